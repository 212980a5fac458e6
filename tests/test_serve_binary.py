"""Pure tier: binary request bodies (raw uint8 with an X-Shape header, ``.npy``) decode to the
same pixels as JSON, and every malformed one gets its 4xx as strictly as JSON's (no Ray, no HTTP)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from lepton_ray.serve.codec import InputSpec, RequestError, decode_body

GREY = InputSpec((4, 3, 1), [0.5], [0.5], ["a", "b"])
RGB = InputSpec((2, 3, 3), [0.5] * 3, [0.5] * 3, ["a", "b"])
MAX_IMAGES = 5
RAW = "application/octet-stream"
NPY = "application/x-npy"


def images(spec: InputSpec, n: int = 3) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, *spec.shape), dtype=np.uint8)


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def refused(body: bytes, ctype: str, spec: InputSpec = GREY, shape: str | None = None) -> tuple:
    with pytest.raises(RequestError) as err:
        decode_body(body, ctype, spec, MAX_IMAGES, shape)
    return err.value.status, str(err.value)


@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
def test_raw_npy_and_json_bodies_of_a_batch_decode_to_the_same_pixels(spec):
    x = images(spec)
    n, h, w, c = x.shape
    as_json = decode_body(json.dumps({"instances": x.tolist()}).encode(), "", spec, MAX_IMAGES)
    raw = decode_body(x.tobytes(), RAW, spec, MAX_IMAGES, f"{n},{h},{w},{c}")
    assert raw.shape == (n, h, w, c) and np.array_equal(raw, x) and np.array_equal(as_json, x)
    for layout in [x, x.reshape(n, -1)] + ([x[..., 0]] if c == 1 else []):
        assert np.array_equal(decode_body(npy(layout), NPY, spec, MAX_IMAGES), x)
    as_float = decode_body(npy(x.astype(np.float32) + 0.2), NPY, spec, MAX_IMAGES)
    assert np.array_equal(as_float, x)  # rounded, as JSON pixels are
    if c == 1:  # one channel: the header may leave C out
        assert np.array_equal(decode_body(x.tobytes(), RAW, spec, MAX_IMAGES, f"{n},{h},{w}"), x)


@pytest.mark.parametrize(
    ("shape", "size", "status", "match"),
    [
        ("3,4,3", 35, 400, "body has 35 bytes; X-Shape 3,4,3,1 needs 36"),
        ("3,4,3,1", 37, 400, "needs 36"),
        ("0,4,3,1", 0, 400, "names no image"),
        ("6,4,3,1", 72, 413, "6 images in one request; the limit is 5"),
        ("3,3,4,1", 36, 422, "X-Shape images are 3x4x1; the model takes 4x3x1"),
        ("3,4,3,3", 108, 422, "the model takes 4x3x1"),
        ("3,4", 12, 400, "must be N,H,W,C"),
        ("3,4,3,1,1", 36, 400, "must be N,H,W,C"),
        ("-3,4,3,1", 36, 400, "must be N,H,W,C"),
        ("3,4,3,1.0", 36, 400, "must be N,H,W,C"),
        ("3,4,²,1", 36, 400, "must be N,H,W,C"),  # a digit to str.isdigit, not to int()
        ("99999999999,4,3,1", 36, 400, "must be N,H,W,C"),
    ],
)
def test_a_raw_body_must_match_its_shape_header_and_the_model(shape, size, status, match):
    got_status, message = refused(b"\x07" * size or b"\x00", RAW, shape=shape)
    assert got_status == status and match in message, message


def test_a_raw_body_without_a_shape_header_is_still_one_png_or_jpeg():
    status, message = refused(images(GREY).tobytes(), RAW)
    assert status == 415 and "not a readable PNG or JPEG" in message


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        (b"\x93NUMPY junk", 400, "not a readable .npy"),
        (b"not npy at all", 400, "not a readable .npy"),
        (npy(images(GREY))[:-5], 400, "not a readable .npy"),  # truncated data
        (npy(np.array([{"a": 1}], dtype=object)), 400, "not a readable .npy"),  # never unpickled
        (npy(images(GREY) > 3), 422, "dtype bool"),
        (npy(images(GREY).astype(np.complex64)), 422, "dtype complex64"),
        (npy(np.zeros(3, dtype=[("a", "u1"), ("b", "u1")])), 422, "dtype"),
        (npy(np.full((1, 4, 3), np.nan, np.float32)), 422, "NaN or infinite"),
        (npy(np.full((1, 4, 3), 256.0)), 422, "in [0, 255]"),
        (npy(np.full((1, 4, 3), -1, np.int16)), 422, "in [0, 255]"),
        (npy(np.zeros((4, 3), np.uint8)), 422, "each image must have shape (4, 3, 1)"),
        (npy(np.zeros((2, 3, 4), np.uint8)), 422, "each image must have shape"),
        (npy(np.zeros((0, 4, 3), np.uint8)), 400, "a batch of images"),
        (npy(np.uint8(7)), 400, "a batch of images"),
        (npy(np.zeros(12, np.uint8)), 400, "a batch of images"),
        (npy(np.zeros((6, 4, 3), np.uint8)), 413, "6 images in one request; the limit is 5"),
    ],
)
def test_a_npy_body_is_refused_as_strictly_as_json(body, status, match):
    got_status, message = refused(body, NPY)
    assert got_status == status and match in message, message
