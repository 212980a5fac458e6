"""The workers' early import (lepton_ray.train.warmup): sympy on a thread of its own while the main
thread imports torch._dynamo and trains, and the backend that asks for it before the process
group is set up."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ray.train.torch import TorchConfig

from lepton_ray.train import warmup

RACE = """
import sys, threading
from lepton_ray.train.warmup import warm_imports
warm_imports()
import torch
import torch._dynamo  # imports sympy too: meets the thread's import or waits for it
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model(torch.ones(3, 4)).sum().backward()
opt.step()
opt.zero_grad()
for t in threading.enumerate():
    if t.name == "lepton-warm-imports":
        t.join(60)
import sympy
assert sys.modules["sympy"] is sympy and sympy.Symbol("x") + 1 - 1 == sympy.Symbol("x")
print("ok")
"""


def test_sympy_warmed_on_a_thread_while_the_main_thread_imports_dynamo_and_steps():
    for _ in range(3):  # fresh processes: the two imports overlap differently each time
        out = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_failing_warm_import_is_left_to_the_main_thread():
    warmup.warm_imports(("lepton_ray_no_such_module",))  # no exception, nothing raised here


class _Stop(Exception):
    pass


class _Group:
    """A worker group that records what a backend asks of it, and stops it at its first
    synchronous call (the process group's set-up, not wanted here)."""

    def __init__(self):
        self.calls: list[str] = []

    def execute_async(self, fn, *args, **kwargs):
        self.calls.append(f"async {fn.__name__}")
        return []

    def _stop(self, *args, **kwargs):
        self.calls.append("set-up")
        raise _Stop

    execute = execute_single = execute_single_async = _stop

    def __len__(self):
        return 1


def test_the_backend_asks_for_the_warm_up_before_the_process_group():
    config = warmup.WarmTorchConfig(backend="gloo")
    group = _Group()
    with pytest.raises(_Stop):
        config.backend_cls().on_start(group, config)
    assert group.calls == ["async warm_imports", "set-up"]
    assert isinstance(config, TorchConfig)  # Ray Train takes it where it takes its own
