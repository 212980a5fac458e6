"""Vectorised image transforms over whole batches (numpy, NHWC uint8 in, NCHW float32 out).

These run inside Ray Data ``map_batches`` on CPU workers. Each augmentation is a pure function
``(images, rng) -> images`` over the whole batch: no per-image Python loop. Their torch twins in
:mod:`lepton_ray.data.device_transforms` run in the training loop instead, on its device
(``DataConfig.augment_on``).

``rng`` is either a ``numpy.random.Generator`` (a plain stream, as for a picture) or the
:class:`RowDraws` of :func:`row_draws`, which hands each row the numbers hashed from
(seed, epoch, row id, augmentation, draw) (:mod:`lepton_ray.data.rowhash`): what
:class:`Preprocessor` uses, so that a row's augmentation does not depend on the batch it is in,
changes every epoch, and is the one the device twins compute.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from lepton_ray.data import rowhash

Augment = Callable[[np.ndarray, Any], np.ndarray]  # (images, np.random.Generator | RowDraws)


class RowDraws:
    """One augmentation's random numbers for each row of a batch, with the part of
    ``numpy.random.Generator``'s interface the augmentations use (``integers``, ``random``,
    ``uniform``): the k-th call returns every row's k-th draw."""

    def __init__(self, bits: np.ndarray):
        self.bits = bits  # (DRAWS, N) int64 values in [0, 2**32)
        self.used = 0

    def _next(self, size: int | None) -> np.ndarray:
        n = self.bits.shape[1]
        if size is not None and size != n:
            raise ValueError(f"per-row draws come one per row ({n}), not {size}")
        if self.used == len(self.bits):
            raise RuntimeError(f"an augmentation drew more than {len(self.bits)} numbers per row")
        self.used += 1
        return self.bits[self.used - 1]

    def integers(self, low: int, high: int, size: int | None = None) -> np.ndarray:
        """Integers in ``[low, high)``: ``low + bits * (high - low) // 2**32``."""
        if not 0 < high - low <= 1 << 31:
            raise ValueError(f"integers({low}, {high}): the range must hold 1 to 2**31 values")
        k = (self._next(size) * (high - low)) >> 32
        return k + low if low else k

    def random(self, size: int | None = None) -> np.ndarray:
        """float32 uniforms in [0, 1), bit for bit what the torch twin gives."""
        return (self._next(size) >> 8).astype(np.float32) * np.float32(rowhash.UNIT)

    def uniform(self, low: float = 0.0, high: float = 1.0, size: int | None = None) -> np.ndarray:
        return self.random(size) * np.float32(high - low) + np.float32(low)


def row_draws(
    seed: int | None, epoch: int, ids: np.ndarray | None, names: Sequence[str], n: int
) -> list[RowDraws]:
    """The draws of each augmentation in ``names`` for ``n`` rows with ``ids``, from
    (seed, epoch, row id). Without a seed or ids a row cannot be keyed: fresh entropy then."""
    return [RowDraws(b) for b in rowhash.numpy_bits(seed, epoch, ids, names, n)]


def decode_raw(images: Any, shape: Sequence[int]) -> np.ndarray:
    """Raw HWC uint8 bytes per row -> (N, H, W, C) uint8.

    ``images`` is an Arrow column (``fixed_size_binary``, as ``prepare`` writes them, or
    ``binary`` of equal-length rows, as older datasets hold them), bytes per row, or already an
    (N, H, W, C) uint8 array. An Arrow column in one chunk is read in place (no copy, no Python
    object per row: the pixels are one buffer); bytes per row cost one join.
    """
    h, w, c = shape
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
        return images
    if isinstance(images, pa.ChunkedArray | pa.Array):
        flat = arrow_pixels(images, h * w * c)
        return flat.reshape(-1, h, w, c)
    buf = b"".join(bytes(b) for b in images)
    n = len(images)
    if len(buf) != n * h * w * c:
        raise ValueError(
            f"image bytes do not match shape {tuple(shape)}: {len(buf)} bytes for {n} rows"
        )
    return np.frombuffer(buf, dtype=np.uint8).reshape(n, h, w, c)


