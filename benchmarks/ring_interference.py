"""Benchmark on one GPU: which part of the ring's read slows the training step beside it.

``gpu_train --cases ring`` at 1M-row epochs ran its second epoch, whose next epoch's read ran
throughout, at 0.81 of the plain loop's same epoch, and its third, whose read ended halfway, at 0.90.
The read competes with the step somewhere; this finds where. The fit's loop is left out: the same
training step (the model, batch, bf16 autocast and channels-last of ``benchmarks._gpu.plain_loop``,
the same crop + flip and conversion on the device) runs in this process for a fixed number of
steps, its batches from one source at a time (a *phase*):

- ``plain``: uint8 rows resident on the device, a permutation gathered per batch (the baseline);
- ``ring_prepacked``: through a :class:`~lepton_ray.train.ring.Ring` fed blocks packed and
  pinned in advance: the ring's own per-step path (draws, gathers, compaction, the host-to-device
  copy of each block on its side stream), no reading;
- ``ring_thread``: the same, its blocks packed from Arrow tables already in host memory into
  pinned memory by the worker's reader thread (:class:`~lepton_ray.train.ring.BlockReader`), as
  :class:`~lepton_ray.train.ring_reader.RemoteBlocks` packs them: the thread without Ray;
- ``ring_ray``: the ring as a fit feeds it: a RingReader actor reads the Parquet shards through
  Ray Data with the default CPU limit, this process's reader thread maps and packs the blocks;
- ``ring_trainer_step``: ``ring_prepacked``'s batches through the library's own step instead
  (:class:`~lepton_ray.train.step.Pixels`, the hashed crop + flip of
  :class:`~lepton_ray.data.device_transforms.Augmenter`, :class:`~lepton_ray.train.step.TrainStep`
  with its loss and accuracy sums): what a fit's loop adds to the step itself;
- ``plain_load``: the baseline beside ``--load-procs`` processes decoding Parquet shards and
  packing them in a loop (the read's CPU work, on other cores, no Ray);
- ``plain_load_apart``: the same, the loop's thread pinned to one core and the load kept off it
  and its hyperthread siblings (what CPU affinity would give);
- ``plain_ray_read``: the baseline beside the ring's read running for another process (reader
  actor, Ray Data's tasks, a Ray task consuming the blocks at the plain loop's pace): Ray's side
  of the read without this process's thread.

With ``--where train_worker`` the phases run in the training thread of a Ray Train worker (a
``TorchTrainer`` of one worker) instead of this process's main thread: the same steps in the
process a fit trains in, to tell what the worker's process costs from what the fit's loop does.

The phases run in the order given and then in reverse, so a drift of the machine over the run
falls on both sides of each; each reports samples/s after its warm-up steps, the launching
thread's CPU time per step (``host_ms``: near the wall time per step when the thread, not the GPU,
sets the pace), the host's wall time per step spent getting the batch (``source_ms``: the
source's launches, and any wait for a block), this process's garbage-collector pauses, the
thread's wait for a CPU and how often it blocked or was preempted per step (``runqueue_ms``,
``sleeps_per_step``, ``preemptions_per_step``; in the JSON, on Linux), and the PyTorch operations a step of it dispatches (``ops``, a mean over ``--count-steps`` steps after the
clock stops; each is a kernel launch or a view: what the host pays per step whatever the
machine). Every ratio is to the mean of the two ``plain`` runs of the same run.

Without a GPU it runs on the CPU (``--model cnn --steps 8 --warmup 2 --rows 8192``): a wiring
check, not a measurement.

    python -m benchmarks.ring_interference [--phases plain,ring_ray] [--steps 600] [--no-doc]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _gpu, harness
from benchmarks.harness import fmt, table

KEY = "ring_interference"
PHASES = {
    "plain": "rows resident on the device, a permutation gathered (the baseline)",
    "ring_prepacked": "the ring fed blocks packed and pinned in advance (its per-step path)",
    "ring_thread": "the ring, blocks packed into pinned memory by the reader thread (no Ray)",
    "ring_ray": "the ring as a fit feeds it: reader actor, Ray Data's tasks, the reader thread",
    "ring_trainer_step": "the ring from prepacked blocks, through the library's own step",
    "plain_load": "the baseline beside processes decoding and packing Parquet (no Ray)",
    "plain_load_apart": "the same, the loop's thread pinned away from the load's cores",
    "plain_ray_read": "the baseline beside the ring's read for another process (Ray only)",
}
RAY_PHASES = ("ring_ray", "plain_ray_read")


class Step:
    """The training step of ``benchmarks._gpu.plain_loop``'s ``uint8_augmented`` loop, on a
    (B, C, H, W) uint8 batch and its labels wherever they come from."""

    def __init__(self, model_name: str, batch: int, steps: int, dev: Any):
        import torch

        from lepton_ray import build_model
        from lepton_ray.config import OptimConfig
        from lepton_ray.train.step import build_optimizer, lr_factor

        self.dev, self.cuda = dev, dev.type == "cuda"
        torch.manual_seed(0)
        self.fmt = torch.channels_last if self.cuda else torch.contiguous_format
        model = build_model(model_name, in_channels=3, num_classes=10)
        self.model = model.to(dev, memory_format=self.fmt)
        cfg = OptimConfig()
        self.opt = build_optimizer(self.model, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s % steps, steps, cfg)
        )
        self.scale = torch.full((1, 3, 1, 1), 1 / (255 * 0.25), device=dev)
        self.shift = torch.full((1, 3, 1, 1), -0.5 / 0.25, device=dev)
        self.autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cuda)

    def __call__(self, batch: dict[str, Any]) -> None:
        import torch.nn.functional as F

        x, y = _gpu.crop_flip(batch["image"]), batch["label"]
        x = x.float().contiguous(memory_format=self.fmt).mul_(self.scale).add_(self.shift)
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.sched.step()


class TrainerStep:
    """The step of a fit's loop on one worker: the batch normalised and augmented on the device
    (the hashed crop + flip, draws hashed once an epoch for ids in ``[0, rows)``), the library's
    :class:`~lepton_ray.train.step.TrainStep` (autocast, loss and accuracy sums, SGD, schedule)."""

    def __init__(self, model_name: str, batch: int, steps: int, rows: int, dev: Any):
        import torch

        from lepton_ray import build_model
        from lepton_ray.config import TrainConfig
        from lepton_ray.data.device_transforms import Augmenter
        from lepton_ray.train.step import Pixels, TrainStep
        from lepton_ray.train.task import Classification

        self.dev, self.cuda = dev, dev.type == "cuda"
        torch.manual_seed(0)
        fmt_ = torch.channels_last if self.cuda else torch.contiguous_format
        model = build_model(model_name, in_channels=3, num_classes=10).to(dev, memory_format=fmt_)
        augment = Augmenter(_gpu.AUGMENT, dev, seed=0)
        augment.hash_ids_once(0, rows)
        augment.start_epoch(0)
        self.task = Classification(Pixels([0.5] * 3, [0.25] * 3, dev, fmt_), augment)
        cfg = TrainConfig(batch_size=batch, epochs=1)
        self.step = TrainStep(model, cfg, 1, 0, steps, self.task)
        self.sums = torch.zeros(3, dtype=torch.float64, device=dev)

    def __call__(self, batch: dict[str, Any]) -> None:
        self.step(*self.task.inputs(batch), self.sums)


def count_ops(fn: Any) -> tuple[int, int]:
    """``fn()``'s PyTorch operations: all of them, and those that are not views (kernels)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[Any] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with Count() as c:
        fn()
    views = sum(_is_view(op) for op in c.ops)
    return len(c.ops), len(c.ops) - views


