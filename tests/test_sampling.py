"""The epoch plan: which rows each worker trains. Pure tests, no Ray.

Worker counts that do not divide the global batch (3 and 7 of 100) are the cases that broke: an
equal split of the rows gave 39 steps on 3 workers and 38 on 7 instead of 40, and rows never trained.
"""

from __future__ import annotations

import numpy as np
import pytest

from lepton_ray.config import parse_fault
from lepton_ray.train.batching import nominal_steps_per_epoch, worker_batch
from lepton_ray.train.sampling import sequential_plan, shuffled_plan

PLANS = {
    "shuffled": shuffled_plan,
    "sequential": sequential_plan,
    "unshuffled": lambda *a, **k: sequential_plan(*a, shuffle_shards=False, **k),
}


def shards_of(rows: int, per_shard: int, first_id: int = 1000, stride: int = 7) -> list[np.ndarray]:
    """Ids need not be contiguous, nor sorted within a shard."""
    ids = first_id + stride * np.random.default_rng(5).permutation(rows)
    return [ids[i : i + per_shard] for i in range(0, rows, per_shard)]


def plan_all(kind: str, shards, world: int, batch: int, epoch: int = 0, exclude=None):
    return [
        PLANS[kind](
            shards, seed=3, epoch=epoch, global_batch=batch, world=world, rank=r, exclude=exclude
        )
        for r in range(world)
    ]


@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 7, 8])
def test_every_row_once_and_the_same_steps_for_every_world_size(kind, world):
    shards = shards_of(4000, 333)  # 13 shards, the last one short
    plans = plan_all(kind, shards, world, batch=100)
    assert {p.steps for p in plans} == {40} == {nominal_steps_per_epoch(4000, 100)}
    for r, p in enumerate(plans):
        assert p.per_step == worker_batch(100, world, r) and len(p.ids) == 40 * p.per_step
    trained = np.concatenate([p.ids for p in plans])
    assert len(trained) == 4000 and set(trained.tolist()) == set(np.concatenate(shards).tolist())


@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("world", [3, 7])
def test_a_tail_smaller_than_a_batch_is_all_that_is_left_out(kind, world):
    shards = shards_of(4037, 500)
    plans = plan_all(kind, shards, world, batch=100)
    trained = np.concatenate([p.ids for p in plans])
    assert {p.steps for p in plans} == {40}
    assert len(np.unique(trained)) == len(trained) == 4000  # 37 rows, less than a batch, left out


@pytest.mark.parametrize("world", [1, 3, 7])
def test_a_shuffled_global_batch_holds_the_same_rows_whatever_the_world_size(world):
    shards = shards_of(1000, 100)
    reference = plan_all("shuffled", shards, 1, batch=70)[0]
    plans = plan_all("shuffled", shards, world, batch=70)
    for s in range(reference.steps):
        batch = np.concatenate([p.step_ids(s) for p in plans])
        assert batch.tolist() == reference.step_ids(s).tolist()


@pytest.mark.parametrize("kind", ["shuffled", "sequential"])
def test_every_epoch_has_its_own_order_and_a_seed_gives_the_same_plan(kind):
    shards = shards_of(1000, 100)
    a, again, other = (plan_all(kind, shards, 2, batch=50, epoch=e)[0] for e in (1, 1, 2))
    assert np.array_equal(a.ids, again.ids)
    assert not np.array_equal(a.ids, other.ids)


def test_unshuffled_order_is_the_stored_order():
    shards = shards_of(300, 100)
    p = plan_all("unshuffled", shards, 1, batch=100, epoch=4)[0]
    assert p.ids.tolist() == np.concatenate(shards).tolist()


@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 7), (7, 2), (4, 4)])
def test_a_resume_at_another_world_size_trains_exactly_the_rest(kind, before, after):
    shards = shards_of(4000, 333)
    first = plan_all(kind, shards, before, batch=100, epoch=2)
    done = 17  # steps taken before the interruption (the checkpoint)
    consumed = np.concatenate([p.ids[: done * p.per_step] for p in first])
    rest = plan_all(kind, shards, after, batch=100, epoch=2, exclude=consumed)
    assert {p.steps for p in rest} == {40 - done}  # the epoch still ends at step 40
    resumed = np.concatenate([p.ids for p in rest])
    assert len(np.unique(resumed)) == len(resumed) == 4000 - len(consumed)
    assert not np.intersect1d(resumed, consumed).size


def test_a_sequential_worker_opens_only_the_shards_its_piece_covers():
    shards = shards_of(4000, 250)  # 16 shards
    plans = plan_all("sequential", shards, 4, batch=100)
    for p in plans:
        held = set(np.concatenate([shards[s] for s in p.shards]).tolist())
        assert set(p.ids.tolist()) <= held
        assert len(p.shards) <= 5  # its quarter of 16 shards, plus boundary shards
    assert sum(len(p.shards) for p in plans) <= 16 + 3  # a boundary shard is read twice at most


def test_shuffled_plan_names_only_the_shards_holding_its_rows():
    shards = shards_of(1000, 100)
    p = plan_all("shuffled", shards, 2, batch=100)[0]
    held = set(np.concatenate([shards[s] for s in p.shards]).tolist())
    assert set(p.ids.tolist()) <= held


def test_parse_fault():
    assert parse_fault("2:13:1") == (2, 13, 1)
    assert parse_fault(None) is None and parse_fault("") is None
    with pytest.raises(ValueError, match="EPOCH:STEP:RANK"):
        parse_fault("2-13")
