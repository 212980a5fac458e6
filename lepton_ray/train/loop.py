"""``train_loop_per_worker``: the one training loop, run by every Ray Train worker.

Read top to bottom: restore, wrap the model, plan the batches for this world size, loop over
epochs (train, validate, all-reduce the metrics), checkpoint and report. Ray ships this function
to the workers, so it lives in the installed package.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lepton_ray import checkpoint, storage
from lepton_ray.config import OptimConfig, TrainConfig
from lepton_ray.data import DatasetInfo, read_ids, read_ray
from lepton_ray.device_transforms import Augmenter
from lepton_ray.errors import TrainingError
from lepton_ray.models import memory_format, unwrap
from lepton_ray.train import batching, sampling
from lepton_ray.train.device_cache import DeviceCache


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
    train_info: DatasetInfo | None = None  # a prepared dataset: enables sample-exact resume
    board: Any = None  # ProgressBoard actor handle (driver progress bar), or None
    local_shuffle_rows: int = 0  # a local shuffle buffer per worker (shard-order shuffling), or 0
    device_augment: tuple[
        str, ...
    ] = ()  # augmentations the loop applies on its device (not Ray Data)
    cache: bool = False  # every worker holds the whole training set on its device (DeviceCache)


# Images travel from the Ray Data workers as uint8 (a quarter of the bytes of float32; every
# dataset this loop reads is made with ``normalize=False``) and are normalised on the worker's
# device (see ``_Pixels``).
_DTYPES = {"image": torch.uint8, "label": torch.int64, "id": torch.int64}


class _Pixels:
    """uint8 (N, C, H, W) batch -> (augmented on the device, if asked) normalised float32 on
    ``device``, in the model's memory ``layout``."""

    def __init__(
        self, mean: list[float], std: list[float], device: torch.device, layout: torch.memory_format
    ):
        m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * s)).view(1, -1, 1, 1).to(device)
        self.shift = (-m / s).view(1, -1, 1, 1).to(device)
        self.layout = layout
        self.move = {"non_blocking": device.type == "cuda", "memory_format": layout}
        self.device = device

    def __call__(self, images: torch.Tensor, augment: Augmenter | None = None) -> torch.Tensor:
        x = images.to(self.device, **self.move).float()
        if augment is not None:
            x = augment(x).contiguous(memory_format=self.layout)
        return x.mul_(self.scale).add_(self.shift)  # in place: keeps x's memory layout


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (standard practice; it only hurts them).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
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
    best: dict[str, Any] | None = None  # {"metric", "value", "epoch"}
    resizes: list[dict[str, int]] = []  # world-size changes: {"step", "from", "to"}
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        loc = storage.Location(resumed.filesystem, resumed.path, resumed.path, spec.endpoint_url)
        weights, state, meta = checkpoint.load_train_state(loc)
        model.load_state_dict({k.removeprefix("module."): v for k, v in weights.items()})
        history = list(meta.get("history", []))
        best = meta.get("best")
        resizes = list(meta.get("world_size_changes", []))
        if (
            meta.get("world_size") and meta["world_size"] != world
        ):  # an elastic resize (or a resume elsewhere)
            resizes.append(
                {
                    "step": int(meta.get("metrics", {}).get("step", 0)),
                    "from": meta["world_size"],
                    "to": world,
                }
            )
    layout = memory_format(spec.meta)  # channels-last for convnets: faster on CPUs and GPUs alike
    model = model.to(memory_format=layout)
    model = ray.train.torch.prepare_model(model)
    if cfg.compile:
        model = torch.compile(model)

    nominal = batching.nominal_steps_per_epoch(spec.num_train_rows, cfg.batch_size)
    total_steps = nominal * cfg.epochs
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.optim)
    )
    start_epoch, resume_consumed, resume_sums = 0, None, None
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("epoch_complete", True):
            start_epoch = int(state["epoch"]) + 1
        else:  # a mid-epoch checkpoint: finish that epoch on the samples it had not consumed
            start_epoch = int(state["epoch"])
            resume_consumed = state["consumed_ids"].numpy()
            resume_sums = state["epoch_sums"]

    # --- plan batches for this world size ----------------------------------------------------
    local_batch = batching.worker_batch(cfg.batch_size, world, rank)
    micros = batching.micro_batches(local_batch, cfg.max_micro_batch)
    full_steps = min(batching.steps_per_epoch(spec.num_train_rows, cfg.batch_size, world), nominal)
    scale = batching.loss_scale(cfg.batch_size, world, local_batch)
    if full_steps < 1:
        raise TrainingError(
            f"{spec.num_train_rows} training rows are too few for a global batch of {cfg.batch_size}"
        )

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if spec.has_val else None
    # The validation set is cached with the training set: then no Ray Data execution per epoch at all.
    cache, val_cache = (
        DeviceCache(s.iter_torch_batches(batch_size=4096, dtypes=_DTYPES), device)
        if spec.cache and s is not None
        else None
        for s in (train_shard, val_shard)
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()
    )
    pixels = _Pixels(spec.meta["data"]["mean"], spec.meta["data"]["std"], device, layout)
    augment = (
        Augmenter(spec.device_augment, device, cfg.seed, rank) if spec.device_augment else None
    )
    cpu_augment = () if spec.device_augment else cfg.data.augment  # Ray Data's share of the work
    fault = sampling.parse_fault(cfg.fault_injection) if not state else None  # first attempt only
    sample_log = _SampleLog(spec, rank) if cfg.record_sample_ids else None
    steps_run = 0  # optimizer steps taken by this worker group (for the driver's pace and ETA)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
        if augment is not None:
            augment.start_epoch(epoch)
        resuming = resume_consumed is not None and epoch == start_epoch
        if cache is not None:
            steps, batches = cache.epoch(
                seed=cfg.seed,
                epoch=epoch,
                global_batch=cfg.batch_size,
                world=world,
                rank=rank,
                max_steps=nominal,
                exclude_ids=resume_consumed if resuming else None,
            )
        elif resuming:
            mine = sampling.remainder_split(
                read_ids(spec.train_info), resume_consumed, seed=cfg.seed, epoch=epoch, world=world
            )[rank]
            steps = len(mine) // batching.worker_batch(cfg.batch_size, world, 0)
            batches = read_ray(
                spec.train_info,
                augment=cpu_augment,
                keep_ids=mine,
                augment_seed=cfg.seed + epoch,
                normalize=False,
                batch_size=cfg.data.preprocess_batch_size,
            ).iter_torch_batches(
                batch_size=local_batch,
                prefetch_batches=2,
                dtypes=_DTYPES,
                local_shuffle_buffer_size=min(len(mine), 8 * local_batch) or None,
                local_shuffle_seed=cfg.seed + epoch,
            )
        else:
            steps = full_steps
            batches = train_shard.iter_torch_batches(
                batch_size=local_batch,
                prefetch_batches=2,
                dtypes=_DTYPES,
                pin_memory=use_cuda,
                local_shuffle_buffer_size=spec.local_shuffle_rows or None,
                local_shuffle_seed=cfg.seed + epoch,
            )
        consumed = [resume_consumed] if resuming else []
        if resuming and rank == 0:  # the restored sums are global already: count them once
            sums += resume_sums.to(device)
        pending: list[torch.Tensor] = []  # ids this worker trained since the last checkpoint
        done, wait, fwd, trained = 0, 0.0, 0.0, 0
        progress_every = cfg.progress_every_steps or max(1, steps // 10)
        batch_iter = iter(batches)
        for i in range(steps):
            tw = time.perf_counter()
            batch = next(batch_iter, None)
            wait += time.perf_counter() - tw
            if batch is None:
                break
            x = pixels(batch["image"], augment)
            y = batch["label"].to(device, non_blocking=True)
            if len(y) != local_batch:
                raise TrainingError(
                    f"worker {rank} got a batch of {len(y)} rows, expected {local_batch}"
                )
            optimizer.zero_grad(set_to_none=True)
            start = 0
            for j, m in enumerate(micros):
                xm, ym = x[start : start + m], y[start : start + m]
                start += m
                sync = (
                    contextlib.nullcontext()
                    if j == len(micros) - 1 or world == 1
                    else model.no_sync()
                )
                with sync:
                    tf = time.perf_counter()
                    with autocast:
                        logits = model(xm)
                        loss = F.cross_entropy(logits, ym)
                    fwd += time.perf_counter() - tf  # host time: exact on CPU, launch time on GPU
                    # mean over this micro-batch -> share of the worker's batch -> share of global batch
                    (loss * (m / local_batch) * scale).backward()
                sums += torch.stack(
                    [
                        loss.detach().double() * m,
                        (logits.argmax(1) == ym).sum().double(),
                        torch.full((), float(m), dtype=torch.float64, device=device),
                    ]
                )  # no host sync
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            done += 1
            trained += local_batch
            ids = batch.get(
                "id"
            )  # a user's Ray Dataset may carry no ids (no mid-epoch resume then)
            if ids is not None:
                pending.append(
                    ids
                )  # stays where it is: a .cpu() here would sync the GPU every step
                if sample_log:
                    sample_log.add(epoch + 1, scheduler.last_epoch, ids)
            if fault and fault == (epoch + 1, i + 1, rank):
                raise RuntimeError(
                    f"injected fault at epoch {epoch + 1} step {i + 1} on rank {rank}"
                )
            every = cfg.checkpoint_every_steps
            timing = {
                "rank": rank,
                "fwd_s": fwd,
                "data_wait_s": wait,
                "steps_since_start": steps_run + done,
            }
            if every and scheduler.last_epoch % every == 0 and i < steps - 1:
                consumed.append(_gather_ids(pending, world))
                pending = []
                global_sums = _all_reduce(sums.clone())
                metrics = (
                    _metrics(
                        epoch + 1,
                        scheduler,
                        global_sums,
                        trained * world,
                        time.perf_counter() - t0,
                        wait,
                        world,
                    )
                    | {"epoch_complete": False}
                    | timing
                )
                extra = {
                    "epoch": epoch,
                    "epoch_complete": False,
                    "epoch_sums": global_sums.cpu(),
                    "consumed_ids": torch.from_numpy(np.concatenate(consumed)),
                }
                if sample_log:
                    sample_log.flush()
                _report_with_checkpoint(
                    spec,
                    model,
                    optimizer,
                    scheduler,
                    metrics,
                    history,
                    rank,
                    extra,
                    resizes=resizes,
                )
            if spec.board is not None and ((i + 1) % progress_every == 0 or i == steps - 1):
                spec.board.update.remote(
                    rank,
                    {  # fire and forget: no barrier
                        "epoch": epoch + 1,
                        "step": scheduler.last_epoch,
                        "world_size": world,
                        "samples_per_second": trained * world / max(time.perf_counter() - t0, 1e-9),
                        "train_loss": float(sums[0] / sums[2]) if i == steps - 1 else None,
                    }
                    | timing,
                )
        steps_run += done
        if done < steps:
            raise TrainingError(
                f"worker {rank}: its data shard ran out after {done} of {steps} steps"
            )
        for _ in batch_iter:  # drain the tail (< one batch) so the next epoch starts clean
            pass
        train_time = time.perf_counter() - t0

        val = None
        if val_shard is not None:
            val_batches = (
                val_cache.chunks(512)
                if val_cache
                else val_shard.iter_torch_batches(batch_size=512, dtypes=_DTYPES)
            )
            val = _evaluate(unwrap(model), val_batches, device, pixels, autocast)
        _all_reduce(sums)
        metrics = _metrics(epoch + 1, scheduler, sums, trained * world, train_time, wait, world)
        metrics["epoch_time_s"] = time.perf_counter() - t0
        timing = {
            "rank": rank,
            "fwd_s": fwd,
            "data_wait_s": wait,
            "steps_since_start": steps_run,
            "epoch_end": True,
        }
        if val is not None:
            metrics.update(val_loss=val[0], val_accuracy=val[1])
        improved, stop, best = _judge(cfg, metrics, best)
        history.append(dict(metrics))
        metrics |= timing
        if sample_log:
            sample_log.flush()
        last = epoch + 1 == cfg.epochs or stop
        if last or improved or (epoch + 1) % cfg.checkpoint_every_epochs == 0:
            extra = {"epoch": epoch, "epoch_complete": True}
            _report_with_checkpoint(
                spec,
                model,
                optimizer,
                scheduler,
                metrics,
                history,
                rank,
                extra,
                best=best,
                publish_best=improved,
                resizes=resizes,
            )
        else:
            ray.train.report(metrics)
        if stop:
            break


def _judge(
    cfg: TrainConfig, metrics: dict[str, Any], best: dict[str, Any] | None
) -> tuple[bool, bool, dict | None]:
    """(improved, stop early, best so far) on the monitored metric, decided by rank 0 for all ranks
    (workers' validation numbers can differ in the last digits; their decisions must not)."""
    name = cfg.monitor if cfg.monitor in metrics else "train_loss"
    value = metrics[name]
    improved = best is None or (
        value < best["value"] if name.endswith("loss") else value > best["value"]
    )
    if improved:
        best = {"metric": name, "value": value, "epoch": metrics["epoch"]}
    stale = metrics["epoch"] - best["epoch"]
    stop = bool(cfg.early_stopping_patience and stale >= cfg.early_stopping_patience)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        decision = [improved, stop, best]
        dist.broadcast_object_list(decision, src=0)
        improved, stop, best = decision
    return improved, stop, best


def _metrics(
    epoch: int,
    scheduler: Any,
    sums: torch.Tensor,
    samples: int,
    seconds: float,
    wait: float,
    world: int,
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "step": scheduler.last_epoch,
        "train_loss": float(sums[0] / sums[2]),
        "train_accuracy": float(sums[1] / sums[2]),
        "samples_per_second": samples / max(seconds, 1e-9),
        "data_wait_s": wait,
        "world_size": world,
        "lr": scheduler.get_last_lr()[0],
    }


def _gather_ids(pending: list[torch.Tensor], world: int) -> np.ndarray:
    """The ids every worker trained since the last checkpoint (a collective: all ranks call it)."""
    local = torch.cat(pending).cpu().numpy() if pending else np.zeros(0, np.int64)
    if world == 1 or not dist.is_initialized():
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    return np.concatenate(parts)


class _SampleLog:
    """Per-worker record of the ids trained at each step (``record_sample_ids``), written to
    ``<run>/sample_ids/`` at each report: for tests and audits of sample-exact resume."""

    def __init__(self, spec: RunSpec, rank: int):
        self.dir = storage.resolve(spec.run_uri, spec.endpoint_url).join("sample_ids")
        self.prefix = f"rank{rank}-{uuid.uuid4().hex[:8]}"
        self.lines: list[str] = []
        self.seq = 0

    def add(self, epoch: int, step: int, ids: torch.Tensor) -> None:
        self.lines.append(
            json.dumps(
                {"epoch": epoch, "step": step, "t": round(time.time(), 3), "ids": ids.tolist()}
            )
        )

    def flush(self) -> None:
        if self.lines:
            self.dir.join(f"{self.prefix}-{self.seq:05d}.jsonl").write_bytes(
                "\n".join(self.lines).encode()
            )
            self.lines, self.seq = [], self.seq + 1


@torch.no_grad()
def _evaluate(
    model: nn.Module, batches: Any, device: torch.device, pixels: _Pixels, autocast: Any
) -> tuple[float, float]:
    """Validation over the full validation set (every worker sees all of it; results agree)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for batch in batches:
        x = pixels(batch["image"])
        y = batch["label"].to(device)
        with autocast:
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return loss_sum / max(n, 1), correct / max(n, 1)


def _report_with_checkpoint(
    spec: RunSpec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    metrics: dict,
    history: list,
    rank: int,
    extra: dict,
    best: dict | None = None,
    publish_best: bool = False,
    resizes: list | None = None,
) -> None:
    """Report ``metrics`` with a checkpoint (a barrier: every rank calls it; rank 0 uploads).

    With ``publish_best`` the same files also go to ``<run>/best/<name>``, then ``best.json``
    points at them (written last), and the previous best is removed.
    """
    name = f"checkpoint_epoch{metrics['epoch']:04d}_step{scheduler.last_epoch:07d}"
    if rank != 0:
        ray.train.report(metrics)
        return
    run = storage.resolve(spec.run_uri, spec.endpoint_url)

    def upload(ckpt: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        dest = checkpoint.publish(ckpt.path, run.join(dir_name))
        if publish_best:
            pointer = run.join("best.json")
            previous = pointer.read_json().get("path") if pointer.exists() else None
            best_dest = checkpoint.publish(ckpt.path, run.join("best", dir_name))
            pointer.write_json({**(best or {}), "path": f"best/{dir_name}", "uri": best_dest.uri})
            if previous and previous != f"best/{dir_name}":
                run.join(previous).delete()
        return ray.train.Checkpoint(path=dest.path, filesystem=dest.fs)

    meta = dict(
        spec.meta,
        metrics=metrics,
        history=history,
        epoch=metrics["epoch"],
        epoch_complete=extra["epoch_complete"],
        best=best,
        world_size=metrics["world_size"],
        world_size_changes=resizes or [],
    )
    train_state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        **extra,
    }
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.write_local(tmp, model, meta, train_state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=name,
            checkpoint_upload_fn=upload,
        )
