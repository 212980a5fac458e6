"""Pure tier: the fast reader of ``{"instances": [...]}`` bodies agrees with the general JSON path
on everything it accepts, and leaves everything else to it (no Ray, no HTTP)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton_ray.serve.codec import InputSpec, RequestError, decode_body, decode_json
from lepton_ray.serve.pixel_json import read_pixel_arrays

SPECS = {
    1: InputSpec((4, 3, 1), [0.5], [0.5], ["a", "b"]),
    3: InputSpec((2, 3, 3), [0.5] * 3, [0.5] * 3, ["a", "b"]),
}
MAX_IMAGES = 5


def general(body: bytes, spec: InputSpec) -> np.ndarray:
    """The general path: the standard library's JSON parser, then decode_json."""
    return decode_json(json.loads(body), spec, MAX_IMAGES)


@st.composite
def pixel_bodies(draw):
    """A valid body in any layout the endpoint accepts, with JSON whitespace sprinkled in."""
    channels = draw(st.sampled_from(sorted(SPECS)))
    h, w, c = SPECS[channels].shape
    n = draw(st.integers(1, MAX_IMAGES))
    images = np.array(
        draw(st.lists(st.integers(0, 255), min_size=n * h * w * c, max_size=n * h * w * c)),
        np.uint8,
    ).reshape(n, h, w, c)
    layouts = [images, images.reshape(n, -1)] + ([images[..., 0]] if c == 1 else [])
    instances = draw(st.sampled_from(layouts)).tolist()
    seps = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
    text = json.dumps(
        {"instances": instances}, separators=seps, indent=draw(st.sampled_from([None, 1]))
    )
    return (
        draw(st.sampled_from(["", " ", "\r\n"])) + text + draw(st.sampled_from(["", "\n"])),
        channels,
        images,
    )


@settings(max_examples=300, deadline=None, derandomize=True)
@given(pixel_bodies())
def test_fast_reader_returns_what_the_general_path_returns(case):
    text, channels, images = case
    spec = SPECS[channels]
    fast = read_pixel_arrays(text.encode(), spec.shape, MAX_IMAGES)
    assert fast is not None and fast.dtype == np.uint8
    np.testing.assert_array_equal(fast, images)
    np.testing.assert_array_equal(fast, general(text.encode(), spec))
    np.testing.assert_array_equal(
        decode_body(text.encode(), "application/json", spec, MAX_IMAGES), images
    )


@settings(
    max_examples=600, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(pixel_bodies(), st.data())
def test_a_mutated_body_is_read_as_the_general_path_reads_it_or_left_to_it(case, data):
    text, channels, _ = case
    spec = SPECS[channels]
    body = bytearray(text.encode())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body) - 1))
        byte = data.draw(st.sampled_from(list(b'0123456789[],. -e"{}:x\n')))
        op = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        if op == "replace":
            body[at] = byte
        elif op == "insert":
            body.insert(at, byte)
        elif len(body) > 1:
            del body[at]
    fast = read_pixel_arrays(bytes(body), spec.shape, MAX_IMAGES)
    if fast is not None:  # then the body is valid JSON that the general path reads the same way
        np.testing.assert_array_equal(fast, general(bytes(body), spec))


@pytest.mark.parametrize(
    "text",
    [
        '{"instances": [[[1,2,3],[4,5,6],[7,8,9],[10,11,12]]], "x": 1}',  # another key
        '{"instances": [[[1.0,2,3],[4,5,6],[7,8,9],[10,11,12]]]}',  # a float
        '{"instances": [[[-1,2,3],[4,5,6],[7,8,9],[10,11,12]]]}',  # negative
        '{"instances": [[[256,2,3],[4,5,6],[7,8,9],[10,11,12]]]}',  # over 255
        '{"instances": [[[007,2,3],[4,5,6],[7,8,9],[10,11,12]]]}',  # leading zeros: not JSON
        '{"instances": [[[1,2,3,4],[5,6],[7,8,9],[10,11,12]]]}',  # ragged
        '{"instances": [[[1,2],[3,4],[5,6],[7,8],[9,10],[11,12]]]}',  # 6x2, not 4x3
        '{"instances": [[[1 2,3],[4,5,6],[7,8,9],[10,11,12]]]}',  # two numbers in one slot
        '{"instances": [[[1,2,3]4,[5,6,7],[8,9,10],[11,12,13]]]}',  # a number outside a slot
        '{"instances": []}',
        '{"images": [[[1,2,3],[4,5,6],[7,8,9],[10,11,12]]]}',
        "[[[1,2,3],[4,5,6],[7,8,9],[10,11,12]]]",
    ],
)
def test_bodies_the_fast_reader_leaves_to_the_general_path(text):
    assert read_pixel_arrays(text.encode(), SPECS[1].shape, MAX_IMAGES) is None


def test_more_images_than_allowed_are_left_to_the_general_path_and_get_413():
    body = json.dumps({"instances": np.zeros((MAX_IMAGES + 1, 4, 3), int).tolist()}).encode()
    assert read_pixel_arrays(body, SPECS[1].shape, MAX_IMAGES) is None
    with pytest.raises(RequestError) as err:
        decode_body(body, "application/json", SPECS[1], MAX_IMAGES)
    assert err.value.status == 413


def test_nan_bodies_still_get_the_422_that_names_them():
    body = json.dumps({"instances": [[[float("nan")] * 3] * 4]}).encode()  # NaN: not strict JSON
    with pytest.raises(RequestError, match="NaN") as err:
        decode_body(body, "application/json", SPECS[1], MAX_IMAGES)
    assert err.value.status == 422


@pytest.mark.parametrize(
    "instances",
    [
        [[[True, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]],  # read as 1 by numpy
        [[[0, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, False]]],  # read as 0
        [[True] * 12],  # flat layout
    ],
)
def test_json_booleans_are_not_pixels_on_either_path(instances):
    body = json.dumps({"instances": instances}).encode()
    assert read_pixel_arrays(body, SPECS[1].shape, MAX_IMAGES) is None
    with pytest.raises(RequestError, match="not true/false") as err:
        decode_body(body, "application/json", SPECS[1], MAX_IMAGES)
    assert err.value.status == 422


def _image_bytes(fmt: str, shape: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    h, w, _ = shape
    buf = io.BytesIO()
    Image.fromarray(np.arange(h * w, dtype=np.uint8).reshape(h, w)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_images_other_than_png_and_jpeg_are_refused_with_415(fmt):
    import base64

    data = _image_bytes(fmt, SPECS[1].shape)
    for body, ctype in (
        (data, "image/png"),
        (json.dumps({"images": [base64.b64encode(data).decode()]}).encode(), "application/json"),
    ):
        with pytest.raises(RequestError, match="not a readable PNG or JPEG") as err:
            decode_body(body, ctype, SPECS[1], MAX_IMAGES)
        assert err.value.status == 415


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_png_and_jpeg_of_the_right_size_are_read(fmt):
    image = decode_body(_image_bytes(fmt, SPECS[1].shape), "image/png", SPECS[1], MAX_IMAGES)
    assert image.shape == (1, *SPECS[1].shape) and image.dtype == np.uint8


def test_too_many_images_is_413_in_every_format():
    from lepton_ray.serve.codec import decode_files

    png = _image_bytes("PNG", SPECS[1].shape)
    with pytest.raises(RequestError) as err:
        decode_files([png] * (MAX_IMAGES + 1), SPECS[1], MAX_IMAGES)
    assert err.value.status == 413 and f"the limit is {MAX_IMAGES}" in str(err.value)
