"""Vectorised batch transforms: decode, augment, normalise."""

from __future__ import annotations

import numpy as np
import pytest

from lepton_ray.data import rowhash
from lepton_ray.data.rowhash import M32
from lepton_ray.data.transforms import (
    AUGMENTATIONS,
    Preprocessor,
    affine,
    check_augment,
    color_jitter,
    decode_raw,
    hflip,
    normalize,
    random_affine,
    random_crop,
    random_rotation,
    row_draws,
)


def _images(n=6, h=5, w=7, c=3, seed=0) -> np.ndarray:
    # Values 1..255 so that zero padding is distinguishable from image content.
    return np.random.default_rng(seed).integers(1, 256, size=(n, h, w, c), dtype=np.uint8)


def test_decode_raw_from_bytes():
    imgs = _images()
    rows = [im.tobytes() for im in imgs]
    out = decode_raw(rows, (5, 7, 3))
    assert out.shape == (6, 5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, imgs)
    # An object array of bytes (what a numpy batch from Ray Data holds) works too.
    np.testing.assert_array_equal(decode_raw(np.array(rows, dtype=object), (5, 7, 3)), imgs)


def test_decode_raw_passes_decoded_arrays_through():
    imgs = _images()
    assert decode_raw(imgs, (5, 7, 3)) is imgs


def test_decode_raw_rejects_wrong_size():
    rows = [im.tobytes() for im in _images()]
    rows[2] = rows[2][:-1]
    with pytest.raises(ValueError, match=r"do not match shape \(5, 7, 3\)"):
        decode_raw(rows, (5, 7, 3))
    with pytest.raises(ValueError, match="do not match shape"):
        decode_raw([im.tobytes() for im in _images()], (28, 28, 1))


def test_decode_raw_reads_arrow_columns_in_place():
    import pyarrow as pa

    from lepton_ray.data.writer import pixel_column

    imgs = _images(n=9)
    fixed = pixel_column(imgs)
    assert fixed.type == pa.binary(5 * 7 * 3)  # fixed_size_binary: no offsets
    out = decode_raw(fixed, (5, 7, 3))
    np.testing.assert_array_equal(out, imgs)
    assert not out.flags.owndata  # a view of Arrow's buffer, not a copy
    np.testing.assert_array_equal(decode_raw(fixed.slice(3, 4), (5, 7, 3)), imgs[3:7])
    # Older datasets: a variable-width binary column of equal-length rows.
    var = pa.array([im.tobytes() for im in imgs], pa.binary())
    np.testing.assert_array_equal(decode_raw(var.slice(2, 5), (5, 7, 3)), imgs[2:7])
    chunked = pa.chunked_array([fixed.slice(0, 4), fixed.slice(4)])
    np.testing.assert_array_equal(decode_raw(chunked, (5, 7, 3)), imgs)
    assert decode_raw(fixed.slice(0, 0), (5, 7, 3)).shape == (0, 5, 7, 3)


def test_decode_raw_refuses_arrow_rows_of_the_wrong_size():
    import pyarrow as pa

    from lepton_ray.data.writer import pixel_column

    rows = [im.tobytes() for im in _images()]
    rows[4] = rows[4][:-1]
    with pytest.raises(ValueError, match="image row 4 is 104 bytes, the shape needs 105"):
        decode_raw(pa.array(rows, pa.binary()), (5, 7, 3))
    with pytest.raises(ValueError, match="rows are 105 bytes, the shape needs 784"):
        decode_raw(pixel_column(_images()), (28, 28, 1))
    with pytest.raises(ValueError, match="1 image rows are null"):
        decode_raw(pa.array([rows[0], None], pa.binary()), (5, 7, 3))
    with pytest.raises(ValueError, match="not raw pixel bytes"):
        decode_raw(pa.array([1, 2]), (5, 7, 3))