def _is_view(op: Any) -> bool:
    """An operation whose result aliases its input without writing it (no kernel runs)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in op._schema.returns)


def measure(
    step: Any, batches: Iterator[dict[str, Any]], steps: int, warmup: int, counted: int
) -> dict:
    """``warmup`` steps, then ``steps`` timed ones (GPU synchronised at both ends), then
    ``counted`` more whose operations are counted (a mean per step)."""
    from lepton_ray.train.gc_clock import process_clock
    from lepton_ray.train.thread_clock import ThreadClock

    for _ in range(warmup):
        step(next(batches))
    gc_clock = process_clock()
    harness.sync(step.dev)
    gc_clock.lap()
    thread = ThreadClock()
    t0 = time.perf_counter()
    n, fetching = 0, 0.0
    for _ in range(steps):
        f0 = time.perf_counter()
        batch = next(batches)
        fetching += time.perf_counter() - f0
        step(batch)
        n += len(batch["label"])
    # before the final wait: the thread's own work (its CPU), its wait for a CPU and how often it
    # blocked (Linux)
    sched = thread.lap()
    harness.sync(step.dev)
    wall = time.perf_counter() - t0
    gc = gc_clock.lap()
    ops, kernels = count_ops(lambda: [step(next(batches)) for _ in range(counted)])
    return {
        "samples_per_s": round(n / wall, 1),
        "wall_ms": round(1e3 * wall / steps, 3),
        "host_ms": round(1e3 * sched["loop_cpu_s"] / steps, 3),
        "source_ms": round(1e3 * fetching / steps, 3),
        "gc_s": gc["gc_s"],
        "gc_full": gc["gc_full"],
        **(
            {
                "runqueue_ms": round(1e3 * sched["loop_runqueue_s"] / steps, 3),
                "sleeps_per_step": round(sched["loop_sleeps"] / steps, 2),
                "preemptions_per_step": round(sched["loop_preemptions"] / steps, 2),
            }
            if "loop_runqueue_s" in sched
            else {}
        ),
        "ops": round(ops / counted, 1),
        "kernel_ops": round(kernels / counted, 1),
    }


# --- the sources ------------------------------------------------------------------------------
def resident_batches(rows: int, batch: int, dev: Any) -> Iterator[dict[str, Any]]:
    """The plain loop's: uint8 rows on the device, a fresh permutation each pass."""
    import torch

    fmt_ = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    n = rows // batch * batch
    x_all = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=dev)
    x_all = x_all.contiguous(memory_format=fmt_)
    y_all = torch.randint(0, 10, (n,), device=dev)
    while True:
        order = torch.randperm(n, device=dev)
        for s in range(n // batch):
            idx = order[s * batch : (s + 1) * batch]
            yield {"image": x_all[idx], "label": y_all[idx], "id": idx}


def ring_batches(ring: Any, blocks: Any, batch: int, seed: int) -> Iterator[dict[str, Any]]:
    """Batches served by ``ring`` from ``blocks`` (endless), one long epoch at a time."""
    from lepton_ray.train.ring import ring_generator, serve

    for epoch in itertools.count():
        generator = ring_generator(seed, epoch, 0, ring.device)
        yield from serve(ring, blocks, 1 << 16, batch, generator)


def shard_tables(info: Any) -> list[Any]:
    """Every shard of ``info`` as the Arrow table Ray Data's read hands over (in host memory)."""
    from lepton_ray.data.dataset import shard_locations
    from lepton_ray.data.shard_file import read_shard

    cols = ("image", "label", "id")
    return [
        read_shard(loc, s["path"], int(s["rows"]), cols, info.uri)
        for s, loc in zip(info.shards, shard_locations(info), strict=True)
    ]


def packed(tables: list[Any], layout: Any, pin: bool) -> Iterator[Any]:
    """``tables`` packed into (pinned) rows as RemoteBlocks packs a mapped block, round and round."""
    for t in itertools.cycle(tables):
        yield layout.pack(t, pin=pin)


class RayRead:
    """The ring's read of ``info`` by a RingReader actor, epoch after epoch, as packed blocks;
    ``cancel`` stops the read in progress (BlockReader's close calls it)."""

    def __init__(self, info: Any, layout: Any, cpus: int, pin: bool, batch: int):
        from lepton_ray.data import read_shard_ids
        from lepton_ray.train.ring_reader import start_reader

        self.info, self.layout, self.cpus, self.pin, self.batch = info, layout, cpus, pin, batch
        self.ids = read_shard_ids(info)
        self.reader, self.reads, self.current, self.stopped = start_reader(), 0, None, False

    def __iter__(self) -> Iterator[Any]:
        from lepton_ray.train.ring_reader import ReadSpec, RemoteBlocks, block_rows
        from lepton_ray.train.sampling import sequential_plan

        for epoch in itertools.count():
            if self.stopped:
                return
            p = sequential_plan(
                self.ids, seed=0, epoch=epoch, global_batch=self.batch, world=1, rank=0
            )
            shards = self.info.only(p.shards)
            rows = block_rows(self.layout.pixels, 256)
            spec = ReadSpec(self.layout.shape, shards, p.ids, epoch, rows, True, self.cpus)
            self.reads += 1
            self.current = RemoteBlocks(self.reader, self.reads, spec, pin=self.pin)
            yield from self.current

    def cancel(self) -> None:
        self.stopped = True
        if self.current is not None:
            self.current.cancel()


def drain_read(info: Any, shape: tuple[int, ...], cpus: int, rows_per_s: float, secs: float) -> int:
    """(A Ray task.) Consume the ring's read of ``info`` for ``secs`` at ``rows_per_s``, packing
    each block and dropping it: the read's load on the node without the training process."""
    from lepton_ray.train.rows import RowLayout

    layout = RowLayout(shape)
    source = RayRead(info, layout, cpus, pin=False, batch=512)
    end, rows, t0 = time.time() + secs, 0, time.time()
    for block in source:
        rows += len(block)
        ahead = rows / rows_per_s - (time.time() - t0)
        if ahead > 0:
            time.sleep(ahead)
        if time.time() > end:
            source.cancel()
            break
    return rows


# --- the load without Ray -------------------------------------------------------------------
def _load(data: bytes, shape: tuple[int, ...], cpus: list[int] | None, stop: Any) -> None:
    """(A process.) Decode a Parquet shard from memory and pack it into rows until ``stop``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lepton_ray.train.rows import RowLayout

    if cpus:
        os.sched_setaffinity(0, cpus)
    layout = RowLayout(shape)
    out = None
    while not stop.is_set():
        table = pq.read_table(pa.BufferReader(data), columns=["image", "label", "id"])
        if out is None or len(out) != table.num_rows:
            out = np.empty((table.num_rows, layout.width), np.uint8)
        layout.pack_array(table, out=out)


def siblings(cpu: int) -> set[int]:
    """``cpu`` and its hyperthread siblings (one physical core), from sysfs."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        return set(_cpu_list(path.read_text()))
    except OSError:
        return {cpu}


def _cpu_list(text: str) -> list[int]:
    """``0-3,8`` -> [0, 1, 2, 3, 8]."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


class Load:
    """``procs`` processes of :func:`_load`, on ``cpus`` (all when None), until :meth:`stop`."""

    def __init__(self, data: bytes, shape: tuple[int, ...], procs: int, cpus: list[int] | None):
        ctx = mp.get_context("spawn")
        self.stop_event = ctx.Event()
        self.procs = [
            ctx.Process(target=_load, args=(data, shape, cpus, self.stop_event), daemon=True)
            for _ in range(procs)
        ]
        for p in self.procs:
            p.start()
        time.sleep(2.0)  # their imports done: the load is on before the clock starts

    def stop(self) -> None:
        self.stop_event.set()
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def topology() -> dict[str, Any]:
    """The CPUs this process may use and how they pair into physical cores."""
    cpus = sorted(os.sched_getaffinity(0))
    cores = sorted({tuple(sorted(siblings(c))) for c in cpus})
    return {"cpus": len(cpus), "physical_cores": len(cores), "siblings": [list(c) for c in cores]}


# --- the run --------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    _gpu.quiet_ray()
    dev = _gpu.device()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise SystemExit(f"unknown phase(s) {unknown}; choose from {list(PHASES)}")
    if "plain" not in phases:
        phases.insert(0, "plain")
    r = harness.record(
        KEY,
        setup={
            "model": args.model,
            "input": "3x32x32",
            "batch": args.batch_size,
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "ring_rows": args.ring_rows,
            "dataset_rows": args.rows,
            "load_procs": args.load_procs,
        },
        topology=topology(),
    )
    store = harness.scratch("lepton-ring-interference-")
    info = _gpu.prepared_dataset(args.rows, store)
    r["where"] = args.where
    in_worker = args.where == "train_worker"
    started = False  # Ray, where needed, started here (a caller's Ray is used and left up)
    if in_worker or any(p in RAY_PHASES for p in phases):
        import ray

        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
            started = True
    try:
        if in_worker:
            runs, r["read_cpus"] = in_train_worker(args, info, phases, dev.type == "cuda")
        else:
            runs, r["read_cpus"] = run_phases(args, info, phases)
    finally:
        if started:
            import ray

            ray.shutdown()

    def mean(rs: list[dict[str, Any]], key: str) -> float:
        return float(np.mean([x[key] for x in rs]))

    base = mean(runs["plain"], "samples_per_s")
    r["phases"] = {
        name: {
            "what": PHASES[name],
            "samples_per_s": round(mean(rs, "samples_per_s"), 1),
            "ratio_to_plain": round(mean(rs, "samples_per_s") / base, 3),
            **{k: round(mean(rs, k), 3) for k in ("host_ms", "wall_ms", "source_ms")},
            "runs": rs,
        }
        for name, rs in runs.items()
    }
    return r


def run_phases(
    args: argparse.Namespace, info: Any, phases: list[str]
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Each phase run twice (in order, then in reverse) in this thread: the runs by phase, and the
    read's CPU limit. Ray, where a phase needs it, is up already."""
    import torch

    from lepton_ray.data.dataset import shard_locations
    from lepton_ray.train.ring import Ring, RowLayout

    dev = _gpu.device()
    pin = dev.type == "cuda"
    step = Step(args.model, args.batch_size, args.steps + args.warmup, dev)
    trainer_step = (
        TrainerStep(args.model, args.batch_size, args.steps + args.warmup, args.rows, dev)
        if "ring_trainer_step" in phases
        else None
    )
    h, w, c = info.shape
    layout = RowLayout((c, h, w))
    tables = shard_tables(info)
    cpus = 1
    if any(p in RAY_PHASES for p in phases):
        from lepton_ray.train.ring_reader import read_cpus

        cpus = args.read_cpus or read_cpus(1)
    bench = Bench(
        args=args,
        step=step,
        trainer_step=trainer_step,
        resident=resident_batches(args.rows, args.batch_size, dev),
        ring=Ring(min(args.ring_rows, args.rows), layout.shape, dev),
        info=info,
        tables=tables,
        prepacked=list(itertools.islice(packed(tables, layout, pin), len(tables))),
        shard_bytes=shard_locations(info)[0].read_bytes(),
        cpus=cpus,
    )
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in phases}
    for name in phases + phases[::-1]:
        out = bench.phase(name, seed=len(runs[name]))  # each run of a phase draws afresh
        runs[name].append(out)
        print(f"{name}: {out}", flush=True)
    del bench, step, trainer_step
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return runs, cpus


