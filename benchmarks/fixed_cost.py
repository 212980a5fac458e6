"""Benchmark: the fixed cost of a ``fit()``, from the call to the first step and from the last step
to the return, and where it goes.

A small run is dominated by it: every ``fit()`` starts Ray Train's controller and its worker
processes, reads its data for the first time, compiles its first step and tears the workers down
(:mod:`lepton_ray.train.timeline` names the phases). This runs ``--fits`` small fits back to back
on one Ray instance: the ``cnn`` on the built-in digits (``mnist5k``, prepared once), one epoch,
global batch 100, the data defaults of the device. The first fit also starts Ray and is the
first of its processes to import torch; the figure judged is the median over the fits after it,
with Ray up, as in a notebook's second cell. The goal (issue 16) is for one GPU worker.

With ``--pause S`` each fit after the first starts S seconds after the last one returned, as a
notebook's next cell would: the time :mod:`lepton_ray.train.prestart` has to start the next fit's
processes (``$LEPTON_PRESTART_S=0`` runs without them; the result records the setting).

With ``--feed ring`` the fits stream their data through the ring (``DataConfig(feed="ring")``):
what a fit of a set larger than the device pays before its first step (its reader's process and
the first read's tasks).

    python -m benchmarks.fixed_cost [--fits 4] [--workers 1] [--use-gpu] [--pause 0] [--feed ring]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from benchmarks import harness
from benchmarks.harness import Goal

KEY = "fixed_cost"
GOALS = [
    Goal(
        "fixed cost of a fit with Ray up, to the first step plus teardown (median of the fits "
        "after the first, 1 worker), <= 10 s (GPU runs)",
        metric="gpu_fixed_s",
        op="<=",
        target=10.0,
    )
]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lepton_ray import DataConfig, Trainer, build_model, prepare
    from lepton_ray.train import prestart

    result = harness.record(
        KEY,
        workers=args.workers,
        use_gpu=args.use_gpu,
        fits=args.fits,
        pause_s=args.pause,
        prestart_keep_s=prestart.keep_alive_s(),
        feed=args.feed,
    )
    store = harness.scratch("lepton-bench-fixed-")
    info = prepare("mnist5k", f"{store}/data")["train"]
    fits = []
    for i in range(args.fits):
        if i:
            time.sleep(args.pause)
        start, ticks = time.perf_counter(), harness.cpu_times()
        res = Trainer(args.workers, use_gpu=args.use_gpu, storage=f"{store}/runs").fit(
            build_model("cnn", in_channels=1, num_classes=10),
            info,
            batch_size=100,
            epochs=1,
            data=DataConfig(feed=args.feed) if args.feed else DataConfig(),
        )
        wall, after = time.perf_counter() - start, harness.cpu_times()
        fits.append(
            {
                "fit": i + 1,
                "wall_s": round(wall, 3),
                "epoch_s": round(res["history"][-1]["epoch_time_s"], 3),
                "phases_s": dict(res["startup_s"]),  # timeline.phases: the known ones and their sum
            }
        )
        if ticks is not None and after is not None:  # every process's, not only the fit's
            fits[-1]["machine_cpu_s"] = round((after[0] - ticks[0]) / os.sysconf("SC_CLK_TCK"), 2)
        print(fits[-1], flush=True)
    # Read once Ray runs: a local instance sets it where the environment does not.
    result["health_check_interval_s"] = float(os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"])
    result["rows"] = info.num_rows
    result["per_fit"] = fits
    return result


def fixed_s(fit: dict[str, Any]) -> float | None:
    """To the first step plus teardown: the fit's wall time that is not training."""
    p = fit["phases_s"]
    if "to_first_step" not in p or "teardown" not in p:
        return None
    return p["to_first_step"] + p["teardown"]


def metrics(r: dict[str, Any]) -> dict[str, Any]:
    """Medians over the fits after the first (Ray up), recomputed from the per-fit phases."""
    warm = [f for f in r["per_fit"][1:] if fixed_s(f) is not None]
    out: dict[str, Any] = {"warm_fits": len(warm)}
    if warm:
        out["fixed_s"] = statistics.median(fixed_s(f) for f in warm)
        out["phases_s"] = {
            k: statistics.median(f["phases_s"].get(k, 0.0) for f in warm)
            for k in warm[0]["phases_s"]
        }
        if all("machine_cpu_s" in f for f in warm):
            out["machine_cpu_s"] = statistics.median(f["machine_cpu_s"] for f in warm)
        gpu = r.get("use_gpu") and (r.get("hardware") or {}).get("gpu")
        if gpu and r.get("workers") == 1:
            out["gpu_fixed_s"] = out["fixed_s"]
    return out


def render(r: dict[str, Any], key: str) -> str:
    from lepton_ray.train.timeline import columns

    m = metrics(r)
    cols = columns([f["phases_s"] for f in r["per_fit"]])
    cpu = all("machine_cpu_s" in f for f in r["per_fit"])  # older results have no such column
    rows = [
        [
            str(f["fit"]),
            *(f["phases_s"].get(c) for c in cols),
            fixed_s(f),
            f["epoch_s"],
            f["wall_s"],
            *([f["machine_cpu_s"]] if cpu else []),
        ]
        for f in r["per_fit"]
    ]
    if "phases_s" in m:
        rows.append(
            [
                "median, fits 2+",
                *(m["phases_s"].get(c) for c in cols),
                m["fixed_s"],
                None,
                None,
                *([m.get("machine_cpu_s")] if cpu else []),
            ]
        )
    device = "1 GPU" if r.get("use_gpu") else "CPU"
    feed = f"fed by `feed={r['feed']!r}`" if r.get("feed") else "the device's data defaults"
    pause = r.get("pause_s", 0)
    apart = f"{pause:g} s apart" if pause else "back to back"
    keep = r.get("prestart_keep_s")  # None: measured before lepton_ray.train.prestart
    warm = (
        ""
        if keep is None
        else f", the next fit's processes prestarted (kept {keep} s)"
        if keep
        else ", no processes prestarted (`LEPTON_PRESTART_S=0`)"
    )
    return (
        f"## Fixed cost of a `fit()`: where the time before the first step and after the last goes (`{key}`)\n\n"
        f"{harness.provenance(r, key)} {r['fits']} fits of the `cnn` on the {r['rows']:,} "
        f"built-in digits {apart} on one Ray instance{warm}, {r['workers']} worker(s) on the "
        f"{device}, one epoch of global batch 100 each, {feed}, Ray Train's "
        f"health check every {r['health_check_interval_s']} s; the first fit also starts Ray. Phases in seconds (`train_results['startup_s']`, "
        "`lepton_ray/train/timeline.py`); fixed: to the first step plus teardown; epoch: the "
        "epoch's own time; wall: the whole call"
        + (
            "; machine CPU: the busy CPU-seconds of all of the machine's CPUs during the call "
            "(every process's, `/proc/stat`)"
            if cpu
            else ""
        )
        + ".\n\n"
        + harness.table(
            ["fit", *cols, "fixed", "epoch", "wall", *(["machine CPU"] if cpu else [])], rows
        )
        + "\n\n"
        + harness.goal_lines(GOALS, m)
        + "\n"
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--fits", type=int, default=4, help="fits in a row; the first starts Ray")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument(
        "--pause", type=float, default=0.0, help="seconds between one fit's return and the next"
    )
    ap.add_argument(
        "--feed", choices=("cache", "ring"), help="the fits' feed (default: the device's)"
    )


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
