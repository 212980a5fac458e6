"""Serving configuration: the checkpoint to serve plus Serve's batching and autoscaling knobs.

``promote.serve`` in a pipeline YAML holds these fields (all but ``checkpoint``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lepton_ray.config.schema import Config, bad, setting
from lepton_ray.config.train import plain_name


def _nonblank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _route(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {value!r}")
    return value


def module_list(value: object) -> object:
    """``"pkg.a,pkg.b"`` -> ``("pkg.a", "pkg.b")`` (a YAML or CLI string is a comma-separated list)."""
    if isinstance(value, str):
        return tuple(name.strip() for name in value.split(",") if name.strip())
    return value


@dataclass(kw_only=True, frozen=True)
class ServeConfig(Config):
    """One model endpoint."""

    checkpoint: str = setting(check=_nonblank)
    """Checkpoint URI (local path or s3://) written by training."""
    endpoint_url: str | None = None
    """S3-compatible endpoint for an s3:// checkpoint."""
    name: str = setting("lepton", check=plain_name)
    """Serve application name."""
    route_prefix: str = setting("/", check=_route)
    """HTTP route prefix of the application."""
    min_replicas: int = setting(1, ge=0)
    """Fewest replicas (0 scales to zero when idle)."""
    max_replicas: int | Literal["auto"] = setting(2, ge=1)
    """Most replicas the autoscaler adds under load, or ``auto``: as many as the cluster's CPUs
    (``num_cpus`` each) and, with ``use_gpu``, its GPUs (``gpus_per_replica`` each) hold, counted
    when the application is built."""
    target_ongoing_requests: float = setting(8.0, gt=0)
    """Autoscaling target of in-flight requests per replica."""
    upscale_delay_s: float = setting(2.0, ge=0)
    """How long load must stay high before adding replicas."""
    downscale_delay_s: float = setting(30.0, ge=0)
    """How long load must stay low before removing replicas."""
    look_back_period_s: float = setting(30.0, gt=0)
    """Window over which Serve averages the load it scales on."""
    max_batch_size: int = setting(64, ge=1)
    """Most requests per model call (``@serve.batch``); 1 disables batching."""
    batch_wait_timeout_s: float = setting(0.0, ge=0)
    """How long a batch waits to fill once its first request is in. 0: take what is queued when the
    model is free; batches still form under load, and a lone request waits for nothing."""
    max_request_bytes: int = setting(8 << 20, ge=1)
    """Largest request body; bigger ones get 413."""
    max_images_per_request: int = setting(256, ge=1)
    """Most images in one request."""
    num_cpus: float = setting(1.0, ge=0)
    """CPUs per replica."""
    use_gpu: bool = False
    """Put each replica's model on a GPU."""
    gpus_per_replica: float = setting(1.0, gt=0, le=1)
    """GPUs each model replica reserves with ``use_gpu`` (a fraction lets replicas share one GPU)."""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """The dtype a replica computes in: ``auto`` is bfloat16 on a GPU (weights cast once at load;
    logits and probabilities still leave in float32) and float32 on a CPU."""
    top_k: int = setting(3, ge=1)
    """How many class probabilities each answer lists."""
    access_log: bool = False
    """Log every HTTP request (Serve's access log) in the ingress. Off by default: the line costs
    26-41% of a request's CPU on 2 cores (issue 18) and floods the deploying terminal."""
    one_hop: bool = True
    """Run the model inside the HTTP ingress replica (proxy -> replica, one hop); False keeps a
    separate autoscaled model deployment behind the ingress (two hops, a few ms more per request;
    scales HTTP and model apart). A canary and ``min_replicas=0`` always use two hops: the canary
    judge routes between two model deployments, and a model scaled to zero needs an ingress that
    stays up (and answers /healthz without waking it)."""
    ingress_replicas: int = setting(1, ge=1)
    """Replicas of the HTTP ingress (auth, limits, decoding, canary routing) when it holds no model
    (two hops); one-hop replicas autoscale with the model settings."""
    auth_token: str | None = setting(None, check=_nonblank, secret=True)
    """Bearer token every route but /healthz and /docs requires (None: ``$LEPTON_SERVE_TOKEN`` where
    the app is built, else no auth). A secret: never written to a file or shown in ``repr``."""
    canary_checkpoint: str | None = None
    """A second checkpoint, on trial against ``checkpoint`` until it is promoted or rolled back."""
    canary_share: float = setting(0.1, ge=0, le=1)
    """Share of predict requests mirrored to the canary during its trial (0-1); stable answers them."""
    canary_min_requests: int = setting(50, ge=1)
    """Mirrored requests the canary answers before the verdict: promote, or roll back if worse."""
    canary_tolerance: float = setting(0.0, ge=0, le=1)
    """How much higher than the stable version's the canary's error rate may be and still be promoted."""
    canary_max_latency_ratio: float = setting(2.0, gt=0)
    """Most the canary's median model-call time may be, in multiples of the stable version's."""
    canary_min_agreement: float = setting(0.9, ge=0, le=1)
    """Least share of mirrored images on which the canary's top-1 class must equal the stable's."""
    store: str | None = None
    """Object-store root (path or s3://bucket/prefix) where the canary's verdict is kept, under
    ``serving/<name>/canary/``; default ``$LEPTON_STORE`` or ~/.lepton_ray/store where the app is
    built. Every replica must reach it."""
    trusted_modules: tuple[str, ...] = setting((), parse=module_list)
    """Module prefixes whose ``nn.Module`` classes a checkpoint may name (e.g. ``mypkg.models``);
    empty: only registered architectures. A checkpoint is data: what it may import is the
    operator's choice, never the checkpoint's."""

    def check(self) -> None:
        if self.max_replicas != "auto" and self.max_replicas < self.min_replicas:
            raise bad(
                "max_replicas",
                f"must be >= min_replicas ({self.min_replicas}), got {self.max_replicas}",
            )

    @property
    def uses_one_hop(self) -> bool:
        """Whether the endpoint runs the model in its HTTP replicas (see ``one_hop``)."""
        return self.one_hop and not self.canary_checkpoint and self.min_replicas > 0

    def replicas_that_fit(self, cpus: float, gpus: float = 0.0) -> int:
        """Model replicas of each model deployment that ``cpus`` and ``gpus`` hold at once.

        Each replica reserves ``num_cpus`` (one counted where it reserves none: a replica still
        uses a CPU) and, with ``use_gpu``, ``gpus_per_replica``. Two hops reserve 0.1 CPU per
        ingress replica first, and a canary's deployment scales like the stable one, so with a
        canary each gets half. E.g. ``num_cpus=1, use_gpu, gpus_per_replica=0.25``: 16 CPUs and
        1 GPU -> min(16, 4) = 4 replicas sharing the GPU; 2 CPUs and 1 GPU -> min(2, 4) = 2.
        Never fewer than ``min_replicas`` (or 1): Serve waits for room for those.
        """
        if not self.uses_one_hop:
            cpus -= 0.1 * self.ingress_replicas
        deployments = 2 if self.canary_checkpoint else 1
        # A hair over each quotient so that 0.3 CPUs / 0.1 each is 3, not 2.9999 -> 2.
        fit = math.floor(cpus / (self.num_cpus or 1.0) / deployments + 1e-9)
        if self.use_gpu:
            fit = min(fit, math.floor(gpus / self.gpus_per_replica / deployments + 1e-9))
        return max(fit, self.min_replicas, 1)

    def max_replicas_for(self, cpus: float, gpus: float = 0.0) -> int:
        """``max_replicas`` as a number: ``auto`` resolved by :meth:`replicas_that_fit`."""
        if self.max_replicas == "auto":
            return self.replicas_that_fit(cpus, gpus)
        return self.max_replicas

    def model_only(self, checkpoint: str | None = None) -> ServeConfig:
        """The fields a model replica uses (so changing auth or canary settings restarts no model)."""
        keep = (
            "endpoint_url",
            "name",
            "max_batch_size",
            "batch_wait_timeout_s",
            "num_cpus",
            "use_gpu",
            "gpus_per_replica",
            "top_k",
            "trusted_modules",
        )
        return ServeConfig(
            checkpoint=checkpoint or self.checkpoint, **{k: getattr(self, k) for k in keep}
        )
