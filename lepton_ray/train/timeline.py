"""Where a fit's fixed cost goes: wall-clock marks on the driver and on rank 0, turned into phases.

A small run is dominated by what happens before the first step and after the last: starting
Ray Train's controller and worker processes (the workers import torch), the process group, the
model, the first read of the data (and the device cache fill), the first step (lazy CUDA and kernel
set-up), then the controller noticing the end and tearing the worker group down. Rank 0 keeps its
marks (``time.time()``, comparable across processes of one machine; rank 0 runs on the driver's
node in a local instance) and sends them with every epoch's report; the driver adds its own and
:func:`phases` turns them into seconds, in ``train_results["startup_s"]``.

Worked example (2 AMD CPU cores, mnist5k, 1 worker, Ray already up; ``benchmarks.fixed_cost``,
``fixed_cost_amd_split``, medians of the 3 fits after the first): Ray 0 s, checks 0.0 s, worker
group 4.1 s (the controller's process and imports, then the worker's process), worker start 2.7 s
(Ray's worker and Ray Train's worker actor), torch set-up 2.5 s (``import torch``, the device and
the process group: one phase then), training function 0.2 s, model 1.1 s (its optimizer: the
first in a process imports ``torch._dynamo``), first read 0.0 s (a streamed feed reads when the
first step asks), first step 0.9 s: 11.7 s to the first step; teardown 0.8 s.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

# (phase, from mark, to mark): consecutive marks, so the phases add up to the total.
PHASES = (
    ("ray_start", "fit_called", "ray_ready"),
    ("checks", "ray_ready", "trainer_started"),
    ("worker_group", "trainer_started", "process_started"),
    # The worker's own start (marks of lepton_ray.train.backend): Ray's worker process and Ray
    # Train's worker actor; finding its device (Ray's torch module and ``get_device``: a GPU
    # worker's first CUDA call, the driver's initialisation); starting the process group;
    # launching the training function (its modules).
    ("worker_start", "process_started", "torch_setup_started"),
    ("device", "torch_setup_started", "device_ready"),
    ("process_group", "device_ready", "process_group_ready"),
    ("train_fn_start", "process_group_ready", "loop_started"),
    ("model", "loop_started", "model_ready"),
    ("first_read", "model_ready", "feed_ready"),
    ("first_step", "feed_ready", "first_step_done"),
    ("teardown", "last_report", "fit_returned"),
)
BEFORE_FIRST_STEP = tuple(name for name, _, _ in PHASES[:-1])  # they add up to ``to_first_step``
MERGED = (
    ("torch_setup", "torch_setup_started", "process_group_ready"),
    ("worker_imports", "process_started", "loop_started"),
)
"""Phases that stand for the consecutive phases of :data:`PHASES` between their two marks, where a
mark between those is not known (results measured before a split, or a backend that does not
mark them): ``device`` and ``process_group``, then the worker's whole start to its loop. Applied
in this order, so an outer one may take in an inner one."""


def _spans(known: dict[str, float]) -> list[tuple[str, str, str]]:
    """:data:`PHASES`, with each of :data:`MERGED` in place of its phases where a mark between
    them is not in ``known``."""
    spans = list(PHASES)
    for merged in MERGED:
        _, a, b = merged
        i = next(k for k, (_, start, _) in enumerate(spans) if start == a)
        j = next(k for k, (_, _, end) in enumerate(spans) if end == b)
        if any(end not in known for _, _, end in spans[i:j]):
            spans[i : j + 1] = [merged]
    return spans


def process_start_time() -> float | None:
    """When this process started (Linux ``/proc``), as ``time.time()``; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class WorkerTimeline:
    """Rank 0's marks for one attempt of the loop (a restarted worker group starts anew)."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {"loop_started": time.time()}
        started = process_start_time()
        if started is not None:
            self.marks["process_started"] = started
        from lepton_ray.train.backend import WORKER_MARKS  # this process's torch set-up

        self.marks |= WORKER_MARKS

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.time())

    def first_step(self, device: torch.device) -> None:
        """Once: the first step is done when the device is (a one-off synchronisation)."""
        if "first_step_done" not in self.marks:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.mark("first_step_done")

    def report(self) -> dict[str, Any]:
        """What each epoch's report carries: the marks, and when it was sent."""
        return {"startup": dict(self.marks), "reported_at": time.time()}


def columns(measured: list[dict[str, float]]) -> list[str]:
    """The phases found in any of ``measured`` (dicts from :func:`phases`), in order, with
    ``to_first_step`` before the teardown: a table's columns for runs from before and after the
    worker's start was split (each of :data:`MERGED` stands just before the phases it stands
    for)."""
    order = [name for name, _, _ in PHASES]
    start = {name: a for name, a, _ in (*PHASES, *MERGED)}
    for name, a, _ in MERGED:
        order.insert(next(k for k, n in enumerate(order) if start[n] == a), name)
    order.insert(len(order) - 1, "to_first_step")
    found = set().union(*measured)
    return [name for name in order if name in found]


def phases(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase of :data:`PHASES` whose two marks are known, plus ``to_first_step``
    (``fit_called`` to ``first_step_done``) when both are."""
    if "process_started" in marks and "trainer_started" in marks:
        # A worker process prestarted for this fit (lepton_ray.train.prestart) began before it:
        # it counts from the trainer's start, so its idle wait is in no phase.
        marks = dict(marks, process_started=max(marks["process_started"], marks["trainer_started"]))
    out = {
        name: round(marks[b] - marks[a], 3)
        for name, a, b in _spans(marks)
        if a in marks and b in marks
    }
    if "fit_called" in marks and "first_step_done" in marks:
        out["to_first_step"] = round(marks["first_step_done"] - marks["fit_called"], 3)
    return out
