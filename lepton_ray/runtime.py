"""Connecting to Ray: attach to the cluster a job runs in, or start a local instance."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from lepton_ray import console

_LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
}


def ensure_ray(
    address: str | None = None,
    *,
    min_cpus: int = 4,
    haproxy: bool | None = None,
    **kwargs: Any,
) -> None:
    """Initialise Ray once.

    Inside ``ray job submit`` (or with ``RAY_ADDRESS`` set) this attaches to that cluster. Started
    locally, it reserves at least ``min_cpus`` logical CPUs so that training workers and the Ray
    Data preprocessing tasks that feed them can run side by side on a small machine, and every
    one of its processes listens on 127.0.0.1 only (GCS, raylet, object manager, workers,
    dashboard, metrics): nothing on the network can reach it. Its Serve HTTP ingress is HAProxy
    where a binary is present, unless ``haproxy=False`` or ``$LEPTON_SERVE_HAPROXY=0`` says
    Serve's own proxy (:func:`lepton_ray.serve.ingress.choose_ingress`); with Ray already running
    in this process, an explicit ``haproxy`` it cannot honour fails in one line. A cluster started
    by ``ray start`` keeps what its own environment says.
    """
    import ray
    from ray.data import DataContext

    # Ray Data's per-operator progress bars flood a job's log (and cost CPU) on every epoch.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        if haproxy is not None:  # an explicit ingress choice the running instance cannot honour
            from lepton_ray.serve.ingress import check_running_ingress

            check_running_ingress(haproxy)
        return
    # Ray's output stays in its session's log folder unless LEPTON_VERBOSE=1 (lepton_ray.console).
    kwargs.setdefault("log_to_driver", console.quiet_ray())
    env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}
    kwargs.setdefault("runtime_env", env)
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        if "://" not in address and _host(address) in (LOOPBACK, "localhost"):
            # A cluster on loopback (a local instance of another process, a test's head): this
            # driver's node is 127.0.0.1 too, else Ray looks for a raylet on the machine's
            # routable address and waits for it forever.
            kwargs.setdefault("_node_ip_address", LOOPBACK)
            with _loopback_node():
                ray.init(address=address, **kwargs)
            return
        ray.init(address=address, **kwargs)
        return
    # A local instance has no nodes to be preempted, and its controller can poll its own workers
    # often: Ray Train's defaults (a preemption-watcher actor; a 2 s health check, which is also how
    # late a finished fit returns, and how long each report after the first waits) are made for
    # clusters. Every 0.1 s rather than 0.5, a small fit's teardown on 2 CPUs went from 1.7 to 1.2
    # s (benchmarks.fixed_cost, median of 4 fits each) and training ran as fast.
    for var, value in _LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(var, value)
    from lepton_ray.serve.ingress import choose_ingress

    choose_ingress(haproxy)
    kwargs.setdefault("_node_ip_address", LOOPBACK)
    kwargs.setdefault("dashboard_host", LOOPBACK)
    with _loopback_node():
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, min_cpus),
            include_dashboard=True,
            **kwargs,
        )


LOOPBACK = "127.0.0.1"


def _host(address: str) -> str:
    """The host of a GCS address (``127.0.0.1:6379``) or URL (``ray://host:10001``)."""
    return address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Let a local instance keep 127.0.0.1 as its node address, so that nothing it runs listens
    on another interface: a local instance is for this machine alone.

    Ray's GCS, raylet, object manager and worker gRPC servers listen on 127.0.0.1 only when the
    node address is exactly 127.0.0.1, else on every interface; but ``ray.init`` replaces a
    loopback ``_node_ip_address`` with the machine's routable address unless Ray runs in its
    single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when Ray is imported).
    This switches that mode on while the instance starts; afterwards Ray takes the node address
    from the running node. Checked from the listening sockets in tests/test_runtime_ports.py.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def running_cluster_address() -> str | None:
    """The cluster a command may attach to: ``$RAY_ADDRESS``, else the one ``ray start`` last
    started on this machine (Ray's ``ray_current_cluster`` file); None when there is none.

    Ray instances that a ``ray.init()`` started inside some other process do not count: they end
    with that process.
    """
    from ray._private.utils import read_ray_address

    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        return address
    return read_ray_address(None) or None
