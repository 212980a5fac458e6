"""``train_loop_per_worker``: the one training loop, run by every Ray Train worker.

Read top to bottom: restore, build the model and its step, get the feed, then per epoch: train its
batches (checkpointing mid-epoch when asked), validate, all-reduce the metrics, judge, report. Each
piece is a named call into a small module: :mod:`~lepton_ray.train.step` (the optimizer step),
:mod:`~lepton_ray.train.feed` (where an epoch's batches come from),
:mod:`~lepton_ray.train.checkpointing` (what is saved and restored). Ray ships this function to the
workers, so it lives in the installed package.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from lepton_ray.config import TrainConfig, parse_fault
from lepton_ray.data import DatasetInfo
from lepton_ray.train import batching, strategy
from lepton_ray.train.checkpointing import EpochTally, Reporter, Restored, SampleLog, all_reduce
from lepton_ray.train.feed import (
    CachedFeed,
    Feed,
    Plan,
    RingFeed,
    ShardFeed,
    StreamedFeed,
    jpeg_decode_on,
)
from lepton_ray.train.gc_clock import process_clock
from lepton_ray.train.prestart import child_options
from lepton_ray.train.progress import WorkerProgress
from lepton_ray.train.ring_reader import read_cpus, read_task_bytes
from lepton_ray.train.step import BATCH_DTYPES, Pixels, TrainStep
from lepton_ray.train.task import for_data, lower_is_better
from lepton_ray.train.thread_clock import ThreadClock
from lepton_ray.train.timeline import WorkerTimeline


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs, shipped once through ``train_loop_config`` (as an ObjectRef)."""

    cfg: TrainConfig
    model: nn.Module | None  # None under FSDP for a registered architecture: built from its spec
    meta: dict[str, Any]  # model spec, data spec, config, provenance: saved in every checkpoint
    num_train_rows: int
    has_val: bool
    run_uri: str
    endpoint_url: str | None = None
    train_info: DatasetInfo | None = None  # a prepared dataset: planned epochs, exact resume
    board: Any = None  # the driver's ProgressBoard (lepton_ray.train.progress), or None
    order: str = "shuffled"  # the epoch plan's order (see lepton_ray.train.sampling)
    device_augment: tuple[str, ...] = ()  # augmentations the loop applies on its device
    feed: str = "stream"  # "cache" | "ring" | "stream": DataConfig.chosen_feed
    init_weights: Any = None  # FSDP: ObjectRef of the initial state dict, fetched by rank 0 only
    fit_id: str = ""  # this fit() call's: a divergence it reports is told from an earlier one's


