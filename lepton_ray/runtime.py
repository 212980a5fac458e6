"""Connecting to Ray: attach to the cluster a job runs in, or start a local instance."""

from __future__ import annotations

import os
from typing import Any

_LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def ensure_ray(address: str | None = None, *, min_cpus: int = 4, **kwargs: Any) -> None:
    """Initialise Ray once.

    Inside ``ray job submit`` (or with ``RAY_ADDRESS`` set) this attaches to that cluster. Started
    locally, it reserves at least ``min_cpus`` logical CPUs so that training workers and the Ray
    Data preprocessing tasks that feed them can run side by side on a small machine.
    """
    import ray
    from ray.data import DataContext

    # Ray Data's per-operator progress bars flood a job's log (and cost CPU) on every epoch.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}
    kwargs.setdefault("runtime_env", env)
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=True, **kwargs)
        return
    # A local instance has no nodes to be preempted, and its controller can poll its own workers
    # often: Ray Train's defaults (a preemption-watcher actor; a 2 s health check, which is also how
    # late a finished fit returns) are made for clusters.
    for var, value in _LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(var, value)
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, min_cpus),
        include_dashboard=True,
        **kwargs,
    )
