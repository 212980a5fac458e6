"""Pipeline parallelism (lepton_ray.train.stages, .pipeline) against a single-process reference.

The layout arithmetic is tested as pure functions; the distributed step runs for real in 2 and 4
processes on gloo (torch.multiprocessing, no Ray): every step's loss, the final weights, the
gathered checkpoint state and a resume from it must equal one process training the whole model
on the whole global batch. A global batch of 7 rows divides evenly neither over 2 replicas (4 + 3)
nor into 2 micro-batches (padded rows), and the tied head/embedding weights live on different
stages. Tolerance: float32 on CPU, where the only differences are summation order: losses within
1e-5 relative, weights within 1e-5 absolute after 3 AdamW steps.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lepton_ray.config import OptimConfig, ScalingConfig, TrainConfig
from lepton_ray.errors import ConfigError
from lepton_ray.gpt import GPT
from lepton_ray.models import build_model
from lepton_ray.train import batching
from lepton_ray.train.pipeline import PipelineStep
from lepton_ray.train.stages import (
    Layout,
    Stage,
    build_stage,
    check_layout,
    check_model,
    micro_rows,
    split_blocks,
)
from lepton_ray.train.step import build_optimizer, lr_factor
from lepton_ray.train.task import NextToken
from tests.test_fsdp import processes

BATCH, STEPS, SEQ, VOCAB = 7, 3, 8, 32


def tiny_gpt() -> GPT:
    return GPT(vocab_size=VOCAB, block_size=SEQ, n_layer=4, n_head=2, n_embd=16)


def config(grad_clip: float | None = None) -> TrainConfig:
    optim = OptimConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1, grad_clip=grad_clip)
    return TrainConfig(batch_size=BATCH, optim=optim, seed=0)


def blocks(rows: int, seed: int) -> dict[str, torch.Tensor]:
    """A feed's batch of token blocks (uint8, ``SEQ + 1`` tokens each), as text data holds them."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, VOCAB, (rows, 1, SEQ + 1, 1), generator=g).to(torch.uint8)}


def batches() -> list[dict[str, torch.Tensor]]:
    return [blocks(BATCH, seed) for seed in range(1, STEPS + 1)]


TASK = NextToken(torch.device("cpu"), SEQ)


def initial_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return tiny_gpt().state_dict()


# -- pure -----------------------------------------------------------------------------------