def arrow_pixels(column: pa.ChunkedArray | pa.Array, row_bytes: int) -> np.ndarray:
    """An Arrow column of ``row_bytes``-long byte strings as one uint8 array of N * row_bytes,
    viewing Arrow's value buffer where the column is one chunk (read-only then)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_chunk_pixels(chunk, row_bytes) for chunk in chunks]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def _chunk_pixels(chunk: pa.Array, row_bytes: int) -> np.ndarray:
    n, t = len(chunk), chunk.type
    if chunk.null_count:
        raise ValueError(f"{chunk.null_count} image rows are null")
    if pa.types.is_fixed_size_binary(t):
        if t.byte_width != row_bytes:
            raise ValueError(f"image rows are {t.byte_width} bytes, the shape needs {row_bytes}")
        buf = chunk.buffers()[1]
        return np.frombuffer(buf, np.uint8, n * row_bytes, chunk.offset * row_bytes)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        _, offsets_buf, values = chunk.buffers()
        kind = np.int64 if pa.types.is_large_binary(t) else np.int32
        offsets = np.frombuffer(offsets_buf, kind, n + 1, chunk.offset * np.dtype(kind).itemsize)
        if n and not (np.diff(offsets) == row_bytes).all():
            bad = int(np.flatnonzero(np.diff(offsets) != row_bytes)[0])
            raise ValueError(
                f"image row {bad} is {int(offsets[bad + 1] - offsets[bad])} bytes, the shape needs {row_bytes}"
            )
        if n == 0:
            return np.zeros(0, np.uint8)
        return np.frombuffer(values, np.uint8, n * row_bytes, int(offsets[0]))
    raise ValueError(f"image column of type {t} is not raw pixel bytes")


def decode_encoded(
    images: Sequence[bytes] | np.ndarray, shape: Sequence[int], ids: Sequence[int] | None = None
) -> np.ndarray:
    """PNG/JPEG bytes per row -> (N, H, W, C) uint8 in the given shape (C=1: greyscale, 3: RGB).

    Image decoding is per image by nature (PIL releases the GIL while it decodes); everything
    after it is vectorised. A row that does not decode to ``shape`` raises ``ValueError`` naming it.
    """
    from PIL import Image

    h, w, c = shape
    mode = {1: "L", 3: "RGB"}[c]
    out = np.empty((len(images), h, w, c), np.uint8)
    for i, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as img:
                a = np.asarray(img.convert(mode) if img.mode != mode else img, np.uint8)
        except Exception as exc:  # PIL raises many types for corrupt bytes
            raise ValueError(
                f"row id {_row_id(ids, i)}: image bytes do not decode ({type(exc).__name__})"
            ) from None
        if a.shape[:2] != (h, w):
            raise ValueError(
                f"row id {_row_id(ids, i)}: image is {a.shape[1]}x{a.shape[0]}, the dataset's is {w}x{h}"
            )
        out[i] = a.reshape(h, w, c)
    return out


def encode_png(images: np.ndarray) -> list[bytes]:
    """(N, H, W, C) uint8 -> PNG bytes per image (lossless)."""
    from PIL import Image

    out = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _row_id(ids: Sequence[int] | None, i: int) -> int:
    return int(ids[i]) if ids is not None else i


def random_crop(images: np.ndarray, rng: Any, padding: int = 2) -> np.ndarray:
    """Zero-pad by ``padding`` and crop back at a random offset per image (a random translation)."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    oy = rng.integers(0, 2 * padding + 1, size=n)
    ox = rng.integers(0, 2 * padding + 1, size=n)
    rows = (oy[:, None] + np.arange(h))[:, :, None]  # (N, H, 1)
    cols = (ox[:, None] + np.arange(w))[:, None, :]  # (N, 1, W)
    return padded[np.arange(n)[:, None, None], rows, cols]  # (N, H, W, C)


def hflip(images: np.ndarray, rng: Any, p: float = 0.5) -> np.ndarray:
    """Mirror a random half of the batch left-right."""
    flip = rng.random(images.shape[0]) < p
    out = images.copy()
    out[flip] = images[flip, :, ::-1]
    return out


def random_affine(
    images: np.ndarray,
    rng: Any,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
) -> np.ndarray:
    """Rotate by up to ``degrees``, shift by up to ``translate`` of the size and zoom within ``scale``,
    each image by its own random amounts."""
    n, h, w, _ = images.shape
    return affine(
        images,
        angle=np.deg2rad(rng.uniform(-degrees, degrees, n)),
        zoom=rng.uniform(scale[0], scale[1], n),
        shift_x=rng.uniform(-translate, translate, n) * w,
        shift_y=rng.uniform(-translate, translate, n) * h,
    )


