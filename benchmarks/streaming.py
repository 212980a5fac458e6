"""Benchmark: one epoch of a dataset larger than Ray's object store, streamed with bounded memory.

Claim: training can read a dataset several times larger than Ray's object store in one pass, each
row exactly once, nothing spilled to disk and the store never over capacity. Meant for a CPU
machine (measured on 2 shared cores).

Generates ``synthetic:ROWS:HxWxC`` (3 GB of pixels by default: 1,000,000 images of 32x32x3) as a
prepared dataset, starts a local Ray whose object store is a third of that, and reads one epoch
the way the trainer does: with ``--feed stream`` (the CPU default) shard order shuffled, random
crop + flip on the Ray Data CPU workers, uint8 rows, a local shuffle buffer where they are
consumed; with ``--feed ring`` as a ring-fed GPU worker reads (its shards in plan order, whole
blocks through its reader actor, packed into rows in host memory, the host queue the ring's
default bound; no GPU needed). Samples the object store while it runs and reports the peak, what
was spilled to disk, the driver's peak RSS and rows/s.

    python -m benchmarks.streaming [--rows 1000000] [--object-store-mb 1024] [--feed ring] [--no-doc]

The test suite runs the same code at a small size (``--rows 80000 --object-store-mb 80
--no-report``: the JSON on stdout's last line, nothing written).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import tempfile
import threading
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.harness import Goal, fmt, table

KEY = "streaming"
GOALS = [
    Goal("every row seen exactly once", "every_row_once", "==", True),
    Goal("nothing spilled to disk (MiB)", "spilled_mib", "<=", 0),
    Goal("peak object-store use ÷ its capacity <= 1", "peak_store_fraction", "<=", 1.0),
]


class StoreSampler:
    """Samples the object store (MiB used, MiB spilled) in a thread while a block runs."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peak_mib, self.spilled_mib = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def sample() -> tuple[int, int]:
        import ray
        from ray._private.internal_api import memory_summary

        # This cluster's address: other Ray instances may run on the same machine.
        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        used = re.search(r"Plasma memory usage (\d+) MiB", text)
        spilled = re.search(r"Spilled (\d+) MiB", text)
        return int(used.group(1)) if used else 0, int(spilled.group(1)) if spilled else 0

    def _run(self) -> None:
        while not self._stop.is_set():
            used, spilled = self.sample()
            self.peak_mib, self.spilled_mib = (
                max(self.peak_mib, used),
                max(self.spilled_mib, spilled),
            )
            self._stop.wait(self.every_s)

    def __enter__(self) -> StoreSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        used, spilled = self.sample()
        self.peak_mib, self.spilled_mib = max(self.peak_mib, used), max(self.spilled_mib, spilled)


def stream_ids(info: Any) -> Any:
    """The ids of one epoch read as the streamed feed reads it, batch by batch."""
    from lepton_ray.data import read_ray

    ds = read_ray(
        info,
        shuffle="files",
        shuffle_seed=0,
        augment=("random_crop", "hflip"),
        batch_size=1024,
        normalize=False,
    )
    for batch in ds.iter_batches(
        batch_size=256, local_shuffle_buffer_size=4096, local_shuffle_seed=0
    ):
        yield batch["id"]


