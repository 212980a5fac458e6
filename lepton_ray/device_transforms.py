"""The augmentations of :mod:`lepton_ray.transforms`, in torch, on the training device.

On a GPU the Ray Data CPU workers can become the bottleneck: a CPU core augments a few thousand
32x32 images per second while one H200 trains ResNet-18 on ~47k/s. With
``DataConfig(augment_on="device")`` (the default when training on GPUs) the CPU workers only read
and decode, and the training loop augments each batch on its own device, here.

Same names and parameters as the numpy versions; images are (N, C, H, W) float32 in [0, 255]
(after the uint8 -> float conversion, before normalisation). Differences from the CPU path: the
random draws come from a per-worker ``torch.Generator`` (so a run is reproducible for a given seed
and worker count, not per row id), and pixels are not rounded to uint8 between steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lepton_ray.transforms import check_augment

DeviceAugment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _uniform(
    n: int, low: float, high: float, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def random_crop(x: torch.Tensor, gen: torch.Generator, padding: int = 2) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back at a random offset per image (a random translation)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def hflip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror a random share ``p`` of the batch left-right."""
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def affine(
    x: torch.Tensor,
    angle: torch.Tensor,
    zoom: torch.Tensor,
    shift_x: torch.Tensor,
    shift_y: torch.Tensor,
) -> torch.Tensor:
    """Rotate each image by ``angle`` radians and zoom it about its centre, then shift it by
    (``shift_x``, ``shift_y``) pixels; bilinear, zero fill: :func:`lepton_ray.transforms.affine`
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
    gen: torch.Generator,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Rotate by up to ``degrees``, shift by up to ``translate`` of the size and zoom within ``scale``."""
    n, _, h, w = x.shape
    d = x.device
    return affine(
        x,
        angle=_uniform(n, -degrees, degrees, gen, d) * (math.pi / 180.0),
        zoom=_uniform(n, scale[0], scale[1], gen, d),
        shift_x=_uniform(n, -translate, translate, gen, d) * w,
        shift_y=_uniform(n, -translate, translate, gen, d) * h,
    )


def random_rotation(x: torch.Tensor, gen: torch.Generator, degrees: float = 15.0) -> torch.Tensor:
    """Rotate each image by a random angle in ``[-degrees, degrees]`` about its centre."""
    return random_affine(x, gen, degrees=degrees, translate=0.0, scale=(1.0, 1.0))


def color_jitter(
    x: torch.Tensor,
    gen: torch.Generator,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
) -> torch.Tensor:
    """Brightness, contrast and (RGB only) saturation by random factors in ``[1 - s, 1 + s]``,
    clipping after each step (as :func:`lepton_ray.transforms.color_jitter`)."""
    n, c = x.shape[:2]

    def factors(s: float) -> torch.Tensor:
        return _uniform(n, 1 - s, 1 + s, gen, x.device).view(n, 1, 1, 1)

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


class Augmenter:
    """Applies ``names`` in order to float (N, C, H, W) batches in [0, 255] on ``device``, drawing
    from one generator per worker and epoch (reseed with :meth:`start_epoch`)."""

    def __init__(self, names: Sequence[str], device: torch.device, seed: int, rank: int):
        self.names = check_augment(names)
        self.device, self.seed, self.rank = device, seed, rank
        self.gen = torch.Generator(device=device)
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        self.gen.manual_seed(
            (self.seed * 1_000_003 + epoch * 10_007 + self.rank) & 0x7FFF_FFFF_FFFF_FFFF
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = AUGMENTATIONS[name](x, self.gen)
        return x
