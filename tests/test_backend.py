"""Ray Train's torch backend without torch in the controller (lepton_ray.train.backend): what the
controller unpickles (the backend's config, and lepton_ray.train.ray_trainer's callback) imports no
torch, and the backend sets the process group up as Ray's does.
Pure (a recording worker group); real process groups: every fit in the Ray tier uses it."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time

import pytest

from lepton_ray.train.backend import TorchBackendConfig, process_group_backend

CONTROLLER = """
import pickle, sys
import ray.train.v2._internal.execution.controller.controller  # the controller's own modules
config, callback = pickle.loads(bytes.fromhex(sys.argv[1]))
assert type(callback).__name__ == "DataContextCallback"
backend = config.backend_cls()
assert config.framework.value == "torch" and config.to_dict()["backend"] == "gloo"
print("torch" in sys.modules)
"""


def test_the_controller_unpickles_the_config_and_builds_the_backend_without_importing_torch():
    from lepton_ray.train.ray_trainer import DataContextCallback

    blob = pickle.dumps((TorchBackendConfig(backend="gloo"), DataContextCallback())).hex()
    out = subprocess.run(
        [sys.executable, "-c", CONTROLLER, blob], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("configured", "resources", "chosen"),
    [
        (None, {"CPU": 1}, "gloo"),
        (None, {"CPU": 1, "GPU": 1}, "nccl"),
        (None, {"GPU": 0.5}, "nccl"),
        ("gloo", {"GPU": 1}, "gloo"),
    ],
)
def test_the_process_group_backend_is_nccl_on_gpus_unless_configured(configured, resources, chosen):
    assert process_group_backend(configured, resources) == chosen


class _Group:
    """A worker group of ``n`` workers that records what a backend asks of it."""

    def __init__(self, n: int, resources: dict[str, float]):
        self.n, self.resources, self.calls = n, resources, []

    def _name(self, fn, args) -> str:
        return args[0] if fn.__name__ == "_on_worker" else fn.__name__

    def execute_async(self, fn, *args, **kwargs):
        self.calls.append(("async", self._name(fn, args), args, kwargs))
        return []

    def execute(self, fn, *args, **kwargs):
        self.calls.append(("all", self._name(fn, args), args, kwargs))
        return [None] * self.n

    def execute_single(self, rank, fn, *args, **kwargs):
        self.calls.append((rank, self._name(fn, args), args, kwargs))
        return ("10.0.0.7", 29511)

    def execute_single_async(self, rank, fn, *args, **kwargs):
        self.calls.append((rank, self._name(fn, args), args, kwargs))
        return []  # ray.get([[]...]) is not called on a real ref here

    def get_resources_per_worker(self):
        return self.resources

    def __len__(self):
        return self.n


def test_on_start_warms_then_rendezvous_at_rank_0_and_starts_every_rank(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda refs, **kw: refs)
    config = TorchBackendConfig(timeout_s=77)
    group = _Group(3, {"CPU": 1, "GPU": 1})
    config.backend_cls().on_start(group, config)
    steps = [(who, name) for who, name, _, _ in group.calls]
    assert steps == [
        ("async", "warm_imports"),  # first, and not waited for
        (0, "get_address_and_port"),
        ("all", "_set_master"),
        ("all", "_set_torch_distributed_env_vars"),
        (0, "_setup_torch_process_group"),
        (1, "_setup_torch_process_group"),
        (2, "_setup_torch_process_group"),
    ]
    assert group.calls[2][2] == ("10.0.0.7", 29511)
    for rank, call in enumerate(group.calls[4:]):
        assert call[3] == dict(
            backend="nccl", world_rank=rank, world_size=3, init_method="env://", timeout_s=77
        )


def test_on_shutdown_destroys_the_process_group_only_when_there_are_several_ranks(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lambda refs, **kw: refs)
    for n, destroy in ((1, False), (2, True)):
        group = _Group(n, {"CPU": 1})
        TorchBackendConfig().backend_cls().on_shutdown(group, TorchBackendConfig())
        assert group.calls == [
            ("async", "_shutdown_torch", ("_shutdown_torch",), {"destroy_process_group": destroy})
        ]


def test_the_worker_side_calls_are_rays_own_functions():
    """The names the backend sends exist in Ray's torch backend (a Ray upgrade that renames them
    fails here, not in a fit)."""
    import ray.train.torch.config as ray_torch

    for name in (
        "_set_torch_distributed_env_vars",
        "_setup_torch_process_group",
        "_shutdown_torch",
    ):
        assert callable(getattr(ray_torch, name))
    assert TorchBackendConfig().train_func_context is ray_torch.TorchConfigContextManager
    assert TorchBackendConfig().backend_cls.share_cuda_visible_devices


def test_the_worker_marks_its_torch_set_ups_start_its_device_and_its_process_group(
    monkeypatch,
):
    import types

    from lepton_ray.train import backend

    calls = []
    fake = types.SimpleNamespace(
        _set_torch_distributed_env_vars=lambda: calls.append(("env", time.time())),
        _setup_torch_process_group=lambda **kw: calls.append(("pg", time.time())),
        _shutdown_torch=lambda **kw: calls.append(("down", time.time())),
    )
    monkeypatch.setattr(backend.importlib, "import_module", lambda name: fake)
    monkeypatch.setattr(backend, "WORKER_MARKS", {})
    backend._on_worker("_set_torch_distributed_env_vars")
    backend._on_worker("_setup_torch_process_group", world_rank=0)
    marks = dict(backend.WORKER_MARKS)
    assert set(marks) == {"torch_setup_started", "device_ready", "process_group_ready"}
    assert (
        marks["torch_setup_started"]
        <= calls[0][1]
        <= marks["device_ready"]
        <= calls[1][1]
        <= marks["process_group_ready"]
    )
    backend._on_worker("_set_torch_distributed_env_vars")  # a second call keeps the first marks
    backend._on_worker("_shutdown_torch")
    assert backend.WORKER_MARKS == marks
