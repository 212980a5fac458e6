"""The ring's reading process (lepton_ray.train.ring_reader) on the session's local Ray: an actor
reads a worker's piece of the epoch plan with Ray Data and hands it over packed, in plan order."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from lepton_ray.data import read_shard_ids, write_dataset
from lepton_ray.train.read_times import ReadTimes
from lepton_ray.train.ring import BlockReader, RowLayout
from lepton_ray.train.ring_reader import (
    TASK_BYTES,
    ReadSpec,
    RemoteBlocks,
    block_rows,
    read_cpus,
    read_task_bytes,
    start_reader,
)
from lepton_ray.train.sampling import sequential_plan

pytestmark = pytest.mark.ray

SHAPE = (1, 2, 3)  # (C, H, W) of the rows below, stored as (H, W, C)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    ids = 7 + 5 * np.arange(900)
    return write_dataset(
        hwc_pixels(ids),
        ids % 10,
        tmp_path_factory.mktemp("reader"),
        classes=[str(i) for i in range(10)],
        ids=ids,
        rows_per_shard=100,
    )


def hwc_pixels(ids: np.ndarray) -> np.ndarray:
    """(N, 2, 3, 1) images whose every pixel says its row and its place in the image."""
    place = np.arange(6, dtype=np.int64).reshape(1, 2, 3, 1)
    return ((ids.reshape(-1, 1, 1, 1) + 40 * place) % 251).astype(np.uint8)


def piece(info, rank: int, epoch: int, world: int = 2):
    """Worker ``rank``'s plan of ``epoch`` and the DatasetInfo of its shards, in plan order."""
    p = sequential_plan(
        read_shard_ids(info), seed=4, epoch=epoch, global_batch=60, world=world, rank=rank
    )
    shards = info.only(p.shards)
    return p, shards


def test_read_times_say_how_early_a_read_began_and_how_long_it_took():
    t = ReadTimes(requested=100.0)
    assert t.seconds(epoch_started=100.0) == {"read_ahead_s": 0.0}  # asked by the epoch itself
    t.first_block, t.done = 101.25, 104.5
    assert t.seconds(epoch_started=103.0) == {  # read ahead: asked 3 s before its epoch began
        "read_ahead_s": 3.0,
        "read_first_block_s": 1.25,
        "read_s": 4.5,
    }
    assert ReadTimes(requested=5.0).seconds(epoch_started=4.0)["read_ahead_s"] == 0.0


def test_blocks_arrive_packed_in_plan_order_and_whole(ray_session, prepared):
    layout = RowLayout(SHAPE)
    actor = start_reader()
    try:
        for read, (rank, epoch) in enumerate([(0, 0), (1, 0), (0, 1)], start=1):
            p, shards = piece(prepared, rank, epoch)
            spec = ReadSpec(SHAPE, shards, p.ids, epoch, 64, True, 1)
            source = RemoteBlocks(actor, read, spec, pin=False)
            reader = BlockReader(source, layout, 10_000)
            blocks = list(reader)
            assert all(b.dtype == torch.uint8 and b.shape[1] == layout.width for b in blocks)
            # the read's course, as the epoch's metrics report it
            t = reader.times
            assert t is source.times and (t.blocks, t.rows) == (len(blocks), len(p.ids))
            assert t.requested <= t.first_block <= t.done
            rows = layout.unpack(torch.cat(blocks))
            assert rows["id"].numpy().tolist() == p.ids.tolist()  # exactly the plan, in order
            want = torch.from_numpy(hwc_pixels(rows["id"].numpy())).permute(0, 3, 1, 2)
            assert torch.equal(rows["image"], want)  # every pixel in its place
            assert (rows["label"] == rows["id"] % 10).all()
    finally:
        import ray

        ray.kill(actor)


def test_tasks_of_several_shards_hand_their_rows_over_in_plan_order(ray_session, tmp_path):
    from types import SimpleNamespace

    from lepton_ray.data.dataset import as_read_tasks

    # The worked example: 1M 32x32x3 rows in 245 shards of 12 MiB, 5 shards a task.
    big = SimpleNamespace(shards=[{"rows": 4082}] * 245, shape=(32, 32, 3))
    assert as_read_tasks(big) == 49
    assert as_read_tasks(SimpleNamespace(shards=[{"rows": 10}] * 5, shape=(2, 3, 1))) == 5
    ids = 3 + 2 * np.arange(700)
    info = write_dataset(
        hwc_pixels(ids),
        ids % 10,
        tmp_path / "many",
        classes=[str(i) for i in range(10)],
        ids=ids,
        rows_per_shard=20,  # 35 shards, read by 8 tasks
    )
    layout = RowLayout(SHAPE)
    actor = start_reader()
    try:
        for read, (world, rank) in enumerate([(1, 0), (3, 2)], start=1):
            p, shards = piece(info, rank, epoch=1, world=world)
            assert as_read_tasks(shards) < len(shards.shards)  # tasks read several shards
            spec = ReadSpec(SHAPE, shards, p.ids, 1, 64, True, 2)
            source = RemoteBlocks(actor, read, spec, pin=False)
            blocks = list(BlockReader(source, layout, 10_000))
            rows = layout.unpack(torch.cat(blocks))
            assert rows["id"].numpy().tolist() == p.ids.tolist()  # exactly the plan, in order
            want = torch.from_numpy(hwc_pixels(rows["id"].numpy())).permute(0, 3, 1, 2)
            assert torch.equal(rows["image"], want)
            assert len(blocks) < len(shards.shards)  # a task's shards came as one block
    finally:
        import ray

        ray.kill(actor)


