"""Serving configuration: the checkpoint to serve plus Serve's batching and autoscaling knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton_ray.errors import ConfigError


@dataclass(kw_only=True, frozen=True)
class ServeConfig:
    """One model endpoint."""

    checkpoint: str
    """Checkpoint URI (local path or s3://) written by training."""
    endpoint_url: str | None = None
    """S3-compatible endpoint for an s3:// checkpoint."""
    name: str = "lepton"
    """Serve application name."""
    route_prefix: str = "/"
    """HTTP route prefix of the application."""
    min_replicas: int = 1
    """Fewest replicas (0 scales to zero when idle)."""
    max_replicas: int = 2
    """Most replicas."""
    target_ongoing_requests: float = 8.0
    """Autoscaling target of in-flight requests per replica."""
    upscale_delay_s: float = 2.0
    """How long load must stay high before adding replicas."""
    downscale_delay_s: float = 30.0
    """How long load must stay low before removing replicas."""
    look_back_period_s: float = 30.0
    """Window over which Serve averages the load it scales on."""
    max_batch_size: int = 64
    """Most requests per model call (``@serve.batch``); 1 disables batching."""
    batch_wait_timeout_s: float = 0.0
    """How long a batch waits to fill once its first request is in. 0: take what is queued when the
    model is free; batches still form under load, and a lone request waits for nothing."""
    max_request_bytes: int = 8 << 20
    """Largest request body; bigger ones get 413."""
    max_images_per_request: int = 256
    """Most images in one request."""
    num_cpus: float = 1.0
    """CPUs per replica."""
    use_gpu: bool = False
    """Put each replica's model on a GPU."""
    gpus_per_replica: float = 1.0
    """GPUs each model replica reserves with ``use_gpu`` (a fraction lets replicas share one GPU)."""
    top_k: int = 3
    """How many class probabilities each answer lists."""
    access_log: bool = True
    """Log every HTTP request (Serve's access log) in the ingress."""
    one_hop: bool = True
    """Run the model inside the HTTP ingress replica (proxy -> replica, one hop); False keeps a
    separate autoscaled model deployment behind the ingress (two hops, a few ms more per request;
    scales HTTP and model apart). A canary and ``min_replicas=0`` always use two hops: the canary
    judge routes between two model deployments, and a model scaled to zero needs an ingress that
    stays up (and answers /healthz without waking it)."""
    ingress_replicas: int = 1
    """Replicas of the HTTP ingress (auth, limits, decoding, canary routing) when it holds no model
    (two hops); one-hop replicas autoscale with the model settings."""
    auth_token: str | None = field(default=None, repr=False)
    """Bearer token every route but /healthz and /docs requires (None: ``$LEPTON_SERVE_TOKEN`` where the
    app is built, else no auth)."""
    canary_checkpoint: str | None = None
    """A second checkpoint that gets ``canary_share`` of the traffic until it is promoted or rolled back."""
    canary_share: float = 0.1
    """Share of predict requests sent to the canary (0-1)."""
    canary_min_requests: int = 50
    """Canary requests to see before the verdict: promote, or roll back if its error rate is higher."""
    canary_tolerance: float = 0.0
    """How much higher than the stable version's the canary's error rate may be and still be promoted."""

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("ServeConfig.checkpoint is required")
        if self.min_replicas < 0:
            raise ConfigError(f"ServeConfig.min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(
                f"ServeConfig.max_replicas must be >= max(1, min_replicas), got {self.max_replicas}"
            )
        for name in (
            "max_batch_size",
            "max_request_bytes",
            "max_images_per_request",
            "top_k",
            "ingress_replicas",
            "canary_min_requests",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.target_ongoing_requests <= 0:
            raise ConfigError(
                f"ServeConfig.target_ongoing_requests must be > 0, got {self.target_ongoing_requests}"
            )
        if not 0.0 < self.gpus_per_replica <= 1.0:
            raise ConfigError(
                f"ServeConfig.gpus_per_replica must be in (0, 1], got {self.gpus_per_replica}"
            )
        if not 0.0 <= self.canary_share <= 1.0:
            raise ConfigError(
                f"ServeConfig.canary_share must be in [0, 1], got {self.canary_share}"
            )
        if self.auth_token is not None and not self.auth_token.strip():
            raise ConfigError("ServeConfig.auth_token must not be blank")

    @property
    def uses_one_hop(self) -> bool:
        """Whether the endpoint runs the model in its HTTP replicas (see ``one_hop``)."""
        return self.one_hop and not self.canary_checkpoint and self.min_replicas > 0

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
        )
        return ServeConfig(
            checkpoint=checkpoint or self.checkpoint, **{k: getattr(self, k) for k in keep}
        )
