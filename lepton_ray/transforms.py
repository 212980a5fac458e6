"""Vectorised image transforms over whole batches (numpy, NHWC uint8 in, NCHW float32 out).

These run inside Ray Data ``map_batches`` on CPU workers, never in the training loop. Each
augmentation is a pure function ``(images, rng) -> images`` over the whole batch: no per-image
Python loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def decode_raw(images: Sequence[bytes] | np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Raw HWC uint8 bytes per row -> (N, H, W, C) uint8, in one copy."""
    h, w, c = shape
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
        return images
    buf = b"".join(bytes(b) for b in images)
    n = len(images)
    if len(buf) != n * h * w * c:
        raise ValueError(f"image bytes do not match shape {tuple(shape)}: {len(buf)} bytes for {n} rows")
    return np.frombuffer(buf, dtype=np.uint8).reshape(n, h, w, c)


def random_crop(images: np.ndarray, rng: np.random.Generator, padding: int = 2) -> np.ndarray:
    """Zero-pad by ``padding`` and crop back at a random offset per image (a random translation)."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    oy = rng.integers(0, 2 * padding + 1, size=n)
    ox = rng.integers(0, 2 * padding + 1, size=n)
    rows = (oy[:, None] + np.arange(h))[:, :, None]  # (N, H, 1)
    cols = (ox[:, None] + np.arange(w))[:, None, :]  # (N, 1, W)
    return padded[np.arange(n)[:, None, None], rows, cols]  # (N, H, W, C)


def hflip(images: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror a random half of the batch left-right."""
    flip = rng.random(images.shape[0]) < p
    out = images.copy()
    out[flip] = images[flip, :, ::-1]
    return out


AUGMENTATIONS: dict[str, Augment] = {
    "random_crop": random_crop,
    "hflip": hflip,
}


def check_augment(names: Sequence[str]) -> tuple[str, ...]:
    """Validate augmentation names; returns them as a tuple."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r} (known: {', '.join(AUGMENTATIONS)})")
    return tuple(names)


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32, scaled to [0, 1] then standardised per channel."""
    x = images.astype(np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class Preprocessor:
    """The ``map_batches`` callable: decode, augment, normalise a numpy batch.

    Input columns: ``image`` (raw bytes or an NHWC uint8 array), ``label``, ``id``.
    Output columns: ``image`` float32 (N, C, H, W), ``label`` int64, ``id`` int64.
    """

    def __init__(self, shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 augment: Sequence[str] = (), seed: int | None = None):
        self.shape = tuple(shape)
        self.mean, self.std = list(mean), list(std)
        self.augment = check_augment(augment)
        self.seed = seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        images = decode_raw(batch["image"], self.shape)
        if self.augment:
            # A fresh stream per batch; seeded runs mix the seed with the rows' ids so the same
            # rows get the same augmentation whatever worker or block they land in.
            ids = np.asarray(batch.get("id", np.arange(len(images))), dtype=np.int64)
            entropy = None if self.seed is None else [self.seed, int(ids.sum()) & 0xFFFFFFFF, len(ids)]
            rng = np.random.default_rng(entropy)
            for name in self.augment:
                images = AUGMENTATIONS[name](images, rng)
        out = {"image": normalize(images, self.mean, self.std), "label": np.asarray(batch["label"], dtype=np.int64)}
        if "id" in batch:
            out["id"] = np.asarray(batch["id"], dtype=np.int64)
        return out