def affine(
    images: np.ndarray,
    angle: np.ndarray,
    zoom: np.ndarray,
    shift_x: np.ndarray,
    shift_y: np.ndarray,
) -> np.ndarray:
    """Rotate each image by ``angle`` radians (counter-clockwise as displayed) and zoom it about its
    centre, then shift it by (``shift_x``, ``shift_y``) pixels; bilinear, zero fill. Parameters are
    per image, shape (N,); one inverse map serves the whole batch."""
    n, h, w, _ = images.shape
    angle, zoom, tx, ty = (
        np.asarray(v, np.float32).reshape(n, 1) for v in (angle, zoom, shift_x, shift_y)
    )
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.divmod(np.arange(h * w, dtype=np.float32), np.float32(w))
    # Output pixel -> source pixel: undo the shift, then the rotation and zoom about the centre.
    dx, dy = xx - cx - tx, yy - cy - ty  # (N, H*W)
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    return _bilinear(images, cos * dx - sin * dy + cx, sin * dx + cos * dy + cy)


def random_rotation(images: np.ndarray, rng: Any, degrees: float = 15.0) -> np.ndarray:
    """Rotate each image by a random angle in ``[-degrees, degrees]`` about its centre."""
    return random_affine(images, rng, degrees=degrees, translate=0.0, scale=(1.0, 1.0))


