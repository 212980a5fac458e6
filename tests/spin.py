"""Keeping a thread busy for a set time: what the thread-accounting tests measure."""

from __future__ import annotations

import time


def spin(seconds: float, clock=time.perf_counter) -> float:
    """Busy for ``seconds`` of ``clock``; the wall seconds that took."""
    t0, w0 = clock(), time.perf_counter()
    while clock() - t0 < seconds:
        continue
    return time.perf_counter() - w0
