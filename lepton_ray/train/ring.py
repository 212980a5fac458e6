"""The streaming ring: a window of rows resident in device memory that every step samples from.

For training sets larger than the device (``DataConfig.feed = "ring"``). Ray Data reads a worker's
piece of the epoch plan (``sampling.sequential_plan``: shards in an order shuffled per epoch) and
hands over whole decoded blocks; a background thread (:class:`BlockReader`) keeps a queue of them
in host memory, pinned on CUDA, bounded in rows. Each block is copied once into preallocated device
tensors of ``capacity`` rows (uint8 image NCHW, label, id); on CUDA the copy is ``non_blocking`` on a
side stream, and the step's draw waits for it on the device, not on the host. Each step then draws
its ``b_r`` rows uniformly at random **without replacement** from the resident rows, frees their
slots and the ring takes in the next rows. At the end of the input the ring drains.

Worked example: 10,000 rows on a worker, ``b_r = 100``, capacity 2,000: the ring fills to 2,000
rows, each step serves 100 of them at random and takes in the next 100; after 80 steps the input is
exhausted and the last 20 steps drain the 2,000 still resident. Every row entered once and left once.

Shuffle: a row stays resident a geometric number of steps (chance ``b_r / capacity`` of leaving at
each), on average ``capacity / b_r`` steps, i.e. it is served about ``capacity`` rows after it was
read, give or take as much again (``tests/test_ring.py`` checks this). Together with the per-epoch
shard order of the plan this is Mosaic Streaming's shape (shuffled shards, a 262,144-row window).

Memory: ``capacity`` rows on the device, allocated once; at most ``capacity`` rows plus one block in
the host queue. Deterministic for a given seed, worker count and block order (Ray Data's
``preserve_order``): the ring is filled to capacity (or to the end of the input) before every draw,
so what it holds depends only on the order rows arrive in, never on block sizes or timing, and the
draws come from a generator seeded per (seed, epoch, rank).

Sampling keeps the resident rows at slots ``[0, n)``: a draw picks ``k`` of them, and the rows
at ``[n - k, n)`` not picked move into the picked slots below ``n - k``, so ``[n - k, capacity)``
is free for the next rows. All of it is index arithmetic on the device with sizes the host knows,
so nothing waits for the GPU.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from lepton_ray.train.step import BATCH_DTYPES

_RING_SALT = 0x121A6


class Ring:
    """``capacity`` rows of (image uint8 ``shape``, label, id) on ``device``; ``n`` resident."""

    def __init__(self, capacity: int, shape: tuple[int, ...], device: torch.device):
        if capacity < 1:
            raise ValueError(f"a ring needs room for at least one row, got capacity {capacity}")
        self.capacity, self.device, self.n = capacity, device, 0
        self.rows = {
            "image": torch.empty((capacity, *shape), dtype=torch.uint8, device=device),
            "label": torch.empty(capacity, dtype=torch.int64, device=device),
            "id": torch.empty(capacity, dtype=torch.int64, device=device),
        }
        self._taken = torch.zeros(capacity, dtype=torch.bool, device=device)
        self._copies = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows.values())

    @property
    def space(self) -> int:
        return self.capacity - self.n

    def clear(self) -> None:
        self.n = 0

    def put(self, block: dict[str, torch.Tensor], start: int = 0) -> int:
        """Copy rows ``start:`` of ``block`` into the free slots, as many as fit; return how many."""
        m = min(self.space, len(block["id"]) - start)
        if m <= 0:
            return 0
        dst = slice(self.n, self.n + m)
        if self._copies is not None:
            # The slots were freed by draws queued on the compute stream: copy after those.
            self._copies.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copies):
                for name, buf in self.rows.items():
                    buf[dst].copy_(block[name][start : start + m], non_blocking=True)
        else:
            for name, buf in self.rows.items():
                buf[dst].copy_(block[name][start : start + m])
        self.n += m
        return m

    def draw(self, k: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``k`` resident rows, uniformly at random without replacement; their slots are freed."""
        n = self.n
        if not 0 < k <= n:
            raise ValueError(f"cannot draw {k} rows from a ring holding {n}")
        if self._copies is not None:  # the rows copied in so far are there before we read them
            torch.cuda.current_stream(self.device).wait_stream(self._copies)
        pick = torch.randperm(n, generator=generator, device=self.device)[:k]
        batch = {name: buf[pick] for name, buf in self.rows.items()}
        # Compact: the picked slots below n - k (ascending, first in `holes`) take the rows at
        # [n - k, n) that were not picked (first in `movers`); as many of one as of the other.
        # The pairs after those move freed rows between freed slots, which is harmless.
        holes = torch.sort(pick).values
        self._taken[pick] = True
        tail_taken = self._taken[n - k : n].to(torch.uint8)
        movers = torch.argsort(tail_taken, stable=True) + (n - k)
        self._taken[pick] = False
        for buf in self.rows.values():
            buf.index_copy_(0, holes, buf.index_select(0, movers))
        self.n = n - k
        return batch


