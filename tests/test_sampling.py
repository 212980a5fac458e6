"""Sample accounting for sample-exact resume: pure tests, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from lepton_ray.train.sampling import parse_fault, remainder_split


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_remainder_is_the_complement_split_evenly(world):
    all_ids = np.arange(1000) * 7  # ids need not be contiguous
    consumed = np.random.default_rng(1).choice(all_ids, size=370, replace=False)
    parts = remainder_split(all_ids, consumed, seed=3, epoch=2, world=world)
    assert len(parts) == world and len({len(p) for p in parts}) == 1
    union = np.concatenate(parts)
    assert len(np.unique(union)) == len(union)  # each remaining sample once
    assert not np.intersect1d(union, consumed).size  # nothing consumed is trained again
    assert len(all_ids) - len(consumed) - len(union) < world  # only the equal-split tail is dropped


def test_remainder_is_reproducible_and_depends_on_epoch_and_seed():
    ids, consumed = np.arange(100), np.arange(10)
    a = remainder_split(ids, consumed, seed=0, epoch=1, world=2)
    assert all(
        np.array_equal(x, y)
        for x, y in zip(a, remainder_split(ids, consumed, seed=0, epoch=1, world=2), strict=True)
    )
    assert not np.array_equal(a[0], remainder_split(ids, consumed, seed=0, epoch=2, world=2)[0])
    assert not np.array_equal(a[0], remainder_split(ids, consumed, seed=1, epoch=1, world=2)[0])


def test_nothing_consumed_means_the_whole_epoch():
    parts = remainder_split(np.arange(10), np.zeros(0, np.int64), seed=0, epoch=0, world=2)
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))


def test_parse_fault():
    assert parse_fault("2:13:1") == (2, 13, 1)
    assert parse_fault(None) is None and parse_fault("") is None
    with pytest.raises(ValueError, match="EPOCH:STEP:RANK"):
        parse_fault("2-13")
