"""The on-device augmentations do what the numpy (Ray Data) ones do, on torch tensors.

Each random op is checked against its numpy twin by replaying the same random draws: the torch
generator is cloned, its draws are fed to the numpy function through a stand-in ``rng``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lepton_ray import device_transforms as dt
from lepton_ray import transforms as nt
from lepton_ray.config import DataConfig
from lepton_ray.errors import ConfigError


class Replay:
    """A numpy-``Generator`` stand-in whose ``uniform`` returns prepared arrays in order."""

    def __init__(self, draws: list[np.ndarray]):
        self.draws = list(draws)

    def uniform(self, low, high, size):  # noqa: ARG002 - the values were drawn with these bounds already
        out = self.draws.pop(0)
        assert out.shape == (size,)
        return out


def images(n: int, c: int, h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def to_torch(x: np.ndarray) -> torch.Tensor:  # NHWC uint8 -> NCHW float in [0, 255]
    return torch.from_numpy(x).permute(0, 3, 1, 2).float()


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_crop_is_a_zero_filled_translation_within_the_padding():
    x = np.arange(1, 5 * 9 * 9 + 1, dtype=np.int64).reshape(
        5, 9, 9, 1
    )  # every pixel unique and non-zero
    out = to_numpy(dt.random_crop(to_torch(x), gen(), padding=2)).astype(np.int64)
    shifts = set()
    for i in range(5):
        padded = np.pad(x[i], ((2, 2), (2, 2), (0, 0)))
        hits = [
            (oy, ox)
            for oy in range(5)
            for ox in range(5)
            if np.array_equal(padded[oy : oy + 9, ox : ox + 9], out[i])
        ]
        assert len(hits) == 1, f"image {i} is not a crop of its padded self"
        shifts.add(hits[0])
    assert len(shifts) > 1  # offsets are per image


def test_hflip_mirrors_a_share_of_the_batch():
    x = to_torch(images(64, 3))
    out = dt.hflip(x, gen())
    flipped = [bool(torch.equal(out[i], x[i].flip(2))) for i in range(64)]
    kept = [bool(torch.equal(out[i], x[i])) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48
    assert torch.equal(dt.hflip(x, gen(), p=1.0), x.flip(3)) and torch.equal(
        dt.hflip(x, gen(), p=0.0), x
    )


@pytest.mark.parametrize("c", [1, 3])
def test_random_affine_matches_the_numpy_version(c):
    x = images(16, c, h=14, w=11)
    ref_gen = gen()
    draws = [
        dt._uniform(16, lo, hi, ref_gen, torch.device("cpu")).numpy()
        for lo, hi in ((-10.0, 10.0), (0.9, 1.1), (-0.1, 0.1), (-0.1, 0.1))
    ]
    out = to_numpy(dt.random_affine(to_torch(x), gen()))
    ref = nt.random_affine(x, Replay(draws)).astype(np.float32)
    diff = np.abs(out - ref)
    assert np.mean(diff > 1.0) < 0.002, (
        f"{np.mean(diff > 1.0):.4f} of pixels differ by more than rounding"
    )


def test_affine_quarter_turn_and_integer_shift_are_exact():
    x = images(2, 3, h=9, w=9)
    quarter = dt.affine(
        to_torch(x),
        angle=torch.full((2,), np.pi / 2),
        zoom=torch.ones(2),
        shift_x=torch.zeros(2),
        shift_y=torch.zeros(2),
    )
    assert np.allclose(
        to_numpy(quarter),
        nt.affine(x, np.full(2, np.pi / 2), np.ones(2), np.zeros(2), np.zeros(2)),
        atol=1e-3,
    )
    shifted = to_numpy(
        dt.affine(
            to_torch(x),
            angle=torch.zeros(2),
            zoom=torch.ones(2),
            shift_x=torch.full((2,), 2.0),
            shift_y=torch.full((2,), -1.0),
        )
    )
    expected = np.zeros_like(x)
    expected[:, :8, 2:] = x[:, 1:, :7]
    assert np.allclose(shifted, expected, atol=1e-3)


@pytest.mark.parametrize("c", [1, 3])
def test_color_jitter_matches_the_numpy_version(c):
    x = images(16, c)
    ref_gen = gen()
    draws = [
        dt._uniform(16, 0.7, 1.3, ref_gen, torch.device("cpu")).numpy().astype(np.float32)
        for _ in range(3 if c == 3 else 2)
    ]
    out = to_numpy(dt.color_jitter(to_torch(x), gen()))
    ref = nt.color_jitter(x, Replay([d.reshape(-1) for d in draws])).astype(np.float32)
    assert np.max(np.abs(out - ref)) <= 1.0 + 1e-3  # numpy rounds to uint8 after each step
    assert out.min() >= 0 and out.max() <= 255


def test_augmenter_is_reproducible_per_seed_epoch_and_rank():
    x = to_torch(images(32, 3))
    names = ("random_crop", "hflip", "color_jitter")

    def run(seed: int, epoch: int, rank: int) -> torch.Tensor:
        aug = dt.Augmenter(names, torch.device("cpu"), seed=seed, rank=rank)
        aug.start_epoch(epoch)
        return aug(x.clone())

    assert torch.equal(run(0, 1, 0), run(0, 1, 0))
    assert not torch.equal(run(0, 1, 0), run(0, 2, 0))
    assert not torch.equal(run(0, 1, 0), run(0, 1, 1))
    assert not torch.equal(run(0, 1, 0), run(1, 1, 0))


def test_augment_on_is_resolved_from_the_device():
    assert DataConfig().augments_on_device(use_gpu=True)
    assert not DataConfig().augments_on_device(use_gpu=False)
    assert DataConfig(augment_on="device").augments_on_device(use_gpu=False)
    assert not DataConfig(augment_on="cpu").augments_on_device(use_gpu=True)
    assert not DataConfig(augment=(), augment_on="device").augments_on_device(use_gpu=True)
    with pytest.raises(
        ConfigError, match="DataConfig.augment_on: 'gpu' is not one of auto, cpu, device"
    ):
        DataConfig(augment_on="gpu")
