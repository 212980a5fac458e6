"""The loop thread's clock (lepton_ray/train/thread_clock.py): CPU, runqueue wait and sleeps, as
the kernel counts them for the calling thread; no Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from lepton_ray.train.thread_clock import _PROC, ThreadClock, _scheduler
from tests.spin import spin

linux = pytest.mark.skipif(_scheduler(_PROC) is None, reason="the kernel keeps no such figures")


def _on_a_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.update(fn()))
    t.start()
    t.join()
    return out


@linux
def test_a_sleeping_thread_blocks_and_uses_no_cpu():
    def run():
        clock = ThreadClock()
        for _ in range(20):
            time.sleep(0.005)
        return clock.lap()

    lap = _on_a_thread(run)
    assert set(lap) == {"loop_cpu_s", "loop_runqueue_s", "loop_sleeps", "loop_preemptions"}
    assert lap["loop_sleeps"] >= 20  # every sleep blocked
    assert lap["loop_cpu_s"] < 0.05


def _spin_on(cpu: int, seconds: float) -> dict:
    def run():
        os.sched_setaffinity(0, {cpu})  # this thread only
        clock = ThreadClock()
        wall = spin(seconds)
        return clock.lap() | {"wall": wall}

    return _on_a_thread(run)


@linux
def test_a_thread_sharing_its_cpu_with_a_busy_process_waits_on_the_runqueue():
    cpu = max(os.sched_getaffinity(0))
    # Alone it has the CPU (the best of three tries: a process the last test left exiting there)
    alone = min((_spin_on(cpu, 0.3) for _ in range(3)), key=lambda lap: lap["loop_runqueue_s"])
    assert alone["loop_runqueue_s"] < alone["loop_cpu_s"] / 2, alone
    hog = subprocess.Popen(
        [sys.executable, "-c", "while True: pass"],
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    try:
        time.sleep(0.3)  # the hog is spinning
        lap = _spin_on(cpu, 1.0)
    finally:
        hog.kill()
        hog.wait()
    # one CPU shared by two busy threads: about half each; the rest of the wall waiting for it
    assert lap["loop_runqueue_s"] > 0.2, lap
    assert lap["loop_cpu_s"] < 0.8, lap
    assert lap["loop_cpu_s"] + lap["loop_runqueue_s"] == pytest.approx(lap["wall"], abs=0.15)
    assert lap["loop_preemptions"] > 0


def test_laps_are_consecutive_and_only_the_cpu_where_the_kernel_says_nothing(tmp_path):
    clock = ThreadClock(proc=tmp_path / "missing")
    spin(0.05, clock=time.thread_time)
    first, second = clock.lap(), clock.lap()
    assert set(first) == {"loop_cpu_s"}
    assert first["loop_cpu_s"] >= 0.05 and second["loop_cpu_s"] < first["loop_cpu_s"]