def _bilinear(images: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Sample (N, H, W, C) uint8 images at source coordinates (N, H*W); outside is zero."""
    n, h, w, c = images.shape
    # One extra zero pixel per image: out-of-image taps read it instead of being masked.
    flat = np.concatenate(
        [images.reshape(n, h * w, c), np.zeros((n, 1, c), np.uint8)], axis=1
    ).reshape(-1, c)
    sx, sy = sx.astype(np.float32), sy.astype(np.float32)
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = sx - x0, sy - y0
    x0, y0 = x0.astype(np.int32), y0.astype(np.int32)
    base = (np.arange(n, dtype=np.int32) * (h * w + 1))[:, None]
    out = np.zeros((n * h * w, c), np.float32)
    for oy, ox, weight in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        yi, xi = y0 + oy, x0 + ox
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        idx = base + np.where(inside, yi * w + xi, h * w)
        out += flat[idx.ravel()] * weight.reshape(-1, 1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(n, h, w, c)


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def color_jitter(
    images: np.ndarray,
    rng: Any,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
) -> np.ndarray:
    """Scale brightness, contrast and (RGB only) saturation of each image by random factors in
    ``[1 - x, 1 + x]``, clipping after each step as torchvision's ``ColorJitter`` does.
    Greyscale images get brightness and contrast."""
    n, _, _, c = images.shape

    def factors(x: float) -> np.ndarray:
        return rng.uniform(1 - x, 1 + x, n).astype(np.float32)[:, None, None, None]

    x = np.clip(images.astype(np.float32) * factors(brightness), 0, 255)
    grey = x @ _LUMA[:, None] if c == 3 else x  # (N, H, W, 1)
    mean = grey.mean(axis=(1, 2, 3), keepdims=True)
    x = np.clip((x - mean) * factors(contrast) + mean, 0, 255)
    if c == 3:
        grey = x @ _LUMA[:, None]
        x = np.clip((x - grey) * factors(saturation) + grey, 0, 255)
    return np.rint(x).astype(np.uint8)


AUGMENTATIONS: dict[str, Augment] = {
    "random_crop": random_crop,
    "hflip": hflip,
    "rotate": random_rotation,
    "affine": random_affine,
    "color_jitter": color_jitter,
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


ENCODINGS = ("raw", "png", "jpeg")
"""How a prepared dataset stores images: raw HWC uint8 bytes, one PNG per row, or each file's own
JPEG bytes at its own size (:mod:`lepton_ray.data.jpeg`: cropped to the dataset's shape as read)."""

JPEG_CROPS = ("center", "random", "bytes")
"""What reading a JPEG dataset does with a row: ``center`` (evaluation: resize and centre crop),
``random`` (training: random-resized crop and flip, per (seed, epoch, id)), or ``bytes`` (left
encoded, for the training worker to decode on its device)."""


def to_nchw(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N, C, H, W), contiguous, dtype kept."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


class Preprocessor:
    """The ``map_batches`` callable: decode, augment, normalise a numpy batch.

    Input columns: ``image`` (raw or PNG/JPEG bytes per ``encoding``, or an NHWC uint8 array),
    ``label``, ``id``. Augmentation is keyed per row by (``seed``, ``epoch``, ``id``): the same row
    gets the same augmentation in any batch, block or worker, and a different one every epoch
    (build one Preprocessor per epoch). Without ``seed`` or an ``id`` column, fresh entropy.
    Output columns: ``image`` float32 (N, C, H, W), ``label`` int64, ``id`` int64. With
    ``normalize=False`` the images stay uint8 (N, C, H, W), a quarter of the bytes to move, and
    whoever consumes them normalises (the training loop does it on its device); with
    ``layout="nhwc"`` too they stay as stored, (N, H, W, C), and a raw dataset's batch passes
    through untouched: the Arrow table read from Parquet, pixels and all, not copied (the ring's
    worker packs them itself, :mod:`lepton_ray.train.rows`).

    A JPEG dataset's rows (``encoding="jpeg"``) are decoded and cropped to ``shape`` as ``jpeg``
    says (:data:`JPEG_CROPS`), before ``augment``; with ``jpeg="bytes"`` the batch passes through
    encoded (``id``, ``image``, ``label``) for the training worker to decode.
    """

    def __init__(
        self,
        shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        augment: Sequence[str] = (),
        seed: int | None = None,
        encoding: str = "raw",
        normalize: bool = True,
        epoch: int = 0,
        jpeg: str = "center",
        layout: str = "nchw",
    ):
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown image encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
        if jpeg not in JPEG_CROPS:
            raise ValueError(f"unknown JPEG crop {jpeg!r} (known: {', '.join(JPEG_CROPS)})")
        if layout not in ("nchw", "nhwc") or (layout == "nhwc" and normalize):
            raise ValueError(f"layout {layout!r}: nchw, or nhwc with normalize=False")
        self.jpeg, self.layout = jpeg, layout
        self.shape = tuple(shape)
        self.mean, self.std = list(mean), list(std)
        self.augment = check_augment(augment)
        self.seed, self.epoch = seed, epoch
        self.encoding = encoding
        self.normalize = normalize

    @property
    def passthrough(self) -> bool:
        """Batches leave as they came (the worker decodes JPEGs on its device, or packs raw
        pixels as stored): nothing to batch, so Ray Data can fuse this into its read tasks."""
        return (self.encoding == "jpeg" and self.jpeg == "bytes") or (
            self.encoding == "raw" and self.layout == "nhwc" and not self.augment
        )

    @property
    def as_read(self) -> bool:
        """Raw rows pass through as Parquet stored them: whole shards are the natural unit (a
        JPEG dataset's bytes passed through keep their batches; its GPU decode was measured with
        them)."""
        return self.passthrough and self.encoding == "raw"

    def decode(self, batch: dict[str, Any]) -> np.ndarray:
        if self.encoding == "raw":
            return decode_raw(batch["image"], self.shape)
        images = batch["image"]
        if isinstance(images, pa.ChunkedArray | pa.Array):
            images = images.to_pylist()
        if self.encoding == "jpeg":  # any size stored; cropped to the dataset's shape
            from lepton_ray.data.jpeg import decode_cpu

            ids = batch.get("id")
            return decode_cpu(
                images,
                None if ids is None else np.asarray(ids, np.int64),
                self.shape[0],
                seed=self.seed,
                epoch=self.epoch,
                train=self.jpeg == "random",
            )
        return decode_encoded(images, self.shape, batch.get("id"))

    def __call__(self, batch: dict[str, Any] | pa.Table) -> dict[str, np.ndarray] | pa.Table:
        if self.passthrough:  # the worker decodes (JPEG, on its device) or packs (raw pixels)
            columns = ("id", "image", "label")
            if isinstance(batch, pa.Table):
                return batch.select([c for c in columns if c in batch.column_names])
            return {k: batch[k] for k in columns if k in batch}
        if isinstance(batch, pa.Table):  # batch_format="pyarrow": pixels read in place
            batch = {
                name: col if name == "image" else col.to_numpy()
                for name, col in zip(batch.column_names, batch.columns, strict=True)
            }
        images = self.decode(batch)
        if self.augment:
            ids = batch.get("id")
            draws = row_draws(self.seed, self.epoch, ids, self.augment, len(images))
            for name, rng in zip(self.augment, draws, strict=True):
                images = AUGMENTATIONS[name](images, rng)
        if self.normalize:
            pixels = normalize(images, self.mean, self.std)
        else:
            pixels = images if self.layout == "nhwc" else to_nchw(images)
        out = {"image": pixels, "label": np.asarray(batch["label"], dtype=np.int64)}
        if "id" in batch:
            out["id"] = np.asarray(batch["id"], dtype=np.int64)
        return out