def test_layout_puts_stages_on_consecutive_ranks():
    layout = check_layout(6, 3)
    assert layout.replicas == 2
    assert [layout.stage(r) for r in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [layout.replica(r) for r in range(6)] == [0, 0, 0, 1, 1, 1]
    assert layout.pipeline_ranks(1) == [3, 4, 5]
    assert layout.stage_ranks(1) == [1, 4]
    assert layout.tie_ranks() == [0, 2, 3, 5]
    assert check_layout(3, None) == Layout(3, 3)  # default: one stage per worker


def test_layout_refuses_what_does_not_fit():
    with pytest.raises(ConfigError, match="multiple of pipeline_stages \\(2\\); got 3 workers"):
        check_layout(3, 2)
    with pytest.raises(ConfigError, match="4 blocks, fewer than its 5 stages"):
        check_layout(5, 5, blocks=4)


def strategy_check(cfg: TrainConfig) -> None:
    from lepton_ray.train import strategy

    strategy.check(cfg, tiny_gpt(), False)


def test_config_refuses_workers_stages_and_micro_batches_that_do_not_fit():
    def cfg(workers, **kw):
        return TrainConfig(strategy="pipeline", scaling=ScalingConfig(num_workers=workers), **kw)

    assert cfg(4, pipeline_stages=2).pipeline_stages == 2
    assert cfg(3).pipeline_stages is None  # one stage per worker
    with pytest.raises(ConfigError, match="pipeline_stages: 2 does not divide the 3 workers"):
        cfg(3, pipeline_stages=2)
    with pytest.raises(ConfigError, match="pipeline_stages: 2 stages need a fixed worker count"):
        cfg((2, 4), pipeline_stages=2)
    with pytest.raises(ConfigError, match="strategy: 'pipeline' needs a worker count or a"):
        cfg("auto")
    # elastic: one stage per worker, re-cut at each size, checked at the largest
    assert cfg((2, 4)).scaling.num_workers == (2, 4)
    assert cfg((2, 4), pipeline_stages=1).pipeline_stages == 1
    with pytest.raises(ConfigError, match="pipeline_micro_batches: 3 is fewer than the 4 stages"):
        cfg((2, 4), pipeline_micro_batches=3)
    strategy_check(cfg((2, 4)))
    with pytest.raises(ConfigError, match="has 4 blocks, fewer than its 5 stages"):
        strategy_check(cfg((2, 5)))
    with pytest.raises(ConfigError, match="pipeline_micro_batches: 2 is fewer than the 4 stages"):
        cfg(4, pipeline_micro_batches=2)
    assert cfg(4, pipeline_micro_batches=2, pipeline_schedule="gpipe").pipeline_micro_batches == 2


def test_only_a_model_with_embed_blocks_and_logits_is_cut():
    check_model(tiny_gpt())
    with pytest.raises(ConfigError, match="ConvNet has no embed, blocks, logits"):
        check_model(build_model("cnn"))


def test_blocks_and_micro_batches_split_near_equal():
    assert split_blocks(5, 2) == [range(0, 3), range(3, 5)]
    assert split_blocks(4, 4) == [range(i, i + 1) for i in range(4)]
    assert micro_rows(7, 2, 2) == (2, 4)  # 8 rows: one padded
    assert micro_rows(3, 4, 2) == (3, 1)  # never more micro-batches than rows
    assert micro_rows(8, 4, 2) == (4, 2)
    assert micro_rows(5, 4, 2) == (3, 2)  # not (4, 2): no micro-batch of padding alone
    assert micro_rows(64, None, 4) == (8, 8)  # default: two per stage
    assert micro_rows(64, None, 1) == (1, 64)  # one stage: the whole batch at once
    assert micro_rows(64, None, 2, max_rows=10) == (7, 10)  # max_micro_batch caps the rows
    assert micro_rows(64, None, 2, max_rows=40) == (4, 16)


def test_stages_chained_equal_the_whole_model():
    state = initial_state()
    full = tiny_gpt()
    full.load_state_dict(state)
    x, _ = TASK.inputs(batches()[0])
    h = x
    for s in range(3):
        stage = build_stage(tiny_gpt, state, Layout(3, 3), s, torch.device("cpu"))
        assert isinstance(stage, Stage)
        h = stage(h)
    torch.testing.assert_close(h, full(x), rtol=0, atol=0)
    last = build_stage(tiny_gpt, state, Layout(3, 3), 2, torch.device("cpu"))
    assert set(last.state_dict()) == {
        "blocks.3.ln_1.weight",
        "blocks.3.attn.qkv.weight",
        "blocks.3.attn.proj.weight",
        "blocks.3.ln_2.weight",
        "blocks.3.mlp.fc.weight",
        "blocks.3.mlp.proj.weight",
        "ln_f.weight",
        "head.weight",
    }
    torch.testing.assert_close(last.head.weight, state["tok_emb.weight"], rtol=0, atol=0)
    whole = build_stage(tiny_gpt, state, Layout(1, 1), 0, torch.device("cpu"))
    assert whole.head.weight is whole.tok_emb.weight  # one stage: still tied


# -- distributed, against the reference ------------------------------------------------------


def reference(cfg: TrainConfig) -> tuple[list[float], dict[str, torch.Tensor], float]:
    """One process, the whole model, the whole global batch: the losses, the final weights and
    the validation loss after training."""
    model = tiny_gpt()
    model.load_state_dict(initial_state())
    opt = build_optimizer(model, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, STEPS, cfg.optim))
    losses = []
    for batch in batches():
        x, y = TASK.inputs(batch)
        opt.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    x, y = TASK.inputs(blocks(5, 0))
    with torch.no_grad():
        val = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    return losses, model.state_dict(), val


