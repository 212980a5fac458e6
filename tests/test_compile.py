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


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of one process, this one (what Ray Train gives a single worker)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_compiled_one_stage_pipeline_step_equals_eager(aot_eager, one_process_group):
    """strategy="pipeline" on one stage has nothing to pipeline: its forward and loss compile as
    one (its blocks are not compiled one by one) and train as the eager stage does."""
    from lepton_ray.train.pipeline import PipelineStep
    from lepton_ray.train.stages import Layout, build_stage

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (3, 6, 17), generator=g)
    task = NextToken(torch.device("cpu"), 16)

    def gpt() -> nn.Module:
        torch.manual_seed(0)
        return build_model("gpt", vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16)

    def train(compile: bool) -> tuple[list[float], list[torch.Tensor]]:
        cfg = TrainConfig(batch_size=6, max_micro_batch=3, strategy="pipeline", compile=compile)
        layout = Layout(1, 1)
        stage = build_stage(
            gpt, gpt().state_dict(), layout, 0, torch.device("cpu"), compile=compile
        )
        assert not any(
            hasattr(b, "_compiled_call_impl") and b._compiled_call_impl
            for b in stage.blocks.values()
        )
        step = PipelineStep(stage, layout, cfg, 0, 3, factory=gpt, task=task)
        assert hasattr(step.forward, "_torchdynamo_orig_callable") == compile
        losses = []
        for t in tokens:
            sums = torch.zeros(3, dtype=torch.float64)
            step(t[:, :-1], t[:, 1:], sums)
            losses.append(float(sums[0] / sums[2]))
        return losses, [p.detach().clone() for p in stage.parameters()]

    _assert_same(train(compile=True), train(compile=False))
