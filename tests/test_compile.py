"""``compile=True``: the compiled step trains exactly as the eager one.

The step compiles the forward together with the loss (``step.forward_fn``) and FSDP compiles unit
by unit (``strategy.shard``). Inductor's C++ code generation takes ~25 s on 2 cores, so these
tests compile with ``aot_eager``: Dynamo's tracing and AOTAutograd's joint graph, the parts that
decide what is computed, without generating kernels."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lepton_ray.config import TrainConfig
from lepton_ray.models import build_model
from lepton_ray.train.step import TrainStep
from lepton_ray.train.task import NextToken


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    yield
    torch._dynamo.reset()


def _train(model_fn, batches, task, compile: bool) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(0)
    module = model_fn()
    model = torch.compile(module) if compile else module  # what strategy.build does
    cfg = TrainConfig(batch_size=len(batches[0][0]), max_micro_batch=3, compile=compile)
    step = TrainStep(model, cfg, 1, 0, total_steps=len(batches), task=task)
    # the step's own compiled forward + loss, not the compiled module's forward alone
    assert hasattr(step.forward, "_torchdynamo_orig_callable") == compile
    losses = []
    for x, y in batches:
        sums = torch.zeros(3, dtype=torch.float64)
        step(x, y, sums)
        losses.append(float(sums[0] / sums[2]))
    return losses, [p.detach().clone() for p in module.parameters()]


def _assert_same(a, b) -> None:
    assert a[0] == pytest.approx(b[0], abs=1e-5)
    assert max((p - q).abs().max().item() for p, q in zip(a[1], b[1], strict=True)) < 1e-5


def test_compiled_classification_step_equals_eager(aot_eager):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(7, 12, generator=g), torch.randint(0, 4, (7,), generator=g))] * 3

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 4))

    eager = _train(mlp, batches, None, compile=False)
    compiled = _train(mlp, batches, None, compile=True)
    _assert_same(compiled, eager)


def test_compiled_next_token_step_equals_eager(aot_eager):
    """The GPT's step, loss and correct count compiled with the forward."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (3, 6, 17), generator=g)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    task = NextToken(torch.device("cpu"), 16)

    def gpt() -> nn.Module:
        return build_model("gpt", vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16)

    eager = _train(gpt, batches, task, compile=False)
    compiled = _train(gpt, batches, task, compile=True)
    _assert_same(compiled, eager)