def ring_ids(info: Any) -> Any:
    """The ids of one epoch read as a ring-fed worker reads it, block by block (packed rows in
    host memory; the queue bounded as the ring's is by default)."""
    import ray

    from benchmarks.ring_read import ring_blocks
    from lepton_ray.config import DataConfig
    from lepton_ray.data import read_shard_ids
    from lepton_ray.train.feed import default_queue_rows
    from lepton_ray.train.ring_reader import read_cpus, start_reader
    from lepton_ray.train.rows import RowLayout
    from lepton_ray.train.sampling import sequential_plan

    # global batch 1: the plan keeps every row (a bigger batch leaves out the last partial step)
    plan = sequential_plan(read_shard_ids(info), seed=0, epoch=0, global_batch=1, world=1, rank=0)
    reader = start_reader()
    try:
        h, w, c = info.shape
        queue = default_queue_rows(DataConfig().ring_rows, RowLayout((c, h, w)).width)
        layout, blocks = ring_blocks(info, plan, 0, read_cpus(1), reader, 1, queue)
        for block in blocks:
            yield layout.unpack(block)["id"].numpy()
    finally:
        ray.kill(reader)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from lepton_ray.data import prepare

    r = harness.record(KEY, feed=args.feed)
    with tempfile.TemporaryDirectory(prefix="lepton-stream-") as tmp:
        source = f"synthetic:{args.rows}:{args.shape}"
        info, prepare_s = harness.timed(
            prepare, source, args.dataset_dir or tmp, rows_per_shard=args.rows_per_shard
        )
        info = info["train"]
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, 4),
            object_store_memory=args.object_store_mb << 20,
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            seen = np.zeros(info.num_rows, np.int32)
            with StoreSampler() as store, harness.Timer() as t:
                for ids in ring_ids(info) if args.feed == "ring" else stream_ids(info):
                    np.add.at(seen, ids, 1)
        finally:
            ray.shutdown()
    pixels_mib = info.pixel_bytes / 2**20
    r.update(
        rows=info.num_rows,
        shape=list(info.shape),
        shards=len(info.shards),
        dataset_pixels_mib=round(pixels_mib, 1),
        object_store_mib=args.object_store_mb,
        dataset_to_store_ratio=round(pixels_mib / args.object_store_mb, 2),
        every_row_once=bool((seen == 1).all()),
        peak_object_store_mib=store.peak_mib,
        spilled_mib=store.spilled_mib,
        driver_peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        epoch_s=round(t.seconds, 1),
        rows_per_s=round(info.num_rows / t.seconds),
        prepare_s=round(prepare_s, 1),
        cpus=os.cpu_count(),
    )
    return r


READS = {
    "stream": "training reads it: shard order shuffled, crop + flip on the Ray Data CPU workers, "
    "uint8 rows, a 4,096-row local shuffle buffer",
    "ring": 'a ring-fed worker reads it (`feed="ring"`): its shards in plan order, a block per '
    "read task through its reader actor, packed into rows in host memory, a queue of at most the "
    "ring's default 262,144 rows",
}


def metrics(r: dict[str, Any]) -> dict[str, Any]:
    return {**r, "peak_store_fraction": r["peak_object_store_mib"] / r["object_store_mib"]}


def render(r: dict[str, Any], key: str) -> str:
    rows = [
        ["every row seen exactly once", fmt(r["every_row_once"])],
        [
            "peak object-store use",
            f"{r['peak_object_store_mib']} MiB of {r['object_store_mib']} MiB",
        ],
        ["spilled to disk", f"{r['spilled_mib']} MiB"],
        ["driver peak RSS", f"{r['driver_peak_rss_mib']} MiB"],
        ["epoch time / throughput", f"{r['epoch_s']} s / {fmt(r['rows_per_s'])} rows/s"],
    ]
    hw = r.get("hardware") or f"{r.get('cpus')} CPUs, {r.get('machine')}"
    return (
        "## Streaming a dataset larger than the object store"
        + (" through the ring" if r.get("feed") == "ring" else "")
        + f" (`{key}`)" * (key != KEY)
        + "\n\n"
        f"{harness.provenance({**r, 'hardware': hw}, key)} One epoch of {fmt(r['rows'])} synthetic "
        f"{'x'.join(map(str, r['shape']))} images "
        f"({r['dataset_pixels_mib'] / 1024:.2f} GiB of pixels in "
        f"{r['shards']} Parquet shards) through a local Ray whose object store holds "
        f"{r['object_store_mib']} MiB ({r['dataset_to_store_ratio']}x less than the data), read as "
        + READS[r.get("feed", "stream")]
        + ".\n\n"
        + table(["measure", "value"], rows)
        + "\n\n"
        + harness.goal_lines(GOALS, metrics(r))
        + "\n"
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shape", default="32x32x3")
    ap.add_argument("--object-store-mb", type=int, default=1024)
    ap.add_argument("--rows-per-shard", type=int, default=None)
    ap.add_argument(
        "--feed",
        choices=("stream", "ring"),
        default="stream",
        help="read as the streamed feed does (the CPU default) or as a ring-fed worker does",
    )
    ap.add_argument(
        "--dataset-dir",
        default=None,
        help="where to write the dataset (default: a temporary folder)",
    )


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
