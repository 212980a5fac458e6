"""FSDP (strategy="fsdp") on CPU processes over gloo, without Ray: the sharded step equals one
process training on the whole global batch, and a rank's parameters, gradients and optimizer state
shrink as 1/W (counted from the local shards, not RSS).

Each test spawns 2 or 3 processes (torch.multiprocessing, gloo on 127.0.0.1) that run the real
:class:`lepton_ray.train.step.TrainStep` on a model sharded by :mod:`lepton_ray.train.strategy`.
"""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lepton_ray.config import OptimConfig, ScalingConfig, TrainConfig
from lepton_ray.models import build_model
from lepton_ray.train import batching, strategy, ties
from lepton_ray.train.sharded import rows
from lepton_ray.train.step import TrainStep, is_sharded

D, CLASSES, B, STEPS = 24, 5, 7, 4  # B = 7 on 2 ranks: 4 + 3 rows, loss scales 8/7 and 6/7
TOL = 1e-5  # float32, sums in another order; measured max differences ~1e-7


class Blocks(nn.Module):
    """An MLP of residual blocks: ``blocks`` is what FSDP shards one by one."""

    def __init__(self, width: int = D, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            for _ in range(depth)
        )
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def config(world: int) -> TrainConfig:
    return TrainConfig(
        batch_size=B,
        max_micro_batch=2,  # 4 rows -> 2 + 2, 3 rows -> 2 + 1: accumulation on every rank
        strategy="fsdp",
        optim=OptimConfig(optimizer="adamw", lr=0.01, schedule="constant", grad_clip=0.5),
        scaling=ScalingConfig(num_workers=world),
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, B, D, generator=g), torch.randint(0, CLASSES, (STEPS, B), generator=g)


def my_rows(world: int, rank: int) -> slice:
    start = sum(batching.worker_batch(B, world, r) for r in range(rank))
    return slice(start, start + batching.worker_batch(B, world, rank))


