"""Benchmark on one GPU, alternated: plain loop, Trainer, plain loop, Trainer, plain loop.

Claim: ``Trainer(1, use_gpu=True).fit`` with the device cache (the GPU default) on random uint8
images runs at >= 0.97 of the plain loop of ``benchmarks/_gpu.py`` (ResNet-18, global batch 512,
bf16, channels-last). Each Trainer run is compared with the mean of the plain-loop runs on either
side of it, so that a drift in the machine's speed during the run does not land on one side only.
Meant for one NVIDIA H200; measured there.

    python -m benchmarks.gpu_alternate [--epochs 6] [--no-doc]

Without a GPU it runs on the CPU (``--model cnn --rows 512 --batch-size 64 --epochs 2``): a wiring
check, not a measurement.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks import _gpu, _usage, harness
from benchmarks._gpu_report import on_gpu, usage_table
from benchmarks._usage import Usage
from benchmarks.harness import Goal, fmt, table

KEY = "gpu_alternate"
RUNS = 2  # Trainer runs, each between two plain loops
GOALS = [
    Goal(
        f"Trainer ÷ mean of its two adjacent plain loops >= 0.97, run {i}",
        f"trainer_{i}.ratio_vs_adjacent_plains",
        ">=",
        0.97,
    )
    for i in range(1, RUNS + 1)
]


def run(args: argparse.Namespace) -> dict[str, Any]:
    return _usage.sampled(args.usage, lambda usage: _run(args, usage))


def _run(args: argparse.Namespace, usage: Usage | None) -> dict[str, Any]:
    from lepton_ray import DataConfig, Trainer, build_model

    _gpu.quiet_ray()
    dev = _gpu.device()
    rows, batch, epochs = args.rows, args.batch_size, args.epochs
    r = harness.record(KEY, model=args.model, rows=rows, batch=batch, epochs=epochs)
    windows: dict[str, tuple[float, float, str]] = {}  # side -> its epochs after the first

    def plain(i: int) -> None:
        clock: list[tuple[float, float]] = []
        rates = _gpu.plain_loop(args.model, rows, batch, epochs, dev, clock=clock)
        r[f"plain_{i}"] = _gpu.plain_summary(rates)
        windows[f"plain_{i}"] = _gpu.plain_window(clock)

    plain(0)
    synth = _gpu.synthetic_ray_dataset(rows)
    store = harness.scratch("lepton-gpu-alternate-")
    for i in range(1, RUNS + 1):
        res = Trainer(1, use_gpu=dev.type == "cuda").fit(
            build_model(args.model, in_channels=3, num_classes=10),
            synth,
            batch_size=batch,
            epochs=epochs,
            data=DataConfig(augment=(), shuffle=True),
            storage=f"{store}/{i}",
            checkpoint_every_epochs=epochs,
            keep_checkpoints=1,
            progress_bar=False,
        )
        returned = time.time()
        r[f"trainer_{i}"] = _gpu.trainer_summary(res, (rows // batch) * batch)
        windows[f"trainer_{i}"] = _gpu.trainer_window(res, returned)
        plain(i)
    if usage is not None:
        usage.attach(r, windows)
    return r


def metrics(r: dict[str, Any]) -> dict[str, Any]:
    """Each Trainer run ÷ the mean of the plain loops before and after it."""
    out = {}
    for i in range(1, RUNS + 1):
        around = (r[f"plain_{i - 1}"]["samples_per_s"] + r[f"plain_{i}"]["samples_per_s"]) / 2
        out[f"trainer_{i}"] = {
            "ratio_vs_adjacent_plains": r[f"trainer_{i}"]["samples_per_s"] / around
        }
    return out


def render(r: dict[str, Any], key: str) -> str:
    m = metrics(r)
    rows = []
    for i in range(RUNS + 1):
        rows.append([f"plain loop {i}", r[f"plain_{i}"]["samples_per_s"], "–", "–"])
        if i < RUNS:
            t, ratio = r[f"trainer_{i + 1}"], m[f"trainer_{i + 1}"]["ratio_vs_adjacent_plains"]
            rows.append(
                [
                    f"`Trainer.fit` {i + 1}",
                    t["samples_per_s"],
                    f"**{ratio:.3f}**",
                    f"{t['data_wait_share']:.0%}",
                ]
            )
    return (
        "## GPU, alternated: plain loop and `Trainer.fit` with the device cache, in turn\n\n"
        f"{harness.provenance(r, key, KEY)} {r.get('model', 'resnet18')} on {fmt(r['rows'])} "
        "random 32x32x3 "
        "images, batch "
        f"{r['batch']}, {r['epochs']} epochs per run (the first is warm-up).\n\n"
        + table(["run", "samples/s", "÷ mean of adjacent plain loops", "data wait"], rows)
        + "".join("\n" + part for part in usage_table(r))
        + "\n\n"
        + (
            harness.goal_lines(GOALS, m)
            if on_gpu(r)
            else "No GPU in this run: a wiring check, not a measurement; no goal is judged."
        )
        + "\n"
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="resnet18", help="cnn for a CPU wiring check")
    ap.add_argument("--rows", type=int, default=51200)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=6, help="per run; the first is warm-up")
    _usage.add_arg(ap)


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