def _phases_in_worker(config: dict[str, Any]) -> None:
    runs, cpus = run_phases(config["args"], config["info"], config["phases"])
    Path(config["out"]).write_text(json.dumps({"runs": runs, "read_cpus": cpus}))


def in_train_worker(
    args: argparse.Namespace, info: Any, phases: list[str], use_gpu: bool
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """:func:`run_phases` in the training thread of a Ray Train worker (a ``TorchTrainer`` of one
    worker, as a fit's): the same steps in the process and thread a fit trains in."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tmp = harness.scratch("lepton-ring-interference-")
    out = tmp / "runs.json"  # one node: the worker writes its runs where this process reads them
    TorchTrainer(
        _phases_in_worker,
        train_loop_config={"args": args, "info": info, "phases": phases, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=str(tmp)),
    ).fit()
    got = json.loads(out.read_text())
    return got["runs"], got["read_cpus"]


@dataclass
class Bench:
    """What the phases share: the steps, the sources' data, the ring and the read's CPU limit."""

    args: argparse.Namespace
    step: Step
    trainer_step: TrainerStep | None
    resident: Iterator[dict[str, Any]]
    ring: Any
    info: Any
    tables: list[Any]
    prepacked: list[Any]
    shard_bytes: bytes
    cpus: int
    plain_rates: list[float] = field(default_factory=list)

    def measure(self, step: Any, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        a = self.args
        return measure(step, batches, a.steps, a.warmup, a.count_steps)

    def phase(self, name: str, seed: int) -> dict[str, Any]:
        """One run of phase ``name`` (``seed``: its ring's draws): its source (and load) set up,
        measured, torn down."""
        from lepton_ray.train.feed import default_queue_rows
        from lepton_ray.train.ring import BlockReader

        args, layout, pin = self.args, self.ring.layout, self.step.cuda
        if name == "plain":
            out = self.measure(self.step, self.resident)
            self.plain_rates.append(out["samples_per_s"])
            return out
        if name.startswith("ring_"):
            if name in ("ring_prepacked", "ring_trainer_step"):
                source: Any = itertools.cycle(self.prepacked)
            elif name == "ring_thread":
                source = packed(self.tables, layout, pin)
            else:
                source = RayRead(self.info, layout, self.cpus, pin, args.batch_size)
            step = self.trainer_step if name == "ring_trainer_step" else self.step
            reader = BlockReader(
                source, layout, default_queue_rows(self.ring.capacity, layout.width)
            )
            try:
                batches = ring_batches(self.ring, reader, args.batch_size, seed)
                return self.measure(step, batches)
            finally:
                reader.close()
                if name == "ring_ray":
                    import ray

                    ray.kill(source.reader)
        if name in ("plain_load", "plain_load_apart"):
            apart = name == "plain_load_apart"
            saved = os.sched_getaffinity(0)
            mine = min(saved)
            others = sorted(saved - siblings(mine)) if apart else None
            load = Load(self.shard_bytes, layout.shape, args.load_procs, others)
            try:
                if apart:
                    os.sched_setaffinity(threading.get_native_id(), {mine})
                return self.measure(self.step, self.resident)
            finally:
                if apart:
                    os.sched_setaffinity(threading.get_native_id(), saved)
                load.stop()
        if name == "plain_ray_read":
            import ray

            pace = float(np.mean(self.plain_rates))  # the read at the plain loop's pace
            secs = 60.0 + 2 * args.steps * 0.05
            task = ray.remote(drain_read).options(num_cpus=0)
            ref = task.remote(self.info, layout.shape, self.cpus, pace, secs)
            time.sleep(5.0)  # its actor and the read's first tasks running
            try:
                return self.measure(self.step, self.resident)
            finally:
                ray.cancel(ref, force=True)
        raise AssertionError(name)


def render(r: dict[str, Any], key: str) -> str:
    s, topo = r["setup"], r["topology"]
    where = (
        "in the training thread of a Ray Train worker"
        if r.get("where") == "train_worker"
        else "in the benchmark's own process"
    )
    rows = [
        [
            f"`{name}`",
            p["what"],
            fmt(p["samples_per_s"]),
            f"{p['ratio_to_plain']:.3f}",
            fmt(p["wall_ms"], 2),
            fmt(p["host_ms"], 2),
            fmt(p["source_ms"], 2),
            _ops(p["runs"][0]),
            ", ".join(fmt(x["samples_per_s"]) for x in p["runs"]),
            ", ".join(f"{x['gc_s']:.3f}" for x in p["runs"]),
        ]
        for name, p in r["phases"].items()
    ]
    return (
        f"## What in the ring's read slows the step beside it (`{key}`)\n\n"
        f"{harness.provenance(r, key)}\n\n"
        f"{s['model']} at {s['input']}, batch {s['batch']}, {s['steps']} timed steps per run after "
        f"{s['warmup_steps']} warm-up steps, each phase run twice (in order, then in reverse) "
        f"{where}; "
        f"ring of {fmt(s['ring_rows'])} rows over a {fmt(s['dataset_rows'])}-row Parquet set; "
        f"the read's Ray Data tasks limited to {r['read_cpus']} CPUs; {s['load_procs']} load "
        f"processes. {topo['cpus']} CPUs in {topo['physical_cores']} physical cores. Ratios are "
        "to the mean of the two `plain` runs; `host ms` is the launching thread's CPU time per "
        "step, `wall ms` the step's wall time, `source ms` the host's time per step getting its "
        "batch (launches, and waits for blocks); `ops` the PyTorch operations a step dispatched "
        "(after the clock), `kernels` those of them that are not views.\n\n"
        + table(
            [
                "phase",
                "batches from",
                "samples/s",
                "÷ plain",
                "wall ms",
                "host ms",
                "source ms",
                "ops (kernels)",
                "each run",
                "GC s each run",
            ],
            rows,
        )
        + "\n"
    )


def _ops(run: dict[str, Any]) -> str:
    """A step's operations and its kernels among them; "–" for a result from before the count."""
    return f"{run['ops']:g} ({run['kernel_ops']:g})" if "ops" in run else "–"


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated, of {list(PHASES)}"
    )
    ap.add_argument("--model", default="resnet18", help="cnn for a CPU wiring check")
    ap.add_argument("--rows", type=int, default=1 << 20, help="rows of the Parquet set")
    ap.add_argument("--ring-rows", type=int, default=262_144, help="the ring's capacity")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=600, help="timed steps per run")
    ap.add_argument(
        "--warmup", type=int, default=200, help="untimed steps before each run (the ring's ramp)"
    )
    ap.add_argument(
        "--count-steps",
        type=int,
        default=64,
        help="steps whose operations are counted, after the clock (the ring computes its draws "
        "32 steps at a time at 262,144 rows: count over a multiple of that)",
    )
    ap.add_argument("--load-procs", type=int, default=4, help="processes of the plain_load phases")
    ap.add_argument("--read-cpus", type=int, default=0, help="default: the ring's own default")
    ap.add_argument(
        "--where",
        choices=("process", "train_worker"),
        default="process",
        help="run the phases in this process's main thread, or in the training thread of a Ray "
        "Train worker (one TorchTrainer worker, as a fit's)",
    )


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
