"""The augmentations of :mod:`lepton_ray.data.transforms`, in torch, on the training device.

On a GPU the Ray Data CPU workers can become the bottleneck: a CPU core augments a few thousand
32x32 images per second while one H200 trains ResNet-18 on ~47k/s. With
``DataConfig(augment_on="device")`` (the default when training on GPUs) the CPU workers only read
and decode, and the training loop augments each batch on its own device, here.

Same names and parameters as the numpy versions; images are (N, C, H, W) float32 in [0, 255]
(after the uint8 -> float conversion, before normalisation). The random draws are the CPU
path's, per row, from the hash of (seed, epoch, row id, augmentation, draw) in
:mod:`lepton_ray.data.rowhash`, computed here on the device: a crop or a flip gives the very pixels
the CPU path gives, whatever the rank, the world size or the batch a row is in. Interpolating
augmentations (rotate, affine, color_jitter) match within one grey level: pixels are not rounded to
uint8 between steps here.

Cost of keying per row, measured on one H200 (torch 2.11, 2026-12-02; crop + flip of 32x32x3
float batches, mean of 200 calls after 20 warm-ups, synchronised): 0.83 ms per batch of 512 rows and
0.90 ms per 4,096, against 0.34 and 0.51 ms drawing from a stateful ``torch.Generator``. Both are
bound by kernel launches (the hash adds about 25 small integer kernels), run ahead of the GPU
asynchronously, and cost the same for any batch size. A feed whose ids span a known range (a
prepared dataset's, cached, streamed or through the ring) avoids the hash per batch: the range is
hashed once an epoch (:meth:`Augmenter.hash_ids_once`), and a batch gathers its rows' draws in
one kernel.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lepton_ray.data import rowhash
from lepton_ray.data.transforms import check_augment


class RowDraws:
    """:class:`lepton_ray.data.transforms.RowDraws` in torch: the k-th call returns every row's
    k-th draw, on the device the bits are on."""

    def __init__(self, bits: torch.Tensor):
        self.bits = bits  # (DRAWS, N) int64 values in [0, 2**32)
        self.used = 0

    def _next(self, size: int) -> torch.Tensor:
        if size != self.bits.shape[1]:
            raise ValueError(f"per-row draws come one per row ({self.bits.shape[1]}), not {size}")
        if self.used == len(self.bits):
            raise RuntimeError(f"an augmentation drew more than {len(self.bits)} numbers per row")
        self.used += 1
        return self.bits[self.used - 1]

    def integers(self, low: int, high: int, size: int) -> torch.Tensor:
        if not 0 < high - low <= 1 << 31:
            raise ValueError(f"integers({low}, {high}): the range must hold 1 to 2**31 values")
        k = (self._next(size) * (high - low)) >> 32
        return k + low if low else k

    def random(self, size: int) -> torch.Tensor:
        return (self._next(size) >> 8).to(torch.float32) * rowhash.UNIT

    def uniform(self, low: float, high: float, size: int) -> torch.Tensor:
        return self.random(size) * (high - low) + low

    def below(self, p: float, size: int) -> torch.Tensor:
        """``random(size) < p``, bit for bit, in one comparison of the bits: ``random`` is
        ``(bits >> 8) * 2**-24`` and ``p`` is compared as a float32 (as torch and numpy both compare
        a float32 array with a Python float), so it holds exactly when
        ``bits < ceil(float32(p) * 2**24) * 2**8``."""
        p32 = float(np.float32(p))
        return self._next(size) < math.ceil(p32 * 2**24) * 2**8


def row_draws(
    seed: int | None, epoch: int, ids: torch.Tensor | None, keys: torch.Tensor, n: int
) -> list[RowDraws]:
    """Each augmentation's draws for ``n`` rows, on ``keys``' device; ``keys`` is
    ``rowhash.draw_keys(names)`` as an int64 (S, DRAWS, 1) tensor. Without a seed or ids, fresh
    entropy (as :func:`lepton_ray.data.transforms.row_draws`)."""
    if seed is None or ids is None:
        seed, ids = secrets.randbits(63), torch.arange(n, device=keys.device)
    ids = ids.to(keys.device, torch.int64, non_blocking=True)
    rows = rowhash.row_keys(rowhash.run_key(seed, epoch), ids)
    return [RowDraws(b) for b in rowhash.draw_bits(rows, keys)]


DeviceAugment = Callable[[torch.Tensor, RowDraws], torch.Tensor]


def random_crop(x: torch.Tensor, rng: RowDraws, padding: int = 2) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back at a random offset per image (a random translation)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = rng.integers(0, 2 * padding + 1, n)
    ox = rng.integers(0, 2 * padding + 1, n)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def hflip(x: torch.Tensor, rng: RowDraws, p: float = 0.5) -> torch.Tensor:
    """Mirror a random share ``p`` of the batch left-right."""
    flip = rng.below(p, x.shape[0])
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def affine(
    x: torch.Tensor,
    angle: torch.Tensor,
    zoom: torch.Tensor,
    shift_x: torch.Tensor,
    shift_y: torch.Tensor,
) -> torch.Tensor:
    """Rotate each image by ``angle`` radians and zoom it about its centre, then shift it by
    (``shift_x``, ``shift_y``) pixels; bilinear, zero fill: :func:`lepton_ray.data.transforms.affine`
    as one ``grid_sample`` (the same pixel-space map, written in its normalised coordinates)."""
    n, _, h, w = x.shape
    hw, hh = max(w - 1, 1) / 2.0, max(h - 1, 1) / 2.0
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos, -sin * hh / hw, -(cos * shift_x - sin * shift_y) / hw], 1),
            torch.stack([sin * hw / hh, cos, -(sin * shift_x + cos * shift_y) / hh], 1),
        ],
        1,
    ).to(x.dtype)  # (N, 2, 3): output pixel -> source pixel
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def random_affine(
    x: torch.Tensor,
    rng: RowDraws,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Rotate by up to ``degrees``, shift by up to ``translate`` of the size and zoom within ``scale``."""
    n, _, h, w = x.shape
    return affine(
        x,
        angle=rng.uniform(-degrees, degrees, n) * (math.pi / 180.0),
        zoom=rng.uniform(scale[0], scale[1], n),
        shift_x=rng.uniform(-translate, translate, n) * w,
        shift_y=rng.uniform(-translate, translate, n) * h,
    )


