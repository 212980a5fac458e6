"""JPEG folders as users have them: images of many sizes, decoded and cropped as they are read.

A dataset prepared with ``encoding="jpeg"`` keeps each file's original JPEG bytes (checked to decode
when it is prepared) with its ``height`` and ``width``; its manifest says ``crop`` (224 by default),
and ``shape`` is ``[crop, crop, 3]``: what every row becomes when it is read. Stored sizes vary.

Reading decodes and crops every row to ``crop`` x ``crop`` RGB uint8, so the feeds take it as any
fixed-size dataset:

- training rows get torchvision's ``RandomResizedCrop`` (a box of 8-100% of the area, aspect ratio
  3/4-4/3, up to ten tries, else the centre) and a flip of half of them, the box and the flip drawn
  from the hash of (seed, epoch, row id) (:mod:`lepton_ray.data.rowhash`): a resumed epoch, another
  worker count or the other decode path crops a row the same way;
- evaluation rows get the usual "resize to 256, centre crop 224": the centred square of 87.5% of the
  shorter side, resized once to ``crop``.

One function decodes, wherever it runs (:func:`decode`): ``torchvision.io.decode_jpeg`` (on the CPU
in Ray Data's tasks, or batched on the training worker's GPU), then each row's box resized with
``F.interpolate`` (bilinear, antialiased), the flips batched; on a GPU the same resize as two
batched matmuls of torch's weights (:func:`resize_boxes`). Both places take their boxes from
:func:`crop_boxes`, so they crop the same pixels; the CPU resizes uint8 and a GPU float32, which
agree within one grey level (``tests/test_jpeg.py``).

:func:`generate` writes a folder of synthetic JPEGs of ImageNet-like sizes (benchmarks, tests).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton_ray.data import rowhash
from lepton_ray.errors import DataError

DEFAULT_CROP = 224
SCALE = (0.08, 1.0)  # RandomResizedCrop's area fraction
RATIO = (3 / 4, 4 / 3)  # and aspect ratio (width / height)
EVAL_FRACTION = 0.875  # 224 / 256: the centre crop's side over the shorter side
_TRIES = 10
_NAMES = ("random_resized_crop",) * 6 + ("hflip",)  # 24 draws: 10 tries x 2, 2 offsets; 1 flip


# --- crop boxes ------------------------------------------------------------------------------
def _uniforms(seed: int | None, epoch: int, ids: np.ndarray) -> np.ndarray:
    """(25, N) float64 uniforms in [0, 1) per row, from (seed, epoch, id); fresh without a seed."""
    bits = rowhash.numpy_bits(seed, epoch, ids, _NAMES, len(ids)).reshape(
        -1, len(ids)
    )  # (7 * DRAWS, N)
    return (bits >> 8).astype(np.float64) * rowhash.UNIT


def crop_boxes(
    heights: np.ndarray,
    widths: np.ndarray,
    ids: np.ndarray | None,
    *,
    seed: int | None,
    epoch: int,
    train: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the box to crop ``(top, left, height, width)`` (N, 4) int64 and whether to flip it.

    ``train``: torchvision's ``RandomResizedCrop.get_params``, vectorised (each row's first valid
    try of ten; none valid: the centre box with the ratio clamped), plus a flip of probability
    1/2; else the centred square of 87.5% of the shorter side, unflipped. E.g. a 300x400 (h x w)
    image, evaluated: side 262, box (19, 69, 262, 262)."""
    h = np.asarray(heights, np.int64)
    w = np.asarray(widths, np.int64)
    n = len(h)
    if not train:
        side = np.maximum(1, np.floor(np.minimum(h, w) * EVAL_FRACTION)).astype(np.int64)
        boxes = np.stack([(h - side) // 2, (w - side) // 2, side, side], 1)
        return boxes, np.zeros(n, bool)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    u = _uniforms(seed, epoch, ids)
    area = (h * w).astype(np.float64)
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    target = area * (SCALE[0] + u[0:_TRIES] * (SCALE[1] - SCALE[0]))  # (10, N)
    aspect = np.exp(log_lo + u[_TRIES : 2 * _TRIES] * (log_hi - log_lo))
    cw = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    ch = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.argmax(0)  # the first valid try (0 when none: replaced below)
    cols = np.arange(n)
    bw, bh = cw[first, cols], ch[first, cols]
    # None valid: torchvision's fallback, the whole image cut to the nearest allowed ratio.
    none = ~ok.any(0)
    if none.any():
        r = w / h
        fw = np.where(r < RATIO[0], w, np.where(r > RATIO[1], np.rint(h * RATIO[1]), w))
        fh = np.where(r < RATIO[0], np.rint(w / RATIO[0]), h)
        bw = np.where(none, fw.astype(np.int64), bw)
        bh = np.where(none, fh.astype(np.int64), bh)
    top = np.floor(u[20] * (h - bh + 1)).astype(np.int64)  # randint(0, h - bh + 1)
    left = np.floor(u[21] * (w - bw + 1)).astype(np.int64)
    top = np.where(none, (h - bh) // 2, top)  # the fallback box is centred
    left = np.where(none, (w - bw) // 2, left)
    return np.stack([top, left, bh, bw], 1), u[24] < 0.5


# --- decoding --------------------------------------------------------------------------------
def _open(data: bytes, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise DataError(f"{where}: not a readable JPEG") from None
    if img.format != "JPEG":
        raise DataError(f"{where}: a {img.format} image, not a JPEG (a jpeg dataset holds JPEGs)")
    if img.mode not in ("L", "RGB"):  # CMYK/YCCK: GPU decoders do not take them
        raise DataError(f"{where}: a {img.mode} JPEG (only greyscale and RGB JPEGs are kept)")
    return img


def decode(
    data: Sequence[bytes],
    ids: np.ndarray | None,
    crop: int,
    *,
    seed: int | None,
    epoch: int,
    train: bool,
    device: Any = "cpu",
) -> Any:
    """JPEG bytes per row -> (N, 3, crop, crop) uint8 on ``device``: decoded by
    ``torchvision.io.decode_jpeg`` (libjpeg-turbo on the CPU, one at a time so that an error names
    its row; on a GPU one batched call, nvJPEG), each row's box (:func:`crop_boxes`) resized to
    ``crop`` by ``F.interpolate`` (bilinear, antialiased), the flips applied to the whole batch.

    On the CPU the resize runs on uint8 (torch's vectorised path: ~1,300 rows/s per core here,
    decode included, against ~650 for PIL's decode and ``resize(box=...)``); on a GPU in float32,
    rounded: the two agree within one grey level."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return _decode_crop(data, ids, crop, seed, epoch, train, device)
    # nvJPEG's hardware engine writes its outputs before work already queued on the stream it is
    # given has run (meta-pytorch/torchcodec#1634, pytorch/vision#9606): a block the caching
    # allocator hands it may still be read by queued kernels, and training then reads corrupted
    # memory. On the H200 (torchvision 0.26) losses went NaN, at random, in loops that decoded
    # each batch between training steps. So decoding runs on a stream of its own, drained
    # first (its queued work is the last batch's crops, long done), and the caller's stream waits
    # for the result: nvJPEG only ever gets memory that nothing queued reads.
    side = _decode_stream(device)
    side.synchronize()
    with torch.cuda.stream(side):
        out = _decode_crop(data, ids, crop, seed, epoch, train, device)
    caller = torch.cuda.current_stream(device)
    caller.wait_stream(side)
    out.record_stream(caller)  # freed after the step: not reused before the caller is done
    return out


_STREAMS: dict[int, Any] = {}


def _decode_stream(device: Any) -> Any:
    """One CUDA stream per device for decoding (created once, on first use)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


def _decode_crop(
    data: Sequence[bytes],
    ids: np.ndarray | None,
    crop: int,
    seed: int | None,
    epoch: int,
    train: bool,
    device: Any,
) -> Any:
    """:func:`decode`'s work on the current stream."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    images: list[Any] = []
    if device.type == "cpu":
        for i, t in enumerate(tensors):
            try:
                images.append(decode_jpeg(t, mode=ImageReadMode.RGB))
            except RuntimeError:
                raise ValueError(f"row id {_row_id(ids, i)}: JPEG bytes do not decode") from None
    elif tensors:
        try:
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:
            first = _row_id(ids, 0)
            raise ValueError(
                f"the batch from row id {first}: JPEG bytes do not decode ({exc})"
            ) from None
    heights = np.array([im.shape[1] for im in images], np.int64)
    widths = np.array([im.shape[2] for im in images], np.int64)
    boxes, flips = crop_boxes(heights, widths, ids, seed=seed, epoch=epoch, train=train)
    if device.type != "cpu":  # CUDA's resize takes floats: the whole batch in two matmuls
        return resize_boxes(images, boxes, flips, crop)
    # (N, H, W, C) in memory: a numpy view of it is the CPU path's batch
    out = torch.empty((len(images), crop, crop, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    for i, (img, (top, left, bh, bw)) in enumerate(zip(images, boxes.tolist(), strict=True)):
        out[i] = resize_uint8(img[None, :, top : top + bh, left : left + bw], crop)[0]
    if flips.any():
        flip = torch.from_numpy(flips)[:, None, None, None]
        out = torch.where(flip, out.flip(3), out)
    return out


def resize_uint8(patch: Any, crop: int) -> Any:
    """(1, 3, h, w) uint8 -> (1, 3, crop, crop) uint8: antialiased bilinear, computed on uint8
    (torch's vectorised CPU path)."""
    import torch.nn.functional as F

    return F.interpolate(patch, (crop, crop), mode="bilinear", antialias=True)


def resize_boxes(images: Sequence[Any], boxes: np.ndarray, flips: np.ndarray, crop: int) -> Any:
    """Each (3, h, w) uint8 image's box ``(top, left, height, width)`` resized to ``crop`` x
    ``crop`` and flipped where ``flips`` says, as one (N, 3, crop, crop) uint8 batch: the pixels
    of ``F.interpolate`` per row in float32 (antialiased bilinear), rounded, in a few kernels
    for the whole batch rather than several per row.

    The resize is separable and linear: per axis a (crop, size) matrix of torch's antialiasing
    weights (:func:`aa_weights`), so the batch is the boxes copied into one zero-padded tensor
    and two batched matmuls, the flip folded into the horizontal weights: a copy per row and ~70
    small kernels for the batch (~30 elementwise ones per axis for the weights), where resizing
    row by row launched 3 kernels a row. Transient device memory for a batch of 256 boxes of up to
    400 px: ~1 GB (the padded boxes in float32 and the weights). On the H200, per
    batch of 256 of ``benchmarks.gpu_jpeg``'s JPEGs: 9.2 ms of host time, 11.8 ms to the result,
    against 15.7 and 15.8 ms row by row (nvJPEG's decode of the batch: 12.2 ms; ResNet-50 trains it
    in ~55 ms, so the decoding thread's host time is what competes with the loop's). With TF32
    matmuls turned on by the user the sums lose ~0.1 grey level."""
    import torch

    n = len(images)
    if n == 0:
        return torch.empty((0, 3, crop, crop), dtype=torch.uint8)
    dev = images[0].device
    b = np.asarray(boxes, np.int64).reshape(n, 4)
    hb, wb = int(b[:, 2].max()), int(b[:, 3].max())
    pad = torch.zeros((n, 3, hb, wb), dtype=torch.uint8, device=dev)
    for i, (img, (top, left, bh, bw)) in enumerate(zip(images, b.tolist(), strict=True)):
        pad[i, :, :bh, :bw] = img[:, top : top + bh, left : left + bw]
    sizes = torch.from_numpy(b[:, 2:].copy()).to(dev)
    wy = aa_weights(sizes[:, 0], crop, hb)  # (N, crop, hb)
    wx = aa_weights(sizes[:, 1], crop, wb)  # (N, crop, wb)
    flips = np.asarray(flips, bool)
    if flips.any():
        flip = torch.from_numpy(flips).to(dev)[:, None, None]
        wx = torch.where(flip, wx.flip(1), wx)
    rows = torch.bmm(pad.float().view(n, 3 * hb, wb), wx.transpose(1, 2))  # (N, 3 hb, crop)
    out = torch.matmul(wy[:, None], rows.view(n, 3, hb, crop))  # (N, 3, crop, crop)
    return _to_uint8(out)


def aa_weights(sizes: Any, out: int, width: int) -> Any:
    """(N, out, width) float32: for each row's input length ``sizes[n]`` (<= ``width``), the
    weights torch's antialiased bilinear resize (``F.interpolate(..., mode="bilinear",
    antialias=True)``, ``align_corners=False``) gives each input pixel in each output pixel; zero
    past the row's length. Torch's formula (``_compute_indices_min_size_weights_aa``): scale =
    size / out, support = max(scale, 1), a triangle filter of that half-width around
    ``scale * (i + 0.5)``, cut to the window torch sums over, normalised to sum 1."""
    import torch

    dev = sizes.device
    length = sizes.to(torch.float32)[:, None, None]  # (N, 1, 1)
    scale = length / out
    support = scale.clamp(min=1.0)
    center = scale * (torch.arange(out, device=dev, dtype=torch.float32)[None, :, None] + 0.5)
    lo = (center - support + 0.5).trunc().clamp_(min=0)  # torch's window: int() truncates
    hi = torch.minimum((center + support + 0.5).trunc(), length)
    j = torch.arange(width, device=dev, dtype=torch.float32)[None, None, :]
    w = (1 - ((j - center + 0.5) * support.reciprocal()).abs()).clamp_(min=0)
    w = w * ((j >= lo) & (j < hi))
    total = w.sum(2, keepdim=True)
    return w / torch.where(total == 0, torch.ones_like(total), total)


def _to_uint8(x: Any) -> Any:
    import torch

    return x.round_().clamp_(0, 255).to(torch.uint8)


def decode_cpu(
    data: Sequence[bytes],
    ids: np.ndarray | None,
    crop: int,
    *,
    seed: int | None,
    epoch: int,
    train: bool,
) -> np.ndarray:
    """:func:`decode` on the CPU as (N, crop, crop, 3) uint8 numpy, the layout Ray Data's CPU
    tasks hand on (:class:`lepton_ray.data.transforms.Preprocessor`)."""
    out = decode(data, ids, crop, seed=seed, epoch=epoch, train=train, device="cpu")
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def _row_id(ids: Sequence[int] | None, i: int) -> int:
    return int(ids[i]) if ids is not None else i


# --- preparing: rows of JPEG bytes -----------------------------------------------------------
@dataclass
class JpegRows:
    """Rows of JPEG bytes as ``prepare`` writes them: the bytes, each image's size, and each
    image's per-channel pixel sums (and sums of squares) over ``pixels`` pixels, for the
    manifest's mean and std (taken at 1/4 scale: JPEG's DCT scaling decodes that cheaply)."""

    data: list[bytes]
    heights: np.ndarray  # (N,) int32
    widths: np.ndarray  # (N,) int32
    sums: np.ndarray  # (N, 3) float64
    sumsq: np.ndarray  # (N, 3) float64
    pixels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, rows: slice) -> JpegRows:
        return JpegRows(
            self.data[rows],
            self.heights[rows],
            self.widths[rows],
            self.sums[rows],
            self.sumsq[rows],
            self.pixels[rows],
        )

    @staticmethod
    def concat(parts: Sequence[JpegRows]) -> JpegRows:
        return JpegRows(
            [b for p in parts for b in p.data],
            *(np.concatenate([getattr(p, k) for p in parts]) for k in _ARRAYS),
        )


_ARRAYS = ("heights", "widths", "sums", "sumsq", "pixels")


def check_jpeg(data: bytes, where: str) -> tuple[int, int, np.ndarray, np.ndarray, int]:
    """Validate one file as a JPEG a jpeg dataset can hold (decodes whole, greyscale or RGB):
    ``(height, width, channel sums, channel sums of squares, pixels summed)``; a
    :class:`DataError` naming ``where`` otherwise."""
    img = _open(data, where)
    w, h = img.size
    try:
        img.draft("RGB", (max(1, w // 4), max(1, h // 4)))  # every coefficient read, 1/16 the IDCT
        a = np.asarray(img.convert("RGB"), np.float64).reshape(-1, 3)
    except (OSError, ValueError, SyntaxError):
        raise DataError(
            f"{where}: a JPEG whose data does not decode (truncated or corrupt)"
        ) from None
    return h, w, a.sum(0), (a * a).sum(0), len(a)


@dataclass
class JpegSplit:
    """One split of an image folder kept as JPEG bytes, read and checked chunk by chunk."""

    files: list[Any]  # storage.Location of each file
    labels: np.ndarray
    first_id: int
    skip_bad: bool
    chunk_rows: int = 1024
    skipped: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.files)

    def chunks(self) -> Iterator[tuple[JpegRows, np.ndarray, np.ndarray]]:
        """(rows, labels, ids) per chunk of files; ids count kept rows from ``first_id``."""
        next_id = self.first_id
        with ThreadPoolExecutor(16) as pool:  # object stores answer many small reads at once
            for start in range(0, len(self.files), self.chunk_rows):
                files = self.files[start : start + self.chunk_rows]
                checked = pool.map(self._read, files)
                kept = [(r, lab) for r, lab in zip(checked, self.labels[start:], strict=False) if r]
                if not kept:
                    continue
                rows = JpegRows(
                    [r[0] for r, _ in kept],
                    np.array([r[1] for r, _ in kept], np.int32),
                    np.array([r[2] for r, _ in kept], np.int32),
                    np.stack([r[3] for r, _ in kept]),
                    np.stack([r[4] for r, _ in kept]),
                    np.array([r[5] for r, _ in kept], np.int64),
                )
                ids = np.arange(next_id, next_id + len(kept), dtype=np.int64)
                next_id += len(kept)
                yield rows, np.array([lab for _, lab in kept], np.int64), ids

    def _read(self, f: Any) -> tuple | None:
        data = f.read_bytes()
        try:
            return (data, *check_jpeg(data, f.uri))
        except DataError as exc:
            if not self.skip_bad:
                raise
            self.skipped.append(str(exc))
            return None


# --- a folder of synthetic JPEGs -------------------------------------------------------------
def generate(
    root: str | Path,
    *,
    train: int,
    test: int = 0,
    classes: int = 10,
    sizes: tuple[int, int] = (256, 400),
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write ``root/{train,test}/<class>/NNNNNN.jpg``: ``train`` and ``test`` synthetic JPEGs, each
    side drawn from ``sizes`` (so aspect ratios vary), reproducible from ``seed``.

    Each image is a smooth random colour field (a few random colours blended over the image) with
    random shapes on it; the class sets the colour and the kind of the largest shape (an ellipse,
    rectangle or triangle in one of ``classes`` hues) at a random place and size, so a model can
    learn it from a random crop of the image. ~2 ms per 300x300 image here."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    hues = (np.arange(classes) * 0.61803) % 1.0  # well spread hues
    for split, count in (("train", train), ("test", test)):
        if not count:  # no empty split folder: prepare would find no files there
            continue
        for c in range(classes):
            (root / split / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        labels = rng.integers(0, classes, count)
        for i, label in enumerate(labels):
            img = _synthetic_image(rng, int(label), hues, sizes)
            img.save(root / split / f"c{label:03d}" / f"{i:06d}.jpg", quality=quality)
    return root


def _synthetic_image(
    rng: np.random.Generator, label: int, hues: np.ndarray, sizes: tuple[int, int]
) -> Any:
    import colorsys

    from PIL import Image, ImageDraw

    h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
    field_ = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)  # a 3x4 field of random colours
    img = Image.fromarray(field_).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):  # distractors: small shapes of any colour
        _shape(
            draw, rng, int(rng.integers(0, 3)), tuple(rng.integers(0, 256, 3).tolist()), w, h, 0.15
        )
    r, g, b = colorsys.hsv_to_rgb(float(hues[label]), 0.8, 0.9)
    color = (int(r * 255), int(g * 255), int(b * 255))
    _shape(draw, rng, label % 3, color, w, h, 0.5)  # the class: its hue and kind of shape
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8))


def _shape(
    draw: Any, rng: np.random.Generator, kind: int, color: tuple, w: int, h: int, size: float
) -> None:
    sw, sh = (int(v) for v in rng.uniform(size / 2, size, 2) * (w, h))
    x, y = int(rng.integers(0, max(1, w - sw))), int(rng.integers(0, max(1, h - sh)))
    box = (x, y, x + sw, y + sh)
    if kind == 0:
        draw.ellipse(box, fill=color)
    elif kind == 1:
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(x, y + sh), (x + sw // 2, y), (x + sw, y + sh)], fill=color)
