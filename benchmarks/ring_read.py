"""Benchmark: what reading an epoch for the streaming ring costs the machine, against Ray Data's own
consumer path for the same rows.

The ring (``DataConfig(feed="ring")``) reads every epoch again while the GPU trains on the last
one, so its read competes with the training loop for the node's CPUs (the loop's Python launches
the GPU's kernels). This measures one worker's read alone, no model: rows/s, and CPU-seconds per
epoch in each kind of process, taken from ``/proc`` (psutil) before and after each epoch:

- ``ring``: as a ring-fed worker reads, :mod:`lepton_ray.train.ring_reader`: Ray Data's
  execution in a reader actor, one block per shard passed through as read, packed into rows by
  the consumer (here the driver stands for the training worker; on a GPU the rows would be
  pinned);
- ``ray_data``: the same rows, in the same order and with the same CPU limit for Ray Data's
  tasks, through ``read_ray(normalize=False)`` and ``iter_batches`` in the consumer: decoded to
  (N, C, H, W) uint8 blocks by the tasks, the execution in the consumer's process.

Both deliver every row of the epoch to the consumer's memory. The first epoch starts Ray's
worker processes and is left out of the means. Meant for a CPU machine (measured on 2 shared
cores); the GPU figures of the ring are ``benchmarks.gpu_train --cases ring``.

    python -m benchmarks.ring_read [--rows 204800] [--epochs 4] [--no-doc]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from typing import Any

from benchmarks import harness
from benchmarks.harness import fmt, table

KEY = "ring_read"
KINDS = ("consumer", "reader_actor", "ray_tasks", "ray_system")
CASES = {
    "ring": "the ring's read: reader actor, shards passed through as read, packed by the consumer",
    "ray_data": "Ray Data's consumer path: `read_ray(normalize=False)`, `iter_batches` in the consumer",
}


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process and of every Ray process on the machine, by pid."""
    import psutil

    me = os.getpid()
    out: dict[int, tuple[str, float]] = {}
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        try:
            cmd, t = " ".join(p.info["cmdline"] or []), p.info["cpu_times"]
        except (psutil.Error, TypeError):
            continue
        if p.pid == me:
            kind = "consumer"
        elif "RingReader" in cmd:
            kind = "reader_actor"
        elif cmd.startswith("ray::") or "default_worker.py" in cmd:
            kind = "ray_tasks"
        elif "ray" in cmd and ("raylet" in cmd or "gcs_server" in cmd or "ray/" in cmd):
            kind = "ray_system"
        else:
            continue
        if t is not None:
            out[p.pid] = (kind, t.user + t.system)
    return out


def spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict:
    by_kind = dict.fromkeys(KINDS, 0.0)
    for pid, (kind, secs) in after.items():
        by_kind[kind] += secs - before.get(pid, (kind, 0.0))[1]
    return by_kind


def ring_blocks(
    info: Any, plan: Any, epoch: int, cpus: int, reader: Any, read: int, queue_rows: int
) -> Any:
    """``plan``'s epoch as a ring-fed worker reads it: read ``read`` of its RingReader ``reader``,
    packed blocks (unpinned: no GPU here) through a host queue of ``queue_rows``; the layout."""
    from lepton_ray.train.ring import BlockReader, RowLayout
    from lepton_ray.train.ring_reader import ReadSpec, RemoteBlocks, block_rows

    h, w, c = info.shape
    layout = RowLayout((c, h, w))
    spec = ReadSpec(layout.shape, info, plan.ids, epoch, block_rows(layout.pixels, 256), True, cpus)
    return layout, BlockReader(RemoteBlocks(reader, read, spec, pin=False), layout, queue_rows)


def ring_epoch(info: Any, plan: Any, epoch: int, cpus: int, reader: Any, read: int) -> int:
    """One epoch of ``plan`` read as a ring-fed worker reads it; the rows it delivered."""
    _, blocks = ring_blocks(info, plan, epoch, cpus, reader, read, 1 << 20)
    return _all_of(plan, sum(len(block) for block in blocks))


def ray_data_epoch(info: Any, plan: Any, epoch: int, cpus: int) -> int:
    """The same rows through Ray Data's consumer path, in order, ``cpus`` for its tasks."""
    from lepton_ray.data import read_ray
    from lepton_ray.train.ring_reader import block_rows

    ds = read_ray(
        info,
        keep_ids=plan.ids,
        normalize=False,
        epoch=epoch,
        batch_size=block_rows(math.prod(info.shape), 256),
    )
    options = ds.context.execution_options  # this dataset's copy of the context
    options.preserve_order = True
    options.resource_limits = options.resource_limits.copy(cpu=cpus)
    rows = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        rows += len(batch["id"])
    return _all_of(plan, rows)


