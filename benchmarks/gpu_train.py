"""Benchmark on one GPU: samples/s of ``Trainer(1, use_gpu=True).fit`` vs a plain PyTorch loop.

Claim: with the defaults on a GPU (the training set cached in GPU memory, augmented there), the
Trainer keeps pace with a plain loop whose data already sits on the GPU: (a) >= 0.97 of it on
random images, (b) >= 0.90 on a prepared Parquet set with random crop + flip. Meant for one
NVIDIA H200 (16 CPU cores); measured there.

Both sides train ResNet-18 (``build_model("resnet18")``) at 3x32x32, global batch 512, bf16
autocast, channels-last, the library's SGD and schedule (see ``benchmarks/_gpu.py``); all ratios
are against a plain loop of the same run doing the same work (uint8 rows on the GPU, a permutation
per epoch gathered into batches, converted and normalised there; plus a vectorised crop + flip
for the augmented cases), each side's clock stopped after the GPU finished (the Trainer's from its
epoch wall time). The plain loop on float tensors sliced in order is shown for reference. Cases (``--cases``; the default is the first five):

- ``synthetic``: an in-memory Ray Dataset of random uint8 images, ``augment=()``, device cache;
- ``synthetic_streamed``: the same through Ray Data every epoch (``cache="off"``);
- ``augmented``: a prepared Parquet set, crop + flip, device cache (the GPU defaults);
- ``ring``: the same set streamed every epoch through the ring (``feed="ring"``): what a set larger
  than the GPU gets; run it with ``--rows 1048576`` (the 1M-row goal) and ``--rows 204800``;
- ``augmented_streamed_device`` / ``augmented_streamed_cpu``: streamed with a global shuffle, the
  crop + flip on the GPU (``augment_on="device"``) or in Ray Data on the CPUs;
- ``files``: streamed with ``shuffle="files"`` (shard order + an 8,192-row buffer), three ways;
- ``shared``: 2 workers sharing the GPU (0.5 each, gloo): the multi-worker paths, not scaling.

Beside the run a sampler of its own process (``benchmarks/_usage.py``; ``--no-usage``: none) reads
every thread's CPU time and the GPU's utilisation once a second; each side's epochs after the first
are summarised in the result: whether the thread that launches the steps or the GPU was the busy one.

Without a GPU everything runs on the CPU: use ``--model cnn --rows 512 --batch-size 64 --epochs 2``
there, a wiring check, not a measurement.

    python -m benchmarks.gpu_train [--cases synthetic,augmented] [--epochs 4] [--no-doc]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks import _gpu, _usage, harness
from benchmarks._gpu_report import render
from benchmarks._usage import Usage

KEY = "gpu_train"
AUG = _gpu.AUGMENT
# case -> (data: "synthetic" or "prepared", DataConfig fields, what it is, extra Trainer fields)
CASES: dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]] = {
    "synthetic": (
        "synthetic",
        {"augment": (), "shuffle": True},
        "random uint8 images, device cache (the GPU default)",
        {},
    ),
    "synthetic_streamed": (
        "synthetic",
        {"augment": (), "shuffle": False, "cache": "off"},
        "random uint8 images, streamed through Ray Data every epoch (`cache='off'`)",
        {},
    ),
    "augmented": (
        "prepared",
        {"augment": AUG, "shuffle": True},
        "prepared Parquet set, device cache, crop + flip on the GPU (the GPU defaults)",
        {},
    ),
    "ring": (
        "prepared",
        {"augment": AUG, "shuffle": True, "feed": "ring"},
        "Parquet, streamed through the ring (blocks into GPU memory, each batch sampled there), "
        "crop + flip on the GPU",
        {},
    ),
    "augmented_streamed_device": (
        "prepared",
        {"augment": AUG, "shuffle": True, "augment_on": "device", "cache": "off"},
        "Parquet, streamed with a global shuffle, crop + flip on the GPU",
        {},
    ),
    "augmented_streamed_cpu": (
        "prepared",
        {"augment": AUG, "shuffle": True, "augment_on": "cpu"},
        "Parquet, streamed with a global shuffle, crop + flip in Ray Data on the CPUs",
        {},
    ),
    "augmented_files": (
        "prepared",
        {"augment": AUG, "shuffle": "files", "shuffle_buffer_rows": 8192, "augment_on": "cpu"},
        "Parquet, shard-order shuffle + 8,192-row buffer (`shuffle='files'`), crop + flip on CPUs",
        {},
    ),
    "augmented_files_bs4096": (
        "prepared",
        {
            "augment": AUG,
            "shuffle": "files",
            "shuffle_buffer_rows": 8192,
            "augment_on": "cpu",
            "preprocess_batch_size": 4096,
        },
        "the same, `preprocess_batch_size=4096`",
        {},
    ),
    "augmented_files_device": (
        "prepared",
        {
            "augment": AUG,
            "shuffle": "files",
            "shuffle_buffer_rows": 8192,
            "augment_on": "device",
            "cache": "off",
        },
        "Parquet, `shuffle='files'`, streamed, crop + flip on the GPU",
        {},
    ),
    "two_workers_one_gpu": (
        "prepared",
        {"augment": AUG, "shuffle": True},
        "Parquet, device cache; 2 workers x 0.5 GPU each (gloo)",
        {"workers": 2, "resources_per_worker": {"GPU": 0.5, "CPU": 1}},
    ),
}
GROUPS = {
    "files": ["augmented_files", "augmented_files_bs4096", "augmented_files_device"],
    "shared": ["two_workers_one_gpu"],
}
DEFAULT_CASES = (
    "synthetic,synthetic_streamed,augmented,augmented_streamed_device,augmented_streamed_cpu"
)


def cases(spec: str) -> list[str]:
    out = []
    for name in spec.split(","):
        out += GROUPS.get(name, [name])
    unknown = [c for c in out if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {[*CASES, *GROUPS]}")
    return out


def _run(args: argparse.Namespace, usage: Usage | None) -> dict[str, Any]:
    from lepton_ray import DataConfig, Trainer, build_model

    _gpu.quiet_ray()
    dev = _gpu.device()
    gpu = dev.type == "cuda"
    chosen = cases(args.cases)
    samples = (args.rows // args.batch_size) * args.batch_size
    r = harness.record(
        "gpu_train",
        setup={
            "model": args.model,
            "input": "3x32x32",
            "global_batch": args.batch_size,
            "rows_per_epoch": samples,
            "epochs": args.epochs,
            "precision": "bf16 autocast" if gpu else "fp32",
            "memory_format": "channels_last" if gpu else "contiguous",
        },
    )
    if args.reference:
        plain = _gpu.plain_loop(args.model, args.rows, args.batch_size, args.epochs, dev)
        r["plain"] = _gpu.plain_summary(plain)
    # The fair baselines: the same conversion (and augmentation) work as the chosen cases.
    needed = {"uint8_augmented" if CASES[c][1].get("augment") else "uint8" for c in chosen}
    windows: dict[str, tuple[float, float, str]] = {}  # side -> its epochs after the first

    def baselines(suffix: str) -> None:
        for data in sorted(needed):
            clock: list[tuple[float, float]] = []
            laps: list[dict[str, Any]] = []
            rates = _gpu.plain_loop(
                args.model,
                args.rows,
                args.batch_size,
                args.epochs,
                dev,
                data=data,
                clock=clock,
                laps=laps,
            )
            r[f"plain_{data}{suffix}"] = _gpu.plain_summary(rates, laps)
            windows[f"plain_{data}{suffix}"] = _gpu.plain_window(clock)

    baselines("")
    if args.cudnn_benchmark:
        rates = _gpu.plain_loop(
            args.model, args.rows, args.batch_size, args.epochs, dev, cudnn_benchmark=True
        )
        r["plain_cudnn_benchmark"] = _gpu.plain_summary(rates)
    store = harness.scratch("lepton-gpu-train-")
    data = {}
    if any(CASES[c][0] == "synthetic" for c in chosen):
        data["synthetic"] = _gpu.synthetic_ray_dataset(args.rows)
    if any(CASES[c][0] == "prepared" for c in chosen):
        data["prepared"] = _gpu.prepared_dataset(args.rows, store)
    for name in chosen:
        kind, fields, label, extra = CASES[name]
        key = f"trainer_{name}"
        resources = extra.get("resources_per_worker")
        if resources and "GPU" in resources and not gpu:  # Ray would wait for it forever
            r[key] = {"input": label, "error": "skipped: this case shares a GPU, and none is here"}
            continue
        trainer = Trainer(extra.get("workers", 1), use_gpu=gpu, resources_per_worker=resources)
        try:
            res = trainer.fit(
                build_model(args.model, in_channels=3, num_classes=10),
                data[kind],
                batch_size=args.batch_size,
                epochs=args.epochs,
                data=DataConfig(**fields),
                storage=f"{store}/runs",
                run_name=name,
                checkpoint_every_epochs=args.epochs,
                keep_checkpoints=1,
            )
            returned = time.time()
            r[key] = {"input": label, **_gpu.trainer_summary(res, samples)}
            r[key]["baseline"] = "plain_uint8_augmented" if fields.get("augment") else "plain_uint8"
            windows[key] = _gpu.trainer_window(res, returned)
        except Exception as exc:  # noqa: BLE001 - recorded; the other cases still run
            r[key] = {"input": label, "error": f"{type(exc).__name__}: {exc}"}
        print(f"{key}: {r[key]}", flush=True)
    if args.plain_after:  # the baselines again: each ratio against the mean of both runs
        baselines("_after")
    if usage is not None:
        usage.attach(r, windows)
    return r


def run(args: argparse.Namespace) -> dict[str, Any]:
    return _usage.sampled(args.usage, lambda usage: _run(args, usage))


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--cases", default=DEFAULT_CASES, help=f"comma-separated, of {[*CASES, *GROUPS]}"
    )
    ap.add_argument("--model", default="resnet18", help="cnn for a CPU wiring check")
    ap.add_argument("--rows", type=int, default=51200, help="training rows per epoch")
    ap.add_argument("--batch-size", type=int, default=512, help="global batch")
    ap.add_argument("--epochs", type=int, default=4, help="per side; the first is warm-up")
    ap.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the plain loop on float tensors sliced in order (a reference, not a baseline)",
    )
    ap.add_argument(
        "--cudnn-benchmark", action="store_true", help="also the plain loop with cudnn.benchmark"
    )
    ap.add_argument(
        "--plain-after",
        action="store_true",
        help="run the plain baselines again after the Trainer cases; each ratio is then against "
        "the mean of the two runs (a drift in the machine's speed lands on both sides)",
    )
    _usage.add_arg(ap)


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