def processes(fn, args: tuple, world: int) -> None:
    """``fn(rank, *args)`` in ``world`` fresh processes, joined. They are forked from one server
    process that imported torch and lepton_ray once for the session ("forkserver"), where "spawn"
    would import them again in each (~3 s a process on 2 cores); the server runs no torch op, so
    its forks start as clean as spawned processes."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["torch.distributed", *(f"lepton_ray.train.{m}" for m in ("step", "pipeline", "sharded"))]
    )
    mp.start_processes(fn, args=args, nprocs=world, join=True, start_method="forkserver")


def spawn(fn, world: int, *args) -> None:
    """``fn(rank, world, rendezvous, *args)`` in ``world`` processes. They meet through a file,
    not a port picked in advance (which another process, e.g. Ray's, may take meanwhile)."""
    with tempfile.TemporaryDirectory() as tmp:
        processes(fn, (world, f"file://{tmp}/rendezvous", *args), world)


def init(rank: int, world: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)


def sharded_model(source: nn.Module) -> nn.Module:
    """What strategy.build_fsdp does: a meta copy sharded, then rank 0's weights broadcast."""
    model = ties.meta_copy(source)
    strategy.shard(model, torch.device("cpu"), mixed_precision=False)
    strategy.broadcast_from_rank0(model, source if dist.get_rank() == 0 else None)
    return model


def _train(rank: int, world: int, rendezvous: str, out: str) -> None:
    init(rank, world, rendezvous)
    torch.manual_seed(0)
    source = Blocks()  # only rank 0's weights count: the others' are a different init
    if rank:
        torch.manual_seed(rank)
        source = Blocks()
    model = sharded_model(source)
    step = TrainStep(model, config(world), world, rank, total_steps=STEPS)
    xs, ys = data()
    losses = []
    for s in range(STEPS):
        sums = torch.zeros(3, dtype=torch.float64)
        step(xs[s, my_rows(world, rank)], ys[s, my_rows(world, rank)], sums)
        dist.all_reduce(sums)
        losses.append(float(sums[0] / sums[2]))
    held = strategy.bytes_held(model, step.optimizer)
    weights = {k: v.full_tensor().tolist() for k, v in model.state_dict().items()}
    if rank == 0:
        record = {"losses": losses, "weights": weights}
    every: list = [None] * world
    dist.all_gather_object(every, held)
    if rank == 0:
        record["held"] = every
        with open(out, "w") as f:
            json.dump(record, f)
    dist.destroy_process_group()


def reference() -> tuple[list[float], dict[str, torch.Tensor], dict[str, int]]:
    """One process, the whole global batch each step: what every world size must reproduce."""
    torch.manual_seed(0)
    model = Blocks()
    step = TrainStep(model, config(1), 1, 0, total_steps=STEPS)
    xs, ys = data()
    losses = []
    for s in range(STEPS):
        sums = torch.zeros(3, dtype=torch.float64)
        step(xs[s], ys[s], sums)
        losses.append(float(sums[0] / sums[2]))
    return losses, model.state_dict(), strategy.bytes_held(model, step.optimizer)


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps sharded over 2 and over 3 processes: {world: results}."""
    out = {}
    for world in (2, 3):
        path = tmp_path_factory.mktemp("fsdp") / f"w{world}.json"
        spawn(_train, world, str(path))
        out[world] = json.loads(path.read_text())
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_step_equals_one_process_on_the_global_batch(runs, ref, world):
    """Micro-batches (set_requires_gradient_sync, in lockstep), uneven shares (loss scale
    W*b_i/B), clipping of the sharded gradients and AdamW over 4 steps: one process's losses and
    weights."""
    got = runs[world]
    ref_losses, ref_weights, _ = ref
    assert got["losses"] == pytest.approx(ref_losses, abs=TOL)
    assert ref_losses[-1] < ref_losses[0]  # it learns
    for name, w in ref_weights.items():
        assert torch.allclose(torch.tensor(got["weights"][name]), w, atol=TOL), name


@pytest.mark.parametrize("world", [2, 3])
def test_bytes_per_rank_fall_as_one_over_w(runs, ref, world):
    """Parameters, gradients and Adam's two moments, counted from each rank's local shards: each
    about 1/W of one process's (n rows split as ceil(n/W): the first ranks may hold a row more)."""
    _, ref_weights, full = ref
    bound = sum(
        rows(w.shape[0], world, 0)[1] * w[0].numel() * w.element_size()
        for w in ref_weights.values()
    )
    held = runs[world]["held"]
    for h in held:
        assert h["params"] <= bound and h["grads"] <= bound
        assert h["optimizer"] <= 2 * bound + 64  # exp_avg, exp_avg_sq (+ replicated step counts)
        assert sum(h.values()) < sum(full.values()) / world * 1.15
    assert sum(h["params"] for h in held) == full["params"]  # every row held once
    assert sum(h["grads"] for h in held) == full["grads"]


def test_a_model_over_one_workers_budget_trains_sharded(runs, ref):
    """A per-worker budget of 40% of what the unsharded model needs (params + grads + AdamW
    state): one process would exceed it; sharded over 3 ranks each holds under it, and trains."""
    _, _, full = ref
    budget = 0.4 * sum(full.values())
    assert sum(full.values()) > budget
    assert all(sum(h.values()) <= budget for h in runs[3]["held"])
    assert runs[3]["losses"][-1] < runs[3]["losses"][0]


def test_shard_units_rule():
    gpt = build_model("gpt", n_layer=3, n_embd=32, n_head=2, block_size=16)
    assert strategy.shard_units(gpt) == list(gpt.blocks)
    resnet = build_model("resnet18")
    assert strategy.shard_units(resnet) == [
        resnet.layer1,
        resnet.layer2,
        resnet.layer3,
        resnet.layer4,
    ]
    assert strategy.shard_units(build_model("cnn")) == []  # the root alone
    mlp = Blocks()
    assert strategy.shard_units(mlp) == list(mlp.blocks)


def test_rows_split_like_torch_chunk():
    for n in (0, 1, 2, 5, 10, 256):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(n).chunk(world) if n else ()
            got = [rows(n, world, r) for r in range(world)]
            want = [(int(c[0]), int(c[-1]) + 1) for c in chunks]
            assert [g for g in got if g[0] < g[1]] == want
            assert sum(b - a for a, b in got) == n


def test_pipeline_is_refused_in_one_line():
    from lepton_ray.config import TrainConfig
    from lepton_ray.errors import ConfigError
    from lepton_ray.models import build_model

    with pytest.raises(ConfigError, match="strategy 'pipeline' needs a model with embed"):
        strategy.check(TrainConfig(strategy="pipeline"), build_model("cnn"), False)


def test_fsdp_ranks_run_micro_batches_in_lockstep():
    # B = 7, W = 3, at most 2 rows: shares 3, 2, 2; DDP runs 2, 1, 1 passes, FSDP 2 on every rank
    ddp = [batching.rank_micro_batches(7, 3, r, 2) for r in range(3)]
    fsdp = [batching.rank_micro_batches(7, 3, r, 2, lockstep=True) for r in range(3)]
    assert ddp == [[2, 1], [2], [2]]
    assert fsdp == [[2, 1], [1, 1], [1, 1]]
    assert [sum(m) for m in fsdp] == [3, 2, 2]
    with pytest.raises(ValueError, match="lockstep"):
        batching.rank_micro_batches(7, 3, 1, 1, lockstep=True)  # 2 rows, 3 passes


def test_meta_copy_keeps_tied_weights():
    gpt = build_model("gpt", n_layer=1, n_embd=16, n_head=2, block_size=8)
    meta = ties.meta_copy(gpt)  # Module.to("meta") alone unties the GPT's head
    assert meta.head.weight is meta.tok_emb.weight and meta.head.weight.is_meta
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in gpt.named_parameters()]
    assert not gpt.head.weight.is_meta  # the original is untouched


