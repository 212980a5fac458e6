"""One optimizer step, and the pieces around it: the batch on the device, the optimizer and its
schedule, the validation pass.

A worker's step takes its ``b_r`` rows of the global batch ``B`` (see :mod:`lepton_ray.train.batching`),
splits them into micro-batches (gradient accumulation, ``no_sync`` on all but the last), scales each
micro-batch's mean loss to its share of the global batch, and steps: the update equals one step on
the whole global batch, whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lepton_ray.config import OptimConfig, TrainConfig
from lepton_ray.train import batching
from lepton_ray.train.task import Classification, NextToken

# Images travel from the Ray Data workers as uint8 (a quarter of the bytes of float32) and are
# normalised on the worker's device (``Pixels``).
BATCH_DTYPES = {"image": torch.uint8, "label": torch.int64, "id": torch.int64}


class Pixels:
    """uint8 (N, C, H, W) batch -> (augmented on the device, if asked) normalised float32 on
    ``device``, in the model's memory ``layout``."""

    def __init__(
        self,
        mean: list[float],
        std: list[float],
        device: torch.device,
        layout: torch.memory_format,
    ):
        m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * s)).view(1, -1, 1, 1).to(device)
        self.shift = (-m / s).view(1, -1, 1, 1).to(device)
        self.layout = layout
        self.non_blocking = device.type == "cuda"
        self.device = device

    def __call__(
        self, images: torch.Tensor, augment: Any = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = images.to(self.device, non_blocking=self.non_blocking)
        if augment is not None:
            x = augment(x.float(), ids)
        # The uint8 -> float conversion (without augmentation) and the change of layout happen in
        # the multiply's own kernel, written straight into a tensor of the model's layout.
        out = torch.empty(
            x.shape, dtype=torch.float32, device=self.device, memory_format=self.layout
        )
        return torch.mul(x, self.scale, out=out).add_(self.shift)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (standard practice; it only hurts them).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        # The fused kernel: one launch for all parameters instead of several per tensor.
        cuda = all(p.device.type == "cuda" for p in model.parameters())
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=cuda or None)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier on the peak LR at optimizer ``step`` (0-based) of ``total_steps``."""
    if cfg.schedule == "constant":
        return 1.0
    warm = int(cfg.warmup_fraction * total_steps)
    if step < warm:
        start = 0.04 if cfg.schedule == "onecycle" else 0.0
        return start + (1.0 - start) * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - 1e-3) + 1e-3


class TrainStep:
    """The optimizer step of one worker: ``step(x, y)`` trains on this worker's rows of one global
    batch and adds (loss * n, correct, n) to ``sums``, on the device (no host sync per step).
    ``task`` gives the loss and the correct count (:mod:`lepton_ray.train.task`; default:
    classification)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        world: int,
        rank: int,
        total_steps: int,
        task: Classification | NextToken | None = None,
    ):
        self.model, self.cfg, self.world = model, cfg, world
        self.task = task or Classification()
        self.local_batch = batching.worker_batch(cfg.batch_size, world, rank)
        self.micros = batching.rank_micro_batches(
            cfg.batch_size, world, rank, cfg.max_micro_batch, lockstep=cfg.strategy == "fsdp"
        )
        self.scale = batching.loss_scale(cfg.batch_size, world, self.local_batch)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, cfg.optim)
        )
        device = next(model.parameters()).device
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda"
            else contextlib.nullcontext()
        )
        self.fwd_s = 0.0  # host time in forward passes: exact on CPU, launch time on GPU
        # Under ddp (and fsdp on one worker, unsharded) with ``compile``, the loss and the
        # correct count are compiled with the forward (as nanoGPT's model computes its loss): the
        # cross-entropy's float32 upcast of (N, T, vocab) logits is fused instead of
        # materialised. A sharded model is compiled unit by unit (strategy.shard), so its loss
        # stays eager.
        self.forward = forward_fn(model, self.task)
        if cfg.compile and cfg.strategy != "pipeline" and not is_sharded(model):
            inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: its module
            self.forward = torch.compile(forward_fn(inner, self.task))

    @property
    def global_step(self) -> int:
        """Optimizer steps taken by the run so far (the LR schedule's position)."""
        return self.scheduler.last_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def __call__(self, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        start = 0
        for j, m in enumerate(self.micros):
            xm, ym = x[start : start + m], y[start : start + m]
            start += m
            last = j == len(self.micros) - 1 or self.world == 1
            with contextlib.nullcontext() if last else no_sync(self.model):
                t = time.perf_counter()
                with self.autocast:
                    loss, correct = self.forward(xm, ym)
                self.fwd_s += time.perf_counter() - t
                # mean over this micro-batch -> share of the worker's batch -> share of global batch
                weight = m / self.local_batch * self.scale  # 1.0 on one worker, one micro-batch
                (loss if weight == 1.0 else loss * weight).backward()
            sums += torch.stack(
                [
                    loss.detach().double() * m,
                    correct.double(),
                    torch.full((), float(m), dtype=torch.float64, device=sums.device),
                ]
            )
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()


def forward_fn(model: nn.Module, task: Any) -> Any:
    """``forward(x, y) -> (mean loss, correct count)`` of one micro-batch."""

    def forward(x: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return task.loss(logits, y), task.correct(logits, y).detach()

    return forward


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (inside any DDP or torch.compile wrapper) is sharded by FSDP."""
    from torch.distributed.fsdp import FSDPModule

    from lepton_ray.models import unwrap

    return isinstance(unwrap(model), FSDPModule)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients without communicating them: DDP's ``no_sync``,
    FSDP's ``set_requires_gradient_sync(False)`` (on again after, for the last micro-batch)."""
    from lepton_ray.models import unwrap

    inner = unwrap(model)
    if is_sharded(inner):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Any,
    task: Classification | NextToken | Pixels,
    autocast: Any = None,
) -> tuple[float, float]:
    """(loss, accuracy) over ``batches`` (every worker sees the whole validation set; results
    agree); ``task`` as :class:`TrainStep` takes it, or the :class:`Pixels` of a classifier."""
    if isinstance(task, Pixels):
        task = Classification(task)
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0.0, 0
    for batch in batches:
        x, y = task.inputs(batch, train=False)
        with autocast or contextlib.nullcontext():
            logits = model(x)
        loss_sum += float(task.loss_sum(logits, y))
        correct += float(task.correct(logits, y))
        n += len(y)
    model.train(was_training)
    return loss_sum / max(n, 1), correct / max(n, 1)