def random_rotation(x: torch.Tensor, rng: RowDraws, degrees: float = 15.0) -> torch.Tensor:
    """Rotate each image by a random angle in ``[-degrees, degrees]`` about its centre."""
    return random_affine(x, rng, degrees=degrees, translate=0.0, scale=(1.0, 1.0))


def color_jitter(
    x: torch.Tensor,
    rng: RowDraws,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
) -> torch.Tensor:
    """Brightness, contrast and (RGB only) saturation by random factors in ``[1 - s, 1 + s]``,
    clipping after each step (as :func:`lepton_ray.data.transforms.color_jitter`)."""
    n, c = x.shape[:2]

    def factors(s: float) -> torch.Tensor:
        return rng.uniform(1 - s, 1 + s, n).view(n, 1, 1, 1)

    luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x * factors(brightness)).clamp_(0, 255)
    grey = (x * luma).sum(1, keepdim=True) if c == 3 else x
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * factors(contrast) + mean).clamp_(0, 255)
    if c == 3:
        grey = (x * luma).sum(1, keepdim=True)
        x = ((x - grey) * factors(saturation) + grey).clamp_(0, 255)
    return x


AUGMENTATIONS: dict[str, DeviceAugment] = {
    "random_crop": random_crop,
    "hflip": hflip,
    "rotate": random_rotation,
    "affine": random_affine,
    "color_jitter": color_jitter,
}


TABLE_BYTES = 256 << 20
"""The most device memory :meth:`Augmenter.hash_ids_once` spends on an epoch's draws."""


class Augmenter:
    """Applies ``names`` in order to float (N, C, H, W) batches in [0, 255] on ``device``.

    Row ``i`` of a batch is augmented from (``seed``, the epoch of :meth:`start_epoch`, ``ids[i]``)
    alone, exactly as :class:`lepton_ray.data.transforms.Preprocessor` would augment it on the CPU:
    the rank and the world size do not matter, and a resumed or resized run augments every row as
    the uninterrupted run would have. ``seed=None`` or ``ids=None``: fresh entropy per batch.

    When every id is known to lie in one range (:meth:`hash_ids_once`: a prepared dataset's
    ids), each epoch hashes the draws of the whole range once and a batch gathers
    its rows' draws: one kernel instead of the hash's ~25, which matter when the step is bound by
    kernel launches (ResNet-18 at 32x32 on an H200).
    """

    def __init__(self, names: Sequence[str], device: torch.device | str, seed: int | None):
        self.names = check_augment(names)
        self.device, self.seed, self.epoch = torch.device(device), seed, 0
        keys = rowhash.draw_keys(self.names)
        self.keys = torch.tensor(keys, dtype=torch.int64, device=self.device).view(
            -1, rowhash.DRAWS, 1
        )
        self.id_range: tuple[int, int] | None = None
        self.table: torch.Tensor | None = None  # (S, DRAWS, n) draws of the range's ids

    def hash_ids_once(self, first: int, n: int) -> bool:
        """Every batch's ids from now on lie in ``[first, first + n)``: draws are then hashed per
        epoch for the whole range (``8 * DRAWS`` bytes of device memory per id and augmentation:
        64 for crop + flip) and gathered per batch; the same draws as hashed per batch. Not for a
        range whose table would pass :data:`TABLE_BYTES` (4M ids with crop + flip): returns
        whether it is used."""
        table_bytes = len(self.names) * rowhash.DRAWS * 8 * n
        if not self.names or self.seed is None or not 0 < table_bytes <= TABLE_BYTES:
            return False
        self.id_range, self.table = (int(first), int(n)), None
        return True

    def start_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.id_range is not None:
            first, n = self.id_range
            ids = torch.arange(first, first + n, dtype=torch.int64, device=self.device)
            rows = rowhash.row_keys(rowhash.run_key(self.seed, self.epoch), ids)
            self.table = rowhash.draw_bits(rows, self.keys)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if not self.names:
            return x
        if self.table is not None and ids is not None:
            first = self.id_range[0]
            ids = ids.to(self.device, torch.int64, non_blocking=True)
            draws = [RowDraws(b) for b in self.table[:, :, ids - first if first else ids]]
        else:
            draws = row_draws(self.seed, self.epoch, ids, self.keys, x.shape[0])
        for name, rng in zip(self.names, draws, strict=True):
            x = AUGMENTATIONS[name](x, rng)
        return x
