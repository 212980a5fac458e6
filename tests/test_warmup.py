"""The workers' early import (lepton_ray.train.warmup): sympy on a thread of its own while the main
thread imports torch._dynamo and trains. The backend that asks for it: tests/test_backend.py."""

from __future__ import annotations

import subprocess
import sys

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
