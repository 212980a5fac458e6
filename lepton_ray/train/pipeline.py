"""Pipeline-parallel training: each worker computes some of the model's layers.

A model is cut into ``S`` stages of consecutive blocks on consecutive ranks
(:mod:`lepton_ray.train.stages`, which also builds each rank's stage on meta). With
``W = dp * S`` workers there are ``dp`` pipeline replicas; rank ``r`` is stage ``r % S`` of replica
``r // S`` (e.g. W=4, S=2: replica 0 = ranks 0, 1; replica 1 = ranks 2, 3).

Arithmetic (the same as ddp's, :mod:`lepton_ray.train.batching`, with the replica as the worker):
replica ``r`` trains ``b_r = worker_batch(B, dp, r)`` rows of the global batch ``B``: every rank of
a replica reads them, stage 0 uses them and sends their targets to the last stage. The rows run
as ``M`` micro-batches through GPipe or 1F1B (``torch.distributed.pipelining``) with
``scale_grads=False``: the loss of a micro-batch is the *sum* of its rows' losses (the task's
mean loss, :mod:`lepton_ray.train.task`, times its rows) times ``dp * b_r / (B * b_r)``, so the
micro-batch losses add up to the replica's mean loss scaled to its share of the global batch,
applied exactly once. Gradients are then averaged over the ``dp`` replicas of each stage: the
update equals one step on the whole global batch. A pipeline stage's receive buffers are sized by
its first micro-batch, so rows are padded to ``M * ceil(b_r / M)`` with targets the loss ignores
(``-100``): exact for models whose rows do not interact (no batch norm), e.g. b_r = 5, M = 2:
two micro-batches of 3, one padded row. A single stage has nothing to pipeline: its
micro-batches run in turn, without a schedule.

Weight tying, the Megatron way: when the head's weight is the token embedding's (the GPT) and they
land on different stages, the last stage holds a copy, initialised equal; after backward the two
gradients are summed between the first and last stages (and averaged over replicas), so both
copies take the same update and stay equal. Checkpoints hold the tied model:
:meth:`PipelineStep.full_model` gathers the stages to rank 0 and keeps the embedding's tensor under
its one name, so ``load_model`` and Serve load it unchanged. Optimizer state is saved keyed by
parameter name (not index), gathered the same way, so a resume may use another number of replicas
or of stages.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from lepton_ray.config import TrainConfig
from lepton_ray.errors import CheckpointError, ConfigError
from lepton_ray.train import batching
from lepton_ray.train.stages import Layout, Stage, micro_rows, tied_names_of
from lepton_ray.train.step import build_optimizer, lr_factor
from lepton_ray.train.ties import materialise, tied_names

IGNORE = -100  # the target of a padding row: cross-entropy skips it
# Tensors sent between stages outside the schedule: a header of _HEAD int64s, then the data.
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8]
_HEAD = 12

Schedule = Literal["gpipe", "1f1b"]


class PipelineStep:
    """The optimizer step of one pipeline stage, with :class:`~lepton_ray.train.step.TrainStep`'s
    interface: ``step(x, y, sums)`` trains this replica's rows of one global batch (every rank of
    the replica passes the same rows) and, on the last stage only, adds (loss * rows, correct,
    rows) to ``sums``; a sum over all ranks of ``sums`` is then the global one, as with ddp.
    ``task`` gives the per-row losses and correct counts (``loss_sum``, ``correct``, ``inputs``;
    :mod:`lepton_ray.train.task`)."""

    def __init__(
        self,
        stage: Stage,
        layout: Layout,
        cfg: TrainConfig,
        rank: int,
        total_steps: int,
        *,
        factory: Callable[[], nn.Module],
        task: Any,
        schedule: Schedule = "1f1b",
        micro_batches: int | None = None,
    ):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.model, self.stage, self.cfg, self.layout, self.rank = stage, stage, cfg, layout, rank
        self.factory, self.task = factory, task
        replica = layout.replica(rank)
        self.local_batch = batching.worker_batch(cfg.batch_size, layout.replicas, replica)
        self.scale = batching.loss_scale(cfg.batch_size, layout.replicas, self.local_batch)
        self.micros, self.rows = micro_rows(
            self.local_batch, micro_batches, layout.stages, cfg.max_micro_batch
        )
        if schedule == "1f1b" and self.micros < layout.stages:
            raise ConfigError(
                f"pipeline_schedule '1f1b' needs at least as many micro-batches as stages "
                f"({layout.stages}); got {self.micros} (pipeline_micro_batches {micro_batches}, "
                f"{self.local_batch} rows per replica)"
            )
        self.optimizer = build_optimizer(stage, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, cfg.optim)
        )
        self.device = next(stage.parameters()).device
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        self.fwd_s = 0.0  # host time in this stage's forward passes
        if layout.stages > 1:  # the schedule calls the stage; one stage is timed in __call__
            stage.register_forward_pre_hook(self._fwd_start)
            stage.register_forward_hook(self._fwd_end)
        self.groups = _Groups(layout, rank)
        # A tied weight split across stages: this stage's copy, summed with the other's.
        self.aliases = tied_names_of(factory)
        self.tied = {}
        if layout.stages > 1:
            tied = set(self.aliases) | set(self.aliases.values())
            self.tied = {n: p for n, p in stage.named_parameters() if n in tied}
        self._recorded: list[torch.Tensor] = []
        self.schedule = None  # one stage has nothing to pipeline: its micro-batches run in turn
        # ... through its forward and loss compiled as one, as ddp's step compiles them
        # (build_stage leaves a single stage's blocks uncompiled for this)
        self.forward = self._stage_sums
        if cfg.compile and layout.stages == 1:
            self.forward = torch.compile(self._stage_sums)
        if layout.stages > 1:
            pipe = PipelineStage(
                stage, layout.stage(rank), layout.stages, self.device, group=self.groups.pipeline
            )
            kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
            self.schedule = kind(pipe, self.micros, loss_fn=self._loss, scale_grads=False)

    def _fwd_start(self, *_: Any) -> None:
        self._t = time.perf_counter()

    def _fwd_end(self, *_: Any) -> None:
        self.fwd_s += time.perf_counter() - self._t

    @property
    def global_step(self) -> int:
        """Optimizer steps taken by the run so far (the LR schedule's position)."""
        return self.scheduler.last_epoch

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A micro-batch's loss (the schedule's ``loss_fn``): :meth:`_sums` scaled by
        :meth:`_scaled`."""
        return self._scaled(*self._sums(logits, y))

    def _sums(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the rows' losses summed, correct count) of a micro-batch. The sum is the task's mean
        loss (which skips padding targets) times the real rows: as fast as ddp's step
        (``loss_sum``'s float32 copy of the logits cost 8% of a GPT-2 step)."""
        real = (y.reshape(len(y), -1)[:, 0] != IGNORE).sum()
        return self.task.loss(logits, y) * real, self.task.correct(logits, y)

    def _scaled(self, total: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        """Record a micro-batch's sums; its loss scaled to its share of the global batch."""
        self._recorded.append(torch.stack([total.detach().double(), correct.double()]))
        return total * (self.scale / self.local_batch)

    def _stage_sums(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One stage's forward and :meth:`_sums`: what a single stage runs per micro-batch."""
        return self._sums(self.stage(x), y)

    def _pad(self, t: torch.Tensor, value: int) -> torch.Tensor:
        """``t`` padded to ``M`` equal micro-batches, contiguous (torch 2.11's stage checks its
        input's strides against the first step's: a ``tokens[:, :-1]`` view would fail)."""
        extra = self.micros * self.rows - t.shape[0]
        if extra == 0:
            return t.contiguous()
        return torch.cat([t, t.new_full((extra, *t.shape[1:]), value)])

    def __call__(self, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._recorded = []
        first, last = self.stage.first, self.stage.last
        y = self._targets_from_first(y)
        with self.autocast:
            if self.schedule is None:
                parts = zip(x.tensor_split(self.micros), y.tensor_split(self.micros), strict=True)
                for xm, ym in parts:
                    t = time.perf_counter()
                    total, correct = self.forward(xm, ym)
                    self.fwd_s += time.perf_counter() - t
                    self._scaled(total, correct).backward()
            else:
                args = (self._pad(x, 0),) if first else ()
                target = self._pad(y, IGNORE) if last else None
                self.schedule.step(*args, target=target, losses=[] if last else None)
        if last:
            # the last M: a stage's first step also calls the loss once to infer gradient shapes
            loss_correct = torch.stack(self._recorded[-self.micros :]).sum(0)
            n = torch.full((1,), float(len(y)), dtype=torch.float64, device=sums.device)
            sums += torch.cat([loss_correct.to(sums.device), n])
        self._reduce_gradients()
        if self.cfg.optim.grad_clip:
            self._clip(self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

    def _reduce_gradients(self) -> None:
        """Average over replicas; a tied weight's two copies summed, then averaged."""
        grads = [
            p.grad
            for n, p in self.stage.named_parameters()
            if p.grad is not None and n not in self.tied
        ]
        if self.groups.replicas is not None and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.groups.replicas)
            flat /= self.layout.replicas
            for g, new in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(new.view_as(g))
        for p in self.tied.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.groups.tie)
            p.grad /= self.layout.replicas

    def _clip(self, max_norm: float) -> None:
        """``clip_grad_norm_`` over the whole model: the squares of each stage's gradients summed
        along the pipeline, a tied weight counted once (on the first stage)."""
        grads = [
            p.grad
            for n, p in self.stage.named_parameters()
            if p.grad is not None
            and not (self.stage.last and not self.stage.first and n in self.tied)
        ]
        sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
        if self.groups.pipeline is not None:
            dist.all_reduce(sq, group=self.groups.pipeline)
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.stage.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> tuple[float, float]:
        """(loss, accuracy) over ``batches`` that every rank sees alike, as
        :func:`~lepton_ray.train.step.evaluate` computes them: forward only, the activations
        passed down the pipeline; the last stage of replica 0 computes, every rank returns it."""
        was_training = self.stage.training
        self.stage.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in batches:
            x, y = self.task.inputs(batch, train=False)
            y = self._targets_from_first(y)
            h = self._receive(self.rank - 1) if not self.stage.first else x
            with self.autocast:
                h = self.stage(h)
            if not self.stage.last:
                self._send(h.float(), self.rank + 1)
                continue
            sums[0] += self.task.loss_sum(h, y).double()
            sums[1] += self.task.correct(h, y).double()
            sums[2] += len(y)
        self.stage.train(was_training)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(sums, src=self.layout.stages - 1)
        return float(sums[0] / sums[2].clamp(min=1)), float(sums[1] / sums[2].clamp(min=1))

    def _targets_from_first(self, y: torch.Tensor) -> torch.Tensor:
        """The targets of stage 0's rows, on the last stage (sent; the other stages return
        ``y``): what a pipeline trains on is stage 0's batch alone, even where the ranks' feeds
        hand the same rows in other orders (``DataConfig.deterministic=False``)."""
        if self.layout.stages == 1 or not (self.stage.first or self.stage.last):
            return y
        first = self.rank - self.stage.index
        if self.stage.first:
            self._send(y, first + self.layout.stages - 1)
            return y
        return self._receive(first)

    def _send(self, t: torch.Tensor, dst: int) -> None:
        """``t`` to rank ``dst`` of this pipeline, its dtype and shape first (:meth:`_receive`)."""
        head = [_DTYPES.index(t.dtype), t.ndim, *t.shape]
        head = torch.tensor(head + [0] * (_HEAD - len(head)), dtype=torch.int64, device=t.device)
        dist.send(head, dst, group=self.groups.pipeline)
        dist.send(t.contiguous(), dst, group=self.groups.pipeline)

    def _receive(self, src: int) -> torch.Tensor:
        head = torch.zeros(_HEAD, dtype=torch.int64, device=self.device)
        dist.recv(head, src, group=self.groups.pipeline)
        dtype, ndim, *shape = head.tolist()
        t = torch.empty(shape[:ndim], dtype=_DTYPES[dtype], device=self.device)
        dist.recv(t, src, group=self.groups.pipeline)
        return t

    # -- checkpoints ------------------------------------------------------------------------

    def _gather(self, local: Any) -> list[Any] | None:
        """Replica 0's stages' ``local`` objects, in stage order, on rank 0 (a collective)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [local]
        mine = local if self.layout.replica(self.rank) == 0 else None
        out: list[Any] = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(mine, out, dst=0)
        return out[: self.layout.stages] if self.rank == 0 else None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0, on the CPU, a tied weight once under its first
        name (None on other ranks). A collective: every rank calls it."""
        local = {
            k: v.detach().cpu() for k, v in self.stage.state_dict().items() if k not in self.aliases
        }
        parts = self._gather(local)
        if parts is None:
            return None
        return {k: v for part in parts for k, v in part.items()}

    def full_model(self) -> nn.Module | None:
        """The whole model on rank 0's CPU with the trained weights, for a checkpoint (None on
        other ranks). A collective: every rank calls it."""
        state = self.full_state_dict()
        if state is None:
            return None
        with torch.device("meta"):
            model = self.factory()
        materialise(model, torch.device("cpu"))
        aliases = tied_names(model)
        model.load_state_dict(state | {a: state[n] for a, n in aliases.items()})
        return model

    def _names(self) -> list[str]:
        """The parameter name of each optimizer index (groups in order)."""
        name_of = {id(p): n for n, p in self.stage.named_parameters()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state keyed by parameter name, gathered from every stage (on rank 0; other
        ranks get their own stage's), and the scheduler. A collective: every rank calls it."""
        aliases = self.aliases
        opt = self.optimizer.state_dict()
        names = self._names()
        local = {
            "state": {
                names[i]: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                for i, s in opt["state"].items()
                if names[i] not in aliases
            },
            "groups": [
                [names[i] for i in g["params"] if names[i] not in aliases]
                for g in opt["param_groups"]
            ],
        }
        parts = self._gather(local) or [local]
        groups = [
            {k: v for k, v in g.items() if k != "params"}
            | {"params": [n for part in parts for n in part["groups"][j]]}
            for j, g in enumerate(opt["param_groups"])
        ]
        state = {n: s for part in parts for n, s in part["state"].items()}
        return {
            "optimizer": {"state": state, "param_groups": groups, "keyed_by": "name"},
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`'s form (any number of replicas)."""
        aliases = self.aliases
        saved = state["optimizer"]
        if saved.get("keyed_by") != "name":
            raise CheckpointError(
                "the checkpoint to resume was not written by strategy 'pipeline': resume it with "
                "the strategy that wrote it"
            )
        names = self._names()
        own = self.optimizer.state_dict()
        own["state"] = {
            i: saved["state"][aliases.get(n, n)]
            for i, n in enumerate(names)
            if aliases.get(n, n) in saved["state"]
        }
        for g, s in zip(own["param_groups"], saved["param_groups"], strict=True):
            g.update({k: v for k, v in s.items() if k != "params"})
        self.optimizer.load_state_dict(own)
        self.scheduler.load_state_dict(state["scheduler"])


class _Groups:
    """The process groups of a layout (every rank creates every group, in the same order, as
    ``new_group`` requires): this rank's pipeline, its stage's replicas, and the tie group."""

    def __init__(self, layout: Layout, rank: int):
        self.pipeline = self.replicas = self.tie = None
        if not dist.is_initialized():
            if layout.world > 1:
                raise RuntimeError("pipeline parallelism across workers needs a process group")
            return
        for r in range(layout.replicas):
            g = dist.new_group(layout.pipeline_ranks(r))
            if r == layout.replica(rank):
                self.pipeline = g
        for s in range(layout.stages):
            g = dist.new_group(layout.stage_ranks(s))
            if s == layout.stage(rank) and layout.replicas > 1:
                self.replicas = g
        if layout.stages > 1:
            g = dist.new_group(layout.tie_ranks())
            if rank in layout.tie_ranks():
                self.tie = g
