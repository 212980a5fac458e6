"""The streaming ring (lepton_ray.train.ring): pure tests, no Ray, on the CPU.

Each worker's ring is fed what Ray Data hands it for its piece of the epoch plan: the plan's ids in
order (``sequential_plan``), cut into blocks of arbitrary sizes. W workers are simulated in one
process; every row carries its id in its pixels and label so we can see rows travel whole.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from lepton_ray.config import DataConfig
from lepton_ray.errors import ConfigError, TrainingError
from lepton_ray.train.feed import Batches
from lepton_ray.train.ring import BlockReader, Ring, RowLayout, ring_generator, serve
from lepton_ray.train.sampling import sequential_plan

CPU = torch.device("cpu")
SHAPE = (1, 2, 3)  # 6 pixel bytes, padded to 8 before label and id
LAYOUT = RowLayout(SHAPE)


def shards_of(rows: int, per_shard: int) -> list[np.ndarray]:
    ids = 500 + 3 * np.random.default_rng(11).permutation(rows)  # not contiguous, not sorted
    return [ids[i : i + per_shard] for i in range(0, rows, per_shard)]


def blocks_of(ids: np.ndarray, seed: int = 0, most: int = 300) -> list[dict[str, np.ndarray]]:
    """What Ray Data hands a worker: its rows in plan order, in blocks of varying size."""
    rng, out, at = np.random.default_rng(seed), [], 0
    while at < len(ids):
        part = ids[at : at + int(rng.integers(1, most))]
        image = np.broadcast_to(
            (part % 251).astype(np.uint8)[:, None, None, None], (len(part), *SHAPE)
        )
        out.append({"image": image, "label": part % 10, "id": part})
        at += len(part)
    return out


def run_worker(
    shards,
    world,
    rank,
    *,
    batch=100,
    capacity=1000,
    epoch=0,
    exclude=None,
    seed=3,
    split_seed=0,
    steps=None,
):
    """The batches worker ``rank`` of ``world`` trains in ``epoch`` (the first ``steps`` of them)."""
    p = sequential_plan(
        shards, seed=seed, epoch=epoch, global_batch=batch, world=world, rank=rank, exclude=exclude
    )
    ring = Ring(capacity, SHAPE, CPU)
    blocks = (LAYOUT.pack(b) for b in blocks_of(p.ids, split_seed))
    served = Batches(
        p.steps, serve(ring, blocks, p.steps, p.per_step, ring_generator(seed, epoch, rank, CPU))
    )
    out = []
    for b in served:
        assert b["image"].shape == (p.per_step, *SHAPE)
        assert (b["image"] == (b["id"] % 251).view(-1, 1, 1, 1)).all()  # every pixel of its row
        assert (b["label"] == b["id"] % 10).all()
        out.append(b["id"].numpy())
        if steps is not None and len(out) == steps:
            break
    return p, out


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_every_row_exactly_once_per_epoch_on_any_worker_count(world):
    shards = shards_of(4_000, 250)
    everything = np.concatenate(shards)
    for epoch in (0, 1):
        runs = [run_worker(shards, world, r, epoch=epoch) for r in range(world)]
        steps = {len(out) for _, out in runs}
        assert steps == {40}  # 4,000 // 100 on every worker, whatever W
        assert all(len(b) == p.per_step for p, out in runs for b in out)
        served = np.concatenate([np.concatenate(out) for _, out in runs])
        assert len(np.unique(served)) == len(served) == 4_000
        assert set(served) == set(everything)
        # each worker served exactly its plan's rows, in another order
        for p, out in runs:
            assert np.array_equal(np.sort(np.concatenate(out)), np.sort(p.ids))
            assert not np.array_equal(np.concatenate(out), p.ids)


def test_a_tail_smaller_than_the_global_batch_is_left_out_and_the_ring_drains():
    shards = shards_of(1_030, 100)  # 10 steps of 100, 30 rows left out (another 30 every epoch)
    runs = [run_worker(shards, 3, r, capacity=2_000) for r in range(3)]  # ring > a worker's rows
    served = np.concatenate([np.concatenate(out) for _, out in runs])
    assert len(served) == len(np.unique(served)) == 1_000


def test_deterministic_for_a_seed_whatever_the_block_sizes():
    """The ring is filled to capacity before every draw, so it depends on the row order only."""
    shards = shards_of(3_000, 200)
    _, a = run_worker(shards, 2, 1, split_seed=0)
    _, b = run_worker(shards, 2, 1, split_seed=1)  # other block boundaries
    _, c = run_worker(shards, 2, 1, seed=4)
    _, d = run_worker(shards, 2, 1, epoch=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    assert not np.array_equal(np.concatenate(a), np.concatenate(d))


def test_served_order_is_shuffled_across_the_window():
    """Shuffle quality: how far from its stored position a row is served (``shift``, in rows).

    In steady state the ring holds C rows and each step serves k of them uniformly, so a row stays
    G steps, G ~ Geometric(k/C): it is served G*k rows after it entered, and it entered as the row C
    places before it left, so shift = G*k - C: mean 0, standard deviation C*sqrt(1 - k/C) (0.975 C
    here), and mean |shift| -> 2C/e = 0.74 C (G*k is nearly exponential with mean C). Measured
    over seeds and sizes: sd 0.94-0.98 C, mean |shift| 0.70-0.73 C (the first and last C rows
    pull both down slightly). We require sd in [0.85 C, 1.1 C] and mean |shift| in [0.6 C, 0.85 C]:
    a FIFO (no shuffle) gives 0 for both, a ring serving its newest rows first a skewed mean.
    """
    capacity, rows = 2_000, 60_000
    shards = shards_of(rows, 1_000)
    p, out = run_worker(shards, 1, 0, batch=100, capacity=capacity)
    stored = {int(i): n for n, i in enumerate(p.ids)}
    served = np.concatenate(out)
    shift = np.arange(len(served)) - np.array([stored[int(i)] for i in served])
    assert abs(shift.mean()) < 0.05 * capacity, shift.mean()
    assert 0.85 * capacity < shift.std() < 1.1 * capacity, shift.std()
    assert 0.6 * capacity < np.abs(shift).mean() < 0.85 * capacity, np.abs(shift).mean()
    # every batch mixes rows from across the window, not a run of neighbours
    spans = [np.ptp([stored[int(i)] for i in b]) for b in out[20:-20]]
    assert min(spans) > capacity / 2


def test_resume_mid_epoch_on_another_worker_count_loses_and_repeats_nothing():
    shards = shards_of(4_200, 300)
    first = [
        run_worker(shards, 2, r, epoch=1, steps=13) for r in range(2)
    ]  # 13 steps, then a failure
    consumed = np.concatenate([np.concatenate(out) for _, out in first])
    assert len(consumed) == 1_300
    rest = [run_worker(shards, 3, r, epoch=1, exclude=consumed) for r in range(3)]
    assert {len(out) for _, out in rest} == {29}  # (4,200 - 1,300) // 100
    after = np.concatenate([np.concatenate(out) for _, out in rest])
    assert len(np.unique(after)) == len(after) == 2_900
    assert not np.intersect1d(after, consumed).size
    assert len(np.union1d(after, consumed)) == 4_200


def test_the_first_draw_waits_for_a_sixteenth_of_the_ring_then_it_fills_up():
    """The ramp (ring.resident): 16,000 rows, batch 100, capacity 8,000: the first step needs 500
    rows in, then each step takes in 400 (serving 100) until the ring holds 8,000 (step 19)."""
    from lepton_ray.train.ring import ramp, resident

    assert ramp(8_000, 100) == (500, 300) and ramp(300, 100) == (100, 300)
    assert [resident(s, 16_000, 100, 8_000) for s in (0, 1, 18, 19, 20, 80, 159)] == [
        500, 800, 5_900, 6_200, 6_500, 8_000, 100
    ]  # fmt: skip
    p = sequential_plan(
        shards_of(16_000, 1_000), seed=0, epoch=0, global_batch=100, world=1, rank=0
    )
    pulled, seen = [0], []

    def blocks():
        for b in blocks_of(p.ids, most=50):
            pulled[0] += len(b["id"])
            yield LAYOUT.pack(b)

    gen = ring_generator(0, 0, 0, CPU)
    for b in serve(Ring(8_000, SHAPE, CPU), blocks(), p.steps, p.per_step, gen):
        seen.append((pulled[0], len(b["id"])))
    assert seen[0][0] < 500 + 50  # the first draw: 500 rows in (plus the rest of one block)
    assert 6_200 + 19 * 100 <= seen[19][0] < 6_200 + 19 * 100 + 50
    assert len(seen) == 160 and pulled[0] == 16_000


def test_ring_memory_is_bounded_by_its_capacity():
    capacity, most = 700, 300
    ring = Ring(capacity, SHAPE, CPU)
    allocated = (ring.rows.data_ptr(), ring.rows.shape)
    assert ring.nbytes == capacity * (8 + 8 + 8)
    peak, put = [0], ring.put

    def watched_put(block, start=0, most=None):
        taken = put(block, start, most)
        peak[0] = max(peak[0], ring.n)
        return taken

    ring.put = watched_put
    p = sequential_plan(shards_of(5_000, 500), seed=0, epoch=0, global_batch=100, world=1, rank=0)
    reader = BlockReader(blocks_of(p.ids, most=most), LAYOUT, max_rows=capacity)
    batches = list(serve(ring, reader, p.steps, p.per_step, ring_generator(0, 0, 0, CPU)))
    assert len(batches) == 50 and peak[0] == capacity and ring.n == 0
    assert (ring.rows.data_ptr(), ring.rows.shape) == allocated  # never grew
    assert reader.peak_rows < capacity + most  # the host queue: capacity plus one block


def test_input_that_runs_short_fails_with_the_step_it_stopped_at():
    p = sequential_plan(shards_of(1_000, 100), seed=0, epoch=0, global_batch=100, world=1, rank=0)
    short = [LAYOUT.pack(b) for b in blocks_of(p.ids[:-150])]  # 850 of the 1,000 rows arrive
    gen = ring_generator(0, 0, 0, CPU)
    batches = Batches(p.steps, serve(Ring(300, SHAPE, CPU), short, p.steps, p.per_step, gen))
    # step 7 should find the ring full (300 of the 400 rows left), but only 250 arrived
    with pytest.raises(TrainingError, match="ran out after 6 of 10 steps"):
        list(batches)
    with pytest.raises(ValueError, match="a ring of 50 rows cannot serve batches of 100"):
        list(serve(Ring(50, SHAPE, CPU), short, p.steps, p.per_step, gen))


def test_block_reader_stops_when_closed_and_closes_its_source():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield {
                    "image": np.zeros((10, *SHAPE), np.uint8),
                    "label": np.zeros(10),
                    "id": np.arange(i, i + 10),
                }
                i += 10
        finally:
            closed.set()

    reader = BlockReader(endless(), LAYOUT, max_rows=50)
    first = next(iter(reader))
    assert LAYOUT.unpack(first)["id"].tolist() == list(range(10))
    deadline = time.monotonic() + 5
    while reader.queued_rows < 50 and time.monotonic() < deadline:  # it fills up to its bound
        time.sleep(0.01)
    assert reader.queued_rows == 50 and reader.peak_rows == 50  # and waits there
    reader.close(timeout=5)
    assert not reader.alive and closed.is_set()


def test_block_reader_hands_a_read_error_to_the_consumer():
    def failing():
        yield {"image": np.zeros((2, *SHAPE), np.uint8), "label": np.zeros(2), "id": np.arange(2)}
        raise OSError("shard 3 is gone")

    with pytest.raises(OSError, match="shard 3 is gone"):
        list(BlockReader(failing(), LAYOUT, max_rows=10))


def test_feed_setting_resolves_as_documented():
    big, small = 10 << 30, 1 << 20
    assert DataConfig().chosen_feed(use_gpu=True, dataset_bytes=small) == "cache"
    assert DataConfig().chosen_feed(use_gpu=True, dataset_bytes=big) == "ring"
    assert DataConfig().chosen_feed(use_gpu=True, dataset_bytes=big, prepared=False) == "stream"
    assert DataConfig(shuffle="none").chosen_feed(use_gpu=True, dataset_bytes=big) == "stream"
    assert DataConfig(augment_on="cpu").chosen_feed(use_gpu=True, dataset_bytes=big) == "stream"
    assert DataConfig().chosen_feed(use_gpu=False, dataset_bytes=small) == "stream"
    assert DataConfig(feed="ring").chosen_feed(use_gpu=False, dataset_bytes=small) == "ring"
    assert DataConfig(cache="off").chosen_feed(use_gpu=True, dataset_bytes=small) == "stream"
    assert DataConfig(cache="device", feed="cache").caches_on_device(False, big)
    assert DataConfig(feed="ring").augments_on_device(use_gpu=False, cached=True)
    with pytest.raises(ConfigError, match="DataConfig.cache: 'off' says feed 'stream', but feed"):
        DataConfig(cache="off", feed="ring")
    with pytest.raises(ConfigError, match="DataConfig.feed: 'ring' augments on the device"):
        DataConfig(feed="ring", augment_on="cpu")
    with pytest.raises(ConfigError, match="DataConfig.feed: 'ring' shuffles within its window"):
        DataConfig(feed="ring", shuffle="none")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from lepton_ray.data import write_dataset

    ids = 500 + 3 * np.arange(1_200)
    images = np.broadcast_to((ids % 251).astype(np.uint8)[:, None, None, None], (1_200, 2, 3, 1))
    return write_dataset(
        np.ascontiguousarray(images),
        ids % 10,
        tmp_path_factory.mktemp("ring"),
        classes=[str(i) for i in range(10)],
        ids=ids,
        rows_per_shard=100,
    )


def ring_feeds(info, world: int, epochs: int) -> tuple[list, list]:
    """RingFeeds of ``world`` workers, Ray Data's read replaced by the rows it would hand over."""
    from lepton_ray.train.feed import Plan, RingFeed

    feeds, reads = [], []
    for rank in range(world):
        plan = Plan(seed=1, global_batch=60, world=world, rank=rank, order="sequential")
        feed = RingFeed(info, plan, rows=150, epochs=epochs, device=CPU, preprocess_batch=64)

        def read(p, epoch, feed=feed, rank=rank):
            reads.append((rank, epoch))
            blocks = blocks_of(p.ids, seed=epoch)
            return BlockReader(
                [b | {"image": b["image"].reshape(-1, 2, 3, 1)} for b in blocks],
                feed.ring.layout,
                feed.queue_rows,
            )

        feed._read = read
        feeds.append(feed)
    return feeds, reads


