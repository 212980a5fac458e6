"""Shared by the GPU benchmarks: the plain PyTorch loop they compare against, the synthetic data,
and the Trainer's figures in the same units.

The plain loop is the fair baseline: the same model, global batch, optimizer and schedule (the
library's own ``build_optimizer``/``lr_factor``), bf16 autocast and channels-last memory as the
Trainer on a GPU, with its data already on the device, so it measures the model's pace alone.
Samples/s is the mean over the epochs after the first (warm-up); every clock stops after the GPU
has finished (:class:`benchmarks.harness.Timer`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import Timer, mean_after_warmup, scratch

AUGMENT = ("random_crop", "hflip")


def device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plain_loop(
    model_name: str,
    rows: int,
    batch: int,
    epochs: int,
    dev: Any,
    *,
    cudnn_benchmark: bool = False,
    data: str = "float",
    clock: list[tuple[float, float]] | None = None,
    laps: list[dict[str, Any]] | None = None,
) -> list[float]:
    """What a user writes by hand, data already on ``dev``; samples/s per epoch (and each epoch's
    start and end as ``time.time()`` into ``clock`` when given: its window for ``benchmarks._usage``;
    and into ``laps`` its garbage collector's pauses and its thread's CPU, runqueue wait and sleeps
    (:mod:`lepton_ray.train.thread_clock`), as a fit's epochs report theirs).

    ``data="float"``: float32 batches sliced in order (the least work a loop can do).
    ``"uint8"``: the work the Trainer does on the same data, written as a user would: uint8 rows
    on the device, a fresh permutation per epoch gathered into each batch, converted to float and
    normalised there. ``"uint8_augmented"``: the same plus a random crop (2-pixel padding) and a
    horizontal flip per image, vectorised over the batch on the device (airbench's way).
    """
    import torch
    import torch.nn.functional as F

    from lepton_ray import build_model
    from lepton_ray.config import OptimConfig
    from lepton_ray.train.gc_clock import process_clock
    from lepton_ray.train.step import build_optimizer, lr_factor
    from lepton_ray.train.thread_clock import ThreadClock

    cuda = dev.type == "cuda"
    prev, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, cudnn_benchmark
    torch.manual_seed(0)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = build_model(model_name, in_channels=3, num_classes=10).to(dev, memory_format=fmt)
    cfg = OptimConfig()
    opt = build_optimizer(model, cfg)
    steps = rows // batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps * epochs, cfg))
    n = steps * batch
    if data == "float":
        x_all = torch.randn(n, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    else:
        x_all = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=dev)
        x_all = x_all.contiguous(memory_format=fmt)
        scale = torch.full((1, 3, 1, 1), 1 / (255 * 0.25), device=dev)
        shift = torch.full((1, 3, 1, 1), -0.5 / 0.25, device=dev)
    y_all = torch.randint(0, 10, (n,), device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)
    rates = []
    gc_clock, thread = process_clock(), ThreadClock()
    for _ in range(epochs):
        began = time.time()
        gc_clock.lap()
        thread.lap()
        with Timer(dev) as t:
            order = torch.randperm(n, device=dev) if data != "float" else None
            for s in range(steps):
                if order is None:
                    x, y = x_all[s * batch : (s + 1) * batch], y_all[s * batch : (s + 1) * batch]
                else:
                    rows = order[s * batch : (s + 1) * batch]
                    x, y = x_all[rows], y_all[rows]
                    if data == "uint8_augmented":
                        x = crop_flip(x)
                    x = x.float().contiguous(memory_format=fmt).mul_(scale).add_(shift)
                opt.zero_grad(set_to_none=True)
                with autocast:
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                sched.step()
        rates.append(steps * batch / t.seconds)
        if laps is not None:
            laps.append(gc_clock.lap() | thread.lap())
        if clock is not None:
            clock.append((began, time.time()))
    del model, opt, x_all, y_all
    if cuda:
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = prev
    return rates


def crop_flip(x: Any, pad: int = 2) -> Any:
    """A random translation (zero padding ``pad``) and a random horizontal flip per image of a
    (B, C, H, W) batch, in a few batched ops on its device: what a user writes for a GPU loop."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device)
    rows = (oy + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    cols = torch.where(torch.rand(b, 1, 1, 1, device=x.device) < 0.5, cols.flip(-1), cols)
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[torch.arange(b, device=x.device)[:, None, None, None], chans, rows, cols]


def plain_summary(rates: list[float], laps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "samples_per_s": round(mean_after_warmup(rates), 1),
        "per_epoch": [round(r, 1) for r in rates],
        **({"per_epoch_gc": gc_summary(laps)} if laps else {}),
        **loop_thread_series(laps or []),
    }


def gc_summary(laps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Epochs' ``gc_s`` and ``gc_full`` (:class:`lepton_ray.train.gc_clock.GcClock` laps, or a
    fit's history) as a result's ``per_epoch_gc``."""
    return [{"s": lap["gc_s"], "full": lap["gc_full"]} for lap in laps]


def random_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``map_batches`` over ``ray.data.range``: random uint8 32x32x3 images, labels id % 10."""
    ids = np.asarray(batch["id"], dtype=np.int64)
    rng = np.random.default_rng(int(ids[0]))
    return {"image": rng.integers(0, 256, (len(ids), 32, 32, 3), dtype=np.uint8), "label": ids % 10}


def synthetic_ray_dataset(rows: int) -> Any:
    """An in-memory Ray Dataset of random images (no ``id`` column, as a user's would be)."""
    import ray

    from lepton_ray.runtime import ensure_ray

    ensure_ray()
    ds = ray.data.range(rows, override_num_blocks=16)
    return ds.map_batches(random_images, batch_format="numpy").materialize()


def realish_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-structured images: a blocky colour pattern per class, per-image noise (learnable)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 10
    rng.shuffle(labels)
    protos = rng.integers(0, 256, (10, 4, 4, 3)).astype(np.int16)
    protos = np.repeat(np.repeat(protos, 8, axis=1), 8, axis=2)  # (10, 32, 32, 3)
    images = np.empty((n, 32, 32, 3), np.uint8)
    for s in range(0, n, 8192):
        sl = slice(s, min(n, s + 8192))
        noise = rng.integers(-60, 61, (sl.stop - sl.start, 32, 32, 3), dtype=np.int16)
        images[sl] = np.clip(protos[labels[sl]] + noise, 0, 255).astype(np.uint8)
    return images, labels


def prepared_dataset(rows: int, store: str | Path | None = None) -> Any:
    """``rows`` structured images written as a prepared (Parquet) dataset; its DatasetInfo."""
    from lepton_ray.data import write_dataset

    store = Path(store or scratch("lepton-gpu-bench-"))
    images, labels = realish_images(rows)
    return write_dataset(
        images,
        labels,
        str(store / "data" / "realish"),
        classes=[str(i) for i in range(10)],
        source="benchmarks realish",
    )


LOOP_THREAD_KEYS = ("loop_cpu_s", "loop_runqueue_s", "loop_sleeps", "loop_preemptions")


def loop_thread_series(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """``per_epoch_<key>`` for each figure of the loop's thread (its CPU seconds, its wait for a
    CPU, how often it blocked and was preempted) that every epoch's record has."""
    return {
        f"per_epoch_{key}": [r[key] for r in records]
        for key in LOOP_THREAD_KEYS
        if records and all(key in r for r in records)
    }


def trainer_summary(res: dict[str, Any], samples_per_epoch: int) -> dict[str, Any]:
    """A ``fit`` result in the plain loop's units, for a run without a validation set.

    samples/s is rows ÷ ``epoch_time_s``, mean over the epochs after the first: that clock stops
    after the loop has read the epoch's metrics back from the GPU (a synchronisation), as the plain
    loop's does, whereas the loop's own ``samples_per_second`` stops its clock with GPU work still
    queued (kept as ``loop_samples_per_s``). The data-wait share is of the loop's training time.
    A ring-fed or streamed fit's epochs also say when their read was asked for and how long it took
    (``per_epoch_read``).
    """
    hist = res["history"]
    measured = hist[1:] if len(hist) > 1 else hist
    per_epoch = [samples_per_epoch / h["epoch_time_s"] for h in hist]
    # The loop's training time: samples / its own samples_per_second.
    wait = [h["data_wait_s"] * h["samples_per_second"] / samples_per_epoch for h in measured]
    epoch_times = [h["epoch_time_s"] for h in hist]
    return {
        "samples_per_s": round(mean_after_warmup(per_epoch), 1),
        "loop_samples_per_s": round(float(np.mean([h["samples_per_second"] for h in measured])), 1),
        "data_wait_share": round(float(np.mean(wait)), 3),
        "per_epoch_samples_per_s": [round(x, 1) for x in per_epoch],
        "per_epoch_data_wait_s": [round(h["data_wait_s"], 2) for h in hist],
        "per_epoch_time_s": [round(t, 3) for t in epoch_times],
        # the garbage collector's pauses in the worker (lepton_ray.train.gc_clock), where reported
        **({"per_epoch_gc": gc_summary(hist)} if all("gc_s" in h for h in hist) else {}),
        # the worker's loop thread (lepton_ray.train.thread_clock), where reported
        **loop_thread_series(hist),
        # each epoch's read (lepton_ray.train.read_times.ReadTimes), where the feed has one
        **(
            {"per_epoch_read": [{k: h[k] for k in h if k.startswith("read_")} for h in hist]}
            if any("read_ahead_s" in h for h in hist)
            else {}
        ),
        "fit_wall_s": round(res["wall_time_s"], 1),
        "fixed_cost_s": round(res["wall_time_s"] - sum(epoch_times), 1),
        "final_train_accuracy": res.get("train_accuracy"),
        "startup_s": res.get("startup_s"),
    }


def plain_window(clock: list[tuple[float, float]]) -> tuple[float, float, str]:
    """A plain loop's epochs after the first (from ``plain_loop``'s ``clock``), for
    ``benchmarks._usage``: it runs in this process, the driver."""
    return clock[min(1, len(clock) - 1)][0], clock[-1][1], "driver"


def trainer_window(res: dict[str, Any], returned: float) -> tuple[float, float, str]:
    """A fit's epochs after the first as ``time.time()`` values, for ``benchmarks._usage``: they
    end where the teardown before ``fit`` returned (at ``returned``) began."""
    end = returned - (res.get("startup_s") or {}).get("teardown", 0.0)
    times = [h["epoch_time_s"] for h in res["history"]]
    return end - sum(times[1:] if len(times) > 1 else times), end, "ray::RayTrainWorker"


def quiet_ray() -> None:
    """A fresh local Ray of this process, never someone else's cluster; no progress bars."""
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
