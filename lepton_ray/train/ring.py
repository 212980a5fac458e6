"""The streaming ring: a window of rows resident in device memory that every step samples from.

For training sets larger than the device (``DataConfig.feed = "ring"``). Ray Data reads a worker's
piece of the epoch plan (``sampling.sequential_plan``: shards in an order shuffled per epoch) as
whole blocks, one per read task (a few shards), its execution in an actor beside the worker
(:mod:`lepton_ray.train.ring_reader`); a background thread of the worker (:class:`BlockReader`)
maps each block from the object store, packs it into rows of bytes (image as stored, label, id:
:class:`RowLayout`) in host memory, pinned on CUDA, and keeps a queue of them bounded in rows.
Each block is copied once into one preallocated device tensor of ``capacity`` rows; on
CUDA the copy is ``non_blocking`` on a side stream, and the step's draw waits for it on the
device, not on the host. Each step then draws its ``b_r`` rows uniformly at random
**without replacement** from the resident rows (one gather), frees their slots and the ring takes
in the next rows. At the end of the input the ring drains.

Worked example: 10,000 rows on a worker, ``b_r = 100``, capacity 2,000: the ring fills to 2,000
rows, each step serves 100 of them at random and takes in the next 100; after 80 steps the input is
exhausted and the last 20 steps drain the 2,000 still resident. Every row entered once and left once.

Shuffle: a row stays resident a geometric number of steps (chance ``b_r / capacity`` of leaving at
each), on average ``capacity / b_r`` steps, so it is served about ``capacity`` rows after it entered,
which is about where it was stored: its shift from its stored position has mean 0 and a standard
deviation of about ``capacity`` (``tests/test_ring.py`` checks this). With the per-epoch shard
order of the plan this is Mosaic Streaming's shape (shuffled shards, a 262,144-row window).

Start-up: the first draw does not wait for a full ring. Before draw ``s`` the ring holds exactly
``n_s = min(capacity, rows left, start + s * growth)`` rows (:func:`resident`): it starts at
``start`` = a sixteenth of the capacity (at least one batch) and takes in ``growth`` = 3 batches
more than it serves per step until it is full, so an epoch's first step waits for 16,384 rows of
a 262,144-row ring, not all of them, and the ring is full after ``(capacity - start) / growth``
steps. Rows served in that ramp come from a smaller window (their shift is about ``n_s``, below).

Memory: ``capacity`` rows on the device, allocated once; at most ``capacity`` rows plus one block in
the host queue. Deterministic for a given seed, worker count and block order (Ray Data's
``preserve_order``): the ring holds ``n_s`` rows before draw ``s`` whatever the timing, so what it
holds depends only on the order rows arrive in, never on block sizes or timing, and the draws come
from a generator seeded per (seed, epoch, rank).

Sampling keeps the resident rows at slots ``[0, n)``: a draw picks ``k`` of them, and the rows
at ``[n - k, n)`` not picked move into the picked slots below ``n - k``, so ``[n - k, capacity)``
is free for the next rows (a device-to-device move of at most ``k`` rows). Since how many rows
the ring holds at each step is known in advance (``n_s``), :func:`draws`
computes the slots of many steps at once; a step is then two gathers, one scatter and the copy of
the new rows, and the host never waits for the GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from lepton_ray.train.readahead import ReadAhead
from lepton_ray.train.rows import RowLayout

__all__ = ["BlockReader", "Draw", "Ring", "RowLayout", "draws", "ring_generator", "serve"]

_RING_SALT = 0x121A6
RAMP_START = 1 / 16  # of the capacity: what the first draw waits for
RAMP_GROWTH = 3  # batches taken in per step beyond the one served, until the ring is full


def ramp(capacity: int, k: int) -> tuple[int, int]:
    """(start, growth) of a ring of ``capacity`` serving ``k`` rows a step (module docstring)."""
    return min(capacity, max(k, int(capacity * RAMP_START))), RAMP_GROWTH * k


def resident(s: Any, rows: int, k: int, capacity: int) -> Any:
    """Rows the ring holds before draw ``s`` (an int, or a tensor of steps) of an epoch of
    ``rows`` rows, ``k`` a step: ``min(capacity, rows - s * k, start + s * growth)``."""
    start, growth = ramp(capacity, k)
    if isinstance(s, torch.Tensor):
        return torch.minimum(rows - s * k, start + s * growth).clamp_(max=capacity)
    return min(capacity, rows - s * k, start + s * growth)


class Ring:
    """``capacity`` rows of :class:`RowLayout` ``shape`` on ``device``; ``n`` of them resident."""

    def __init__(self, capacity: int, shape: tuple[int, ...], device: torch.device):
        if capacity < 1:
            raise ValueError(f"a ring needs room for at least one row, got capacity {capacity}")
        self.capacity, self.device, self.n = capacity, device, 0
        self.layout = RowLayout(shape)
        self.rows = torch.empty((capacity, self.layout.width), dtype=torch.uint8, device=device)
        self._copies = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def nbytes(self) -> int:
        return self.rows.numel()

    @property
    def space(self) -> int:
        return self.capacity - self.n

    def clear(self) -> None:
        self.n = 0

    def put(self, block: torch.Tensor, start: int = 0, most: int | None = None) -> int:
        """Copy packed rows ``start:`` of ``block`` into the free slots, as many as fit (and at
        most ``most``); return how many."""
        m = min(self.space, len(block) - start, self.space if most is None else most)
        if m <= 0:
            return 0
        dst, src = self.rows[self.n : self.n + m], block[start : start + m]
        if self._copies is not None:
            # The slots were freed by draws queued on the compute stream: copy after those.
            self._copies.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copies):
                dst.copy_(src, non_blocking=True)
        else:
            dst.copy_(src)
        self.n += m
        return m

    def draw(self, step: Draw) -> dict[str, torch.Tensor]:
        """The rows at ``step.pick``; their slots are freed (see the module docstring)."""
        k = len(step.pick)
        if step.n != self.n:
            raise RuntimeError(f"the draw expects {step.n} resident rows, the ring holds {self.n}")
        if self._copies is not None:  # the rows copied in so far are there before we read them
            torch.cuda.current_stream(self.device).wait_stream(self._copies)
        batch = self.layout.unpack(self.rows.index_select(0, step.pick))
        self.rows.index_copy_(0, step.holes, self.rows.index_select(0, step.movers))
        self.n -= k
        return batch


class Draw(NamedTuple):
    """One step's draw from a ring holding ``n`` rows: the ``k`` slots it takes (``pick``), and
    the compaction: the picked slots in ascending order (``holes``) take the rows at ``movers``,
    the slots ``[n - k, n)`` not picked first (as many as there are picked slots below ``n - k``;
    the pairs after those move freed rows between freed slots, which is harmless)."""

    n: int
    pick: torch.Tensor
    holes: torch.Tensor
    movers: torch.Tensor


def draws(
    capacity: int,
    rows: int,
    k: int,
    generator: torch.Generator,
    device: torch.device,
    max_keys: int = 1 << 23,
) -> Iterator[Draw]:
    """The draws of an epoch of ``rows`` rows through a ring of ``capacity``, ``k`` a step.

    The ring holds ``n_s`` rows (:func:`resident`) at step ``s`` whatever the data, so the draws
    are computed ahead, for many steps in a few batched
    operations on the device (random keys, the ``k`` smallest among the first ``n_s`` slots:
    uniform without replacement), ``max_keys`` keys at a time (32 MiB of float32)."""
    if not 0 < k <= capacity:
        raise ValueError(f"a ring of {capacity} rows cannot serve batches of {k}")
    steps = rows // k
    s = 0
    while s < steps:
        n0 = min(capacity, rows - s * k)
        count = max(1, min(steps - s, max_keys // n0))
        # (S, 1): n_s of these steps, made on the device (a tensor from a list would be copied
        # from pageable memory, which waits for the GPU)
        n = resident(s + torch.arange(count, device=device), rows, k, capacity).view(-1, 1)
        slots = torch.arange(n0, device=device).view(1, -1)
        keys = torch.rand((count, n0), generator=generator, device=device)
        keys.masked_fill_(slots >= n, 2.0)  # (S, n0): slots past n_s are never picked
        pick = keys.topk(k, dim=1, largest=False, sorted=True).indices  # (S, k)
        taken = torch.zeros((count, n0), dtype=torch.uint8, device=device)
        taken.scatter_(1, pick, 1)
        tail = n - k + torch.arange(k, device=device).view(1, -1)  # (S, k): slots [n - k, n)
        movers = torch.argsort(taken.gather(1, tail), dim=1, stable=True) + (n - k)
        holes = torch.sort(pick, dim=1).values
        for i in range(count):
            yield Draw(resident(s + i, rows, k, capacity), pick[i], holes[i], movers[i])
        s += count


def ring_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """The draws of ``rank``'s ring in ``epoch``: one seeded stream per (seed, epoch, rank)."""
    key = np.random.SeedSequence([seed, epoch, rank, _RING_SALT]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(key) & ((1 << 63) - 1))