def test_ring_feed_reads_the_next_epoch_ahead_and_serves_each_epoch_once(prepared):
    feeds, reads = ring_feeds(prepared, world=2, epochs=3)
    assert feeds[0].ring.capacity == 150 and feeds[0].ring.layout.shape == (1, 2, 3)
    for epoch in range(3):
        served = []
        for feed in feeds:
            batches = feed.epoch(epoch)
            assert batches.steps == 20
            served += [b["id"].numpy() for b in batches]
            # all of this epoch's rows went in: the next epoch is being read already
            assert (feed.ahead is not None) == (epoch < 2)
        served = np.concatenate(served)
        assert len(served) == len(np.unique(served)) == 1_200
    # one read per worker and epoch: each read-ahead was the one used
    assert sorted(reads) == [(r, e) for r in range(2) for e in range(3)]
    for feed in feeds:
        feed.close()


def test_ring_feed_stops_its_read_ahead_on_an_early_stop_or_a_resume(prepared):
    feeds, _ = ring_feeds(prepared, world=1, epochs=5)
    (feed,) = feeds
    first = [b["id"].numpy() for b in feed.epoch(0)]
    ahead = feed.ahead[1]
    # a resume of epoch 1 (some ids consumed) cannot use the read-ahead: it is stopped
    batches = feed.epoch(1, exclude=np.concatenate(first[:3]))
    assert not ahead.alive and batches.steps == 17
    next(iter(batches))
    reading = feed.reading
    feed.close()  # an early stop mid-epoch
    assert not reading.alive and feed.ahead is None


