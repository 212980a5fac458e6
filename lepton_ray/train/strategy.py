"""How a worker holds the model: the one place that knows the strategies.

``strategy="ddp"`` (the default): every worker holds the whole model, its gradients and optimizer
state; Ray Train's ``prepare_model`` wraps it in DDP, which averages gradients over the ``W``
workers. ``strategy="fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``) over a 1-D
``DeviceMesh`` of the process group Ray Train set up; each block (:func:`shard_units`) and then the
root is one unit whose parameters, gradients and optimizer state are sharded along dim 0, so a
worker holds about ``1/W`` of each (on one worker nothing is sharded: :func:`shards`). Its
reduce-scatter averages gradients over ``W`` as DDP's all-reduce does (checked against a single
process in ``tests/test_fsdp.py``), so the loop's loss scale ``W * b_i / B``
(:mod:`lepton_ray.train.batching`) means the same under both.

An FSDP model is built on the meta device from its spec (no weights allocated), sharded,
materialised on the worker's device, then filled from rank 0: rank 0 alone holds the initial
weights (fetched from the object store, not shipped to every worker) and broadcasts each tensor
once; every rank keeps its rows. A model whose spec names no registered architecture is shipped
to every worker as under DDP, then sharded the same way. Resuming reads each rank's rows of a
sharded checkpoint (:mod:`lepton_ray.train.sharded`), at any world size.

``strategy="pipeline"``: each worker holds a stage, some of the model's blocks
(:mod:`lepton_ray.train.stages`); its step (:func:`make_step`,
:mod:`lepton_ray.train.pipeline`) has the same interface as ddp's, its feed reads its replica's
rows (:func:`data_shard`), validation runs through the stages (:func:`validate`) and checkpoints
hold the whole model gathered to rank 0 (:func:`checkpoint_model`), an ordinary checkpoint.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from lepton_ray.errors import CheckpointError, ConfigError
from lepton_ray.models import from_spec, memory_format, unwrap
from lepton_ray.train import ties

if TYPE_CHECKING:
    from lepton_ray.config import TrainConfig
    from lepton_ray.train.checkpointing import Restored
    from lepton_ray.train.loop import RunSpec

log = logging.getLogger(__name__)
STRATEGIES = ("ddp", "fsdp", "pipeline")


def check(cfg: TrainConfig, model: nn.Module, ray_dataset: bool) -> None:
    """Refuse, on the driver, in one line, what ``cfg.strategy`` cannot run (``ray_dataset``: the
    training set is a user's Ray Dataset, which Ray Train splits across all workers)."""
    if cfg.strategy != "pipeline":
        return
    from lepton_ray.train import stages

    stages.check_model(model)
    workers = cfg.scaling.num_workers  # an elastic range: its largest count (config.check_pipeline)
    most = workers if isinstance(workers, int) else workers[1]
    stages.check_layout(most, cfg.pipeline_stages, len(model.blocks))
    if ray_dataset:
        raise ConfigError(
            "strategy 'pipeline' needs a prepared dataset (a URI, DatasetInfo or torch Dataset): "
            "every stage of a pipeline reads the same rows, which a Ray Dataset split by Ray "
            "Train cannot give"
        )


def check_resume(strategy: str, manifest: dict[str, Any]) -> None:
    """Refuse, on the driver, to resume a run from a checkpoint ``strategy`` cannot read: a
    sharded one (fsdp) under another strategy, or an ordinary one under fsdp."""
    from lepton_ray import checkpoint

    sharded = checkpoint.is_sharded(manifest)
    if sharded != (strategy == "fsdp"):
        wrote = "fsdp" if sharded else "ddp or pipeline"
        raise ConfigError(
            f"cannot resume with strategy '{strategy}': the run's last checkpoint was written by "
            f"strategy '{wrote}' (resume with that strategy)"
        )


def build(
    spec: RunSpec, restored: Restored, device: torch.device
) -> tuple[nn.Module, torch.memory_format]:
    """The worker's model, restored and wrapped for ``spec.cfg.strategy``, and its input layout."""
    layout = memory_format(spec.meta)  # channels-last for convnets: faster on CPUs and GPUs alike
    if spec.cfg.strategy == "pipeline":  # compiled block by block, or one stage whole, if asked
        return build_pipeline(spec, restored, device), layout
    if spec.cfg.strategy == "fsdp" and shards(dist.get_world_size()):
        return build_fsdp(spec, restored, device), layout  # compiled unit by unit (see shard)
    if spec.cfg.strategy == "fsdp":
        model = build_whole(spec, restored, device).to(memory_format=layout)
    else:
        if restored.sharded is not None:
            raise CheckpointError(
                "the checkpoint to resume is sharded (strategy 'fsdp'): resume with strategy='fsdp'"
            )
        import ray.train.torch

        model = copy.deepcopy(spec.model)
        if restored.weights is not None:
            model.load_state_dict(restored.weights)
        model = ray.train.torch.prepare_model(model.to(memory_format=layout))
    if spec.cfg.compile:
        model = torch.compile(model)
    return model, layout


def shards(world: int) -> bool:
    """Whether ``strategy="fsdp"`` shards the model at this world size: not on one worker,
    where every shard would be the whole model and FSDP's gathers, hooks and DTensor optimizer
    step would cost time for nothing (torchtitan likewise applies ``fully_shard`` only when its
    shard dimension is over 1). The run stays an fsdp run: its model is built and initialised as
    on more workers (:func:`build_whole`), and its checkpoints are sharded ones
    (:mod:`lepton_ray.train.sharded`), so it resumes or grows onto more workers sharded."""
    return world > 1


def build_whole(spec: RunSpec, restored: Restored, device: torch.device) -> nn.Module:
    """An fsdp run's model on one worker (:func:`shards`): the initial weights every fsdp run
    starts from, or the sharded checkpoint resumed, read whole."""
    _refuse_unsharded(restored)
    model = (initial_model(spec) if spec.model is None else copy.deepcopy(spec.model)).to(device)
    if restored.sharded is not None:
        restored.sharded.load_model(model)
    log.info("FSDP on one worker: nothing to shard; the model trains whole")
    return model


def initial_model(spec: RunSpec) -> nn.Module:
    """A registered architecture built from its spec on the CPU and filled with the run's initial
    weights (from the object store; persistent or not, every buffer too). Its init draws random
    numbers: forked, so this rank's stream stays the one DDP would have, e.g. for dropout."""
    import ray

    with torch.random.fork_rng(devices=[]):
        model = from_spec(spec.meta["model"])
    model.load_state_dict(ray.get(spec.init_weights))
    return model


def _refuse_unsharded(restored: Restored) -> None:
    if restored.weights is not None:
        raise CheckpointError(
            "the checkpoint to resume is not sharded (strategy 'ddp'): resume with strategy='ddp'"
        )


def build_fsdp(spec: RunSpec, restored: Restored, device: torch.device) -> nn.Module:
    _refuse_unsharded(restored)
    if spec.model is None:  # a registered architecture: built from its spec, no weights yet
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = from_spec(spec.meta["model"])
        source = initial_model(spec) if dist.get_rank() == 0 else None  # rank 0 alone
    else:
        log.info(
            "FSDP: %s has no registered spec; every worker received it whole", type(spec.model)
        )
        source = spec.model
        model = ties.meta_copy(spec.model)
    shard(model, device, mixed_precision=device.type == "cuda", compile=spec.cfg.compile)
    broadcast_from_rank0(model, source)
    del source
    if restored.sharded is not None:
        restored.sharded.load_model(model)
    return model


def model_factory(spec: RunSpec) -> Callable[[], nn.Module]:
    """Builds the run's model, random weights: from its registered spec (on the meta device when
    called under ``torch.device("meta")``), else a copy of the model shipped whole."""
    if spec.model is None:
        return functools.partial(from_spec, spec.meta["model"])
    return functools.partial(copy.deepcopy, spec.model)


def build_pipeline(spec: RunSpec, restored: Restored, device: torch.device) -> nn.Module:
    """This rank's stage (:mod:`lepton_ray.train.stages`): built on meta, only its own part
    materialised, filled from the full state every rank starts from (the checkpoint resumed or
    the initial weights, fetched from the object store)."""
    from lepton_ray.train import stages

    if restored.sharded is not None:
        raise CheckpointError(
            "the checkpoint to resume is sharded (strategy 'fsdp'): resume with strategy='fsdp'"
        )
    if restored.weights is not None:
        state = restored.weights
    elif spec.model is None:
        import ray

        state = ray.get(spec.init_weights)
    else:
        state = spec.model.state_dict()
    layout = stages.check_layout(dist.get_world_size(), spec.cfg.pipeline_stages)
    return stages.build_stage(
        model_factory(spec), state, layout, dist.get_rank(), device, compile=spec.cfg.compile
    )


def make_step(
    model: nn.Module, spec: RunSpec, world: int, rank: int, total_steps: int, task: Any
) -> Any:
    """The optimizer step for the strategy: :class:`~lepton_ray.train.step.TrainStep`, or a
    pipeline stage's :class:`~lepton_ray.train.pipeline.PipelineStep` (same interface)."""
    cfg = spec.cfg
    if cfg.strategy != "pipeline":
        from lepton_ray.train.step import TrainStep

        return TrainStep(model, cfg, world, rank, total_steps=total_steps, task=task)
    from lepton_ray.train.pipeline import PipelineStep
    from lepton_ray.train.stages import check_layout

    return PipelineStep(
        model,
        check_layout(world, cfg.pipeline_stages),
        cfg,
        rank,
        total_steps,
        factory=model_factory(spec),
        task=task,
        schedule=cfg.pipeline_schedule,
        micro_batches=cfg.pipeline_micro_batches,
    )


def data_shard(cfg: TrainConfig, world: int, rank: int) -> tuple[int, int]:
    """(shards, this rank's shard) of each global batch: one per worker, or under pipeline one
    per replica, every stage of a replica reading its rows (W=4, 2 stages: ranks 2, 3 -> (2, 1))."""
    if cfg.strategy != "pipeline":
        return world, rank
    from lepton_ray.train.stages import check_layout

    layout = check_layout(world, cfg.pipeline_stages)
    return layout.replicas, layout.replica(rank)


def counts_rows(cfg: TrainConfig, world: int, rank: int) -> bool:
    """Whether this rank records the ids it trains (under pipeline, stage 0 of each replica:
    its other stages train the same rows)."""
    if cfg.strategy != "pipeline":
        return True
    from lepton_ray.train.stages import check_layout

    return check_layout(world, cfg.pipeline_stages).stage(rank) == 0


def validate(step: Any, model: nn.Module, batches: Any, task: Any) -> tuple[float, float]:
    """(loss, accuracy) on the validation batches, the same on every rank."""
    if step.cfg.strategy == "pipeline":
        return step.evaluate(batches)
    from lepton_ray.train.step import evaluate

    return evaluate(unwrap(model), batches, task, step.autocast)


def checkpoint_model(step: Any, model: nn.Module) -> nn.Module:
    """The model a checkpoint saves: ``model``, or under pipeline the whole model gathered to
    rank 0 (a collective: every rank calls it; other ranks get their stage)."""
    if step.cfg.strategy == "pipeline":
        return step.full_model() or model
    return model


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one before the root: the items of ``model.blocks`` or
    ``model.layers`` (a Transformer's blocks) or ``model.tables`` (a DLRM's embedding tables,
    each sharded by rows), torchvision ResNet's ``layer1``..``layer4``, else none (the root alone
    is one unit). Each unit's parameters are gathered for its forward and freed after, so a
    worker holds one unit whole at a time."""
    for name in ("blocks", "layers", "tables"):
        seq = getattr(model, name, None)
        if isinstance(seq, nn.ModuleList | nn.Sequential):
            return list(seq)
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(s, nn.Module) for s in stages):
        return stages
    return []


def shard(
    model: nn.Module, device: torch.device, *, mixed_precision: bool, compile: bool = False
) -> nn.Module:
    """``fully_shard`` each unit then the root over a mesh of every rank, then give the (meta)
    tensors memory on ``device`` (uninitialised: :func:`broadcast_from_rank0` fills them).

    ``mixed_precision`` (GPUs): parameters gathered and computed in bf16, gradients reduced in
    fp32, the sharded master weights and optimizer state fp32. gloo has no bf16 reduce-scatter
    path worth having, so CPUs stay fp32.

    ``compile``: each unit is compiled in place before it is sharded (as torchtitan does: the
    blocks share one compiled graph, names and state-dict keys unchanged), the root is not; FSDP's
    all-gather and reduce-scatter hooks run around the compiled bodies. Compiling the sharded root
    whole instead traces across every unit's hooks (measured on one H200 at 0.44 of the plain
    loop: ``docs/benchmarks.md``). A model with no units compiles its root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    units = shard_units(model)
    for unit in units:
        if compile:
            unit.compile()
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    if compile and not units:
        model.compile()
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return ties.materialise(model, device)


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module, source: nn.Module | None) -> None:
    """Fill every rank's rows of ``model`` (sharded) from rank 0's whole ``source``: one tensor
    at a time is whole on each rank, so the peak is the largest tensor, not the model."""
    from lepton_ray.train.sharded import local_rows

    src = dict(_all_tensors(source)) if source is not None else {}
    for name, t in _all_tensors(model):
        full = (
            src[name].to(t.device, t.dtype).contiguous()
            if dist.get_rank() == 0
            else torch.empty(t.shape, dtype=t.dtype, device=t.device)
        )
        dist.broadcast(full, src=0)
        if hasattr(t, "to_local"):  # a DTensor: keep this rank's rows
            local = t.to_local()
            start, stop = local_rows(t)
            local.copy_(full[start:stop])
        else:
            t.copy_(full)


def _all_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters (a shared one once) and every buffer, persistent or not, by name."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def load_train_state(step: Any, restored: Restored, model: nn.Module) -> None:
    """Restore the optimizer and schedule: a sharded checkpoint's optimizer state is read as this
    rank's rows, placed like the model's parameters."""
    state = restored.state
    keyed_by_name = state.get("optimizer", {}).get("keyed_by") == "name"
    if keyed_by_name and step.cfg.strategy != "pipeline":
        raise CheckpointError(
            "the checkpoint to resume was written by strategy 'pipeline': resume with "
            "strategy='pipeline'"
        )
    if restored.sharded is not None:
        from lepton_ray.train.sharded import materialise

        state = materialise(state, restored.sharded, next(unwrap(model).parameters()))
    step.load_state_dict(state)


def bytes_held(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds (local shards)."""

    def size(t: Any) -> int:
        if t is None or not isinstance(t, torch.Tensor):
            return 0
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    params = list(unwrap(model).parameters())
    out = {
        "params": sum(size(p) for p in params),
        "grads": sum(size(p.grad) for p in params),
        "optimizer": 0,
    }
    if optimizer is not None:
        out["optimizer"] = sum(size(v) for s in optimizer.state.values() for v in s.values())
    return out
