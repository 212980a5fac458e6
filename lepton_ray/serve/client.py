"""A small HTTP client for the endpoint: predict, measure accuracy over HTTP, and stream a
language model's generation."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

MAX_RETRY_AFTER_S = 10.0  # the longest a Retry-After is obeyed; a longer one fails at once


def predict(
    url: str,
    images: np.ndarray,
    *,
    token: str | None = None,
    timeout: float = 60.0,
    retries: int = 2,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """POST (N, H, W, C) uint8 images as pixel arrays to ``url/v1/predict``; returns the JSON answer.

    A 503 (no model replica could answer: one died or is starting) is sent again up to
    ``retries`` times, after the ``Retry-After`` the endpoint gives: predictions are pure, so a
    replay is safe. Any other error raises ``RuntimeError`` with the status and the endpoint's
    ``{"error"}`` message.
    """
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
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            wait = _retry_after(exc)
            if exc.code != 503 or wait is None or attempt == retries:
                raise RuntimeError(f"HTTP {exc.code} from {url}: {_error_text(detail)}") from None
            sleep(wait)
    raise AssertionError("unreachable")


def generate(
    url: str,
    prompt: str,
    *,
    token: str | None = None,
    timeout: float = 60.0,
    **options: Any,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """POST ``prompt`` to ``url/v1/generate`` with ``stream: true``; yields ``(event, data)`` for
    each Server-Sent Event as it arrives: ``("token", {"token", "text"})`` per token, then
    ``("done", {"text", "finish_reason", "usage", "seed", "model_version"})``. ``options``:
    ``max_new_tokens``, ``temperature``, ``top_k``, ``seed`` (None ones are left out). An HTTP
    error raises ``RuntimeError`` with the status and the endpoint's message. E.g. the whole
    text: ``"".join(d["text"] for _, d in generate(url, "Once upon a time", seed=1))``.
    """
    body = {"prompt": prompt, "stream": True, **{k: v for k, v in options.items() if v is not None}}
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/generate",
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise RuntimeError(f"HTTP {exc.code} from {url}: {_error_text(detail)}") from None
    with resp:
        name = "message"
        for raw in resp:  # one line at a time, as the server flushes them
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                yield name, json.loads(line.removeprefix("data:"))
                name = "message"


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    """The seconds a 503 asks to wait (``Retry-After``, seconds form), if at most
    :data:`MAX_RETRY_AFTER_S`; 1 s when it says nothing."""
    value = (exc.headers.get("Retry-After") or "1").strip()
    try:
        wait = float(value)
    except ValueError:  # an HTTP date: a planned outage, not a replica being replaced
        return None
    return wait if 0 <= wait <= MAX_RETRY_AFTER_S else None


def _error_text(body: str) -> str:
    """The endpoint's ``{"error": ...}`` message, or the body as it came (a proxy's page)."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.strip()[:500]


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
