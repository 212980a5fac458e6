"""Which rows each worker trains in an epoch: the epoch plan. Pure functions over id arrays.

Every row has a stable id. An epoch is ``S = remaining_rows // B`` optimizer steps of the global
batch ``B`` (``remaining_rows`` is the whole set, or on a resume what the interrupted epoch had not
consumed yet). Worker ``r`` of ``W`` takes ``b_r`` rows per step (``batching.worker_batch``: the
``b_r`` sum to ``B`` and differ by at most one), so it trains exactly ``S * b_r`` rows of the
epoch. The plan hands it exactly those: every row at most once per epoch, the same ``S`` on every
worker (DDP's collectives need it) and for every ``W`` (the LR schedule is planned on it), and only
the ``remaining_rows % B`` rows of the tail left out, a different tail every epoch.

Worked example: 4,000 rows, ``B = 100``, ``W = 3``: ``b = 34, 33, 33``, ``S = 40`` on any ``W``;
worker 0 trains 1,360 rows, workers 1 and 2 trains 1,320 each: 4,000 rows, each once. (An equal
split of the rows, 1,333 each, gives worker 0 only 39 full batches of 34: 39 steps and 133 rows
never trained; with 7 workers, 38 steps.)

Two orders (``DataConfig.shuffle``):

- ``shuffled``: one permutation of the remaining ids from ``(seed, epoch)``, cut into ``S`` global
  batches; worker ``r`` takes its slice of each (the device cache's order, and the streamed order
  of datasets small enough to shuffle whole). A global batch then holds the same rows whatever
  ``W`` is.
- ``sequential``: the shards in an order shuffled per epoch (or kept, for ``none``), their rows one
  after the other, cut into one contiguous piece of ``S * b_r`` rows per worker: each worker opens
  only the shards its piece covers (at most two of them shared with a neighbour), so a dataset far
  larger than memory streams once per epoch, with a bounded shuffle buffer in each worker.

On a resume (any ``W``) the consumed ids are left out and the same rules apply to the rest, so each
remaining sample is trained exactly once and what the restored weights had not seen (the steps after
the checkpoint) is trained again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lepton_ray.train import batching

_SHUFFLE_SALT, _SHARD_SALT = 0xCAC4E, 0x5EED


@dataclass(frozen=True)
class EpochPlan:
    """One worker's share of an epoch: ``steps`` steps of ``per_step`` rows each, ``ids`` in the
    order the plan made them (``steps * per_step`` of them), and ``shards``, the indices of the
    shards that hold them (in the order to read them)."""

    steps: int
    per_step: int
    ids: np.ndarray
    shards: tuple[int, ...]

    def step_ids(self, step: int) -> np.ndarray:
        return self.ids[step * self.per_step : (step + 1) * self.per_step]


def _steps(remaining: int, global_batch: int) -> int:
    return remaining // global_batch


def _offset(global_batch: int, world: int, rank: int) -> int:
    """Where rank ``rank``'s slice of a global batch starts (ranks before it take theirs first)."""
    return sum(batching.worker_batch(global_batch, world, r) for r in range(rank))


def _remaining(ids: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    if exclude is not None and len(exclude):
        ids = ids[~np.isin(ids, np.asarray(exclude, np.int64))]
    return ids


def shuffled_plan(
    shard_ids: Sequence[np.ndarray],
    *,
    seed: int,
    epoch: int,
    global_batch: int,
    world: int,
    rank: int,
    exclude: np.ndarray | None = None,
) -> EpochPlan:
    """``rank``'s slice of every global batch of the epoch's permutation (see the module docstring).

    The permutation is of the remaining ids sorted, so it depends on which rows there are, never on
    the order they were stored or delivered in."""
    all_ids = np.sort(
        _remaining(np.concatenate(list(shard_ids) or [np.zeros(0, np.int64)]), exclude)
    )
    order = all_ids[np.random.default_rng([seed, epoch, _SHUFFLE_SALT]).permutation(len(all_ids))]
    steps = _steps(len(order), global_batch)
    per_step = batching.worker_batch(global_batch, world, rank)
    start = _offset(global_batch, world, rank)
    grid = order[: steps * global_batch].reshape(steps, global_batch)  # (S, B): the global batches
    mine = np.ascontiguousarray(grid[:, start : start + per_step]).reshape(-1)
    return EpochPlan(steps, per_step, mine, _shards_holding(shard_ids, mine))


def sequential_plan(
    shard_ids: Sequence[np.ndarray],
    *,
    seed: int,
    epoch: int,
    global_batch: int,
    world: int,
    rank: int,
    shuffle_shards: bool = True,
    exclude: np.ndarray | None = None,
) -> EpochPlan:
    """``rank``'s contiguous piece of the epoch's shard sequence (see the module docstring)."""
    order = (
        np.random.default_rng([seed, epoch, _SHARD_SALT]).permutation(len(shard_ids))
        if shuffle_shards
        else np.arange(len(shard_ids))
    )
    kept = [_remaining(shard_ids[s], exclude) for s in order]
    stream = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    shard_of = np.repeat(order, [len(k) for k in kept])  # which shard each stream row is in
    steps = _steps(len(stream), global_batch)
    per_step = batching.worker_batch(global_batch, world, rank)
    start = steps * _offset(global_batch, world, rank)
    piece = slice(start, start + steps * per_step)
    shards = tuple(dict.fromkeys(int(s) for s in shard_of[piece]))  # in stream order, once each
    return EpochPlan(steps, per_step, stream[piece], shards)


def _shards_holding(shard_ids: Sequence[np.ndarray], ids: np.ndarray) -> tuple[int, ...]:
    """Indices of the shards that hold any of ``ids``, in manifest order."""
    wanted = np.asarray(ids, np.int64)
    return tuple(i for i, s in enumerate(shard_ids) if np.isin(s, wanted).any())
