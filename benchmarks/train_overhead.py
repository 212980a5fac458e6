"""Benchmark: samples/s of ``Trainer.fit`` with 1 worker vs a plain single-process PyTorch loop.

Claim: the Trainer costs at most a tenth of a plain loop's speed (Trainer ÷ plain >= 0.90),
with the data streamed through Ray Data every epoch (the CPU default) and cached in the worker
(``DataConfig(cache="device")``). Meant for a CPU machine (measured on 2 shared cores).

Same work on both sides: the ``cnn`` at width 32, the built-in 4,000 MNIST digits with random-crop
augmentation, the same global batch, steps, optimizer and schedule (the library's own), one CPU
thread each, channels-last memory (the layout the Trainer picks for convnets). The plain loop also
runs once in NCHW, the layout a hand-written loop gets by default. The first epoch of each is
warm-up and left out; all ratios are within this one run. The channels-last plain loop runs before
the Trainer's two fits and again after them, and the baseline is the mean of the two: on shared
cores the machine's speed drifts over a run (three runs on 2026-12-03 gave the plain loop 919, 847
and 843 samples/s, the Trainer's streamed fit 795, 814 and 787), and one plain run at the start
judged the Trainer against that moment alone.

    python -m benchmarks.train_overhead [--epochs 4] [--batch-size 100] [--no-doc]
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from benchmarks import harness
from benchmarks.harness import Goal

KEY = "train_overhead"
GOALS = [
    Goal("Trainer (streamed) ÷ plain loop >= 0.90", metric="ratio", op=">=", target=0.90),
    Goal('Trainer (`cache="device"`) ÷ plain loop >= 0.90', "ratio_cached", ">=", 0.90),
]


def plain_loop(info: Any, epochs: int, batch: int, channels_last: bool = True) -> list[float]:
    """The loop a user would write by hand; samples/s per epoch."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lepton_ray import build_model
    from lepton_ray.config import OptimConfig
    from lepton_ray.data import read_arrays
    from lepton_ray.train.step import build_optimizer, lr_factor

    layout = torch.channels_last if channels_last else torch.contiguous_format
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, labels, _ = read_arrays(info)
    pre = info.preprocessor(("random_crop",))
    model = build_model("cnn", in_channels=1, num_classes=10).to(memory_format=layout)
    cfg = OptimConfig()
    opt = build_optimizer(model, cfg)
    steps = len(images) // batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps * epochs, cfg))
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(epochs):
        order = rng.permutation(len(images))
        with harness.Timer() as t:
            for s in range(steps):
                idx = order[s * batch : (s + 1) * batch]
                b = pre({"image": images[idx], "label": labels[idx]})
                # clone(memory_format=...) sets the strides even for 1 channel
                x = torch.from_numpy(b["image"]).clone(memory_format=layout)
                loss = F.cross_entropy(model(x), torch.from_numpy(b["label"]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        rates.append(steps * batch / t.seconds)
    return rates


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lepton_ray import DataConfig, Trainer, build_model, prepare

    result = harness.record(KEY, epochs=args.epochs, batch=args.batch_size, threads_per_side=1)
    store = tempfile.mkdtemp(prefix="lepton-bench-")
    info = prepare("mnist5k", f"{store}/data")["train"]
    per_epoch = {
        "plain": plain_loop(info, args.epochs, args.batch_size),
        "plain_nchw": plain_loop(info, args.epochs, args.batch_size, channels_last=False),
    }
    for name, data in (("trainer", DataConfig()), ("trainer_cached", DataConfig(cache="device"))):
        res = Trainer(1, storage=f"{store}/runs").fit(
            build_model("cnn", in_channels=1, num_classes=10),
            info,
            batch_size=args.batch_size,
            epochs=args.epochs,
            data=data,
        )
        per_epoch[name] = [h["samples_per_second"] for h in res["history"]]
    per_epoch["plain_after"] = plain_loop(info, args.epochs, args.batch_size)
    sps = {k: harness.mean_after_warmup(v) for k, v in per_epoch.items()}
    result.update(
        epochs_measured=max(1, args.epochs - 1),
        plain_samples_per_s=round((sps["plain"] + sps["plain_after"]) / 2, 1),
        plain_before_samples_per_s=round(sps["plain"], 1),
        plain_after_samples_per_s=round(sps["plain_after"], 1),
        plain_nchw_samples_per_s=round(sps["plain_nchw"], 1),
        trainer_samples_per_s=round(sps["trainer"], 1),
        trainer_cached_samples_per_s=round(sps["trainer_cached"], 1),
        per_epoch={k: [round(r, 1) for r in v] for k, v in per_epoch.items()},
    )
    return result


def metrics(r: dict[str, Any]) -> dict[str, Any]:
    """Ratios from the run's samples/s (recomputed, not read back)."""
    plain = r["plain_samples_per_s"]
    return {
        "ratio": r["trainer_samples_per_s"] / plain,
        "ratio_cached": r["trainer_cached_samples_per_s"] / plain,
        "channels_last_over_nchw": plain / r["plain_nchw_samples_per_s"],
    }


def render(r: dict[str, Any], key: str) -> str:
    m = metrics(r)
    # results before 2026-12-03 ran the plain loop once, before the fits
    bracketed = "plain_after_samples_per_s" in r
    plain = r["plain_samples_per_s"]
    rows = (
        [
            ["plain PyTorch loop, channels-last, before the fits", r["plain_before_samples_per_s"]],
            ["the same, after the fits", r["plain_after_samples_per_s"]],
        ]
        if bracketed
        else []
    )
    rows = [[name, sps, f"{sps / plain:.3f}"] for name, sps in rows] + [
        [
            "plain PyTorch loop, channels-last"
            + (": the baseline, mean of before and after" if bracketed else ""),
            plain,
            "1.00",
        ],
        [
            "`Trainer.fit`, streamed through Ray Data",
            r["trainer_samples_per_s"],
            f"**{m['ratio']:.3f}**",
        ],
        [
            '`Trainer.fit`, `cache="device"`',
            r["trainer_cached_samples_per_s"],
            f"**{m['ratio_cached']:.3f}**",
        ],
        [
            "plain loop in NCHW memory",
            r["plain_nchw_samples_per_s"],
            f"{1 / m['channels_last_over_nchw']:.3f}",
        ],
    ]
    return (
        "## Training overhead: `Trainer.fit` (1 worker) vs a plain PyTorch loop\n\n"
        f"{harness.provenance(r, key)} The `cnn` on the 4,000 MNIST digits, one CPU thread "
        "per side, "
        + (
            f"mean samples/s over the {r['epochs_measured']} epochs after the first (warm-up).\n\n"
            if r.get("epochs", 2) > 1
            else "one epoch, warm-up included: a smoke run, not a measurement.\n\n"
        )
        + harness.table(["side", "samples/s", "÷ plain loop"], rows)
        + "\n\n"
        + harness.goal_lines(GOALS, m)
        + "\n"
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--epochs", type=int, default=4, help="per side; the first is warm-up")
    ap.add_argument("--batch-size", type=int, default=100)


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
