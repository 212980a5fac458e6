"""The arithmetic that keeps the optimisation fixed when the world size changes.

The user gives a global batch ``B``. With ``W`` workers, worker ``i`` takes ``b_i`` samples per
optimizer step (the ``b_i`` sum to ``B`` and differ by at most one), split into micro-batches of
at most ``max_micro`` rows (gradient accumulation, ``no_sync`` on all but the last). DDP averages
gradients over ``W``, so worker ``i`` scales its mean loss by ``W * b_i / B``: the step then equals
one step on the full global batch, whatever ``W`` is. All functions here are pure.
"""

from __future__ import annotations

import math


def worker_batch(global_batch: int, world_size: int, rank: int) -> int:
    """Samples per optimizer step for ``rank``: an even split of ``global_batch``, remainder first."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if global_batch < world_size:
        raise ValueError(f"global batch {global_batch} is smaller than the world size {world_size}")
    base, extra = divmod(global_batch, world_size)
    return base + (1 if rank < extra else 0)


def micro_batches(batch: int, max_micro: int | None) -> list[int]:
    """Split one worker's per-step batch into near-equal micro-batches of at most ``max_micro``."""
    if max_micro is None or batch <= max_micro:
        return [batch]
    k = math.ceil(batch / max_micro)
    base, extra = divmod(batch, k)
    return [base + (1 if j < extra else 0) for j in range(k)]


def rank_micro_batches(
    global_batch: int, world_size: int, rank: int, max_micro: int | None, lockstep: bool = False
) -> list[int]:
    """``rank``'s micro-batches of one step. ``lockstep`` (FSDP, whose every forward and backward
    is a collective): every rank runs as many as the largest share needs, its rows split near
    equal among them: B = 7, W = 3, max_micro = 2: shares 3, 2, 2 -> [2, 1], [1, 1], [1, 1]
    (without lockstep [2, 1], [2], [2], which DDP's no_sync allows)."""
    local = worker_batch(global_batch, world_size, rank)
    if not lockstep:
        return micro_batches(local, max_micro)
    k = len(micro_batches(worker_batch(global_batch, world_size, 0), max_micro))
    if local < k:
        raise ValueError(
            f"{local} rows cannot make the {k} micro-batches every rank must run in lockstep: "
            f"raise max_micro_batch or make the global batch {global_batch} a multiple of "
            f"{world_size} workers"
        )
    base, extra = divmod(local, k)
    return [base + (1 if j < extra else 0) for j in range(k)]


def loss_scale(global_batch: int, world_size: int, local_batch: int) -> float:
    """Factor on worker-local *mean* loss so that DDP's gradient average is the global-batch mean."""
    return world_size * local_batch / global_batch


def steps_per_epoch(num_rows: int, global_batch: int, world_size: int) -> int:
    """Optimizer steps every worker takes in one epoch of a user's Ray Dataset, which Ray Train
    splits equally (``num_rows // world_size`` rows each; a prepared dataset is planned exactly
    instead, see :mod:`lepton_ray.train.sampling`).

    The worker with the largest share of the batch must not run out, so the count is set by it:
    e.g. 4,000 rows, B = 100 on 3 workers: 1,333 rows each, 34 per step for worker 0: 39 steps,
    not 40. Every worker takes the same number of steps, which DDP's collectives require.
    """
    rows = num_rows // world_size
    return rows // worker_batch(global_batch, world_size, 0)


def nominal_steps_per_epoch(num_rows: int, global_batch: int) -> int:
    """Steps per epoch of a single worker: the length the LR schedule is planned on (W-independent)."""
    return max(1, num_rows // global_batch)
