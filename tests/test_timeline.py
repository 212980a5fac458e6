"""The fixed cost of a fit split into phases (lepton_ray.train.timeline): pure, no Ray."""

from __future__ import annotations

import os
import time

import pytest
import torch

from lepton_ray.train.timeline import (
    BEFORE_FIRST_STEP,
    WorkerTimeline,
    columns,
    phases,
    process_start_time,
)

# A fit's marks, as a worker without the torch set-up's marks (before the split) sent them.
MARKS = {
    "fit_called": 99.0,
    "ray_ready": 100.0,
    "trainer_started": 100.5,
    "process_started": 104.0,
    "loop_started": 107.0,
    "model_ready": 107.1,
    "feed_ready": 108.3,
    "first_step_done": 109.0,
    "last_report": 120.0,
    "fit_returned": 121.75,
}


def test_phases_are_the_gaps_between_consecutive_marks():
    assert phases(MARKS) == {
        "ray_start": 1.0,
        "checks": 0.5,
        "worker_group": 3.5,
        "worker_imports": 3.0,
        "model": 0.1,
        "first_read": 1.2,
        "first_step": 0.7,
        "teardown": 1.75,
        "to_first_step": 10.0,
    }


def test_the_workers_start_is_split_where_its_torch_set_up_is_marked():
    marks = MARKS | {
        "torch_setup_started": 105.0,
        "device_ready": 106.25,
        "process_group_ready": 106.5,
    }
    got = phases(marks)
    assert not {"worker_imports", "torch_setup"} & set(got)
    assert [got[k] for k in ("worker_start", "device", "process_group", "train_fn_start")] == [
        1.0,
        1.25,
        0.25,
        0.5,
    ]
    assert got["to_first_step"] == pytest.approx(sum(got[k] for k in BEFORE_FIRST_STEP))
    # Without the device's mark (a worker from before that split): one torch set-up phase.
    del marks["device_ready"]
    got = phases(marks)
    assert not {"device", "process_group"} & set(got)
    assert (got["worker_start"], got["torch_setup"], got["train_fn_start"]) == (1.0, 1.5, 0.5)
    assert got["to_first_step"] == pytest.approx(
        sum(got[k] for k in got if k not in ("to_first_step", "teardown"))
    )
    # Without one of the two outer marks: the unsplit phase, and still the sum.
    del marks["process_group_ready"]
    got = phases(marks)
    assert got["worker_imports"] == 3.0
    assert not {"worker_start", "torch_setup", "device", "train_fn_start"} & set(got)
    assert got["to_first_step"] == pytest.approx(
        sum(got[k] for k in got if k not in ("to_first_step", "teardown"))
    )


def test_a_worker_process_started_before_the_fit_counts_from_the_trainers_start():
    # Prestarted for it (lepton_ray.train.prestart): the idle wait is in no phase.
    marks = MARKS | {"process_started": 90.0, "torch_setup_started": 105.0}
    marks |= {"device_ready": 106.0, "process_group_ready": 106.5}
    got = phases(marks)
    assert (got["worker_group"], got["worker_start"]) == (0.0, 4.5)
    assert got["to_first_step"] == pytest.approx(sum(got[k] for k in BEFORE_FIRST_STEP))


def test_table_columns_are_the_phases_any_run_has_in_order():
    old = {"worker_group": 1.0, "worker_imports": 2.0, "model": 1.0, "to_first_step": 4.0}
    new = {"worker_group": 1.0, "worker_start": 1.0, "torch_setup": 1.0, "teardown": 0.5}
    newest = {"worker_start": 1.0, "device": 0.5, "process_group": 0.5, "model": 1.0}
    assert columns([old]) == ["worker_group", "worker_imports", "model", "to_first_step"]
    assert columns([new, old]) == [
        "worker_group",
        "worker_imports",
        "worker_start",
        "torch_setup",
        "model",
        "to_first_step",
        "teardown",
    ]
    assert columns([newest, new]) == [
        "worker_group",
        "worker_start",
        "torch_setup",
        "device",
        "process_group",
        "model",
        "teardown",
    ]
    assert columns([]) == []


def test_a_missing_mark_leaves_out_only_its_phases():
    marks = {"ray_ready": 0.0, "trainer_started": 1.0, "loop_started": 5.0, "model_ready": 5.5}
    # No process start (not Linux): the worker group and its imports are not told apart.
    assert phases(marks) == {"checks": 1.0, "model": 0.5}


def test_the_worker_timeline_marks_once_and_reports_its_marks():
    t = WorkerTimeline()
    if os.path.exists("/proc/self/stat"):
        started = process_start_time()
        assert started is not None and started <= t.marks["loop_started"] <= time.time()
        assert t.marks["process_started"] == pytest.approx(started, abs=0.05)
    t.mark("model_ready")
    first = t.marks["model_ready"]
    t.mark("model_ready")  # a second mark of the same name keeps the first
    t.first_step(torch.device("cpu"))
    t.first_step(torch.device("cpu"))
    sent = t.report()
    assert sent["startup"]["model_ready"] == first
    assert set(sent["startup"]) >= {"loop_started", "model_ready", "first_step_done"}
    assert sent["reported_at"] >= sent["startup"]["first_step_done"]
