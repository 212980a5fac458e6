"""ReadAhead: a source iterated on a thread into a bounded queue (the ring's and the streamed
feed's host-side read-ahead). No Ray here: the streamed feed's use of it is in
tests/test_stream_feed.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from lepton_ray.train.readahead import ReadAhead, batch_bytes


def wait_for(cond, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_it_queues_up_to_its_bound_in_the_units_of_size_and_hands_items_over_in_order():
    items = [np.zeros(n) for n in (3, 4, 5, 6, 7, 8)]
    reader = ReadAhead(items, limit=10, size=len)
    # 3 + 4 + 5 = 12 >= 10 after the third: it stops there (the bound plus one item at most)
    assert wait_for(lambda: reader.queued == 12)
    time.sleep(0.05)
    assert reader.queued == 12 and not reader.exhausted
    got = [len(a) for a in reader]
    assert got == [3, 4, 5, 6, 7, 8]
    assert reader.exhausted and reader.peak < 10 + 8 and reader.queued == 0


def test_an_item_larger_than_the_bound_still_passes_alone():
    reader = ReadAhead([np.zeros(100), np.zeros(1)], limit=10, size=len)
    assert [len(a) for a in reader] == [100, 1]
    assert reader.peak == 100


def test_a_function_source_is_called_on_the_readers_thread():
    seen = []

    def source():
        seen.append(threading.current_thread().name)
        return iter(range(3))

    reader = ReadAhead(source, limit=2, name="stream-epoch-7")
    assert list(reader) == [0, 1, 2]
    assert seen == ["stream-epoch-7"]


def test_exhausted_only_once_the_source_has_given_its_last_item():
    release = threading.Event()

    def slow():
        yield 1
        release.wait(5)
        yield 2

    reader = ReadAhead(slow(), limit=100)
    it = iter(reader)
    assert next(it) == 1
    assert not reader.exhausted
    release.set()
    assert wait_for(lambda: reader.exhausted)
    assert list(it) == [2]


def test_times_say_when_it_began_queued_its_first_item_and_ran_out():
    release = threading.Event()

    def slow_to_start():
        time.sleep(0.2)  # e.g. a Ray Data execution starting
        yield 1
        release.wait(5)
        yield 2

    reader = ReadAhead(slow_to_start, limit=10)
    times = reader.times
    assert times.first_block is None and times.done is None  # nothing queued yet
    it = iter(reader)
    assert next(it) == 1
    first = times.first_block
    assert first is not None and 0.2 <= first - times.requested < 5
    assert times.done is None and times.seconds(times.requested) == {
        "read_ahead_s": 0.0,
        "read_first_block_s": round(first - times.requested, 3),
    }
    release.set()
    assert list(it) == [2] and times.first_block == first  # the first item's, not the last's
    assert times.blocks == 2 and times.done >= first and "read_s" in times.seconds(first)


def test_an_error_reaches_the_consumer_after_the_items_before_it_and_is_not_exhausted():
    def failing():
        yield "a"
        raise OSError("the object store went away")

    def bad_source():
        raise FileNotFoundError("shard-00007.parquet")

    reader = ReadAhead(failing(), limit=10)
    got = []
    with pytest.raises(OSError, match="the object store went away"):
        for item in reader:
            got.append(item)
    assert got == ["a"] and not reader.exhausted
    with pytest.raises(FileNotFoundError, match="shard-00007"):
        list(ReadAhead(bad_source, limit=10))


def test_close_stops_a_full_reader_and_closes_its_source():
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield 0
        finally:
            closed.set()

    reader = ReadAhead(endless(), limit=4)
    assert wait_for(lambda: reader.queued == 4)
    reader.close()
    assert not reader.alive and closed.is_set() and reader.queued == 0
    assert list(reader) == []  # nothing is handed over after a close


def test_batch_bytes_counts_tensors_arrays_and_the_bytes_in_object_columns():
    jpegs = np.empty(2, dtype=object)
    jpegs[:] = [b"x" * 1000, b"y" * 3000]
    batch = {"image": jpegs, "label": np.zeros(2, np.int64), "id": torch.zeros(2, 3)}
    assert batch_bytes(batch) == 4000 + 16 + 24
