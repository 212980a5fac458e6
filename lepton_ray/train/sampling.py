"""Sample accounting for sample-exact resume. Pure functions over id arrays.

Every row has a stable id. At each checkpoint the ids that all workers consumed since the epoch
began go into the checkpoint. On resume (with any world size) the rest of the epoch is the
complement, shuffled from the seed and split evenly over the new workers, so each remaining sample
is trained exactly once; what the restored weights had not seen (the steps after the checkpoint)
is trained again.
"""

from __future__ import annotations

import numpy as np


def remainder_split(
    all_ids: np.ndarray, consumed: np.ndarray, *, seed: int, epoch: int, world: int
) -> list[np.ndarray]:
    """The ids not yet consumed this epoch, shuffled and split into ``world`` equal parts.

    Equal parts keep every worker on the same number of steps (DDP's collectives need it); the
    fewer than ``world`` ids left over by the equal split are dropped, like the tail of any epoch.
    """
    remaining = np.setdiff1d(np.asarray(all_ids, np.int64), np.asarray(consumed, np.int64))
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    remaining = rng.permutation(remaining)
    per = len(remaining) // world
    return [np.sort(remaining[r * per : (r + 1) * per]) for r in range(world)]


def parse_fault(spec: str | None) -> tuple[int, int, int] | None:
    """``"EPOCH:STEP:RANK"`` (1-based epoch and step within it) -> a tuple, for fault injection."""
    if not spec:
        return None
    try:
        epoch, step, rank = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"fault_injection must look like EPOCH:STEP:RANK, got {spec!r}") from None
    return epoch, step, rank
