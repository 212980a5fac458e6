"""The batch arithmetic that keeps one optimizer step identical whatever the world size."""

from __future__ import annotations

import pytest
import torch

from lepton_ray.train.batching import (
    loss_scale,
    micro_batches,
    nominal_steps_per_epoch,
    steps_per_epoch,
    worker_batch,
)


@pytest.mark.parametrize(
    ("global_batch", "world"),
    [(b, w) for b in (1, 2, 7, 10, 99, 100, 101, 256) for w in (1, 2, 3, 4, 7) if b >= w],
)
def test_worker_batch_splits_evenly(global_batch, world):
    sizes = [worker_batch(global_batch, world, r) for r in range(world)]
    assert sum(sizes) == global_batch
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the remainder goes to the first ranks
    assert min(sizes) >= 1


@pytest.mark.parametrize("rank", [-1, 3, 4])
def test_worker_batch_rejects_rank_out_of_range(rank):
    with pytest.raises(ValueError, match="rank"):
        worker_batch(12, 3, rank)


def test_worker_batch_rejects_batch_smaller_than_world():
    with pytest.raises(ValueError, match="smaller than the world size"):
        worker_batch(3, 4, 0)


@pytest.mark.parametrize("batch", [1, 5, 16, 17, 33, 100])
@pytest.mark.parametrize("max_micro", [None, 1, 4, 16, 32, 1000])
def test_micro_batches(batch, max_micro):
    parts = micro_batches(batch, max_micro)
    assert sum(parts) == batch
    assert all(p >= 1 for p in parts)
    assert max(parts) - min(parts) <= 1
    if max_micro is None or batch <= max_micro:
        assert parts == [batch]
    else:
        assert all(p <= max_micro for p in parts)
        assert len(parts) == -(-batch // max_micro)  # as few micro-batches as possible


def test_loss_scale():
    assert loss_scale(100, 1, 100) == 1.0
    assert loss_scale(100, 4, 25) == 1.0
    assert loss_scale(10, 3, 4) == pytest.approx(1.2)
    assert loss_scale(10, 3, 3) == pytest.approx(0.9)
    # The scales of all workers average to exactly one.
    for b, w in [(10, 3), (101, 4), (7, 7), (100, 6)]:
        scales = [loss_scale(b, w, worker_batch(b, w, r)) for r in range(w)]
        assert sum(scales) / w == pytest.approx(1.0)


def test_steps_per_epoch():
    assert steps_per_epoch(1000, 100, 1) == 10
    assert steps_per_epoch(1000, 100, 4) == 10  # 250 rows per worker, 25 per step
    # 10 / 3 -> ranks take 4, 3, 3; 333 rows each; the largest share sets the count.
    assert steps_per_epoch(1000, 10, 3) == 333 // 4
    assert steps_per_epoch(50, 100, 1) == 0
    with pytest.raises(ValueError):
        steps_per_epoch(1000, 2, 3)
    assert nominal_steps_per_epoch(1000, 100) == 10
    assert nominal_steps_per_epoch(50, 100) == 1


# --- the arithmetic, checked against autograd ------------------------------------------------
def _setup(global_batch: int):
    g = torch.Generator().manual_seed(1234)
    model = torch.nn.Linear(5, 3).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(global_batch, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (global_batch,), generator=g)
    return model, x, y


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _reference(model, x, y) -> list[torch.Tensor]:
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return _grads(model)


def _simulated_ddp(model, x, y, world: int, max_micro: int | None) -> list[torch.Tensor]:
    """Every worker backprops its scaled (micro-batched) loss; DDP then averages over ``world``."""
    global_batch = len(y)
    per_worker = []
    start = 0
    for rank in range(world):
        b = worker_batch(global_batch, world, rank)
        xs, ys = x[start : start + b], y[start : start + b]
        start += b
        scale = loss_scale(global_batch, world, b)
        model.zero_grad()
        offset = 0
        for m in micro_batches(b, max_micro):
            loss = torch.nn.functional.cross_entropy(
                model(xs[offset : offset + m]), ys[offset : offset + m]
            )
            offset += m
            (loss * (m / b) * scale).backward()
        assert offset == b
        per_worker.append(_grads(model))
    assert start == global_batch
    return [torch.stack(gs).sum(0) / world for gs in zip(*per_worker, strict=True)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("global_batch", [13, 23])  # divisible by none of 2, 3, 4
def test_ddp_average_equals_global_batch_gradient(world, global_batch):
    model, x, y = _setup(global_batch)
    expected = _reference(model, x, y)
    got = _simulated_ddp(model, x, y, world, max_micro=None)
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("max_micro", [1, 2, 3, 5])
def test_ddp_average_with_micro_batches_equals_global_batch_gradient(world, max_micro):
    global_batch = 23
    model, x, y = _setup(global_batch)
    expected = _reference(model, x, y)
    got = _simulated_ddp(model, x, y, world, max_micro=max_micro)
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e, g, rtol=1e-10, atol=1e-12)


def test_unscaled_losses_would_be_wrong():
    """Sanity check of the test itself: without the scale, uneven shares give another gradient."""
    global_batch, world = 13, 3
    model, x, y = _setup(global_batch)
    expected = _reference(model, x, y)
    per_worker, start = [], 0
    for rank in range(world):
        b = worker_batch(global_batch, world, rank)
        model.zero_grad()
        torch.nn.functional.cross_entropy(
            model(x[start : start + b]), y[start : start + b]
        ).backward()
        start += b
        per_worker.append(_grads(model))
    got = [torch.stack(gs).mean(0) for gs in zip(*per_worker, strict=True)]
    assert not all(
        torch.allclose(e, g, rtol=1e-10, atol=1e-12) for e, g in zip(expected, got, strict=True)
    )