def _all_of(plan: Any, rows: int) -> int:
    if rows != len(plan.ids):
        raise RuntimeError(f"the read delivered {rows} of the plan's {len(plan.ids)} rows")
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from lepton_ray.data import prepare, read_shard_ids
    from lepton_ray.train.ring_reader import read_cpus, start_reader
    from lepton_ray.train.sampling import sequential_plan

    r = harness.record(KEY, rows=args.rows, shape=args.shape, epochs=args.epochs)
    with tempfile.TemporaryDirectory(prefix="lepton-ring-read-") as tmp:
        info = prepare(f"synthetic:{args.rows}:{args.shape}", tmp)["train"]
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            cpus = args.read_cpus or read_cpus(1)
            ids = read_shard_ids(info)
            reader, read = start_reader(), 0
            cases: dict[str, Any] = {}
            for name in CASES:
                epochs = []
                for epoch in range(args.epochs):
                    plan = sequential_plan(
                        ids, seed=0, epoch=epoch, global_batch=512, world=1, rank=0
                    )
                    before, t0 = cpu_seconds(), time.perf_counter()
                    if name == "ring":
                        read += 1
                        rows = ring_epoch(info, plan, epoch, cpus, reader, read)
                    else:
                        rows = ray_data_epoch(info, plan, epoch, cpus)
                    wall = time.perf_counter() - t0
                    epochs.append({"rows": rows, "wall_s": wall, **spent(before, cpu_seconds())})
                cases[name] = {"what": CASES[name], **summarise(epochs)}
            ray.kill(reader)
        finally:
            ray.shutdown()
    r.update(
        shards=len(info.shards),
        read_cpus=cpus,
        cpus=os.cpu_count(),
        cases=cases,
        ring_cpu_over_ray_data=round(
            cases["ring"]["cpu_s_per_epoch"] / cases["ray_data"]["cpu_s_per_epoch"], 3
        ),
        ring_rows_per_s_over_ray_data=round(
            cases["ring"]["rows_per_s"] / cases["ray_data"]["rows_per_s"], 3
        ),
    )
    return r


def summarise(epochs: list[dict[str, float]]) -> dict[str, Any]:
    """Means over the epochs after the first; every epoch's figures kept."""
    measured = epochs[1:] if len(epochs) > 1 else epochs

    def mean(key: str) -> float:
        return sum(e[key] for e in measured) / len(measured)

    return {
        "rows_per_epoch": epochs[0]["rows"],
        "rows_per_s": round(sum(e["rows"] for e in measured) / sum(e["wall_s"] for e in measured)),
        "cpu_s_per_epoch": round(sum(mean(k) for k in KINDS), 2),
        "cpu_s_by_process": {k: round(mean(k), 2) for k in KINDS},
        "per_epoch": [{k: round(v, 2) for k, v in e.items()} for e in epochs],
    }


def render(r: dict[str, Any], key: str) -> str:
    rows = []
    for name, c in r["cases"].items():
        by = c["cpu_s_by_process"]
        rows.append(
            [
                c.get("what", CASES.get(name, name)),
                fmt(c["rows_per_s"]),
                fmt(c["cpu_s_per_epoch"], 2),
            ]
            + [fmt(by[k], 2) for k in KINDS]
        )
    return (
        f"## The ring's read: CPU per epoch against Ray Data's consumer path (`{key}`)\n\n"
        f"{harness.provenance(r, key)}\n\n"
        f"One worker's epoch of {fmt(r['rows'])} rows of {r['shape']} uint8 pixels in "
        f"{r['shards']} Parquet shards, Ray Data's tasks limited to {fmt(r['read_cpus'])} of "
        f"{r['cpus']} CPUs, no model; means over epochs 2-{r['epochs']}. CPU-seconds per epoch by "
        "process: the consumer (the training worker's place), the ring's reader actor, Ray "
        "Data's task workers, Ray's own processes (raylet, GCS).\n\n"
        + table(
            [
                "read",
                "rows/s",
                "CPU s / epoch",
                "consumer",
                "reader actor",
                "Ray Data tasks",
                "Ray system",
            ],
            rows,
        )
        + f"\n\nRing ÷ Ray Data: CPU per epoch {r['ring_cpu_over_ray_data']:.3f}, rows/s "
        f"{r['ring_rows_per_s_over_ray_data']:.3f}.\n"
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rows", type=int, default=204_800)
    ap.add_argument("--shape", default="32x32x3")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--read-cpus", type=int, default=0, help="default: the ring's own default")


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
