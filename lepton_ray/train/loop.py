"""``train_loop_per_worker``: the one training loop, run by every Ray Train worker.

Read top to bottom: restore, wrap the model, plan the batches for this world size, loop over
epochs (train, validate, all-reduce the metrics), checkpoint and report. Ray ships this function
to the workers, so it lives in the installed package.
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lepton_ray import checkpoint, storage
from lepton_ray.config import OptimConfig, TrainConfig
from lepton_ray.errors import TrainingError
from lepton_ray.models import unwrap
from lepton_ray.train import batching


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs, shipped once through ``train_loop_config``."""

    cfg: TrainConfig
    model: nn.Module
    meta: dict[str, Any]  # model spec, data spec, config, provenance: saved in every checkpoint
    num_train_rows: int
    has_val: bool
    run_uri: str
    endpoint_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_DTYPES = {"image": torch.float32, "label": torch.int64, "id": torch.int64}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (standard practice; it only hurts them).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
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


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec: RunSpec = config["spec"]
    cfg = spec.cfg
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    if not use_cuda:
        cpus = (cfg.scaling.resources_per_worker or {}).get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
    torch.manual_seed(cfg.seed)

    # --- restore -----------------------------------------------------------------------------
    model = copy.deepcopy(spec.model)
    state: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        loc = storage.Location(resumed.filesystem, resumed.path, resumed.path, spec.endpoint_url)
        weights, state, meta = checkpoint.load_train_state(loc)
        model.load_state_dict({k.removeprefix("module."): v for k, v in weights.items()})
        history = list(meta.get("history", []))
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)

    nominal = batching.nominal_steps_per_epoch(spec.num_train_rows, cfg.batch_size)
    total_steps = nominal * cfg.epochs
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg.optim))
    start_epoch = 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epoch"]) + 1

    # --- plan batches for this world size ----------------------------------------------------
    local_batch = batching.worker_batch(cfg.batch_size, world, rank)
    micros = batching.micro_batches(local_batch, cfg.max_micro_batch)
    steps = min(batching.steps_per_epoch(spec.num_train_rows, cfg.batch_size, world), nominal)
    scale = batching.loss_scale(cfg.batch_size, world, local_batch)
    if steps < 1:
        raise TrainingError(f"{spec.num_train_rows} training rows are too few for a global batch of {cfg.batch_size}")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if spec.has_val else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()
    to_device = {"non_blocking": True, "memory_format": torch.channels_last} if use_cuda else {}

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
        batches = train_shard.iter_torch_batches(batch_size=local_batch, prefetch_batches=2,
                                                 dtypes=_DTYPES)
        done, wait = 0, 0.0
        batch_iter = iter(batches)
        for _ in range(steps):
            tw = time.perf_counter()
            batch = next(batch_iter, None)
            wait += time.perf_counter() - tw
            if batch is None:
                break
            x = batch["image"].to(device, **to_device)
            y = batch["label"].to(device, non_blocking=True)
            if len(y) != local_batch:
                raise TrainingError(f"worker {rank} got a batch of {len(y)} rows, expected {local_batch}")
            optimizer.zero_grad(set_to_none=True)
            start = 0
            for j, m in enumerate(micros):
                xm, ym = x[start:start + m], y[start:start + m]
                start += m
                sync = contextlib.nullcontext() if j == len(micros) - 1 or world == 1 else model.no_sync()
                with sync:
                    with autocast:
                        logits = model(xm)
                        loss = F.cross_entropy(logits, ym)
                    # mean over this micro-batch -> share of the worker's batch -> share of global batch
                    (loss * (m / local_batch) * scale).backward()
                sums += torch.stack([loss.detach().double() * m, (logits.argmax(1) == ym).sum().double(),
                                     torch.tensor(float(m), dtype=torch.float64, device=device)])
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            done += 1
        if done < steps:
            raise TrainingError(f"worker {rank}: its data shard ran out after {done} of {steps} steps")
        for _ in batch_iter:  # drain the tail (< one batch) so the next epoch starts clean
            pass
        train_time = time.perf_counter() - t0

        val = _evaluate(unwrap(model), val_shard, device, to_device, autocast) if val_shard else None
        _all_reduce(sums)
        metrics = {
            "epoch": epoch + 1,
            "step": scheduler.last_epoch,
            "train_loss": float(sums[0] / sums[2]),
            "train_accuracy": float(sums[1] / sums[2]),
            "samples_per_second": float(sums[2]) / max(train_time, 1e-9),
            "epoch_time_s": time.perf_counter() - t0,
            "data_wait_s": wait,
            "world_size": world,
            "lr": scheduler.get_last_lr()[0],
        }
        if val is not None:
            metrics.update(val_loss=val[0], val_accuracy=val[1])
        history.append(metrics)
        last = epoch + 1 == cfg.epochs
        if last or (epoch + 1) % cfg.checkpoint_every_epochs == 0:
            _report_with_checkpoint(spec, model, optimizer, scheduler, epoch, metrics, history, rank)
        else:
            ray.train.report(metrics)


@torch.no_grad()
def _evaluate(model: nn.Module, shard: Any, device: torch.device, to_device: dict, autocast: Any) -> tuple[float, float]:
    """Validation over the full validation set (every worker sees all of it; results agree)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for batch in shard.iter_torch_batches(batch_size=512, dtypes=_DTYPES):
        x = batch["image"].to(device, **to_device)
        y = batch["label"].to(device)
        with autocast:
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return loss_sum / max(n, 1), correct / max(n, 1)


def _report_with_checkpoint(spec: RunSpec, model: nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler: Any, epoch: int, metrics: dict, history: list, rank: int) -> None:
    name = f"checkpoint_epoch{epoch + 1:04d}_step{scheduler.last_epoch:07d}"
    if rank != 0:
        ray.train.report(metrics)
        return
    run = storage.resolve(spec.run_uri, spec.endpoint_url)

    def upload(ckpt: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        dest = checkpoint.publish(ckpt.path, run.join(dir_name))
        return ray.train.Checkpoint(path=dest.path, filesystem=dest.fs)

    meta = dict(spec.meta, metrics=metrics, history=history, epoch=epoch + 1)
    train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "torch_rng": torch.get_rng_state(), "epoch": epoch}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.write_local(tmp, model, meta, train_state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name, checkpoint_upload_fn=upload)
