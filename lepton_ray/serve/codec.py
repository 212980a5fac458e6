"""Request decoding, validation and response shaping: pure functions, tested without Serve.

Requests carry images as raw pixel values (0-255) in the dataset's layout, ``[H][W]`` or
``[H][W][C]`` (or flat ``H*W*C``), as base64-encoded PNG/JPEG, as a raw PNG/JPEG body, as
multipart file uploads, or in a binary body: a batch of uint8 pixels with its shape in an
``X-Shape`` header, or a ``.npy`` array. A text classifier takes ``{"texts": [...]}``
(:func:`decode_texts`), a click model ``{"features": ...}`` (:func:`decode_features`). Every
problem raises
:class:`RequestError` with an HTTP status before the request joins a batch, so one bad request
never fails its batch-mates.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from lepton_ray.serve.pixel_json import instance_layouts, read_pixel_arrays

IMAGE_FORMATS = ("PNG", "JPEG")
"""The image formats requests may carry (PIL's names)."""
NPY_TYPES = ("application/x-npy", "application/npy")
"""Content types of a ``.npy`` body."""
SHAPE_HEADER = "X-Shape"
"""With ``application/octet-stream``: the raw pixels' shape, ``N,H,W,C`` (or ``N,H,W`` for one
channel)."""


class RequestError(Exception):
    """A request the endpoint answers with an error: ``status`` (4xx, or 503 when the model is
    unavailable), a one-line message, and any headers the status calls for (``Retry-After``,
    ``WWW-Authenticate``). The body is always ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


class InputSpec:
    """What the model takes: image shape (H, W, C), normalisation, class names, and whether it
    runs on channels-last (NHWC) memory; ``kind`` is the data's (``"text-label"``: rows of
    ``(1, block_size, 1)`` byte tokens, which reach the model as int64 tokens)."""

    def __init__(
        self,
        shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str],
        channels_last: bool = False,
        kind: str = "image",
    ):
        self.shape = tuple(int(v) for v in shape)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.classes = list(classes)
        self.channels_last = channels_last
        self.kind = kind

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> InputSpec:
        """The spec a checkpoint's ``lepton.json`` records."""
        data = meta["data"]
        return cls(
            data["shape"],
            data["mean"],
            data["std"],
            data["classes"],
            meta.get("memory_format") == "channels_last",
            data.get("kind", "image"),
        )


def decode_body(
    body: bytes, content_type: str, spec: InputSpec, max_images: int, shape: str | None = None
) -> np.ndarray:
    """A whole request body -> (N, H, W, C) uint8: raw pixels for ``application/octet-stream``
    with a ``shape`` (the :data:`SHAPE_HEADER`), a ``.npy`` array for :data:`NPY_TYPES`, one
    PNG/JPEG for ``image/*`` and ``application/octet-stream`` without a shape, JSON for anything
    else (curl's default form type included)."""
    if not body:
        raise RequestError(400, "empty request body")
    if content_type.startswith("application/octet-stream") and shape is not None:
        return decode_raw(body, shape, spec, max_images)
    if content_type.startswith(NPY_TYPES):
        return decode_npy(body, spec, max_images)
    if content_type.startswith(("image/", "application/octet-stream")):
        return decode_image_bytes(body, spec)[None]
    fast = read_pixel_arrays(body, spec.shape, max_images)  # the common body, without Python lists
    if fast is not None:
        return fast
    return decode_json(_json(body), spec, max_images)


def _json(body: bytes) -> Any:
    """A JSON body, parsed. orjson is strict JSON; the standard library also reads NaN/Infinity
    (which Python's json.dumps writes) and lone surrogates, so that they get their clearer 422
    rather than a parse error."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise RequestError(400, "body is not valid JSON") from None


def encode(answer: Any) -> bytes:
    """A response body: JSON, as bytes (orjson: several times faster than the standard library
    on the per-request path)."""
    return orjson.dumps(answer)


def decode_files(files: list[bytes], spec: InputSpec, max_images: int) -> np.ndarray:
    """Uploaded image files (multipart parts) -> (N, H, W, C) uint8."""
    if not files:
        raise RequestError(400, "multipart body has no file parts: upload images as form files")
    if len(files) > max_images:
        raise too_many_images(len(files), max_images)
    return np.stack([decode_image_bytes(data, spec, i) for i, data in enumerate(files)])


def too_many_images(count: int | str, max_images: int) -> RequestError:
    """The 413 for a request with more images than ``max_images``, whatever the body's format."""
    return RequestError(413, f"{count} images in one request; the limit is {max_images}")


