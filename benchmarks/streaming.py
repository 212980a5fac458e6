"""Benchmark: one epoch of a dataset larger than Ray's object store, streamed with bounded memory.

Generates ``synthetic:ROWS:HxWxC`` (3 GB of pixels by default: 1,000,000 images of 32x32x3) as a
prepared dataset, starts a local Ray whose object store is a third of that, and reads one epoch
the way the trainer does: shard order shuffled, random crop + flip on the Ray Data CPU workers,
uint8 rows, a local shuffle buffer where they are consumed. Samples the object store while it
runs and reports the peak, what was spilled to disk, the driver's peak RSS and rows/s.

    python -m benchmarks.streaming [--rows 1000000] [--object-store-mb 1024] [--out benchmarks/results]

The test suite runs the same code at a small size (``--rows 80000 --object-store-mb 80
--no-report``). Writes ``streaming.json`` and a section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import tempfile
import threading
import time

import numpy as np

from benchmarks.report import replace_section, save_result
from lepton_ray.data import prepare, read_ray


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


def run(
    rows: int, shape: str, object_store_mb: int, rows_per_shard: int | None, dataset_dir: str
) -> dict:
    import ray

    t0 = time.perf_counter()
    info = prepare(f"synthetic:{rows}:{shape}", dataset_dir, rows_per_shard=rows_per_shard)["train"]
    prepare_s = time.perf_counter() - t0
    pixels_mib = info.pixel_bytes / 2**20
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, 4),
        object_store_memory=object_store_mb << 20,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        ds = read_ray(
            info,
            shuffle="files",
            shuffle_seed=0,
            augment=("random_crop", "hflip"),
            batch_size=1024,
            normalize=False,
        )
        seen = np.zeros(info.num_rows, np.int32)
        t0 = time.perf_counter()
        with StoreSampler() as store:
            for batch in ds.iter_batches(
                batch_size=256, local_shuffle_buffer_size=4096, local_shuffle_seed=0
            ):
                np.add.at(seen, batch["id"], 1)
        epoch_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {
        "rows": info.num_rows,
        "shape": list(info.shape),
        "shards": len(info.shards),
        "dataset_pixels_mib": round(pixels_mib, 1),
        "object_store_mib": object_store_mb,
        "dataset_to_store_ratio": round(pixels_mib / object_store_mb, 2),
        "every_row_once": bool((seen == 1).all()),
        "peak_object_store_mib": store.peak_mib,
        "spilled_mib": store.spilled_mib,
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "epoch_s": round(epoch_s, 1),
        "rows_per_s": round(info.num_rows / epoch_s),
        "prepare_s": round(prepare_s, 1),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
    }


def section(r: dict) -> str:
    return (
        "\n## Streaming a dataset larger than the object store (`benchmarks/streaming.py`)\n\n"
        f"One epoch of {r['rows']:,} synthetic {'x'.join(map(str, r['shape']))} images "
        f"({r['dataset_pixels_mib'] / 1024:.2f} GiB of pixels in {r['shards']} Parquet shards) through a local Ray "
        f"whose object store holds {r['object_store_mib']} MiB ({r['dataset_to_store_ratio']}x smaller than the "
        f"data), read as training reads it: shard order shuffled, crop + flip on the Ray Data CPU workers, uint8 "
        f"rows, a 4,096-row local shuffle buffer. {r['cpus']} CPUs.\n\n"
        "| measure | value |\n| --- | --- |\n"
        f"| every row seen exactly once | {'yes' if r['every_row_once'] else '**no**'} |\n"
        f"| peak object-store use | {r['peak_object_store_mib']} MiB of {r['object_store_mib']} MiB |\n"
        f"| spilled to disk | {r['spilled_mib']} MiB |\n"
        f"| driver peak RSS | {r['driver_peak_rss_mib']} MiB |\n"
        f"| epoch time / throughput | {r['epoch_s']} s / {r['rows_per_s']:,} rows/s |\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shape", default="32x32x3")
    ap.add_argument("--object-store-mb", type=int, default=1024)
    ap.add_argument("--rows-per-shard", type=int, default=None)
    ap.add_argument(
        "--dataset-dir",
        default=None,
        help="where to write the dataset (default: a temporary folder)",
    )
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument(
        "--no-report", action="store_true", help="print the JSON only (what the tests use)"
    )
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lepton-stream-") as tmp:
        r = run(a.rows, a.shape, a.object_store_mb, a.rows_per_shard, a.dataset_dir or tmp)
    print(json.dumps(r))
    if not a.no_report:
        save_result(a.out, "streaming.json", r)
        replace_section("Streaming a dataset larger than the object store", section(r))


if __name__ == "__main__":
    main()