def ring_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """The draws of ``rank``'s ring in ``epoch``: one seeded stream per (seed, epoch, rank)."""
    key = np.random.SeedSequence([seed, epoch, rank, _RING_SALT]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(key) & ((1 << 63) - 1))


def serve(
    ring: Ring,
    blocks: Iterable[dict[str, torch.Tensor]],
    steps: int,
    per_step: int,
    generator: torch.Generator,
) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches of ``per_step`` rows through ``ring`` from ``blocks`` (an epoch's rows in
    order). Before each draw the ring is filled to capacity, or with all that is left."""
    ring.clear()
    it = iter(blocks)
    block: dict[str, torch.Tensor] | None = None
    at = 0
    for _ in range(steps):
        while ring.space:
            if block is None or at == len(block["id"]):
                block, at = next(it, None), 0
                if block is None:
                    break
            at += ring.put(block, at)
        if ring.n < per_step:
            return  # the input ran out: Batches names the step it stopped at
        yield ring.draw(per_step, generator)


def host_block(batch: dict[str, Any], pin: bool) -> dict[str, torch.Tensor]:
    """A block of numpy columns from Ray Data -> contiguous CPU tensors of the batch dtypes (pinned
    for an asynchronous copy when ``pin``)."""
    out = {}
    for name, dtype in BATCH_DTYPES.items():
        t = torch.as_tensor(np.ascontiguousarray(batch[name])).to(dtype)
        out[name] = t.pin_memory() if pin else t
    return out


class BlockReader:
    """Iterates ``blocks`` on a background thread into a queue holding at most ``max_rows`` rows
    (plus the block being put); iterating the reader hands them over in order.

    :meth:`close` stops the thread after its current block and closes the source iterator (a Ray
    Data iterator then shuts its execution down)."""

    def __init__(self, blocks: Iterable[dict[str, Any]], max_rows: int, pin: bool = False):
        self.max_rows, self.pin = max_rows, pin
        self._queue: deque[dict[str, torch.Tensor]] = deque()
        self.queued_rows, self.peak_rows = 0, 0
        self._cond = threading.Condition()
        self._done, self._stop = False, False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(blocks,), daemon=True)
        self._thread.name = "ring-block-reader"
        self._thread.start()

    def _run(self, blocks: Iterable[dict[str, Any]]) -> None:
        it = iter(blocks)
        try:
            for raw in it:
                block = host_block(raw, self.pin)
                with self._cond:
                    while self.queued_rows >= self.max_rows and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        break
                    self._queue.append(block)
                    self.queued_rows += len(block["id"])
                    self.peak_rows = max(self.peak_rows, self.queued_rows)
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the consumer, raised in the training loop
            self._error = exc
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            with self._cond:
                while not self._queue and not self._done:
                    self._cond.wait()
                if not self._queue:
                    if self._error is not None:
                        raise self._error
                    return
                block = self._queue.popleft()
                self.queued_rows -= len(block["id"])
                self._cond.notify_all()
            yield block

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._queue.clear()
            self.queued_rows = 0
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
