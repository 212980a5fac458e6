"""StreamedFeed reading ahead: the next epoch's Ray Data read starts while this one still has
batches to train, serves what a feed without read-ahead serves, reports when it began, and is
dropped on a resume."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lepton_ray.train.feed import Plan, StreamedFeed


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from lepton_ray.data import write_dataset

    ids = 500 + 3 * np.arange(1_200)
    images = np.broadcast_to((ids % 251).astype(np.uint8)[:, None, None, None], (1_200, 4, 4, 1))
    return write_dataset(
        np.ascontiguousarray(images),
        ids % 10,
        tmp_path_factory.mktemp("stream"),
        classes=[str(i) for i in range(10)],
        ids=ids,
        rows_per_shard=100,
    )


def feed(info, rank: int, order: str, epochs: int, world: int = 2, **kw) -> StreamedFeed:
    plan = Plan(seed=3, global_batch=60, world=world, rank=rank, order=order)
    return StreamedFeed(
        info,
        plan,
        augment=(),
        preprocess_batch=64,
        shuffle_buffer_rows=200,
        pin_memory=False,
        epochs=epochs,
        **kw,
    )


def ids_of(batches) -> list[list[int]]:
    return [b["id"].tolist() for b in batches]


@pytest.mark.parametrize("order", ["shuffled", "sequential"])
def test_the_next_epoch_reads_ahead_and_serves_what_a_fresh_read_serves(
    ray_session, prepared, order
):
    feeds = [feed(prepared, rank, order, epochs=3) for rank in range(2)]
    for epoch in range(3):
        served = []
        for rank, f in enumerate(feeds):
            batches = f.epoch(epoch)
            assert batches.steps == 20
            if epoch > 0:  # read ahead during the epoch before: planned there, not here
                assert f.reading.plan.done()
            it = iter(batches)
            got = [next(it)["id"].tolist()]
            # once this epoch's input is all read, the next batch starts the next epoch's read
            deadline = time.monotonic() + 60
            while not f.reading.batches.exhausted and time.monotonic() < deadline:
                time.sleep(0.01)
            got.append(next(it)["id"].tolist())
            assert (f.ahead is not None) == (epoch < 2)  # the last epoch reads nothing ahead
            assert f.ahead is None or f.ahead.epoch == epoch + 1
            got += ids_of(it)
            assert len(got) == 20
            # its read, as the loop reports it with the epoch: asked for before the epoch began
            # (the epoch before read it ahead) except the first, then its first batch, its end
            read = batches.read_seconds()
            assert (read["read_ahead_s"] > 0) == (epoch > 0), read
            assert 0 < read["read_first_block_s"] <= read["read_s"], read
            # the same batches, in the same order, as a feed that reads this epoch afresh
            fresh = feed(prepared, rank, order, epochs=0)
            assert ids_of(fresh.epoch(epoch)) == got
            assert fresh.ahead is None
            served += got
        flat = np.concatenate(served)
        assert len(flat) == len(np.unique(flat)) == 1_200  # every row once per epoch
    for f in feeds:
        f.close()


def test_a_resume_drops_the_read_ahead_and_close_stops_the_reads(ray_session, prepared):
    f = feed(prepared, 0, "shuffled", epochs=5, world=1)
    assert len(ids_of(f.epoch(0))) == 20
    ahead = f.ahead
    assert ahead is not None and ahead.epoch == 1
    # a resume of epoch 1 (its first three batches trained) cannot use what was read ahead
    epoch1 = ids_of(feed(prepared, 0, "shuffled", epochs=0, world=1).epoch(1))
    batches = f.epoch(1, exclude=np.array(sum(epoch1[:3], [])))
    assert not ahead.batches.alive and batches.steps == 17
    rest = ids_of(batches)
    assert sorted(sum(rest, [])) == sorted(sum(epoch1[3:], []))
    it = iter(f.epoch(2))
    next(it)
    reading = f.reading.batches
    f.close()  # an early stop mid-epoch
    assert not reading.alive and f.ahead is None and f.reading is None