def test_resume_under_another_strategy_is_refused_before_ray():
    from lepton_ray.errors import ConfigError

    ordinary = {"files": {}}
    sharded = {"files": {}, "sharded": {"world_size": 2}}
    strategy.check_resume("fsdp", sharded)
    strategy.check_resume("ddp", ordinary)
    strategy.check_resume("pipeline", ordinary)  # its own checks follow on the workers
    with pytest.raises(ConfigError, match="written by strategy 'fsdp'"):
        strategy.check_resume("ddp", sharded)
    with pytest.raises(ConfigError, match="cannot resume with strategy 'fsdp'"):
        strategy.check_resume("fsdp", ordinary)


# --- fsdp on one worker: the model whole, checkpoints sharded (1 -> 2 -> 1 workers) -------------
CKPT_META = {"model": {"name": "blocks"}, "memory_format": "contiguous", "data": {}}


def _resume_leg(rank: int, world: int, rendezvous: str, where: str, first: int, last: int) -> None:
    """Steps ``first..last-1`` of the reference's global batches at ``world`` workers, as an fsdp
    run does: resumed from ``where/ckpt-<first>`` (none when ``first`` is 0), model whole on one
    worker (strategy.build_whole) and sharded on more; then a sharded checkpoint at ``last``."""
    from types import SimpleNamespace

    from lepton_ray import storage
    from lepton_ray.train import sharded
    from lepton_ray.train.checkpointing import Restored

    init(rank, world, rendezvous)
    torch.manual_seed(0 if first == 0 else 100 + rank)  # resumed legs: other weights, overwritten
    restored = Restored()
    if first:
        reader = sharded.Reader(storage.resolve(f"{where}/ckpt-{first}"))
        restored = Restored(state=reader.train_state(), sharded=reader)
    if strategy.shards(world):
        model = sharded_model(Blocks())
        if restored.sharded is not None:
            restored.sharded.load_model(model)
    else:
        model = strategy.build_whole(
            SimpleNamespace(model=Blocks(), meta={}), restored, torch.device("cpu")
        )
    step = TrainStep(model, config(world), world, rank, total_steps=STEPS)
    if first:
        strategy.load_train_state(step, restored, model)
    xs, ys = data()
    losses = []
    for s in range(first, last):
        sums = torch.zeros(3, dtype=torch.float64)
        step(xs[s, my_rows(world, rank)], ys[s, my_rows(world, rank)], sums)
        if world > 1:
            dist.all_reduce(sums)
        losses.append(float(sums[0] / sums[2]))
    sharded.save(
        storage.resolve(f"{where}/ckpt-{last}"), model, step.state_dict(), CKPT_META, rank, world
    )
    sharded_now = is_sharded(model)
    state = {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v
        for k, v in model.state_dict().items()
    }
    if rank == 0:
        with open(f"{where}/leg-{first}.json", "w") as f:
            json.dump(
                {
                    "losses": losses,
                    "sharded": sharded_now,
                    "weights": {k: v.tolist() for k, v in state.items()},
                },
                f,
            )
    dist.destroy_process_group()


def test_fsdp_on_one_worker_trains_whole_and_resumes_sharded_at_other_sizes(ref, tmp_path):
    """An fsdp run on one worker holds its model whole (nothing to shard) yet writes sharded
    checkpoints: 2 steps on 1 worker, the next on 2 (sharded, reading its rows of the 1-worker
    checkpoint), the last on 1 again, equal the reference step by step and in the end weights."""
    where = str(tmp_path)
    for world, (first, last) in ((1, (0, 2)), (2, (2, 3)), (1, (3, 4))):
        spawn(_resume_leg, world, where, first, last)
    legs = [json.loads((tmp_path / f"leg-{f}.json").read_text()) for f in (0, 2, 3)]
    assert [leg["sharded"] for leg in legs] == [False, True, False]
    ref_losses, ref_weights, _ = ref
    assert sum((leg["losses"] for leg in legs), []) == pytest.approx(ref_losses, abs=TOL)
    for name, w in ref_weights.items():
        assert torch.allclose(torch.tensor(legs[-1]["weights"][name]), w, atol=TOL), name
    # the 1-worker checkpoint: parameters and Adam's moments saved as rows, the step count whole
    index = json.loads((tmp_path / "ckpt-2" / "shard-00000-of-00001.json").read_text())["tensors"]
    assert index["/model/head.weight"]["sharded"] is True
    moments = [k for k in index if k.endswith(("/exp_avg", "/exp_avg_sq"))]
    assert moments and all(index[k]["sharded"] for k in moments)
    steps = [k for k in index if k.endswith("/step")]
    assert steps and not any(index[k]["sharded"] for k in steps)
