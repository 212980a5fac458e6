"""Ray Train's torch backend, set up without importing torch in Ray Train's controller.

Every ``fit()`` starts a new controller process before any worker, and Ray's ``TorchConfig``
lives in ``ray.train.torch.config``, which imports torch at the top: unpickling the config cost
the controller ``import torch`` (2.9-3.5 s on the 2-core machine, measured with
``import ray.train.torch.config`` after the controller's own modules) before it asked for a
single worker. The workers import torch anyway.

:class:`TorchBackendConfig` has ``TorchConfig``'s fields (``backend``, ``timeout_s``) and its
backend does what Ray's ``_TorchBackend`` does for Ray Train V2's worker group with the ``env://``
rendezvous: choose NCCL when the workers have GPUs and gloo otherwise (unless told), take rank 0's
address and a free port as ``MASTER_ADDR``/``MASTER_PORT``, set the workers' torch.distributed
variables, start the process group on every rank, and shut it down. The functions that touch
torch are Ray's own (``_set_torch_distributed_env_vars``, ``_setup_torch_process_group``,
``_shutdown_torch``), looked up by name on the workers (:func:`_on_worker`). The backend also
asks each worker, without waiting, to import sympy on a thread of its own
(:func:`lepton_ray.train.warmup.warm_imports`).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig

from lepton_ray.train.warmup import warm_imports

log = logging.getLogger(__name__)

RAY_TORCH = "ray.train.torch.config"  # Ray's torch backend module: imported on workers only
WORKER_MARKS: dict[str, float] = {}
"""On a worker: when its torch set-up started (``torch_setup_started``: Ray's worker actor is up),
when its device was found (``device_ready``: Ray's ``get_device``, the first CUDA call on a GPU
worker) and when its process group was ready (``process_group_ready``), as ``time.time()``;
:class:`lepton_ray.train.timeline.WorkerTimeline` takes them (the training function runs in the
same process)."""
_MARK_BEFORE = {"_set_torch_distributed_env_vars": "torch_setup_started"}
_MARK_AFTER = {
    "_set_torch_distributed_env_vars": "device_ready",
    "_setup_torch_process_group": "process_group_ready",
}


def _on_worker(name: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``ray.train.torch.config.<name>`` on a worker (importing it imports torch there), with
    the :data:`WORKER_MARKS` of the set-up's first and last calls."""
    if name in _MARK_BEFORE:
        WORKER_MARKS.setdefault(_MARK_BEFORE[name], time.time())
    out = getattr(importlib.import_module(RAY_TORCH), name)(*args, **kwargs)
    if name in _MARK_AFTER:
        WORKER_MARKS.setdefault(_MARK_AFTER[name], time.time())
    return out


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def process_group_backend(configured: str | None, resources: dict[str, float]) -> str:
    """The process group's backend: the configured one, else NCCL when each worker has a GPU and
    gloo when not (as Ray's ``_TorchBackend`` chooses)."""
    if configured:
        return configured
    return "nccl" if resources.get("GPU", 0) > 0 else "gloo"


class _TorchBackend(Backend):
    share_cuda_visible_devices = True  # as Ray's: a node's workers see each other's GPUs (NCCL)

    def on_start(self, worker_group: Any, backend_config: TorchBackendConfig) -> None:
        worker_group.execute_async(warm_imports)  # not waited for: each worker's own thread
        backend = process_group_backend(
            backend_config.backend, worker_group.get_resources_per_worker()
        )
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr, port)
        worker_group.execute(_on_worker, "_set_torch_distributed_env_vars")
        world = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _on_worker,
                    "_setup_torch_process_group",
                    backend=backend,
                    world_rank=rank,
                    world_size=world,
                    init_method="env://",
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(world)
            ]
        )

    def on_shutdown(self, worker_group: Any, backend_config: TorchBackendConfig) -> None:
        from ray._private.ray_constants import env_integer
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        done = worker_group.execute_async(
            _on_worker, "_shutdown_torch", destroy_process_group=len(worker_group) > 1
        )
        timeout = env_integer(
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
        )
        try:
            ray.get(done, timeout=timeout)
        except GetTimeoutError:
            log.warning("the torch process group's shutdown timed out after %s s", timeout)


@dataclass
class TorchBackendConfig(BackendConfig):
    """Ray's ``TorchConfig`` (``torch_config=`` of ``TorchTrainer``) with the ``env://``
    rendezvous, importable without torch. ``backend``: ``nccl``, ``gloo`` or None (chosen by
    whether the workers have GPUs); ``timeout_s``: the process group's collective timeout."""

    backend: str | None = None
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[Backend]:
        return _TorchBackend

    @property
    def train_func_context(self) -> Any:
        # Read by the driver (which has torch) when it wraps the training function: each worker
        # then sets its CUDA device before the function runs, as with Ray's TorchConfig.
        return importlib.import_module(RAY_TORCH).TorchConfigContextManager

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}
