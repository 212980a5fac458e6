"""Deploy a checkpoint as an autoscaling HTTP endpoint (``serve.run``), or build the application
for ``serve run`` / ``serve deploy`` from a config file."""

from __future__ import annotations

import os
from typing import Any

from lepton_ray import checkpoint
from lepton_ray.config import ServeConfig, from_dict
from lepton_ray.trust import check_spec


def build_app(cfg: ServeConfig | dict[str, Any]) -> Any:
    """The Serve application for ``cfg``; also the builder that ``serving/config.yaml`` names.

    One hop (``cfg.uses_one_hop``, the default): one autoscaled deployment ``<name>-ingress``
    whose replicas take HTTP and run the model, with the model's resources.
    Two hops: an ingress deployment ``<name>-ingress`` (HTTP; fixed ``ingress_replicas``) in front
    of the autoscaled model deployment ``<name>-model`` and, when ``canary_checkpoint`` is set,
    ``<name>-canary`` with the same scaling settings. Both keep the ingress's name, so switching
    between them (adding or ending a canary) is a rolling update of the same HTTP deployment.
    """
    from lepton_ray.serve.app import Ingress, ModelServer

    if isinstance(cfg, dict):
        cfg = from_dict(ServeConfig, cfg)
    if cfg.canary_checkpoint and cfg.store is None:  # the verdict's store, resolved here once
        from dataclasses import replace

        from lepton_ray.storage import default_store

        cfg = replace(cfg, store=default_store())
    max_replicas = (
        cfg.max_replicas_for(*cluster_resources())
        if cfg.max_replicas == "auto"
        else cfg.max_replicas
    )
    autoscaling = {
        "min_replicas": cfg.min_replicas,
        "initial_replicas": max(1, cfg.min_replicas),
        "max_replicas": max_replicas,
        "target_ongoing_requests": cfg.target_ongoing_requests,
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
        "look_back_period_s": cfg.look_back_period_s,
    }
    if (
        cfg.look_back_period_s < 20
    ):  # replicas report load every 10 s by default: at least twice a window
        autoscaling["metrics_interval_s"] = cfg.look_back_period_s / 2

    model_options = {
        "autoscaling_config": autoscaling,
        "ray_actor_options": {
            "num_cpus": cfg.num_cpus,
            "num_gpus": cfg.gpus_per_replica if cfg.use_gpu else 0,
        },
        # Room to queue inside the replica: when every replica is full, Serve's router backs off
        # and retries, which at high concurrency costs far more than waiting in the replica.
        "max_ongoing_requests": max(
            cfg.max_batch_size * 2, int(cfg.target_ongoing_requests * 4), 64
        ),
    }
    token = cfg.auth_token or os.environ.get("LEPTON_SERVE_TOKEN") or None
    if cfg.uses_one_hop:
        return Ingress.options(
            name=f"{cfg.name}-ingress",
            logging_config={"enable_access_log": cfg.access_log},
            **model_options,
        ).bind(cfg, None, None, token)

    def model(checkpoint: str, role: str) -> Any:
        return ModelServer.options(
            name=f"{cfg.name}-{role}",
            logging_config={"enable_access_log": False},  # the ingress logs each HTTP request once
            **model_options,
        ).bind(cfg.model_only(checkpoint))

    canary = model(cfg.canary_checkpoint, "canary") if cfg.canary_checkpoint else None
    return Ingress.options(
        name=f"{cfg.name}-ingress",
        num_replicas=cfg.ingress_replicas,
        ray_actor_options={"num_cpus": 0.1},
        logging_config={"enable_access_log": cfg.access_log},
        # The ingress only decodes and awaits the model: let it hold every request the models can.
        max_ongoing_requests=max(256, 4 * max_replicas * max(cfg.max_batch_size, 64)),
    ).bind(cfg, model(cfg.checkpoint, "model"), canary, token)


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the Ray cluster this process is connected to (its totals: what replicas
    could ever hold, not what other work holds now)."""
    import ray

    total = ray.cluster_resources()
    return total.get("CPU", 0.0), total.get("GPU", 0.0)


def deploy(
    checkpoint_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    haproxy: bool | None = None,
    **kwargs: Any,
) -> str:
    """Deploy ``checkpoint_uri`` with Ray Serve and return the endpoint's base URL.

    ``host``/``port`` apply when this starts Serve; on a cluster where Serve already runs, the
    application joins its HTTP proxy and the URL returned says where that listens.

    ``haproxy``: the HTTP ingress of the Ray instance this starts (default
    ``$LEPTON_SERVE_HAPROXY``, else HAProxy where its binary is present; False: Serve's own
    proxy). It is chosen when Ray starts (:mod:`lepton_ray.serve.ingress`): with Ray already
    running, an explicit choice it cannot honour fails in one line.

    The checkpoint's manifest and metadata are checked here, and its model spec against the
    trusted modules, before anything is deployed, so a bad URI or an untrusted checkpoint fails
    here in one line; the weights are not read on the driver (each replica verifies every
    checksum when it loads them). Other keyword arguments are :class:`ServeConfig` fields.
    """
    from ray import serve

    from lepton_ray.runtime import ensure_ray
    from lepton_ray.serve.ingress import wanted

    cfg = ServeConfig(checkpoint=checkpoint_uri, **kwargs)
    trusted = cfg.trusted_modules
    for uri in filter(None, (cfg.checkpoint, cfg.canary_checkpoint)):
        meta = checkpoint.describe(uri, cfg.endpoint_url, loadable=True).meta  # one weights file
        check_spec(meta.get("model"), trusted)
    ensure_ray(haproxy=wanted(haproxy))  # the argument, else $LEPTON_SERVE_HAPROXY
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix)
    # Serve keeps the HTTP options it was first started with; report where it really listens.
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    return f"http://{host}:{http.port}{cfg.route_prefix.rstrip('/')}"