def test_closing_a_read_mid_way_unblocks_it_and_the_actor_reads_on(ray_session, prepared):
    layout = RowLayout(SHAPE)
    actor = start_reader()
    try:
        p, shards = piece(prepared, 0, 0, world=1)
        spec = ReadSpec(SHAPE, shards, p.ids, 0, 64, True, 1)
        reader = BlockReader(RemoteBlocks(actor, 1, spec, pin=False), layout, max_rows=64)
        first = next(iter(reader))  # the reader now waits for room; the actor has more ready
        assert layout.unpack(first)["id"].numpy().tolist() == p.ids[: len(first)].tolist()
        started = time.monotonic()
        reader.close(timeout=30)
        assert not reader.alive and time.monotonic() - started < 10
        assert reader.times.first_block is not None and reader.times.done is None  # cut short
        # a later read of the same actor starts from its own beginning
        p2, shards2 = piece(prepared, 0, 1, world=1)
        spec2 = ReadSpec(SHAPE, shards2, p2.ids, 1, 64, True, 1)
        got = torch.cat(list(BlockReader(RemoteBlocks(actor, 2, spec2, pin=False), layout, 10_000)))
        assert layout.unpack(got)["id"].numpy().tolist() == p2.ids.tolist()
    finally:
        import ray

        ray.kill(actor)


def test_a_read_error_reaches_the_training_side(ray_session, prepared):
    layout = RowLayout(SHAPE)
    p, shards = piece(prepared, 0, 0, world=1)
    gone = {**shards.shards[0], "path": "missing-shard.parquet"}  # inside the folder, not there
    broken = dataclasses.replace(shards, shards=(gone, *shards.shards[1:]))
    actor = start_reader()
    try:
        spec = ReadSpec(SHAPE, broken, p.ids, 0, 64, True, 1)
        with pytest.raises(Exception, match="missing-shard"):
            list(BlockReader(RemoteBlocks(actor, 1, spec, pin=False), layout, 10_000))
    finally:
        import ray

        ray.kill(actor)


def test_a_dead_reader_fails_the_read_instead_of_hanging(ray_session, prepared):
    import ray

    layout = RowLayout(SHAPE)
    actor = start_reader()
    p, shards = piece(prepared, 0, 0, world=1)
    ray.kill(actor)
    spec = ReadSpec(SHAPE, shards, p.ids, 0, 64, True, 1)
    with pytest.raises(ray.exceptions.RayActorError):
        list(BlockReader(RemoteBlocks(actor, 1, spec, pin=False), layout, 10_000))


def test_block_and_cpu_defaults(ray_session):
    import ray

    assert block_rows(3 * 32 * 32, 1024) == (16 << 20) // 3072  # 5,461: 16 MiB of 32x32x3
    assert block_rows(3 * 224 * 224, 1024) == 1024  # the preprocessing batch is bigger
    node_cpus = int(ray.cluster_resources()["CPU"])  # one node here
    assert read_cpus(1) == max(1, node_cpus // 2)
    assert read_cpus(64) == 1  # never none
    store = int(ray.cluster_resources()["object_store_memory"])
    assert read_task_bytes(1) == max(1, min(TASK_BYTES, store // 64))
    assert read_task_bytes(2) == max(1, min(TASK_BYTES, store // 128))  # shared by two workers
    assert read_task_bytes(1 << 50) == 1  # a shard a task, at least


def test_the_ring_read_benchmark_reads_every_row_both_ways(ray_session, prepared):
    from benchmarks import ring_read

    p, shards = piece(prepared, 0, 1, world=1)
    actor = start_reader()
    try:
        assert ring_read.ring_epoch(shards, p, 1, 1, actor, 1) == len(p.ids)
        assert ring_read.ray_data_epoch(shards, p, 1, 1) == len(p.ids)
    finally:
        import ray

        ray.kill(actor)
    before = ring_read.cpu_seconds()
    assert before and all(kind in ring_read.KINDS for kind, _ in before.values())
    assert "consumer" in {kind for kind, _ in before.values()}  # this process


def test_an_encoded_dataset_reaches_the_ring_decoded_pixel_for_pixel(ray_session, tmp_path):
    """PNG rows are decoded by Ray Data's tasks (a tensor column, not the stored bytes) and
    packed as a raw dataset's are."""
    ids = 3 + 2 * np.arange(120)
    info = write_dataset(
        hwc_pixels(ids),
        ids % 10,
        tmp_path,
        classes=[str(i) for i in range(10)],
        ids=ids,
        rows_per_shard=40,
        encoding="png",
    )
    layout = RowLayout(SHAPE)
    p, shards = piece(info, 0, 0, world=1)
    actor = start_reader()
    try:
        spec = ReadSpec(SHAPE, shards, p.ids, 0, 64, True, 1)
        got = torch.cat(list(BlockReader(RemoteBlocks(actor, 1, spec, pin=False), layout, 10_000)))
    finally:
        import ray

        ray.kill(actor)
    rows = layout.unpack(got)
    assert rows["id"].numpy().tolist() == p.ids.tolist()
    want = torch.from_numpy(hwc_pixels(rows["id"].numpy())).permute(0, 3, 1, 2)
    assert torch.equal(rows["image"], want)