def test_rows_keep_pixels_as_stored_and_unpack_to_channels_first_views():
    import pyarrow as pa

    layout = RowLayout((3, 4, 5))  # (C, H, W); stored (H, W, C) like a prepared dataset
    images = np.random.default_rng(3).integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)
    labels, ids = np.arange(6) % 4, 100 + np.arange(6)
    want = torch.from_numpy(images).permute(0, 3, 1, 2)
    from_numpy = layout.pack({"image": images, "label": labels, "id": ids})
    # as Ray Data hands a raw dataset's block over: Parquet's fixed-width pixel column, chunked
    flat = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(60), 6, [None, pa.py_buffer(images.tobytes())]
    )
    table = pa.Table.from_arrays(
        [pa.chunked_array([flat[:2], flat[2:]]), pa.array(labels), pa.array(ids)],
        names=["image", "label", "id"],
    )
    out = np.full((6, layout.width), 7, np.uint8)  # e.g. pinned memory: written in place
    assert layout.pack_array(table, out=out) is out
    for rows in (from_numpy, torch.from_numpy(out)):
        got = layout.unpack(rows)
        assert torch.equal(got["image"], want)
        assert got["image"].stride() == (layout.width, 1, 15, 3)  # each image channels-last
        assert got["label"].tolist() == labels.tolist() and got["id"].tolist() == ids.tolist()
    # an older dataset's pixels: variable-width binary of equal lengths, read in place too
    old = table.set_column(0, "image", pa.array([im.tobytes() for im in images], pa.binary()))
    assert torch.equal(layout.unpack(layout.pack(old))["image"], want)
    with pytest.raises(ValueError, match="rows for 6 of width"):
        layout.pack_array(table, out=np.empty((5, layout.width), np.uint8))
