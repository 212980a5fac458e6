"""Benchmark: images/s of the Ray Data decode + augment pipeline vs a PyTorch ``DataLoader``.

Claim: ``lepton_ray.data.read_ray`` delivers >= 1.2x the images/s of the ``DataLoader`` a PyTorch
user writes, on the same CPUs. Meant for a CPU machine (measured on 2 shared cores).

Same data (a prepared dataset of synthetic 32x32x3 images, CIFAR-sized, raw uint8 rows in Parquet),
same transforms (decode, random crop with 2-pixel padding, horizontal flip, colour jitter,
normalise to float32 NCHW), same batch size, same number of CPU processes doing the work, and the
same consumer (the main process iterating torch batches). Measured in one run:

- ``ray_data``: ``lepton_ray.data.read_ray`` (vectorised transforms over whole batches in
  ``map_batches`` tasks) on a local Ray with ``--cpus`` CPUs, ``iter_torch_batches``.
- ``ray_data_uint8``: the same, but rows stay uint8 until the consumer normalises them (what
  ``Trainer.fit`` does, on the training device, with ``lepton_ray.train.step.Pixels``).
- ``dataloader``: what a PyTorch user writes: a map-style ``Dataset`` over the same rows (held in
  memory), torchvision ``transforms.v2`` per image,
  ``DataLoader(num_workers=--cpus, shuffle=True)``.
- ``dataloader_batched``: the DataLoader again, but calling our vectorised transforms once per
  batch (a batch sampler): where the speed comes from, the transforms or Ray Data.

Each pipeline runs ``--epochs`` epochs; the first is warm-up (process start-up) and is left out.
Not measured here: preprocessing on other nodes than the GPU's, streaming from object storage
(``benchmarks/streaming.py``), per-epoch global shuffles.

    python -m benchmarks.data_pipeline [--rows 50000] [--epochs 3] [--cpus 2] [--no-doc]
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import numpy as np
import torch

from benchmarks import harness
from benchmarks.harness import Goal, fmt, table
from lepton_ray.data import DatasetInfo, prepare, read_arrays, read_ray

KEY = "data_pipeline"
GOALS = [
    Goal(
        "Ray Data ÷ DataLoader (torchvision per image) >= 1.2", "ray_data_vs_dataloader", ">=", 1.2
    )
]

AUGMENT = ("random_crop", "hflip", "color_jitter")
BATCH = 256


def _epochs(make_iter, epochs: int) -> list[float]:
    """Images/s of each epoch; ``make_iter()`` returns a fresh iterator over torch batches."""
    rates = []
    for _ in range(epochs):
        n = 0
        with harness.Timer() as t:
            for batch in make_iter():
                images = batch["image"] if isinstance(batch, dict) else batch[0]
                assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
                n += len(images)
        rates.append(n / t.seconds)
    return rates


def ray_data(info: DatasetInfo, epochs: int, cpus: int) -> dict[str, list[float]]:
    """Float rows (like the DataLoader's), and uint8 rows normalised by the consumer (what
    ``Trainer.fit`` does: a quarter of the bytes cross the object store)."""
    import ray

    from lepton_ray.train.step import BATCH_DTYPES, Pixels

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    out = {}
    pixels = Pixels(info.mean, info.std, torch.device("cpu"), torch.channels_last)
    try:
        for name, normalize in (("ray_data", True), ("ray_data_uint8", False)):
            ds = read_ray(
                info,
                augment=AUGMENT,
                shuffle="files",
                shuffle_seed=0,
                augment_seed=0,
                batch_size=1024,
                normalize=normalize,
            )
            dtypes = {**BATCH_DTYPES, "image": torch.float32} if normalize else BATCH_DTYPES

            def batches(ds=ds, dtypes=dtypes, normalize=normalize):
                for b in ds.iter_torch_batches(batch_size=BATCH, dtypes=dtypes):
                    yield b if normalize else {**b, "image": pixels(b["image"])}

            out[name] = _epochs(batches, epochs)
        return out
    finally:
        ray.shutdown()


class RowDataset(torch.utils.data.Dataset):
    """Per-image decode + torchvision transforms: the usual PyTorch input pipeline."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std):
        import torchvision.transforms.v2 as T

        self.rows = [im.tobytes() for im in images]  # raw bytes per row, as stored
        self.shape, self.labels = images.shape[1:], labels
        self.transform = T.Compose(
            [
                T.RandomCrop(32, padding=2),
                T.RandomHorizontalFlip(),
                T.ColorJitter(0.3, 0.3, 0.3),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(list(mean), list(std)),
            ]
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        img = (
            torch.frombuffer(bytearray(self.rows[i]), dtype=torch.uint8)
            .view(*self.shape)
            .permute(2, 0, 1)
        )
        return self.transform(img), int(self.labels[i])


class BatchDataset(torch.utils.data.Dataset):
    """The same rows, but transformed a whole batch at a time with lepton_ray's vectorised code."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, info: DatasetInfo):
        self.rows = np.array([im.tobytes() for im in images], dtype=object)
        self.labels = labels
        self.pre = info.preprocessor(AUGMENT, seed=0)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: list[int]):
        out = self.pre({"image": self.rows[idx], "label": self.labels[idx], "id": np.asarray(idx)})
        return torch.from_numpy(out["image"]), torch.from_numpy(out["label"])


def dataloader(info: DatasetInfo, epochs: int, cpus: int, batched: bool) -> list[float]:
    images, labels, _ = read_arrays(info)
    common = {"num_workers": cpus, "persistent_workers": False}
    if batched:
        ds = BatchDataset(images, labels, info)
        sampler = torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(ds), BATCH, drop_last=False
        )
        loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None, **common)
    else:
        ds = RowDataset(images, labels, info.mean, info.std)
        loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, **common)
    return _epochs(lambda: iter(loader), epochs)


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    r = harness.record(
        KEY, rows=a.rows, epochs=a.epochs, cpus=a.cpus, batch=BATCH, augment=list(AUGMENT)
    )
    with tempfile.TemporaryDirectory(prefix="lepton-pipe-") as tmp:
        info = prepare(f"synthetic:{a.rows}:32x32x3", tmp)["train"]
        runs = {
            **ray_data(info, a.epochs, a.cpus),
            "dataloader": dataloader(info, a.epochs, a.cpus, batched=False),
            "dataloader_batched": dataloader(info, a.epochs, a.cpus, batched=True),
        }
    r["images_per_s"] = {k: round(harness.mean_after_warmup(v)) for k, v in runs.items()}
    r["per_epoch"] = {k: [round(x) for x in v] for k, v in runs.items()}
    return r


def metrics(r: dict[str, Any]) -> dict[str, float]:
    ips = r["images_per_s"]
    return {f"ray_data_vs_{k}": ips["ray_data"] / v for k, v in ips.items() if k != "ray_data"}


def render(r: dict[str, Any], key: str) -> str:
    ips, m = r["images_per_s"], metrics(r)
    names = {
        "ray_data": "Ray Data, vectorised transforms in `map_batches`",
        "ray_data_uint8": "Ray Data, uint8 rows normalised by the consumer "
        "(as `Trainer.fit` reads)",
        "dataloader": "DataLoader, torchvision v2 per image",
        "dataloader_batched": "DataLoader, lepton_ray's vectorised transforms per batch",
    }
    rows = [
        [names[k], v, "1.00" if k == "ray_data" else f"{m[f'ray_data_vs_{k}']:.2f}"]
        for k, v in ips.items()
    ]
    hw = r.get("hardware") or f"{r.get('os_cpus')} CPUs, {r.get('machine')}"
    return (
        "## Ray Data pipeline vs DataLoader\n\n"
        f"{harness.provenance({**r, 'hardware': hw}, key)} "
        "Images/s delivered as float32 NCHW torch "
        f"batches of {r['batch']} to the main process: decode, random crop (padding 2), horizontal "
        f"flip, colour jitter, normalise; {fmt(r['rows'])} synthetic 32x32x3 rows; {r['cpus']} CPU "
        f"processes doing the work in each; mean of epochs 2..{r['epochs']}.\n\n"
        + table(["pipeline", "images/s", "Ray Data ÷ this"], rows)
        + "\n\n"
        + harness.goal_lines(GOALS, m)
        + "\n"
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2)


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