def decode_json(payload: Any, spec: InputSpec, max_images: int) -> np.ndarray:
    """A JSON body -> (N, H, W, C) uint8. Accepts ``{"instances": [...]}`` or ``{"images": [b64, ...]}``."""
    if not isinstance(payload, dict):
        raise RequestError(
            400, 'body must be a JSON object with "instances" (pixel arrays) or "images" (base64)'
        )
    if "texts" in payload:
        raise RequestError(
            400, 'this model classifies images: send "instances" or "images", not "texts"'
        )
    keys = [k for k in ("instances", "images") if k in payload]
    if len(keys) != 1:
        raise RequestError(
            400,
            'body needs exactly one of "instances" (pixel arrays) or "images" (base64 PNG/JPEG)',
        )
    items = payload[keys[0]]
    if not isinstance(items, list):
        raise RequestError(400, f'"{keys[0]}" must be a list')
    if not items:
        raise RequestError(400, f'"{keys[0]}" is empty')
    if len(items) > max_images:
        raise too_many_images(len(items), max_images)
    if keys[0] == "images":
        return np.stack(
            [decode_image_bytes(_b64(item, i), spec, i) for i, item in enumerate(items)]
        )
    return decode_arrays(items, spec)


def decode_raw(body: bytes, shape: str, spec: InputSpec, max_images: int) -> np.ndarray:
    """Raw uint8 pixels, image after image, each (H, W, C) in row-major order, and their
    ``shape`` header ``N,H,W,C`` (``N,H,W`` when C is 1) -> (N, H, W, C) uint8. The header must
    name the model's image size and the body hold exactly that many bytes."""
    h, w, c = spec.shape
    parts = shape.replace(" ", "").split(",")
    if len(parts) not in (3, 4) or not all(re.fullmatch("[0-9]{1,9}", p) for p in parts):
        raise RequestError(
            400, f"{SHAPE_HEADER} must be N,H,W,C (whole numbers), got {shape[:40]!r}"
        )
    n, *image = (int(p) for p in parts)
    if n < 1:
        raise RequestError(400, f"{SHAPE_HEADER} names no image (N is 0)")
    if n > max_images:
        raise too_many_images(n, max_images)
    if tuple(image) not in [(h, w, c)] + ([(h, w)] if c == 1 else []):
        raise RequestError(
            422, f"{SHAPE_HEADER} images are {'x'.join(parts[1:])}; the model takes {h}x{w}x{c}"
        )
    if len(body) != n * h * w * c:
        raise RequestError(
            400, f"body has {len(body)} bytes; {SHAPE_HEADER} {n},{h},{w},{c} needs {n * h * w * c}"
        )
    return np.frombuffer(body, np.uint8).reshape(n, h, w, c)


def decode_npy(body: bytes, spec: InputSpec, max_images: int) -> np.ndarray:
    """A ``.npy`` array of N images, ``(N, *layout)`` with a layout JSON instances may take ->
    (N, H, W, C) uint8. uint8 is taken as is; other integer and float arrays are checked and
    rounded as JSON pixels are; anything else (booleans, objects, records) is refused, and
    nothing is unpickled."""
    try:
        arr = np.lib.format.read_array(io.BytesIO(body), allow_pickle=False)
    except Exception:  # noqa: BLE001 - numpy raises ValueError, EOFError, ... on junk
        raise RequestError(400, "body is not a readable .npy array") from None
    if arr.dtype.kind not in "uif":
        raise RequestError(422, f".npy pixels must be numbers 0-255, got dtype {arr.dtype}")
    if arr.ndim < 2 or not len(arr):
        raise RequestError(
            400, f".npy body must be a batch of images (N, H, W[, C]), got {arr.shape}"
        )
    if len(arr) > max_images:
        raise too_many_images(len(arr), max_images)
    h, w, c = spec.shape
    if arr.shape[1:] not in instance_layouts(spec.shape):
        raise RequestError(
            422,
            f"each image must have shape {(h, w, c)} (or {h * w * c} values), got {arr.shape[1:]}",
        )
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr).reshape(len(arr), h, w, c)
    return _pixels(arr.astype(np.float64).reshape(len(arr), h, w, c), "pixel values")


def _b64(item: Any, i: int) -> bytes:
    if not isinstance(item, str):
        raise RequestError(400, f"images[{i}] must be a base64 string")
    try:
        return base64.b64decode(
            item.split(",", 1)[-1] if item.startswith("data:") else item, validate=True
        )
    except (binascii.Error, ValueError):
        raise RequestError(400, f"images[{i}] is not valid base64") from None


