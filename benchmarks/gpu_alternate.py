"""Benchmark (a) on a GPU, alternated: plain loop, Trainer, plain loop, Trainer, plain loop.

``Trainer(1, use_gpu=True).fit`` with the device cache (the GPU default) on random uint8 32x32x3
images vs the plain loop of :mod:`benchmarks.gpu` (ResNet-18, global batch 512, bf16, channels-last),
each Trainer run compared with the mean of the plain-loop runs on either side of it, so that a
drift in the machine's speed during the run does not land on one side only.

    python -m benchmarks.gpu_alternate [--out benchmarks/results] [--epochs 6]

Writes ``gpu_a_rerun.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ray
import torch

from benchmarks.gpu import _mean_after_warmup, _random_images, plain_loop, trainer_summary
from lepton_ray import DataConfig, Trainer, build_model
from lepton_ray.runtime import ensure_ray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--rows", type=int, default=51200)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=6, help="per run; the first is warm-up")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, batch, epochs = args.rows, args.batch_size, args.epochs
    result: dict = {"rows": rows, "batch": batch, "epochs": epochs}

    def save() -> None:
        Path(args.out, "gpu_a_rerun.json").write_text(json.dumps(result, indent=1))

    def plain(name: str) -> None:
        p = plain_loop("resnet18", rows, batch, epochs, dev)
        result[name] = {"per_epoch": p, "samples_per_s": _mean_after_warmup(p)}
        save()

    plain("plain_0")
    ensure_ray()
    synth = (
        ray.data.range(rows, override_num_blocks=16)
        .map_batches(_random_images, batch_format="numpy")
        .materialize()
    )
    for i in (1, 2):
        res = Trainer(1, use_gpu=dev.type == "cuda").fit(
            build_model("resnet18", in_channels=3, num_classes=10),
            synth,
            batch_size=batch,
            epochs=epochs,
            data=DataConfig(augment=(), shuffle=True),
            storage=f"/tmp/lepton-gpu-alternate/{i}",
            checkpoint_every_epochs=epochs,
            keep_checkpoints=1,
            progress_bar=False,
        )
        result[f"trainer_{i}"] = summary = trainer_summary(
            res, result[f"plain_{i - 1}"]["samples_per_s"], (rows // batch) * batch
        )
        plain(f"plain_{i}")
        both = (
            result[f"plain_{i - 1}"]["samples_per_s"] + result[f"plain_{i}"]["samples_per_s"]
        ) / 2
        summary["ratio_vs_adjacent_plains"] = round(summary["samples_per_s"] / both, 3)
        save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
