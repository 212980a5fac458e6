"""The fixed cost of a fit split into phases (lepton_ray.train.timeline): pure, no Ray."""

from __future__ import annotations

import os
import time

import pytest
import torch

from lepton_ray.train.timeline import WorkerTimeline, phases, process_start_time


def test_phases_are_the_gaps_between_consecutive_marks():
    marks = {
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
    assert phases(marks) == {
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