def serve(
    ring: Ring,
    blocks: Iterable[torch.Tensor],
    steps: int,
    per_step: int,
    generator: torch.Generator,
) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches of ``per_step`` rows through ``ring`` from ``blocks`` (an epoch's rows in
    order, packed by ``ring.layout``). Before each draw the ring is filled to the draw's ``n``
    (:func:`resident`)."""
    ring.clear()
    it = iter(blocks)
    block: torch.Tensor | None = None
    at = taken = 0
    for step in draws(ring.capacity, steps * per_step, per_step, generator, ring.device):
        while ring.n < step.n:
            if block is None or at == len(block):
                block, at = next(it, None), 0
                if block is None:
                    break
            m = ring.put(block, at, most=step.n - ring.n)
            at, taken = at + m, taken + m
        if ring.n < step.n:
            return  # the input ran out: Batches names the step it stopped at
        if taken == steps * per_step and block is not None and at == len(block):
            # Every row is in: reach the input's end now, not after the last step, so that
            # what follows it (RingFeed's read-ahead of the next epoch) starts while this one trains.
            block, at = next(it, None), 0
        yield ring.draw(step)


class BlockReader(ReadAhead):
    """Iterates ``blocks`` on a background thread into a queue holding at most ``max_rows`` rows
    (plus the block being put); iterating the reader hands them over in order. A block is numpy
    columns, packed (and pinned) here, or a tensor its source packed already
    (:class:`lepton_ray.train.ring_reader.RemoteBlocks`).

    :meth:`close` stops the thread after its current block and closes the source iterator (a Ray
    Data iterator then shuts its execution down)."""

    def __init__(
        self,
        blocks: Iterable[dict[str, Any]],
        layout: RowLayout,
        max_rows: int,
        pin: bool = False,
    ):
        self.layout, self.pin = layout, pin
        super().__init__(blocks, max_rows, size=len, prepare=self._pack, name="ring-block-reader")

    def _pack(self, raw: Any) -> torch.Tensor:
        if isinstance(raw, torch.Tensor):  # packed (and pinned) by its source already
            return raw
        # packed (and pinned) here, off the training thread
        return self.layout.pack(raw, pin=self.pin)

    @property
    def queued_rows(self) -> int:
        return int(self.queued)

    @property
    def times(self) -> Any:
        """The source's record of its read (:class:`~lepton_ray.train.read_times.ReadTimes`),
        where it keeps one; else None."""
        return getattr(self._source, "times", None)

    @property
    def peak_rows(self) -> int:
        return int(self.peak)
