"""The on-device augmentations do what the numpy (Ray Data) ones do, on torch tensors.

Both draw each row's random numbers from the same hash of (seed, epoch, row id, augmentation,
draw) (``lepton_ray.data.rowhash``): the uniforms are bit-identical, so a crop or a flip gives the
very same pixels on either side, and the interpolating augmentations agree within rounding.
On a CUDA machine the same tests run on the GPU as well.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lepton_ray.config import DataConfig
from lepton_ray.data import device_transforms as dt
from lepton_ray.data import rowhash
from lepton_ray.data import transforms as nt
from lepton_ray.errors import ConfigError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def images(n: int, c: int, h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def to_torch(x: np.ndarray, device: str = "cpu") -> torch.Tensor:  # NHWC uint8 -> NCHW float
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().to(device)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).cpu().numpy()


def both_draws(names, ids, seed=11, epoch=2, device="cpu"):
    """The numpy and the torch draws for the same (seed, epoch, ids)."""
    keys = torch.tensor(rowhash.draw_keys(names), dtype=torch.int64, device=device)
    cpu = nt.row_draws(seed, epoch, ids, names, len(ids))
    dev = dt.row_draws(
        seed, epoch, torch.from_numpy(ids), keys.view(-1, rowhash.DRAWS, 1), len(ids)
    )
    return cpu, dev


IDS = np.concatenate([np.arange(500), np.array([-7, 1 << 33, (1 << 62) + 12345])]).astype(np.int64)


@pytest.mark.parametrize("device", DEVICES)
def test_numpy_and_torch_uniforms_are_bit_identical(device):
    names = ("random_crop", "hflip", "affine", "color_jitter")
    cpu, dev = both_draws(names, IDS, device=device)
    n = len(IDS)
    for c, d in zip(cpu, dev, strict=True):
        np.testing.assert_array_equal(c.bits, d.bits.cpu().numpy())
        u_c, u_d = c.random(n), d.random(n).cpu().numpy()
        assert u_c.dtype == u_d.dtype == np.float32
        assert u_c.tobytes() == u_d.tobytes()
        np.testing.assert_array_equal(c.integers(0, 5, n), d.integers(0, 5, n).cpu().numpy())
        np.testing.assert_array_equal(
            c.uniform(-10.0, 10.0, n), d.uniform(-10.0, 10.0, n).cpu().numpy()
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [1, 3])
def test_crop_and_flip_give_the_same_pixels_on_the_cpu_and_the_device(device, c):
    x = images(64, c)
    ids = np.arange(1000, 1064, dtype=np.int64)
    names = ("random_crop", "hflip")
    cpu_images = x
    for name, rng in zip(names, nt.row_draws(5, 3, ids, names, 64), strict=True):
        cpu_images = nt.AUGMENTATIONS[name](cpu_images, rng)
    aug = dt.Augmenter(names, device, seed=5)
    aug.start_epoch(3)
    on_device = aug(to_torch(x, device), torch.from_numpy(ids))
    np.testing.assert_array_equal(to_numpy(on_device).astype(np.uint8), cpu_images)
    # ... and the Ray Data preprocessor (uint8 NCHW out) agrees with both.
    pre = nt.Preprocessor(
        x.shape[1:], [0.0] * c, [1.0] * c, names, seed=5, normalize=False, epoch=3
    )
    rows = pre({"image": x, "label": np.zeros(64), "id": ids})["image"]
    np.testing.assert_array_equal(rows, cpu_images.transpose(0, 3, 1, 2))
    assert not np.array_equal(cpu_images, x)


@pytest.mark.parametrize("device", DEVICES)
def test_a_flip_decided_on_the_bits_is_the_uniform_below_p(device):
    bits = torch.cat(
        [
            torch.randint(0, 1 << 32, (4000,), generator=torch.Generator().manual_seed(0)),
            torch.tensor([0, 255, 256, (1 << 31) - 1, 1 << 31, (1 << 32) - 257, (1 << 32) - 1]),
        ]
    ).to(device)
    edges = [1 / 3, 0.1, 0.7 + 1e-9, 2.0**-24, 1 - 2.0**-24, 1 - 2.0**-26]
    for p in [0.0, 0.5, 1.0, -0.5, 1.5] + edges:
        uniform = dt.RowDraws(bits.view(1, -1)).random(len(bits)) < p
        below = dt.RowDraws(bits.view(1, -1)).below(p, len(bits))
        assert torch.equal(below, uniform), p


@pytest.mark.parametrize("device", DEVICES)
def test_draws_hashed_once_an_epoch_for_an_id_range_are_the_per_batch_draws(device):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    names = ("random_crop", "hflip", "color_jitter")
    x = to_torch(images(40, 3), device)
    ids = (torch.randperm(40, generator=torch.Generator().manual_seed(1)) + 1000)[:29]
    keyed, ranged = dt.Augmenter(names, device, seed=3), dt.Augmenter(names, device, seed=3)
    ranged.hash_ids_once(1000, 40)
    for epoch in (0, 7):
        keyed.start_epoch(epoch)
        ranged.start_epoch(epoch)
        with Ops() as per_batch:
            want = keyed(x[:29].clone(), ids)
        with Ops() as gathered:
            got = ranged(x[:29].clone(), ids)
        assert torch.equal(got, want)
        hashing = [op for op in per_batch.names if "xor" in op]
        assert len(hashing) >= 8 and not [op for op in gathered.names if "xor" in op]
    unseeded = dt.Augmenter(names, device, seed=None)
    assert not unseeded.hash_ids_once(1000, 40)  # nothing to key: fresh entropy per batch
    too_many = dt.TABLE_BYTES // (len(names) * rowhash.DRAWS * 8) + 1
    assert not dt.Augmenter(names, device, seed=3).hash_ids_once(0, too_many)
    assert dt.Augmenter(names, device, seed=3).hash_ids_once(0, too_many - 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("augment", [False, True])
def test_pixels_normalise_uint8_rows_into_the_models_layout_as_float_arithmetic(device, augment):
    from lepton_ray.train.step import Pixels

    rows = torch.from_numpy(images(6, 3).transpose(0, 3, 1, 2).copy())  # uint8 NCHW
    mean, std = [0.2, 0.4, 0.6], [0.3, 0.2, 0.1]
    pixels = Pixels(mean, std, torch.device(device), torch.channels_last)
    aug = dt.Augmenter(("random_crop", "hflip"), device, seed=1) if augment else None
    ids = torch.arange(6)
    x = rows.to(device).float()
    want = (aug(x, ids) if augment else x) * pixels.scale + pixels.shift
    got = pixels(rows, aug, ids)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)


def test_the_augmenter_ignores_batch_composition_and_world_size():
    x = to_torch(images(48, 3))
    ids = torch.arange(48) * 31 + 7
    aug = dt.Augmenter(("random_crop", "hflip", "color_jitter"), "cpu", seed=0)
    aug.start_epoch(4)
    whole = aug(x.clone(), ids)
    # Two "ranks" with interleaved rows, each shuffled: every row as in the whole batch.
    for rank in range(2):
        mine = torch.randperm(48, generator=torch.Generator().manual_seed(rank))
        mine = mine[mine % 2 == rank]
        assert torch.equal(aug(x[mine].clone(), ids[mine]), whole[mine])
    aug.start_epoch(5)
    other = aug(x.clone(), ids)
    assert sum(not torch.equal(other[i], whole[i]) for i in range(48)) > 40
    again = dt.Augmenter(("random_crop", "hflip", "color_jitter"), "cpu", seed=0)
    again.start_epoch(4)
    assert torch.equal(again(x.clone(), ids), whole)


def test_without_ids_the_augmenter_draws_fresh_entropy():
    x = to_torch(np.repeat(images(1, 3), 64, axis=0))
    aug = dt.Augmenter(("random_crop",), "cpu", seed=0)
    assert not torch.equal(aug(x.clone()), aug(x.clone()))
    assert torch.equal(dt.Augmenter((), "cpu", seed=0)(x), x)


def test_random_crop_is_a_zero_filled_translation_within_the_padding():
    x = np.arange(1, 5 * 9 * 9 + 1, dtype=np.int64).reshape(5, 9, 9, 1)  # unique, non-zero pixels
    (rng,) = both_draws(("random_crop",), np.arange(5))[1]
    out = to_numpy(dt.random_crop(to_torch(x), rng, padding=2)).astype(np.int64)
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
    ids = np.arange(64)

    def flip(p):
        (rng,) = both_draws(("hflip",), ids)[1]
        return dt.hflip(x, rng, p=p)

    out = flip(0.5)
    flipped = [bool(torch.equal(out[i], x[i].flip(2))) for i in range(64)]
    kept = [bool(torch.equal(out[i], x[i])) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48
    assert torch.equal(flip(1.0), x.flip(3)) and torch.equal(flip(0.0), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "c"), [("affine", 1), ("affine", 3), ("rotate", 3)])
def test_random_affine_matches_the_numpy_version(device, name, c):
    x = images(16, c, h=14, w=11)
    (cpu,), (dev,) = both_draws((name,), np.arange(16), device=device)
    out = to_numpy(dt.AUGMENTATIONS[name](to_torch(x, device), dev))
    ref = nt.AUGMENTATIONS[name](x, cpu).astype(np.float32)
    diff = np.abs(out - ref)
    assert np.mean(diff > 1.0) < 0.002, (
        f"{np.mean(diff > 1.0):.4f} of pixels differ by more than rounding"
    )
    assert np.mean(diff) > 0 or name == "rotate"  # compared images, not zeros


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [1, 3])
def test_color_jitter_matches_the_numpy_version(device, c):
    x = images(16, c)
    (cpu,), (dev,) = both_draws(("color_jitter",), np.arange(16), device=device)
    out = to_numpy(dt.color_jitter(to_torch(x, device), dev))
    ref = nt.color_jitter(x, cpu).astype(np.float32)
    assert np.max(np.abs(out - ref)) <= 1.0 + 1e-3  # numpy rounds to uint8 after each step
    assert out.min() >= 0 and out.max() <= 255 and not np.array_equal(ref, x)


def test_augment_on_is_resolved_from_the_device():
    assert DataConfig().augments_on_device(use_gpu=True)
    assert not DataConfig().augments_on_device(use_gpu=False)
    assert DataConfig(augment_on="device").augments_on_device(use_gpu=False)
    assert not DataConfig(augment_on="cpu").augments_on_device(use_gpu=True)
    assert not DataConfig(augment=(), augment_on="device").augments_on_device(use_gpu=True)
    with pytest.raises(ConfigError, match=r"DataConfig\.augment_on: .*'gpu'"):
        DataConfig(augment_on="gpu")
