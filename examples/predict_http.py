"""Classify images with a running lepton_ray endpoint, using only Python's standard library.

    python examples/predict_http.py http://127.0.0.1:8000                  # examples/images/*.png
    python examples/predict_http.py http://127.0.0.1:8000 digit.png other.jpg
    python examples/predict_http.py http://127.0.0.1:8000 --smoke-test     # one image

Start an endpoint first (``lepton-ray serve CHECKPOINT``, ``lepton_ray.deploy``, ``make demo
--keep-serving``). The script reads ``GET /v1/model``, then sends the images to ``POST
/v1/predict`` twice: as files in one multipart form (PNG or JPEG, as they are), and as pixel
arrays in ``{"instances": [...]}`` (PNGs only, read by the small decoder below). The two answers
agree: the PNG is lossless. Set ``LEPTON_SERVE_TOKEN`` for an endpoint that needs a token.
Errors come back as ``{"error": "<one line>"}`` with a 4xx or 5xx status.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import struct
import sys
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

IMAGES = sorted((Path(__file__).parent / "images").glob("*.png"))  # three held-out digits


def call(url: str, body: bytes | None = None, content_type: str | None = None) -> dict:
    """GET (no body) or POST ``url``; the JSON answer, or SystemExit with the endpoint's error."""
    headers = {"Content-Type": content_type} if content_type else {}
    if token := os.environ.get("LEPTON_SERVE_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:  # the endpoint answers every error as {"error": ...}
        raise SystemExit(
            f"HTTP {exc.code} from {url}: {exc.read().decode(errors='replace')}"
        ) from None


def multipart(paths: list[Path]) -> tuple[bytes, str]:
    """A multipart/form-data body with one file part per image, and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = []
    for path in paths:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        head = f'Content-Disposition: form-data; name="file"; filename="{path.name}"'
        parts.append(f"--{boundary}\r\n{head}\r\nContent-Type: {kind}\r\n\r\n".encode())
        parts.append(path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def paeth(a: int, b: int, c: int) -> int:
    """PNG's Paeth predictor: whichever of left, up and up-left is nearest to left + up - up-left."""
    p = a + b - c
    return min((abs(p - a), 0, a), (abs(p - b), 1, b), (abs(p - c), 2, c))[2]


def png_pixels(data: bytes) -> list:
    """An 8-bit greyscale (``[H][W]``) or RGB (``[H][W][3]``) non-interlaced PNG's pixels."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat = 8, b""
    while pos < len(data):  # chunks: length, type, body, CRC
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(
                ">IIBBBBB", data[pos + 8 : pos + 21]
            )
        elif kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    if depth != 8 or color not in (0, 2) or interlace:
        raise ValueError("only 8-bit greyscale or RGB, non-interlaced PNGs: send it as a file")
    n = 1 if color == 0 else 3  # bytes per pixel
    raw, stride, prev, rows = zlib.decompress(idat), width * n, bytearray(width * n), []
    for y in range(height):  # each row: a filter byte, then the row filtered against its left/up
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a, b = row[i - n] if i >= n else 0, prev[i]  # left, up
            c = prev[i - n] if i >= n else 0  # up-left
            row[i] = (row[i] + (0, a, b, (a + b) // 2, paeth(a, b, c))[kind]) & 255
        rows.append(list(row) if n == 1 else [list(row[x : x + n]) for x in range(0, stride, n)])
        prev = row
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the endpoint, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "images", nargs="*", type=Path, help="PNG or JPEG files (default: examples/images)"
    )
    p.add_argument("--smoke-test", action="store_true", help="send one image")
    args = p.parse_args(argv)
    url, paths = args.url.rstrip("/"), args.images or IMAGES
    paths = paths[:1] if args.smoke_test else paths

    model = call(f"{url}/v1/model")
    print(
        f"model {model['model_version']}: input {model['input_shape']}, classes {model['classes']}"
    )
    as_files = call(f"{url}/v1/predict", *multipart(paths))["predictions"]
    pngs = [path for path in paths if path.suffix.lower() == ".png"]
    as_json = {}
    if pngs:
        instances = json.dumps({"instances": [png_pixels(path.read_bytes()) for path in pngs]})
        answer = call(f"{url}/v1/predict", instances.encode(), "application/json")
        as_json = dict(zip(pngs, answer["predictions"], strict=True))
    results = []
    for path, answer in zip(paths, as_files, strict=True):
        json_class = as_json[path]["class"] if path in as_json else None
        top = answer["top_k"][0]["probability"]
        print(f"{path.name}: {answer['class']} (p={top:.2f}); as JSON instances: {json_class}")
        results.append({"file": str(path), "class": answer["class"], "json_class": json_class})
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
