"""Benchmark: samples/s of ``Trainer.fit`` with 1 worker vs a plain single-process PyTorch loop.

Same model (the ``cnn`` at width 32), same data (the built-in 4,000 MNIST digits with random-crop
augmentation), same global batch and number of steps, one CPU thread each, both in channels-last
memory (the layout the Trainer picks for convnets); all measured in one run of this script, so the
ratios are what counts on a shared, noisy machine. The first epoch of each is warm-up and is left
out. The plain loop also runs once in NCHW memory, the layout a hand-written loop gets by default. The Trainer runs twice: streaming every epoch through Ray Data
(the CPU default) and with the training set cached in the worker (``DataConfig(cache="device")``,
the GPU default for sets that fit), where the crop runs in the loop as in the plain loop.

    python -m benchmarks.train_overhead [--epochs 4] [--out benchmarks/results]

Writes ``train_overhead.json`` and updates the table in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.report import replace_section, save_result
from lepton_ray import DataConfig, Trainer, build_model, prepare
from lepton_ray.config import OptimConfig
from lepton_ray.data import read_arrays
from lepton_ray.train.loop import build_optimizer, lr_factor


def plain_loop(
    info, epochs: int, batch: int, layout: torch.memory_format = torch.channels_last
) -> list[float]:
    """The loop a user would write by hand; returns samples/s per epoch."""
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
        t0 = time.perf_counter()
        order = rng.permutation(len(images))
        for s in range(steps):
            idx = order[s * batch : (s + 1) * batch]
            b = pre({"image": images[idx], "label": labels[idx]})
            x = torch.from_numpy(b["image"]).clone(
                memory_format=layout
            )  # strides set even for 1 channel
            loss = F.cross_entropy(model(x), torch.from_numpy(b["label"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        rates.append(steps * batch / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    store = tempfile.mkdtemp(prefix="lepton-bench-")
    info = prepare("mnist5k", f"{store}/data")["train"]
    plain = plain_loop(info, args.epochs, args.batch_size)
    plain_sps = float(np.mean(plain[1:]))
    nchw = plain_loop(info, args.epochs, args.batch_size, torch.contiguous_format)
    nchw_sps = float(np.mean(nchw[1:]))
    rates = {}
    for name, data in (("streamed", DataConfig()), ("cached", DataConfig(cache="device"))):
        trainer = Trainer(1, storage=f"{store}/runs")
        res = trainer.fit(
            build_model("cnn", in_channels=1, num_classes=10),
            info,
            batch_size=args.batch_size,
            epochs=args.epochs,
            data=data,
        )
        rates[name] = [h["samples_per_second"] for h in res["history"]]
    ray_rates = rates["streamed"]
    ray_sps = float(np.mean(ray_rates[1:]))
    cached_sps = float(np.mean(rates["cached"][1:]))
    result = {
        "benchmark": "train_overhead",
        "what": "Trainer.fit (1 Ray Train worker, Ray Data input) vs plain PyTorch loop, samples/s",
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads in driver, "
        f"1 thread per side, CPU only",
        "epochs_measured": args.epochs - 1,
        "plain_samples_per_s": round(plain_sps, 1),
        "plain_nchw_samples_per_s": round(nchw_sps, 1),
        "trainer_samples_per_s": round(ray_sps, 1),
        "ratio": round(ray_sps / plain_sps, 3),
        "trainer_cached_samples_per_s": round(cached_sps, 1),
        "ratio_cached": round(cached_sps / plain_sps, 3),
        "goal": ">= 0.90 on CPU",
        "per_epoch": {
            "plain": [round(r, 1) for r in plain],
            "plain_nchw": [round(r, 1) for r in nchw],
            "trainer": [round(r, 1) for r in ray_rates],
            "trainer_cached": [round(r, 1) for r in rates["cached"]],
        },
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    save_result(args.out, "train_overhead.json", result)
    write_table(result)
    print(json.dumps(result, indent=2))


def write_table(r: dict) -> None:
    section = (
        "\n## Training overhead: `Trainer.fit` (1 worker) vs a plain PyTorch loop\n\n"
        "`python -m benchmarks.train_overhead`\n\n"
        "| measured | hardware | plain loop samples/s | Trainer.fit samples/s, streamed (ratio) "
        '| Trainer.fit samples/s, `cache="device"` (ratio) | plain loop in NCHW samples/s | goal |\n'
        "| --- | --- | --- | --- | --- | --- | --- |\n"
        f"| {r['measured_at']} | {r['hardware']} | {r['plain_samples_per_s']} | {r['trainer_samples_per_s']} "
        f"(**{r['ratio']}**) | {r.get('trainer_cached_samples_per_s', '–')} (**{r.get('ratio_cached', '–')}**) "
        f"| {r.get('plain_nchw_samples_per_s', '–')} | {r['goal']} |\n\n"
        "What closed the gap (0.76 until 2026-11-29): memory layout. The plain loop had always run in "
        "channels-last memory without saying so (its 1-channel batches come from an NHWC array, and PyTorch "
        "reads their strides as channels-last), while the Trainer fed NCHW; on this CPU oneDNN runs the `cnn` "
        "about 1.3x faster in channels-last. The Trainer now picks channels-last for any model with conv "
        "weights that runs on it (a model that `.view()`s its feature maps keeps NCHW), records the choice in "
        "its checkpoints, and Serve and `evaluate` load the model and build its inputs in the same layout. "
        "Side runs that ruled out Ray itself: the same plain loop gives the same samples/s in the driver, "
        "a driver thread, and a Ray Train worker; Ray's processes use ~25% of the second core during `fit`. "
        "With the set cached in the worker, only the loop's own work remains, so that ratio is ~1; streamed, "
        "the Ray Data iterator in the worker costs a few percent more.\n"
    )
    replace_section("Training overhead", section)


if __name__ == "__main__":
    main()
