"""How long a process's Python garbage collector ran: the ``gc_s`` of an epoch's metrics.

A collection holds the GIL, so while it runs no thread of the process runs Python: not the loop
launching the step's kernels, not the feed's reader thread. A full (generation 2) collection walks
every tracked object of the process, and a training worker holds many (torch, Ray, pyarrow, the
model), so each one is a pause of its own; torchtitan runs its collections itself for this reason.
:class:`GcClock` adds up the collections through ``gc.callbacks``, which Python calls at the start
and the end of each, whichever thread triggered it.
"""

from __future__ import annotations

import gc
import time
from typing import Any


class GcClock:
    """Seconds spent in collections and how many were full, since :meth:`start`; :meth:`stop`
    unhooks it. :meth:`lap` gives what ran since the previous lap. A process needs one:
    :func:`process_clock`."""

    def __init__(self) -> None:
        self.seconds, self.full = 0.0, 0
        self._began: float | None = None
        self._lap = (0.0, 0)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.seconds += time.perf_counter() - self._began
            self.full += info.get("generation") == 2
            self._began = None

    def start(self) -> GcClock:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def lap(self) -> dict[str, float | int]:
        """``gc_s`` (seconds in collections) and ``gc_full`` (full collections) since the last
        lap (or the start)."""
        seconds, full = self._lap
        self._lap = (self.seconds, self.full)
        return {"gc_s": round(self.seconds - seconds, 4), "gc_full": self.full - full}


_PROCESS: GcClock | None = None


def process_clock() -> GcClock:
    """This process's clock, hooked on first use and for the rest of the process."""
    global _PROCESS
    if _PROCESS is None:
        _PROCESS = GcClock().start()
    return _PROCESS
