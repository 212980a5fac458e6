"""The streaming ring's stream order on CUDA (skipped without a GPU; run on the GPU machine with
``pytest tests/test_ring_cuda.py``).

On CUDA the ring copies blocks in on a side stream and draws on the compute stream: a copy must not
overwrite slots a queued draw has still to read, and a draw must not read slots before their copy
lands. The check keeps the compute stream busy between draws and never waits for the GPU inside an
epoch, so the host queues copies far ahead of the draws; every row carries pixels computed from its
id, so a row overwritten or read early shows. A control ring whose copies and draws wait for nothing
must fail the same check, or the check proves nothing.
"""

from __future__ import annotations

import pytest
import torch

from lepton_ray.train.ring import Ring, ring_generator, serve
from lepton_ray.train.rows import RowLayout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPE = (3, 32, 32)
ROWS, K, CAPACITY, BLOCK = 65_536, 512, 16_384, 5_461  # blocks that do not divide the batches


def pixels(ids: torch.Tensor) -> torch.Tensor:
    """(n, 3072) uint8 determined by each id, on the ids' device."""
    return ((ids.view(-1, 1) * 7 + torch.arange(3072, device=ids.device).view(1, -1)) % 251).to(
        torch.uint8
    )


def pinned_blocks(layout: RowLayout) -> list[torch.Tensor]:
    blocks = []
    for start in range(0, ROWS, BLOCK):
        ids = torch.arange(start, min(ROWS, start + BLOCK))
        rows = torch.zeros((len(ids), layout.width), dtype=torch.uint8).pin_memory()
        rows[:, : layout.pixels] = pixels(ids)
        meta = rows[:, layout.meta :].view(torch.int64)
        meta[:, 0], meta[:, 1] = ids % 10, ids
        blocks.append(rows)
    return blocks


class Unordered(Ring):
    """The control: copies on the side stream, draws on the compute stream, and no waits."""

    def put(self, block: torch.Tensor, start: int = 0, most: int | None = None) -> int:
        m = min(self.space, len(block) - start, self.space if most is None else most)
        if m <= 0:
            return 0
        with torch.cuda.stream(self._copies):
            self.rows[self.n : self.n + m].copy_(block[start : start + m], non_blocking=True)
        self.n += m
        return m

    def draw(self, step):  # type: ignore[no-untyped-def]
        batch = self.layout.unpack(self.rows.index_select(0, step.pick))
        self.rows.index_copy_(0, step.holes, self.rows.index_select(0, step.movers))
        self.n -= len(step.pick)
        return batch


def served(ring: Ring, epochs: int) -> tuple[int, bool]:
    """(rows whose pixels do not match their id, whether each epoch served every row once)."""
    device = ring.device
    blocks = pinned_blocks(ring.layout)
    load = torch.randn(4096, 4096, device=device)
    bad = torch.zeros((), dtype=torch.int64, device=device)
    once = True
    for epoch in range(epochs):
        ids = []
        for batch in serve(ring, iter(blocks), ROWS // K, K, ring_generator(0, epoch, 0, device)):
            for _ in range(3):  # the compute stream stays busy, the host runs ahead
                load = (load @ load).tanh_()
            got = batch["image"].permute(0, 2, 3, 1).reshape(len(batch["id"]), -1)
            bad += (got != pixels(batch["id"])).any(dim=1).sum()
            ids.append(batch["id"])
        order = torch.cat(ids).sort().values.cpu()
        once &= torch.equal(order, torch.arange(ROWS // K * K))
    return int(bad), once


def test_copies_and_draws_on_two_streams_serve_every_row_whole_and_once():
    assert served(Ring(CAPACITY, SHAPE, torch.device("cuda")), epochs=3) == (0, True)


def test_the_check_fails_a_ring_whose_streams_do_not_wait_for_each_other():
    bad, once = served(Unordered(CAPACITY, SHAPE, torch.device("cuda")), epochs=1)
    assert bad > 0 or not once
