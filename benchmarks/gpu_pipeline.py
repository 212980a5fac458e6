"""Benchmark on one GPU: samples/s the Ray Data input pipeline alone delivers onto the GPU.

Claim measured, not assumed: how fast Ray Data -> ``iter_torch_batches`` -> GPU can feed the
training loop when it streams (no model), against the plain loop's pace on the same GPU in the
same run (``benchmarks/_gpu.py``): a ratio under 1 means a streamed Trainer must wait for data.
Meant for one NVIDIA H200 (16 CPU cores); measured there.

Cases: random images in memory normalised on the CPUs (at 256- and 2,048-row ``map_batches``
blocks, and with ``prefetch_batches=8``); a prepared Parquet set with a global shuffle and
crop + flip on the CPUs, as float32, pinned float32, and uint8 rows normalised on the GPU
(``lepton_ray.train.step.Pixels``, what the Trainer does).

    python -m benchmarks.gpu_pipeline [--rows 51200] [--epochs 2] [--no-doc]

Without a GPU it runs on the CPU (``--model cnn --rows 1024 --batch-size 64``): a wiring check.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import _gpu, harness
from benchmarks._gpu_report import render

KEY = "gpu_pipeline"


def rate(
    ds: Any,
    batch: int,
    dev: Any,
    epochs: int,
    *,
    pixels: Any = None,
    pin_memory: bool = False,
    prefetch_batches: int = 2,
) -> list[float]:
    """samples/s per epoch of ``ds`` into ``dev`` as the loop consumes it; with ``pixels`` (a
    ``Pixels``) the rows are uint8 and normalised on the device."""
    import torch

    from lepton_ray.train.step import BATCH_DTYPES

    cuda = dev.type == "cuda"
    dtypes = BATCH_DTYPES if pixels else {**BATCH_DTYPES, "image": torch.float32}
    # Ray's collate looks every column up in ``dtypes``: name exactly the dataset's columns.
    dtypes = {k: v for k, v in dtypes.items() if k in ds.columns()}
    rates = []
    for _ in range(epochs):
        n = 0
        with harness.Timer(dev) as t:
            for b in ds.iter_torch_batches(
                batch_size=batch,
                dtypes=dtypes,
                device=str(dev),
                drop_last=True,
                pin_memory=pin_memory and cuda,
                prefetch_batches=prefetch_batches,
            ):
                x = pixels(b["image"]) if pixels else b["image"]
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                n += len(b["label"])
        rates.append(n / t.seconds)
    return rates


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lepton_ray.data import describe_ray_dataset, read_ray
    from lepton_ray.train.step import Pixels

    _gpu.quiet_ray()
    dev = _gpu.device()
    r = harness.record("gpu_pipeline", setup={"rows": args.rows, "batch": args.batch_size})
    r["plain"] = _gpu.plain_summary(
        _gpu.plain_loop(args.model, args.rows, args.batch_size, args.epochs + 1, dev)
    )
    synth = _gpu.synthetic_ray_dataset(args.rows)
    sinfo = describe_ray_dataset(synth, "train")
    info = _gpu.prepared_dataset(args.rows, harness.scratch("lepton-gpu-pipe-"))
    aug = _gpu.AUGMENT
    pixels = Pixels(info.mean, info.std, dev, torch.channels_last)

    def synth_pre(bs: int) -> Any:
        return synth.map_batches(sinfo.preprocessor(()), batch_format="numpy", batch_size=bs)

    def aug_pre(normalize: bool = True) -> Any:
        return read_ray(info, augment=aug, shuffle=True, shuffle_seed=0, normalize=normalize)

    cases = {
        "synthetic_float32_bs256": (lambda: synth_pre(256), {}),
        "synthetic_float32_bs2048": (lambda: synth_pre(2048), {}),
        "synthetic_float32_bs2048_prefetch8": (lambda: synth_pre(2048), {"prefetch_batches": 8}),
        "augmented_float32": (aug_pre, {}),
        "augmented_float32_pinned": (aug_pre, {"pin_memory": True}),
        "augmented_uint8_pinned_gpu_normalise": (
            lambda: aug_pre(normalize=False),
            {"pin_memory": True, "pixels": pixels},
        ),
    }
    r["pipeline_only"] = out = {}
    for name, (make, kw) in cases.items():
        try:
            rates = rate(make(), args.batch_size, dev, args.epochs, **kw)
            out[name] = {
                "samples_per_s": round(rates[-1], 1),
                "per_epoch": [round(x, 1) for x in rates],
            }
        except Exception as exc:  # noqa: BLE001 - recorded; the other cases still run
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{name}: {out[name]}", flush=True)
    return r


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="resnet18", help="of the plain loop (cnn on a CPU)")
    ap.add_argument("--rows", type=int, default=51200)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2, help="per pipeline; the last one counts")


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
