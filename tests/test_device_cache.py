"""The device cache's epoch plan: every sample once per epoch, the same global batches whatever the
number of workers, a resumed epoch that continues without the consumed samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lepton_ray.config import DataConfig
from lepton_ray.errors import ConfigError
from lepton_ray.train.device_cache import DeviceCache
from lepton_ray.train.feed import CachedFeed, Plan, id_range

CPU = torch.device("cpu")
ROWS, BATCH = 103, 10  # 10 full global batches and a 3-row tail


def make_cache(
    rows: int = ROWS, blocks: int = 4, with_ids: bool = True, stride: int = 1
) -> DeviceCache:
    ids = np.random.default_rng(0).permutation(
        np.arange(1000, 1000 + rows * stride, stride)
    )  # delivered out of order; stride > 1: ids with gaps (a filtered set)
    parts = np.array_split(np.arange(rows), blocks)
    batches = []
    for p in parts:
        b = {
            "image": torch.from_numpy((ids[p] % 251).astype(np.uint8))
            .view(-1, 1, 1, 1)
            .expand(-1, 1, 2, 2)
            .clone(),
            "label": torch.from_numpy(ids[p] % 10),
        }
        if with_ids:
            b["id"] = torch.from_numpy(ids[p])
        batches.append(b)
    return DeviceCache(batches, CPU)


def plan(cache: DeviceCache, world: int, epoch: int = 0, exclude=None) -> list[list[int]]:
    """The global batches of an epoch, assembled from every rank's slices, as lists of ids."""
    per_rank = []
    for rank in range(world):
        batches = CachedFeed(cache, Plan(3, BATCH, world, rank, "shuffled")).epoch(epoch, exclude)
        got = list(batches)
        assert len(got) == batches.steps
        for b in got:  # rows stay together: image, label and id of one sample
            assert torch.equal(b["label"], b["id"] % 10) and torch.equal(
                b["image"][:, 0, 0, 0], (b["id"] % 251).to(torch.uint8)
            )
        per_rank.append([b["id"].tolist() for b in got])
    return [sum((per_rank[r][s] for r in range(world)), []) for s in range(len(per_rank[0]))]


def test_every_sample_at_most_once_per_epoch_and_a_new_order_each_epoch():
    cache = make_cache()
    e0, e1 = plan(cache, 1, epoch=0), plan(cache, 1, epoch=1)
    flat = [i for b in e0 for i in b]
    assert len(e0) == ROWS // BATCH and len(flat) == len(set(flat)) == (ROWS // BATCH) * BATCH
    assert set(flat) <= set(range(1000, 1000 + ROWS))
    assert e0 != e1
    assert plan(make_cache(blocks=7), 1, epoch=0) == e0  # whatever order the blocks arrived in


@pytest.mark.parametrize("world", [2, 3, 4])
def test_global_batches_do_not_depend_on_the_world_size(world):
    cache = make_cache()
    assert plan(cache, world) == plan(cache, 1)


def test_a_resumed_epoch_continues_without_the_consumed_samples():
    cache = make_cache()
    full = plan(cache, 2)
    consumed = np.array([i for b in full[:4] for i in b])
    rest = plan(cache, 3, exclude=consumed)
    rest_ids = [i for b in rest for i in b]
    assert not set(rest_ids) & set(consumed.tolist())
    assert len(rest_ids) == len(set(rest_ids))
    assert (
        ROWS - len(consumed) - len(rest_ids) < BATCH
    )  # only a tail smaller than one batch is left


def test_rows_without_ids_are_numbered():
    cache = make_cache(with_ids=False)
    assert cache.ids.tolist() == list(range(ROWS)) and cache.nbytes == ROWS * 4


def test_cache_resolution():
    small, big = 10 << 20, 10 << 30
    assert DataConfig().caches_on_device(use_gpu=True, dataset_bytes=small)
    assert not DataConfig().caches_on_device(use_gpu=True, dataset_bytes=big)
    assert not DataConfig().caches_on_device(use_gpu=False, dataset_bytes=small)
    assert not DataConfig(augment_on="cpu").caches_on_device(use_gpu=True, dataset_bytes=small)
    assert DataConfig(cache="device").caches_on_device(use_gpu=False, dataset_bytes=big)
    assert not DataConfig(cache="off").caches_on_device(use_gpu=True, dataset_bytes=small)
    assert DataConfig(augment_on="cpu").augments_on_device(use_gpu=False, cached=True)
    with pytest.raises(ConfigError, match="DataConfig.cache: 'device' augments on the device"):
        DataConfig(cache="device", augment_on="cpu")
    with pytest.raises(
        ConfigError, match="DataConfig.cache: expected one of auto, off, device, got 'gpu'"
    ):
        DataConfig(cache="gpu")


def test_validation_from_the_cache_equals_validation_from_batches():
    import contextlib

    from lepton_ray.models import build_model
    from lepton_ray.train.step import Pixels, evaluate

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (300, 1, 28, 28), dtype=np.uint8))
    labels, ids = torch.from_numpy(rng.integers(0, 10, 300)), torch.arange(300)
    batches = [
        {"image": images[i : i + 128], "label": labels[i : i + 128], "id": ids[i : i + 128]}
        for i in range(0, 300, 128)
    ]
    model = build_model("cnn", in_channels=1, num_classes=10, width=4)
    pixels = Pixels([0.13], [0.31], CPU, torch.contiguous_format)
    cache = DeviceCache(reversed(batches), CPU)
    streamed = evaluate(model, batches, pixels, contextlib.nullcontext())
    cached = evaluate(model, cache.chunks(64), pixels, contextlib.nullcontext())
    assert cached == pytest.approx(streamed, rel=1e-5)


@pytest.mark.parametrize("stride", [1, 3])
def test_each_epoch_serves_its_planned_ids_in_order_and_the_next_plan_is_ready_early(stride):
    """Rows are found by subtraction when the ids are one range, by search when they have gaps;
    either way an epoch hands out exactly its plan's ids in order, and the next epoch, planned in
    a thread while this one runs, is the plan a fresh feed computes."""
    cache = make_cache(stride=stride)
    feed = CachedFeed(cache, Plan(3, BATCH, 1, 0, "shuffled"))
    assert (feed.first is not None) == (stride == 1)
    first, last = int(cache.ids[0]), int(cache.ids[-1])
    assert feed.id_range == (first, last - first + 1)  # what an Augmenter may hash once an epoch
    assert id_range([np.array([9, 7]), np.array([], np.int64), np.array([12])]) == (7, 6)
    assert id_range([np.array([], np.int64)]) is None
    for epoch in range(3):
        got = torch.cat([b["id"] for b in feed.epoch(epoch)]).tolist()
        assert got == feed.plan.of(feed.ids, epoch, None).ids.tolist()
        assert feed.next is not None and feed.next[0] == epoch + 1
        fresh = CachedFeed(cache, Plan(3, BATCH, 1, 0, "shuffled"))
        assert torch.cat([b["id"] for b in fresh.epoch(epoch)]).tolist() == got
        fresh.close()
    consumed = np.array(got[:BATCH])  # a resumed epoch is planned without its consumed ids
    resumed = torch.cat([b["id"] for b in feed.epoch(2, exclude=consumed)]).tolist()
    assert not set(resumed) & set(consumed.tolist())
    feed.close()
