"""The garbage collector's clock: what an epoch's ``gc_s`` and ``gc_full`` count."""

from __future__ import annotations

import gc

from lepton_ray.train.gc_clock import GcClock, process_clock


def _cycles(n: int) -> None:
    for _ in range(n):
        a: list = []
        a.append(a)  # only the collector frees it


def test_the_clock_counts_full_collections_and_their_time_lap_by_lap():
    clock = GcClock().start()
    try:
        assert clock.lap() == {"gc_s": 0.0, "gc_full": 0}
        _cycles(10_000)
        gc.collect(2)
        gc.collect(2)
        first = clock.lap()
        assert first["gc_full"] == 2 and first["gc_s"] > 0
        gc.collect(0)  # a young collection is timed, not counted as full
        second = clock.lap()
        assert second["gc_full"] == 0 and second["gc_s"] >= 0
        assert clock.seconds >= first["gc_s"] + second["gc_s"] - 1e-3
    finally:
        clock.stop()
    assert clock._callback not in gc.callbacks
    gc.collect(2)
    assert clock.lap() == {"gc_s": 0.0, "gc_full": 0}  # unhooked: nothing more is counted


def test_a_process_has_one_clock_hooked_once():
    clock = process_clock()
    assert process_clock() is clock
    assert gc.callbacks.count(clock._callback) == 1
    clock.start()  # starting it again does not hook it twice
    assert gc.callbacks.count(clock._callback) == 1