def decode_arrays(items: list, spec: InputSpec) -> np.ndarray:
    """Pixel arrays (one per image) -> (N, H, W, C) uint8, checking shape, type, range."""
    h, w, c = spec.shape
    if _holds_bool(items):
        raise RequestError(422, "pixel values must be numbers, not true/false")
    try:
        arr = np.asarray(items, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise RequestError(
            422,
            f"instances must be numeric arrays of one shape, each {h}x{w}"
            + (f"x{c}" if c > 1 else ""),
        ) from None
    if arr.shape[1:] not in instance_layouts(spec.shape):
        raise RequestError(
            422,
            f"each instance must have shape {(h, w, c) if c > 1 else (h, w)} (or {h * w * c} values), got {arr.shape[1:]}",
        )
    return _pixels(arr.reshape(len(arr), h, w, c), "instances")


def _pixels(arr: np.ndarray, what: str) -> np.ndarray:
    """Float pixel values -> uint8, refusing non-finite values and values outside [0, 255]."""
    if not np.isfinite(arr).all():
        raise RequestError(422, f"{what} contain NaN or infinite values")
    if arr.min() < 0 or arr.max() > 255:
        raise RequestError(422, "pixel values must be in [0, 255]")
    return np.rint(arr).astype(np.uint8)


def _holds_bool(items: list) -> bool:
    """Whether a JSON boolean sits anywhere in nested lists: numpy would read ``true`` as 1.

    One pass over the values (~0.1 ms for a 28x28 image), paid only on the general path: the fast
    reader (:mod:`lepton_ray.serve.pixel_json`) takes digits only."""
    stack = [items]
    while stack:
        value = stack.pop()
        if type(value) is list:
            stack.extend(value)
        elif type(value) is bool:
            return True
    return False


def decode_image_bytes(data: bytes, spec: InputSpec, i: int = 0) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, C) uint8 in the model's mode and size.

    Only PNG and JPEG are opened (what the API documents; every other format PIL knows, GIF,
    TIFF, ..., is more parser exposed to the network for no use): anything else is a 415. The
    size is checked from the header before any pixel is decoded, so a small file that inflates to
    a huge image (a decompression bomb) costs nothing.
    """
    from PIL import Image

    h, w, c = spec.shape
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        size = img.size
        if size == (w, h):
            img.load()
            img = img.convert("L" if c == 1 else "RGB")
    except Exception:  # noqa: BLE001 - PIL raises many types (SyntaxError, struct.error, ...) on junk
        raise RequestError(415, f"image {i} is not a readable PNG or JPEG") from None
    if size != (w, h):
        raise RequestError(422, f"image {i} is {size[0]}x{size[1]}; the model takes {w}x{h}")
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def to_model_input(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32, normalised as in training, in the model's
    memory layout (channels-last is the NHWC array itself: no copy). Labelled text: rows (N, 1,
    T, 1) -> (N, T) int64 tokens, as the training loop gives them to the model."""
    if spec.kind == "text-label":
        return images.reshape(len(images), -1).astype(np.int64)
    x = images.astype(np.float32) * (1.0 / 255.0)
    x = (x - spec.mean) / spec.std
    x = x.transpose(0, 3, 1, 2)
    return x if spec.channels_last else np.ascontiguousarray(x)


