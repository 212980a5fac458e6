"""A small HTTP client for the endpoint: predict, and measure accuracy over HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


def predict(
    url: str, images: np.ndarray, *, token: str | None = None, timeout: float = 60.0
) -> dict[str, Any]:
    """POST (N, H, W, C) uint8 images as pixel arrays to ``url/v1/predict``; returns the JSON answer."""
    body = json.dumps({"instances": np.asarray(images).tolist()}).encode()
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/predict",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise RuntimeError(f"HTTP {exc.code} from {url}: {detail}") from None


def evaluate(
    url: str,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    batch: int = 50,
    concurrency: int = 4,
) -> dict[str, Any]:
    """Accuracy of the endpoint on labelled images, sent in requests of ``batch`` images."""
    chunks = [slice(i, i + batch) for i in range(0, len(images), batch)]
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda sl: predict(url, images[sl])["predictions"], chunks))
    predicted = [p["class"] for a in answers for p in a]
    truth = [classes[int(y)] for y in labels]
    correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
    return {
        "accuracy": correct / len(truth),
        "correct": correct,
        "total": len(truth),
        "requests": len(chunks),
    }