def train_loop_per_worker(config: dict[str, Any]) -> None:
    timeline = WorkerTimeline()  # where the fixed cost goes: sent with rank 0's reports
    spec: RunSpec = ray.get(config["spec"])
    cfg = spec.cfg
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int((cfg.scaling.resources_per_worker or {}).get("CPU", 1))))
    torch.manual_seed(cfg.seed)

    restored = Restored.latest(spec.endpoint_url, world)
    model, layout = build_model(spec, restored, device)
    pixels = Pixels(spec.meta["data"]["mean"], spec.meta["data"]["std"], device, layout)
    augment = make_augmenter(spec, device)
    task = for_data(spec.meta["data"], device, pixels, augment)  # images or next-token
    nominal = batching.nominal_steps_per_epoch(spec.num_train_rows, cfg.batch_size)
    step = strategy.make_step(model, spec, world, rank, nominal * cfg.epochs, task)
    if restored.state:
        strategy.load_train_state(step, restored, model)
        torch.set_rng_state(restored.state["torch_rng"])
    timeline.mark("model_ready")  # and its optimizer: the first in a process imports torch._dynamo
    feed, val_batches = make_feeds(spec, *strategy.data_shard(cfg, world, rank), device)
    if augment is not None and feed.id_range:  # draws hashed once an epoch, not per batch
        augment.hash_ids_once(*feed.id_range)
    own_rows = strategy.counts_rows(cfg, world, rank)  # pipeline: stage 0 records the ids
    timeline.mark("feed_ready")
    reporter = Reporter(spec.run_uri, spec.endpoint_url, spec.meta, rank, cfg.strategy == "fsdp")
    sample_log = SampleLog(spec.run_uri, spec.endpoint_url, rank) if cfg.record_sample_ids else None
    fault = parse_fault(cfg.fault_injection) if not restored.state else None  # first attempt only
    progress = WorkerProgress(spec.board, spec.fit_id, rank, world, cfg.progress_every_steps)
    history, best, resizes = restored.history, restored.best, restored.resizes
    gc_clock = process_clock()
    thread = ThreadClock()  # the loop's thread: CPU, runqueue, sleeps (thread_clock.py)

    for epoch in range(restored.start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        gc_clock.lap()  # from here to the epoch's end: what epoch_time_s covers
        thread.lap()
        resumed = restored.consumed if epoch == restored.start_epoch else None
        tally = EpochTally(device, rank, resumed, restored.state.get("epoch_sums"), sample_log)
        if augment is not None:
            augment.start_epoch(epoch)
        batches = feed.epoch(epoch, exclude=resumed)
        progress.start_epoch(epoch + 1, batches.steps, t0)
        for i, batch in enumerate(batches):
            step(*task.inputs(batch), tally.sums)
            tally.trained(batch.get("id") if own_rows else None, epoch, step.global_step)
            timeline.first_step(device)
            if fault == (epoch + 1, i + 1, rank):
                raise RuntimeError(
                    f"injected fault at epoch {epoch + 1} step {i + 1} on rank {rank}"
                )
            timing = progress.timing(step, batches, done=i + 1)
            every = cfg.checkpoint_every_steps
            if every and step.global_step % every == 0 and i < batches.steps - 1:  # mid-epoch
                sums, consumed = tally.checkpoint(world)
                seconds = time.perf_counter() - t0
                metrics = epoch_metrics(
                    epoch, step, sums, (i + 1) * cfg.batch_size, seconds, batches.wait_s, world
                )
                metrics |= task.metrics(metrics) | batches.read_seconds()
                if diverged(metrics):
                    reporter.metrics(metrics | timing | stopped(spec))
                    feed.close()
                    return
                state = train_state(
                    step,
                    epoch,
                    False,
                    epoch_sums=sums.cpu(),
                    consumed_ids=torch.from_numpy(consumed),
                )
                reporter.checkpoint(
                    metrics | {"epoch_complete": False} | timing,
                    strategy.checkpoint_model(step, model),
                    state,
                    history=history,
                    resizes=resizes,
                )
            progress.update(step, tally.sums, i, timing)
        if device.type == "cuda":  # the clock stops when the queued steps are done, not launched
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - t0

        val = strategy.validate(step, model, val_batches(), task) if val_batches else None
        sums = all_reduce(tally.sums)
        metrics = epoch_metrics(
            epoch, step, sums, batches.steps * cfg.batch_size, train_time, batches.wait_s, world
        )
        metrics["epoch_time_s"] = time.perf_counter() - t0
        # this thread over the same span: its CPU (on a GPU, what launching the steps cost the
        # host), its wait for a CPU, and how often it blocked
        metrics |= thread.lap()
        metrics |= gc_clock.lap()  # the garbage collector's pauses of this epoch (gc_clock.py)
        metrics |= batches.read_seconds()  # the epoch's read: how early it began, how long it took
        if device.type == "cuda":  # what the run needs of the device, for sizing and the report
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if val is not None:
            metrics.update(val_loss=val[0], val_accuracy=val[1])
        metrics |= task.metrics(metrics)  # perplexity and tokens/s for text
        if diverged(metrics):
            reporter.metrics(metrics | stopped(spec))
            break
        improved, stop, best = judge(cfg, metrics, best)
        history.append(dict(metrics))
        metrics |= progress.timing(step, batches, done=batches.steps) | {"epoch_end": True}
        metrics |= timeline.report() if rank == 0 else {}
        tally.flush()
        last = epoch + 1 == cfg.epochs or stop
        if last or improved or (epoch + 1) % cfg.checkpoint_every_epochs == 0:
            reporter.checkpoint(
                metrics,
                strategy.checkpoint_model(step, model),
                train_state(step, epoch, True),
                history=history,
                resizes=resizes,
                best=best,
                publish_best=improved,
            )
        else:
            reporter.metrics(metrics)
        if stop:
            break
    feed.close()  # an early stop leaves the next epoch's read-ahead running


def diverged(metrics: dict[str, Any]) -> bool:
    """The loss is no longer a number (NaN or inf). Every rank decides alike: the loss comes from
    all-reduced sums. The run then stops without checkpointing (the last checkpoint, from before,
    stays the latest) and ``fit`` raises: more epochs of NaN weights would only cost time, and
    Ray Train's restarts would diverge again from the same checkpoint."""
    return not math.isfinite(metrics["train_loss"])


def stopped(spec: RunSpec) -> dict[str, Any]:
    """What a diverged run's last report adds: recorded as its epoch's line of ``metrics.jsonl``
    (Ray Train keeps a report without a checkpoint nowhere else), where ``fit`` finds it."""
    return {"diverged": True, "fit_id": spec.fit_id, "epoch_end": True}


def train_state(step: TrainStep, epoch: int, complete: bool, **extra: Any) -> dict[str, Any]:
    """What a checkpoint saves besides the weights: optimizer, scheduler, RNG, where in the run."""
    return step.state_dict() | {
        "torch_rng": torch.get_rng_state(),
        "epoch": epoch,
        "epoch_complete": complete,
        **extra,
    }


def build_model(
    spec: RunSpec, restored: Restored, device: torch.device
) -> tuple[nn.Module, torch.memory_format]:
    """The worker's model, restored and wrapped for ``cfg.strategy`` (DDP, or sharded with FSDP:
    :mod:`lepton_ray.train.strategy`), and the memory layout its inputs take."""
    return strategy.build(spec, restored, device)


def make_feeds(spec: RunSpec, world: int, rank: int, device: torch.device) -> tuple[Feed, Any]:
    """The training feed and a function giving the validation batches (or None)."""
    from lepton_ray.train.device_cache import DeviceCache

    cfg = spec.cfg
    plan = Plan(cfg.seed, cfg.batch_size, world, rank, spec.order)
    val_shard = ray.train.get_dataset_shard("val") if spec.has_val else None
    # A JPEG dataset's rows are cropped afresh every epoch: always streamed (decode hook below).
    jpeg = spec.train_info is not None and spec.train_info.encoding == "jpeg"
    if (
        spec.feed == "cache" and not jpeg
    ):  # every worker reads the whole set once, in id order, into device memory
        from lepton_ray.data import read_ray

        whole = (
            ray.train.get_dataset_shard("train")  # a user's Ray Dataset, not split
            if spec.train_info is None
            else read_ray(
                spec.train_info,
                normalize=False,
                batch_size=cfg.data.preprocess_batch_size,
                task_args=child_options(),  # not this worker's hook (lepton_ray.train.prestart)
            )
        )
        cache = DeviceCache(whole.iter_torch_batches(batch_size=4096, dtypes=BATCH_DTYPES), device)
        feed: Feed = CachedFeed(cache, plan)
    elif spec.feed == "ring" and not jpeg:  # its shards through a window of rows in device memory
        local = ray.train.get_context().get_local_world_size()  # workers sharing its node
        feed = RingFeed(
            spec.train_info,
            plan,
            rows=cfg.data.ring_rows,
            epochs=cfg.epochs,
            device=device,
            preprocess_batch=cfg.data.preprocess_batch_size,
            deterministic=cfg.data.deterministic,
            read_cpus=cfg.data.ring_read_cpus or read_cpus(local),
            read_task_bytes=read_task_bytes(local),
        )
    elif spec.train_info is None:  # a user's Ray Dataset: Ray Train splits it
        feed = ShardFeed(
            ray.train.get_dataset_shard("train"),
            rows=spec.num_train_rows,
            global_batch=cfg.batch_size,
            world=world,
            rank=rank,
            shuffle_buffer_rows=cfg.data.shuffle_buffer_rows if spec.order != "shuffled" else 0,
            seed=cfg.seed,
            pin_memory=device.type == "cuda",
        )
    else:
        feed = StreamedFeed(
            spec.train_info,
            plan,
            augment=() if spec.device_augment else cfg.data.augment,
            preprocess_batch=cfg.data.preprocess_batch_size,
            shuffle_buffer_rows=cfg.data.shuffle_buffer_rows,
            pin_memory=device.type == "cuda",
            deterministic=cfg.data.deterministic,
            decode_on=jpeg_decode_on(cfg.data.augment_on, device) if jpeg else "cpu",
            device=device,
            epochs=cfg.epochs,
        )
    if val_shard is None:
        return feed, None
    if spec.feed == "cache":  # then no Ray Data execution per epoch at all
        val_cache = DeviceCache(
            val_shard.iter_torch_batches(batch_size=4096, dtypes=BATCH_DTYPES), device
        )
        return feed, lambda: val_cache.chunks(512)
    return feed, lambda: val_shard.iter_torch_batches(batch_size=512, dtypes=BATCH_DTYPES)


def make_augmenter(spec: RunSpec, device: torch.device) -> Any:
    """Augmentation in the loop, on the worker's device (``DataConfig.augment_on``), or None."""
    if not spec.device_augment:
        return None
    from lepton_ray.data.device_transforms import Augmenter

    return Augmenter(spec.device_augment, device, spec.cfg.seed)


def judge(
    cfg: TrainConfig, metrics: dict[str, Any], best: dict[str, Any] | None
) -> tuple[bool, bool, dict | None]:
    """(improved, stop early, best so far) on the monitored metric, decided by rank 0 for all ranks
    (workers' validation numbers can differ in the last digits; their decisions must not)."""
    name = cfg.monitor if cfg.monitor in metrics else "train_loss"
    value = metrics[name]
    improved = best is None or (
        value < best["value"] if lower_is_better(name) else value > best["value"]
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


def epoch_metrics(
    epoch: int,
    step: TrainStep,
    sums: torch.Tensor,
    samples: int,
    seconds: float,
    wait: float,
    world: int,
) -> dict[str, Any]:
    """The metrics of an epoch so far: loss and accuracy from globally reduced ``sums`` (loss * n,
    correct, n), pace from the ``samples`` all workers trained in ``seconds`` of this attempt."""
    return {
        "epoch": epoch + 1,
        "step": step.global_step,
        "train_loss": float(sums[0] / sums[2]),
        "train_accuracy": float(sums[1] / sums[2]),
        "samples_per_second": samples / max(seconds, 1e-9),
        "data_wait_s": wait,
        "world_size": world,
        "lr": step.scheduler.get_last_lr()[0],
    }