def other_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the ranks past stage 0 are handed: other rows (a pipeline trains stage 0's batch; the
    last stage takes its targets from there, whatever its own feed gave it)."""
    return {"image": batch["image"].flip(0).roll(1, dims=2)}


def replica_rows(layout: Layout, rank: int) -> slice:
    r = layout.replica(rank)
    start = sum(batching.worker_batch(BATCH, layout.replicas, i) for i in range(r))
    return slice(start, start + batching.worker_batch(BATCH, layout.replicas, r))


def train(
    layout: Layout,
    rank: int,
    cfg: TrainConfig,
    schedule: str,
    state=None,
    opt_state=None,
    steps: slice = slice(None),
):
    """The ``steps`` of the run (the LR schedule spans all STEPS) at ``layout``, from ``state``
    and ``opt_state``: (global losses, the step object)."""
    stage = build_stage(tiny_gpt, state or initial_state(), layout, rank, torch.device("cpu"))
    micro = max(2, layout.stages)  # 1F1B needs at least one micro-batch per stage
    step = PipelineStep(
        stage,
        layout,
        cfg,
        rank,
        STEPS,
        factory=tiny_gpt,
        task=TASK,
        schedule=schedule,
        micro_batches=micro,
    )
    if opt_state is not None:
        step.load_state_dict(opt_state)
    losses = []
    for batch in batches()[steps]:
        x, y = TASK.inputs(batch if layout.stage(rank) == 0 else other_rows(batch))
        rows = replica_rows(layout, rank)
        sums = torch.zeros(3, dtype=torch.float64)
        step(x[rows], y[rows], sums)
        dist.all_reduce(sums)
        losses.append(float(sums[0] / sums[2]))
    return losses, step


def tie_copies(step: PipelineStep) -> list:
    """Every rank's copy of the tied weight (None where a rank holds neither), on rank 0."""
    mine = next((p.detach().clone() for p in step.tied.values()), None)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def worker(rank: int, world: int, port: int, cases: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for name, stages, schedule, clip, resume_stages in cases:
            cfg = config(clip)
            layout = Layout(world, stages)
            losses, step = train(layout, rank, cfg, schedule)
            weights = step.full_state_dict()
            val = step.evaluate([blocks(5, 0) if layout.stage(rank) == 0 else blocks(5, 99)])
            ties = tie_copies(step)
            resumed = None
            if resume_stages:  # 2 steps, checkpoint, then step 3 at another layout
                first, half = train(layout, rank, cfg, schedule, steps=slice(0, 2))
                model_state = [half.full_state_dict()]
                opt_state = [half.state_dict()]
                dist.broadcast_object_list(model_state, src=0)
                dist.broadcast_object_list(opt_state, src=0)
                later, _ = train(
                    Layout(world, resume_stages),
                    rank,
                    cfg,
                    schedule,
                    state=model_state[0],
                    opt_state=opt_state[0],
                    steps=slice(2, None),
                )
                resumed = first + later
            results[name] = {
                "losses": losses,
                "weights": weights,
                "ties": ties,
                "resumed": resumed,
                "val": val,
                "copies": 2 * layout.replicas if stages > 1 else 0,  # tied, one stage: one tensor
            }
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(results, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, cases: list, tmp_path) -> dict:
    out = str(tmp_path / "results.pt")
    processes(worker, (world, free_port(), cases, out), world)
    return torch.load(out, weights_only=False)


def check(result: dict, cfg: TrainConfig) -> None:
    losses, weights, val = reference(cfg)
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    assert set(result["weights"]) == set(weights) - {"head.weight"}  # the tied model, once
    for k, v in result["weights"].items():
        torch.testing.assert_close(v, weights[k], rtol=1e-4, atol=1e-5, msg=k)
    copies = [t for t in result["ties"] if t is not None]
    assert len(copies) == result["copies"]
    for t in copies:  # the first stage's embedding and the last stage's head: equal, exactly
        torch.testing.assert_close(t, copies[0], rtol=0, atol=0)
    assert result["val"][0] == pytest.approx(val, rel=1e-5)
    if result["resumed"] is not None:
        assert result["resumed"] == pytest.approx(losses, rel=1e-5)


def test_two_stages_equal_the_reference(tmp_path):
    cases = [
        ("gpipe", 2, "gpipe", None, None),
        ("1f1b-clip", 2, "1f1b", 0.5, None),
        ("one-stage-two-replicas", 1, "1f1b", None, None),
    ]
    results = run(2, cases, tmp_path)
    check(results["gpipe"], config())
    check(results["1f1b-clip"], config(0.5))
    check(results["one-stage-two-replicas"], config())


def test_two_stages_times_two_replicas_equal_the_reference(tmp_path):
    cases = [
        ("gpipe", 2, "gpipe", None, None),
        ("1f1b-resume-at-4-stages", 2, "1f1b", 0.5, 4),
    ]
    results = run(4, cases, tmp_path)
    check(results["gpipe"], config())
    check(results["1f1b-resume-at-4-stages"], config(0.5))