def postprocess(logits: np.ndarray, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    """(N, K) logits -> per image: predicted class and the top-k probabilities."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    k = min(k, p.shape[1])
    top = np.argsort(-p, axis=1)[:, :k]
    return [
        {
            "class": classes[int(t[0])],
            "index": int(t[0]),
            "top_k": [
                {"class": classes[int(j)], "probability": round(float(row[j]), 6)} for j in t
            ],
        }
        for row, t in zip(p, top, strict=True)
    ]


# --- click rows (a DLRM's checkpoint: data kind "ctr") -------------------------------------------
class ClickSpec:
    """What a click model's checkpoint takes: ``dense`` float features and one id per table,
    each id below its table's cardinality (:mod:`lepton_ray.data.ctr`)."""

    def __init__(self, cardinalities: Sequence[int], dense: int):
        self.cardinalities = np.asarray(cardinalities, np.int64)
        self.dense = int(dense)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ClickSpec | None:
        """The spec of a click checkpoint's ``lepton.json``; None for any other model's."""
        data = meta.get("data", {})
        if data.get("kind") != "ctr":
            return None
        return cls(data["cardinalities"], data["dense"])


def decode_features(body: bytes, spec: ClickSpec, max_rows: int) -> np.ndarray:
    """``{"features": {"dense": [[...]], "sparse": [[...]]}}`` -> the rows as the model's data
    stores them, (N, 1, 4 * (D + T), 1) uint8 (``ctr.pack``), so they batch like images. Strict:
    exactly those keys, N rows of D finite numbers and T whole-number ids, id ``j`` of a row in
    ``[0, cardinalities[j])``; each problem one :class:`RequestError` naming it (400 malformed,
    413 too many rows, 422 a value out of range)."""
    from lepton_ray.data.ctr import pack

    if not body:
        raise RequestError(400, 'empty request body: send JSON {"features": {"dense", "sparse"}}')
    payload = _json(body)
    if not isinstance(payload, dict) or set(payload) != {"features"}:
        raise RequestError(
            400, 'body must be a JSON object {"features": {"dense": ..., "sparse": ...}}'
        )
    features = payload["features"]
    if not isinstance(features, dict) or set(features) != {"dense", "sparse"}:
        raise RequestError(400, '"features" must hold exactly "dense" and "sparse"')
    t = len(spec.cardinalities)
    dense = _matrix(features["dense"], "dense", spec.dense, np.float64, max_rows)
    sparse = _matrix(features["sparse"], "sparse", t, np.int64, max_rows)
    if len(dense) != len(sparse):
        raise RequestError(400, f'"dense" has {len(dense)} rows, "sparse" {len(sparse)}')
    if not np.isfinite(dense).all():
        raise RequestError(422, '"dense" holds NaN or infinite values')
    if np.abs(dense).max(initial=0.0) > np.finfo(np.float32).max:
        raise RequestError(422, '"dense" holds values too large for float32')
    bad = np.argwhere((sparse < 0) | (sparse >= spec.cardinalities))
    if len(bad):
        row, j = (int(v) for v in bad[0])
        raise RequestError(
            422,
            f'"sparse"[{row}][{j}] is {int(sparse[row, j])}: table {j} takes ids 0..'
            f"{int(spec.cardinalities[j]) - 1}",
        )
    return pack(dense.astype(np.float32), sparse)


def _matrix(value: Any, name: str, width: int, dtype: type, max_rows: int) -> np.ndarray:
    """A JSON list of rows of ``width`` numbers (``int64``: whole numbers only) -> (N, width)."""
    if not isinstance(value, list) or not value:
        raise RequestError(400, f'"{name}" must be a non-empty list of rows')
    if len(value) > max_rows:
        raise RequestError(413, f"{len(value)} rows in one request; the limit is {max_rows}")
    ok = (int,) if dtype is np.int64 else (int, float)
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != width:
            raise RequestError(400, f'"{name}"[{i}] must be a list of {width} numbers')
        if not all(isinstance(v, ok) and not isinstance(v, bool) for v in row):
            what = "whole-number ids" if dtype is np.int64 else "numbers"
            raise RequestError(422, f'"{name}"[{i}] must hold {what} only')
    try:
        return np.asarray(value, dtype).reshape(len(value), width)
    except OverflowError:
        raise RequestError(422, f'"{name}" holds an id too large') from None


def click_answers(logits: np.ndarray) -> list[dict[str, float]]:
    """(N,) click logits -> per row ``{"click_probability": p}``."""
    p = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64).reshape(-1)))
    return [{"click_probability": round(float(v), 6)} for v in p]


# --- texts (a text classifier's checkpoint: data kind "text-label") -------------------------------
def decode_texts(body: bytes, content_type: str, spec: InputSpec, max_texts: int) -> np.ndarray:
    """``{"texts": ["...", ...]}`` -> the rows as the model's data stores them, (N, 1, T, 1) uint8
    byte tokens (:func:`lepton_ray.data.labelled_text.tokenize`: truncated or padded to T), so they
    batch like images. Strict: a JSON object with exactly ``texts``, a non-empty list of at most
    ``max_texts`` non-empty strings without U+0000; each problem one :class:`RequestError` naming
    it (415 an image or binary body, 400 malformed, 413 too many texts, 422 a bad text)."""
    from lepton_ray.data.labelled_text import text_problem, tokenize

    if content_type.startswith(("image/", "application/octet-stream", "multipart/", *NPY_TYPES)):
        raise RequestError(
            415, f'this model classifies text: send JSON {{"texts": [...]}}, not {content_type}'
        )
    if not body:
        raise RequestError(400, 'empty request body: send JSON {"texts": ["...", ...]}')
    payload = _json(body)
    if not isinstance(payload, dict) or set(payload) != {"texts"}:
        keys = [repr(k[:40]) for k in list(payload)[:3]] if isinstance(payload, dict) else []
        given = f", not {', '.join(keys)}" if keys else ""
        raise RequestError(
            400, f'this model classifies text: body must be {{"texts": ["...", ...]}}{given}'
        )
    texts = payload["texts"]
    if not isinstance(texts, list) or not texts:
        raise RequestError(400, '"texts" must be a non-empty list of strings')
    if len(texts) > max_texts:
        raise RequestError(413, f"{len(texts)} texts in one request; the limit is {max_texts}")
    for i, t in enumerate(texts):
        if (problem := text_problem(t)) is not None:
            raise RequestError(422, f"texts[{i}] {problem}")
    t = spec.shape[1]  # rows are (1, T, 1)
    return tokenize(texts, t).reshape(len(texts), 1, t, 1)
