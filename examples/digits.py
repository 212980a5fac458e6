"""What plain_pytorch.py and lepton_ray_train.py share, so that the two differ only where
lepton_ray changes the job: the built-in digits as a torch Dataset, the model, the arguments.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lepton_ray import build_model
from lepton_ray.data import load_mnist5k

SMOKE_ROWS = {"train": 400, "test": 200}  # --smoke-test: a few batches, to check the wiring


def digits(split: str, rows: int | None = None) -> TensorDataset:
    """The 5,000 digits shipped with lepton_ray (4,000 train / 1,000 test), as
    ``(image (1, 28, 28) float in [0, 1], label)`` pairs, the way torchvision's ToTensor gives them."""
    images, labels, _ = load_mnist5k()[split]  # (N, 28, 28, 1) uint8, (N,) int64, row ids
    keep = np.random.default_rng(0).permutation(len(labels))[:rows]  # (the file is sorted by class)
    x = torch.from_numpy(images[keep]).permute(0, 3, 1, 2).float() / 255.0  # (N, 1, 28, 28)
    return TensorDataset(x, torch.from_numpy(labels[keep]))


def Net() -> nn.Module:  # noqa: N802 - read as a class, as in PyTorch's tutorials
    """A small CNN: lepton_ray's registered ``cnn``, so that a checkpoint names it and serving
    rebuilds it from data (a class defined in a script could not be rebuilt)."""
    return build_model("cnn", in_channels=1, num_classes=10)


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset, device: str = "cpu") -> float:
    """The share of ``dataset`` that ``model`` classifies right."""
    model.eval()
    x, y = dataset.tensors
    predicted = torch.cat([model(b.to(device)).argmax(1).cpu() for b in x.split(500)])
    return (predicted == y).float().mean().item()


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"1 epoch on {SMOKE_ROWS['train']} train / {SMOKE_ROWS['test']} test digits",
    )
    args = p.parse_args(argv)
    args.rows = SMOKE_ROWS if args.smoke_test else {"train": None, "test": None}
    if args.smoke_test:
        args.epochs = 1
    return args
