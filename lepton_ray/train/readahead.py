"""Reading ahead on a background thread: an iterator's items queued, up to a bound, before asked for.

:class:`ReadAhead` iterates a source on a thread of its own and keeps what it gives in a queue
holding at most ``limit`` (in the units of ``size(item)``: rows, bytes; always at least one item,
however large); iterating the reader hands the items over in order. The source may be a function
that makes the iterable: it is then called on the thread, so that planning an epoch and starting
its Ray Data execution cost the training thread nothing. The feeds build on it: the ring's host
queue of blocks (:class:`lepton_ray.train.ring.BlockReader`) and the streamed feed's batches, whose
next epoch starts reading once this one's source is :attr:`~ReadAhead.exhausted`
(:class:`lepton_ray.train.feed.StreamedFeed`).

An error in the source (or in ``prepare``) is raised to the consumer once the items before it are
handed over. :meth:`ReadAhead.close` stops the thread after its current item and closes the source
iterator (a Ray Data iterator then shuts its execution down).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from lepton_ray.train.read_times import ReadTimes


class ReadAhead:
    """``source`` iterated on a background thread into a queue of at most ``limit`` (by ``size``).

    ``prepare`` runs on the thread for each item before it is queued (e.g. packing and pinning a
    block). ``queued`` and ``peak`` say how much the queue holds now and at most so far;
    ``times`` (:class:`~lepton_ray.train.read_times.ReadTimes`) when the reader began, queued its
    first item and ran out, and how many items it queued."""

    def __init__(
        self,
        source: Iterable[Any] | Callable[[], Iterable[Any]],
        limit: float,
        *,
        size: Callable[[Any], float] = lambda item: 1,
        prepare: Callable[[Any], Any] | None = None,
        name: str = "read-ahead",
    ):
        self.limit, self.size, self.prepare = limit, size, prepare
        self._queue: deque[tuple[Any, float]] = deque()
        self.queued: float = 0
        self.peak: float = 0
        self._times = ReadTimes(requested=time.time())
        self._cond = threading.Condition()
        self._done = self._stop = self._exhausted = False
        self._error: BaseException | None = None
        self._source = source
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        it: Iterator[Any] | None = None
        try:
            source = self._source() if callable(self._source) else self._source
            it = iter(source)
            for raw in it:
                item = self.prepare(raw) if self.prepare is not None else raw
                n = self.size(item)
                with self._cond:
                    while self.queued >= self.limit and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        break
                    if self._times.first_block is None:
                        self._times.first_block = time.time()
                    self._times.blocks += 1
                    self._queue.append((item, n))
                    self.queued += n
                    self.peak = max(self.peak, self.queued)
                    self._cond.notify_all()
            else:
                self._times.done = time.time()
                self._exhausted = True
        except BaseException as exc:  # handed to the consumer, raised in the training loop
            self._error = exc
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            with self._cond:
                self._done = True
                self._cond.notify_all()

    @property
    def times(self) -> ReadTimes:
        return self._times

    @property
    def exhausted(self) -> bool:
        """The source has given its last item: all that is left of it is in the queue."""
        return self._exhausted

    def __iter__(self) -> Iterator[Any]:
        while True:
            with self._cond:
                while not self._queue and not self._done:
                    self._cond.wait()
                if not self._queue:
                    if self._error is not None:
                        raise self._error
                    return
                item, n = self._queue.popleft()
                self.queued -= n
                self._cond.notify_all()
            yield item

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._queue.clear()
            self.queued = 0
            self._cond.notify_all()
        cancel = getattr(self._source, "cancel", None)
        if cancel is not None:  # a source that blocks elsewhere (RemoteBlocks): unblock it
            cancel()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def batch_bytes(batch: dict[str, Any]) -> int:
    """The memory a batch of columns holds: tensors' and arrays' bytes, and the bytes of the
    objects in an object column (e.g. JPEG bytes, one per row)."""
    total = 0
    for col in batch.values():
        if isinstance(col, torch.Tensor):
            total += col.nbytes
        elif isinstance(col, np.ndarray) and col.dtype == object:
            total += sum(len(v) if isinstance(v, bytes | bytearray) else 8 for v in col)
        else:
            total += int(getattr(col, "nbytes", 8))
    return total