def test_preprocessor_takes_arrow_batches_as_numpy_ones():
    import pyarrow as pa

    from lepton_ray.data.writer import pixel_column

    imgs = _images(n=8)
    ids, labels = np.arange(100, 108), np.arange(8) % 3
    table = pa.table({"id": ids, "image": pixel_column(imgs), "label": labels})
    rows = {"id": ids, "image": [im.tobytes() for im in imgs], "label": labels}
    for scaled in (True, False):
        pre = Preprocessor(
            (5, 7, 3), [0.5] * 3, [0.25] * 3, ("random_crop", "hflip"), 3, normalize=scaled
        )
        a, b = pre(table), pre(rows)
        assert a.keys() == b.keys() == {"image", "label", "id"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_preprocessor_nhwc_passes_raw_rows_through_and_keeps_decoded_ones_as_stored():
    import pyarrow as pa

    from lepton_ray.data.writer import pixel_column

    imgs = _images(n=4)
    table = pa.table({"id": np.arange(4), "image": pixel_column(imgs), "label": np.arange(4) % 3})
    pre = Preprocessor((5, 7, 3), [0.5] * 3, [0.25] * 3, normalize=False, layout="nhwc")
    assert pre.passthrough and pre(table).equals(table)  # the pixels not even looked at
    assert pre.as_read  # read_ray: whole shards, one fused task each
    assert not Preprocessor((5, 7, 3), [0.5] * 3, [0.25] * 3, normalize=False).passthrough
    jpeg_bytes = Preprocessor(
        (5, 7, 3), [0.5] * 3, [0.25] * 3, encoding="jpeg", normalize=False, jpeg="bytes"
    )
    assert jpeg_bytes.passthrough and not jpeg_bytes.as_read  # keeps its decode batches
    augmented = Preprocessor(
        (5, 7, 3), [0.5] * 3, [0.25] * 3, ("hflip",), 3, normalize=False, layout="nhwc"
    )
    assert not augmented.passthrough
    assert augmented(table)["image"].shape == (4, 5, 7, 3)  # augmented, still (N, H, W, C)
    with pytest.raises(ValueError, match="nhwc with normalize=False"):
        Preprocessor((5, 7, 3), [0.5] * 3, [0.25] * 3, layout="nhwc")


def test_random_crop_keeps_shape_and_dtype():
    imgs = _images()
    out = random_crop(imgs, np.random.default_rng(0), padding=2)
    assert out.shape == imgs.shape and out.dtype == imgs.dtype


def test_random_crop_without_padding_is_identity():
    imgs = _images()
    np.testing.assert_array_equal(random_crop(imgs, np.random.default_rng(0), padding=0), imgs)


def _translate(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``img`` shifted down by ``dy`` and right by ``dx`` (negative: up/left), zero-filled."""
    h, w, _ = img.shape
    out = np.zeros_like(img)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def test_random_crop_is_a_translation_per_image():
    pad = 2
    imgs = _images(n=32)
    out = random_crop(imgs, np.random.default_rng(7), padding=pad)
    # Replay the generator: the offsets are drawn for rows first, then for columns.
    rng = np.random.default_rng(7)
    oy = rng.integers(0, 2 * pad + 1, size=len(imgs))
    ox = rng.integers(0, 2 * pad + 1, size=len(imgs))
    for i in range(len(imgs)):
        np.testing.assert_array_equal(
            out[i], _translate(imgs[i], pad - int(oy[i]), pad - int(ox[i]))
        )
    # With 32 images some must actually move.
    assert any(not np.array_equal(out[i], imgs[i]) for i in range(len(imgs)))


def test_random_crop_one_image_by_hand():
    img = np.arange(1, 10, dtype=np.uint8).reshape(1, 3, 3, 1)

    class Fixed:
        """A stand-in generator: row offset 0, column offset 2 (of 0..2 with padding 1)."""

        def __init__(self):
            self.calls = iter([np.array([0]), np.array([2])])

        def integers(self, low, high, size):
            assert (low, high, size) == (0, 3, 1)
            return next(self.calls)

    out = random_crop(img, Fixed(), padding=1)  # type: ignore[arg-type]
    # Padded image rows 0..2 (one zero row on top), columns 2..4 (one zero column on the right):
    # the digits move down by one and left by one.
    expected = np.array([[0, 0, 0], [2, 3, 0], [5, 6, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(out[0, :, :, 0], expected)


def test_hflip_flips_exactly_the_masked_rows():
    imgs = _images(n=64)
    out = hflip(imgs, np.random.default_rng(3), p=0.5)
    mask = np.random.default_rng(3).random(len(imgs)) < 0.5
    assert 0 < mask.sum() < len(imgs)
    np.testing.assert_array_equal(out[mask], imgs[mask][:, :, ::-1])
    np.testing.assert_array_equal(out[~mask], imgs[~mask])
    assert out.shape == imgs.shape and out.dtype == imgs.dtype


def test_hflip_does_not_modify_its_input():
    imgs = _images()
    before = imgs.copy()
    hflip(imgs, np.random.default_rng(0), p=1.0)
    np.testing.assert_array_equal(imgs, before)


def test_hflip_probability_extremes():
    imgs = _images()
    np.testing.assert_array_equal(hflip(imgs, np.random.default_rng(0), p=0.0), imgs)
    np.testing.assert_array_equal(hflip(imgs, np.random.default_rng(0), p=1.0), imgs[:, :, ::-1])


def test_normalize():
    imgs = _images(n=4, h=2, w=3, c=3)
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.25, 0.5]
    out = normalize(imgs, mean, std)
    assert out.dtype == np.float32
    assert out.shape == (4, 3, 2, 3)
    assert out.flags["C_CONTIGUOUS"]
    expected = (imgs.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(out, expected.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)
    # One value by hand: pixel 255 in channel 2 -> (1 - 0.9) / 0.5 = 0.2.
    full = normalize(np.full((1, 1, 1, 3), 255, np.uint8), mean, std)
    np.testing.assert_allclose(full[0, :, 0, 0], [4.5, 2.0, 0.2], rtol=1e-6)


def test_check_augment():
    assert check_augment(["random_crop", "hflip"]) == ("random_crop", "hflip")
    assert check_augment(()) == ()
    with pytest.raises(ValueError, match="unknown augmentation 'blur'"):
        check_augment(["random_crop", "blur"])
    assert set(AUGMENTATIONS) == {"random_crop", "hflip", "rotate", "affine", "color_jitter"}


def test_preprocessor_rejects_unknown_augmentation():
    with pytest.raises(ValueError, match="unknown augmentation"):
        Preprocessor((5, 7, 3), [0.5] * 3, [0.5] * 3, augment=("blur",))


@pytest.mark.parametrize("augment", [(), ("random_crop", "hflip"), tuple(AUGMENTATIONS)])
def test_preprocessor_output(augment):
    imgs = _images(n=8)
    batch = {
        "image": np.array([im.tobytes() for im in imgs], dtype=object),
        "label": np.arange(8, dtype=np.int32) % 3,
        "id": np.arange(100, 108, dtype=np.int32),
    }
    pre = Preprocessor((5, 7, 3), [0.5] * 3, [0.25] * 3, augment=augment, seed=0)
    out = pre(batch)
    assert set(out) == {"image", "label", "id"}
    assert out["image"].dtype == np.float32 and out["image"].shape == (8, 3, 5, 7)
    assert out["label"].dtype == np.int64 and out["id"].dtype == np.int64
    np.testing.assert_array_equal(out["label"], batch["label"])
    np.testing.assert_array_equal(out["id"], batch["id"])
    if not augment:
        np.testing.assert_allclose(out["image"], normalize(imgs, [0.5] * 3, [0.25] * 3))
    # Seeded: the same rows get the same augmentation.
    np.testing.assert_array_equal(pre(batch)["image"], out["image"])


def test_preprocessor_without_ids():
    imgs = _images(n=3)
    out = Preprocessor((5, 7, 3), [0.0] * 3, [1.0] * 3)({"image": imgs, "label": [0, 1, 2]})
    assert set(out) == {"image", "label"}
    assert out["label"].dtype == np.int64
    np.testing.assert_allclose(out["image"], imgs.transpose(0, 3, 1, 2) / 255.0, rtol=1e-6)


def _warp(imgs, angle=0.0, zoom=1.0, sx=0.0, sy=0.0):
    n = len(imgs)
    return affine(imgs, np.full(n, angle), np.full(n, zoom), np.full(n, sx), np.full(n, sy))


def test_affine_identity_and_exact_turns():
    imgs = _images(n=4, h=6, w=6)
    np.testing.assert_array_equal(_warp(imgs), imgs)
    # A quarter turn counter-clockwise as displayed is numpy's rot90; a half turn flips both axes.
    np.testing.assert_array_equal(_warp(imgs, np.pi / 2), np.rot90(imgs, axes=(1, 2)))
    np.testing.assert_array_equal(_warp(imgs, np.pi), imgs[:, ::-1, ::-1])


def test_affine_integer_shift_is_a_translation():
    imgs = _images(n=3)
    out = _warp(imgs, sx=2.0, sy=-1.0)  # right by 2, up by 1
    for i in range(3):
        np.testing.assert_array_equal(out[i], _translate(imgs[i], -1, 2))


def test_affine_half_pixel_shift_interpolates():
    img = np.array([[0, 100, 200, 50]], np.uint8).reshape(1, 1, 4, 1)
    out = _warp(img, sx=0.5)
    # Each output pixel averages the two source pixels it straddles; the left edge meets zero fill.
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 50, 150, 125])


def test_affine_zoom_out_leaves_a_zero_border():
    imgs = np.full((2, 9, 9, 1), 200, np.uint8)
    out = _warp(imgs, zoom=0.5)
    assert (out[:, 0] == 0).all() and (out[:, :, -1] == 0).all()
    assert (out[:, 4, 4] == 200).all()


def test_random_rotation_and_affine_are_seeded_and_vary_per_image():
    imgs = np.repeat(_images(n=1, h=12, w=12), 8, axis=0)
    for fn in (random_rotation, random_affine):
        a = fn(imgs, np.random.default_rng(5))
        np.testing.assert_array_equal(a, fn(imgs, np.random.default_rng(5)))
        assert a.shape == imgs.shape and a.dtype == np.uint8
        assert len({a[i].tobytes() for i in range(8)}) == 8  # the same image, eight different draws
    # Rotation keeps the centre pixel of an odd-sized image where it is.
    odd = _images(n=4, h=9, w=9)
    np.testing.assert_array_equal(
        random_rotation(odd, np.random.default_rng(0))[:, 4, 4], odd[:, 4, 4]
    )


def test_color_jitter():
    imgs = _images(n=16, h=4, w=4, c=3)
    np.testing.assert_array_equal(color_jitter(imgs, np.random.default_rng(0), 0, 0, 0), imgs)
    out = color_jitter(imgs, np.random.default_rng(0))
    assert out.shape == imgs.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, color_jitter(imgs, np.random.default_rng(0)))
    assert not np.array_equal(out, imgs)
    # A saturation factor of 0 leaves grey pixels: R == G == B up to rounding.
    grey = color_jitter(imgs, _Const(0.0), brightness=0, contrast=0, saturation=1.0)
    assert np.ptp(grey.astype(int), axis=3).max() <= 1
    # Brightness factor 2 doubles (and clips) every pixel.
    bright = color_jitter(imgs, _Const(2.0), brightness=1.0, contrast=0, saturation=0)
    np.testing.assert_array_equal(bright, np.clip(imgs.astype(int) * 2, 0, 255))


def test_color_jitter_greyscale_changes_brightness_and_contrast_only():
    imgs = _images(n=4, c=1)
    out = color_jitter(imgs, _Const(0.5), brightness=0.5, contrast=0, saturation=0.5)
    np.testing.assert_array_equal(out, np.rint(imgs * 0.5).astype(np.uint8))


class _Const:
    """A generator whose non-degenerate uniform draws return one value (to pin a jitter factor)."""

    def __init__(self, value: float):
        self.value = value

    def uniform(self, low, high, size):
        return np.full(size, self.value if high > low else low)


def test_uint8_rows_normalised_on_the_device_match_cpu_normalisation():
    """Training gets uint8 rows (``normalize=False``) and normalises on its device: same numbers."""
    import torch

    from lepton_ray.train.step import Pixels

    imgs = _images(n=8)
    batch = {"image": imgs, "label": np.arange(8) % 3}
    mean, std = [0.2, 0.4, 0.6], [0.3, 0.2, 0.1]
    rows = Preprocessor((5, 7, 3), mean, std, normalize=False)(batch)["image"]
    assert rows.dtype == np.uint8 and rows.shape == (8, 3, 5, 7)
    on_device = Pixels(mean, std, torch.device("cpu"), torch.channels_last)(torch.from_numpy(rows))
    np.testing.assert_allclose(
        on_device.numpy(), Preprocessor((5, 7, 3), mean, std)(batch)["image"], rtol=1e-5, atol=1e-5
    )


# --- augmentation keyed per row: (seed, epoch, row id) ----------------------------------------
def _batch(imgs: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"image": imgs, "label": np.zeros(len(imgs), np.int64), "id": ids}


def _augmented(imgs, ids, epoch=0, seed=3, augment=("random_crop", "hflip", "color_jitter")):
    pre = Preprocessor(
        imgs.shape[1:], [0.0] * 3, [1.0] * 3, augment, seed, normalize=False, epoch=epoch
    )
    return pre(_batch(imgs, ids))["image"]


def test_a_row_is_augmented_the_same_in_any_batch_composition_or_order():
    imgs = _images(n=64, h=8, w=8)
    ids = np.arange(5000, 5064, dtype=np.int64) * 7919  # not positions, not contiguous
    whole = _augmented(imgs, ids)
    order = np.random.default_rng(1).permutation(64)
    np.testing.assert_array_equal(_augmented(imgs[order], ids[order]), whole[order])
    halves = [_augmented(imgs[s], ids[s]) for s in (slice(0, 23), slice(23, None))]
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    np.testing.assert_array_equal(_augmented(imgs[5:6], ids[5:6]), whole[5:6])


def test_every_epoch_augments_differently_and_reproducibly():
    imgs = _images(n=64, h=8, w=8)
    ids = np.arange(64, dtype=np.int64)
    e0, e1 = _augmented(imgs, ids, epoch=0), _augmented(imgs, ids, epoch=1)
    np.testing.assert_array_equal(_augmented(imgs, ids, epoch=1), e1)
    changed = [not np.array_equal(e0[i], e1[i]) for i in range(64)]
    assert sum(changed) > 56  # crop (25 offsets) x flip x jitter: a repeat is rare
    other_seed = _augmented(imgs, ids, epoch=0, seed=4)
    assert sum(not np.array_equal(e0[i], other_seed[i]) for i in range(64)) > 56


def test_the_preprocessor_epoch_comes_from_the_dataset_info_too():
    from lepton_ray.data import DatasetInfo

    info = DatasetInfo("mem", 8, (5, 7, 3), ("a",), (0.0,) * 3, (1.0,) * 3)
    imgs, ids = _images(n=8), np.arange(8)
    pre = info.preprocessor(("random_crop",), seed=3, normalize=False, epoch=2)
    np.testing.assert_array_equal(
        pre(_batch(imgs, ids))["image"],
        _augmented(imgs, ids, epoch=2, augment=("random_crop",)),
    )


def test_without_a_seed_or_ids_every_batch_draws_fresh_entropy():
    imgs = np.repeat(_images(n=1, h=8, w=8), 64, axis=0)
    ids = np.arange(64)
    pre = Preprocessor((8, 8, 3), [0.0] * 3, [1.0] * 3, ("random_crop",), None, normalize=False)
    assert not np.array_equal(pre(_batch(imgs, ids))["image"], pre(_batch(imgs, ids))["image"])
    seeded = Preprocessor((8, 8, 3), [0.0] * 3, [1.0] * 3, ("random_crop",), 0, normalize=False)
    no_ids = {"image": imgs, "label": np.zeros(64)}
    assert not np.array_equal(seeded(no_ids)["image"], seeded(no_ids)["image"])


def test_hflip_takes_half_the_rows_and_crop_offsets_are_uniform():
    n = 10_000
    ids = np.arange(n, dtype=np.int64) + (1 << 40)  # ids beyond 32 bits
    crop, flip = row_draws(0, 0, ids, ("random_crop", "hflip"), n)
    flipped = flip.random(n) < 0.5
    assert abs(flipped.mean() - 0.5) < 0.02  # 4 standard deviations of a fair coin
    oy, ox = crop.integers(0, 5, n), crop.integers(0, 5, n)
    assert oy.min() == 0 and oy.max() == 4
    cells = np.bincount(oy * 5 + ox, minlength=25)  # the 25 (dy, dx) pairs: independent, uniform
    expected = n / 25
    chi2 = ((cells - expected) ** 2 / expected).sum()
    assert chi2 < 52.6, cells  # the 0.999 quantile of chi-square with 24 degrees of freedom
    u = crop.random(n)
    assert u.dtype == np.float32 and 0 <= u.min() and u.max() < 1
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 900


def test_row_draws_refuse_misuse():
    (draws,) = row_draws(0, 0, np.arange(4), ("hflip",), 4)
    with pytest.raises(ValueError, match="one per row"):
        draws.random(5)
    for _ in range(rowhash.DRAWS):
        draws.random(4)
    with pytest.raises(RuntimeError, match="more than 4 numbers per row"):
        draws.random(4)
    with pytest.raises(ValueError, match="must hold 1 to 2"):
        row_draws(0, 0, np.arange(4), ("hflip",), 4)[0].integers(3, 3, 4)


def test_hash32_on_int64_arrays_never_overflows():
    """The array version equals a Python-int reference computed modulo 2**32 (Python ints do not
    overflow), extremes included, and is a bijection on what it was given."""

    def reference(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x21F0AAAD) % 2**32
        x ^= x >> 15
        x = (x * 0x735A2D97) % 2**32
        return x ^ (x >> 15)

    x = np.concatenate(
        [np.random.default_rng(0).integers(0, 1 << 32, 5000), [0, 1, (1 << 31) - 1, 1 << 31, M32]]
    ).astype(np.int64)
    got = rowhash.hash32(x)
    assert got.tolist() == [reference(int(v)) for v in x]
    assert len(set(got.tolist())) == len(set(x.tolist()))
    assert rowhash.hash32(1) == 0x86D2FA73 == reference(1)


def test_a_repeated_augmentation_draws_independently():
    first, second = row_draws(0, 0, np.arange(1000), ("hflip", "hflip"), 1000)
    assert not np.array_equal(first.random(1000), second.random(1000))
