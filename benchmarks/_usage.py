"""What each side of a benchmark kept busy: every thread's CPU and the GPU's utilisation.

A sampler in a process of its own (so that it takes no turn on the measured process's interpreter)
reads every thread's CPU time from ``/proc`` once a second, for the benchmark's own process (the
driver: the plain loop runs there) and for Ray's processes (``ray::RayTrainWorker``, the Ray Data
tasks, ``ray::IDLE`` workers starting, Ray's own daemons), plus ``nvidia-smi``'s utilisation where
one is present; one JSON line a sample. A side's window of wall-clock time (its epochs after the
first) is summarised afterwards:

- ``step_thread_cores``: the busiest thread of the process that runs the step plus torch's
  autograd threads (the backward pass blocks the thread that calls it, so the two take turns):
  near 1.0 means the step's thread never waited, for data or for the GPU;
- ``other_thread_cores``: the rest of that process (the feed's threads, Ray's);
- ``gpu_util_pct``: the share of time a kernel ran (``nvidia-smi``), absent without a GPU;
- ``cores_by_kind``: every sampled process kind's cores, the busiest first;
- the machine's state, which differs between machines lent as the same kind and over time on one:
  ``host_busy_cores`` and ``steal_cores`` (all of the host's CPUs, from ``/proc/stat``: steal is
  time the hypervisor ran something else while this guest had work), and ``gpu_sm_mhz`` with
  ``gpu_slowdown_share``, the share of samples whose SM clock was held down by a power cap, a
  thermal limit or a hardware slowdown (``nvidia-smi``'s clock event reasons), absent without one;
- ``step_thread_states``: where the step's thread and torch's autograd threads were, polled every
  5 ms between samples (Linux): the share of polls each ``running`` (on a CPU or waiting for one)
  or asleep in a kernel wait channel (``/proc/<pid>/task/<tid>/wchan``: ``futex_do_wait`` for the
  GIL, a lock or a condition, ``ep_poll``, a driver's; ``D:`` marks an uninterruptible wait such as
  a page fault's), the most frequent first. A step thread asleep outside its backward and its
  batch waits on something else. In the polls where neither ran, ``step_futex`` is the futex the
  step thread slept on (an address, ``+t`` for a timed wait such as the GIL's) and
  ``others_running`` which of the process's other threads ran meanwhile (``name:tid``);
  ``step_thread_polls`` counts each role's polls (``others_running``'s against ``step``'s: the
  share of polls in which neither ran).

A step thread near one core with the GPU busy well under 100% is a loop bound by the CPU that
launches its kernels; the GPU near 100% is a loop bound by the GPU. Two runs of one loop that differ
with the machine's state differ for the machine.

    python -m benchmarks._usage OUT.jsonl --driver PID [--interval 1.0]   (started by Usage)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

AUTOGRAD = "pt_autograd"  # torch's backward threads: pt_autograd_0, pt_autograd_1, ...
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def kind_of(cmdline: str, pid: int, driver: int) -> str | None:
    """The process kind a sample is filed under, or None for a process not sampled."""
    if pid == driver:
        return "driver"
    if cmdline.startswith("ray::"):  # a Ray worker's title: ray::RayTrainWorker.run_train_fn
        return cmdline.split()[0].split(".")[0] if cmdline.split() else "ray::"
    if "/ray/" in cmdline or "gcs_server" in cmdline or "raylet" in cmdline:
        return "ray (daemons)"
    return None


def _thread_ticks(pid: int) -> dict[str, tuple[str, int]]:
    """tid -> (thread name, user + system ticks) of one process; empty once it has gone."""
    out: dict[str, tuple[str, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        stat = _stat(pid, tid)
        if stat is not None:
            name, fields = stat
            out[tid] = (name, int(fields[11]) + int(fields[12]))  # utime + stime
    return out


def _stat(pid: int, tid: str) -> tuple[str, list[str]] | None:
    """A thread's name and the fields of its ``/proc`` stat after it (state first); None once
    it has gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


# nvidia-smi's clock event reasons that hold the SM clock down: SW power cap, HW slowdown, SW
# thermal, HW thermal, HW power brake (idle, application clocks, sync boost are not slowdowns).
SLOWDOWN = 0x4 | 0x8 | 0x20 | 0x40 | 0x80
# The reasons' field was renamed (clocks_throttle_reasons before driver 535): a name the driver
# refuses, where it answers without it, is dropped for the next.
_REASON_FIELDS = ["clocks_event_reasons.active", "clocks_throttle_reasons.active", None]


def _nvidia_smi(fields: str) -> list[list[str]] | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return [[x.strip() for x in line.split(",")] for line in done.stdout.splitlines() if line]


def _gpu_state() -> dict[str, list] | None:
    """Each GPU's utilisation, SM clock and whether a slowdown held that clock down."""
    if not shutil.which("nvidia-smi"):
        return None
    base, reason = "utilization.gpu,clocks.sm", _REASON_FIELDS[0]
    rows = _nvidia_smi(base + (f",{reason}" if reason else ""))
    if rows is None and reason is not None:  # refused: the field, or nvidia-smi this once?
        rows, reason = _nvidia_smi(base), None
        if rows is not None:  # the field: the next sample asks by the next name
            _REASON_FIELDS.pop(0)
    try:
        return {
            "gpu": [float(r[0]) for r in rows or []] or None,
            "sm_mhz": [float(r[1]) for r in rows or []],
            "slowdown": [bool(int(r[2], 16) & SLOWDOWN) for r in rows or []] if reason else [],
        }
    except (ValueError, IndexError):
        return None


def _host_ticks() -> tuple[int, int]:
    """(busy, steal) ticks of all of the host's CPUs since boot (:func:`harness.cpu_times`)."""
    from benchmarks.harness import cpu_times

    ticks = cpu_times()
    return (0, 0) if ticks is None else ticks[:2]


FOCUS = ("driver", "ray::RayTrainWorker")  # the kinds whose step threads are polled
POLL_S = 0.005
FUTEX_SYSCALL = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine, -1)


def thread_state(pid: int, tid: str) -> str | None:
    """``running``, or the kernel wait channel a thread sleeps in (``D:`` first when it cannot be
    interrupted); None once it has gone."""
    stat = _stat(pid, tid)
    if stat is None:
        return None
    state = stat[1][0]
    if state == "R":
        return "running"
    try:
        with open(f"/proc/{pid}/task/{tid}/wchan") as fh:
            wchan = fh.read().strip()
    except OSError:
        return None
    wchan = wchan if wchan and wchan != "0" else "unknown"
    return f"D:{wchan}" if state == "D" else wchan


def watched(pid: int, ticks: dict[str, tuple[str, int]], old: dict) -> list[tuple[str, str]]:
    """(tid, role) of a process's step thread (its busiest but torch's autograd threads) and of
    its autograd threads that ran, over the last interval."""
    used = {tid: t - old[tid][1] for tid, (_, t) in ticks.items() if tid in old}
    autograd = [tid for tid in used if ticks[tid][0].startswith(AUTOGRAD) and used[tid] > 0]
    rest = [tid for tid in used if not ticks[tid][0].startswith(AUTOGRAD) and used[tid] > 0]
    step = max(rest, key=lambda tid: used[tid], default=None)
    return ([(step, "step")] if step else []) + [(tid, "autograd") for tid in autograd]


def futex_of(pid: int, tid: str) -> str | None:
    """The futex a thread sleeps on, from ``/proc/<pid>/task/<tid>/syscall``: its address, with
    ``+t`` for a wait with a timeout (CPython's GIL is waited for with one, the switch
    interval; a lock, a condition without a timeout or the backward's wait, without); None when the
    thread is not in ``futex``."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as fh:
            fields = fh.read().split()
    except OSError:
        return None
    if len(fields) < 5 or fields[0] != str(FUTEX_SYSCALL):
        return None
    return fields[1] + ("+t" if int(fields[4], 16) else "")


def running_others(pid: int, skip: set[str]) -> str:
    """The threads of ``pid`` but ``skip`` running now, as ``name:tid`` joined by ``+`` (a Python
    thread bears its process's name: the tid tells them apart), or ``none``."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return "none"
    running = []
    for tid in tids:
        stat = None if tid in skip else _stat(pid, tid)
        if stat is not None and stat[1][0] == "R":
            running.append(f"{stat[0]}:{tid}")
    return "+".join(sorted(running)) or "none"


def poll_states(watch: dict[int, list[tuple[str, str]]], until: float) -> dict[str, dict]:
    """Every :data:`POLL_S` until ``until``: each watched thread's :func:`thread_state`, counted
    by process and role (with none watched, a wait until then). Where a process's watched
    threads all sleep, two more roles: ``step_futex``, the futex the step thread sleeps on
    (:func:`futex_of`), and ``others_running``, which of its other threads ran then
    (:func:`running_others`)."""
    if not watch:
        time.sleep(max(0.0, until - time.time()))
        return {}
    counts: dict[str, dict[str, Counter[str]]] = {}
    while True:
        for pid, threads in watch.items():
            of_pid = counts.setdefault(str(pid), {})
            states = {tid: (role, thread_state(pid, tid)) for tid, role in threads}
            for role, state in states.values():
                if state is not None:
                    of_pid.setdefault(role, Counter())[state] += 1
            if states and all(st not in (None, "running") for _, st in states.values()):
                step = next((tid for tid, (role, _) in states.items() if role == "step"), None)
                futex = futex_of(pid, step) if step else None
                if futex is not None:
                    of_pid.setdefault("step_futex", Counter())[futex] += 1
                of_pid.setdefault("others_running", Counter())[
                    running_others(pid, set(states))
                ] += 1
        left = until - time.time()
        if left <= 0:
            return {
                pid: {role: dict(c) for role, c in roles.items()} for pid, roles in counts.items()
            }
        time.sleep(min(POLL_S, left))


def sample_forever(out: str, driver: int, interval: float) -> None:
    """One JSON line per ``interval`` into ``out``: each sampled process's threads in cores, and
    where the focus processes' step threads were between samples (:func:`poll_states`)."""
    before: dict[int, dict[str, tuple[str, int]]] = {}
    watch: dict[int, list[tuple[str, str]]] = {}
    last, host = time.time(), _host_ticks()
    with open(out, "w") as fh:
        while True:
            states = poll_states(watch, last + interval)  # and the wait for the next sample
            now = time.time()
            dt, last = now - last, now
            procs, watch = [], {}
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                pid = int(entry)
                try:  # read every time: a Ray worker renames itself for each task it takes
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        cmd = c.read().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    continue
                kind = kind_of(cmd, pid, driver)
                if kind is None:
                    continue
                ticks, old = _thread_ticks(pid), before.get(pid, {})
                before[pid] = ticks
                if kind in FOCUS:
                    watch[pid] = watched(pid, ticks, old)
                threads = [
                    [name, round((t - old[tid][1]) / TICK / dt, 3)]
                    for tid, (name, t) in ticks.items()
                    if tid in old and t > old[tid][1]
                ]
                if threads:
                    procs.append({"pid": pid, "kind": kind, "threads": threads})
            host_was, host = host, _host_ticks()
            sample = {"t": now, "dt": dt, "procs": procs, "gpu": None, "states": states}
            sample["host_busy"] = round((host[0] - host_was[0]) / TICK / dt, 3)
            sample["steal"] = round((host[1] - host_was[1]) / TICK / dt, 3)
            sample.update(_gpu_state() or {})
            fh.write(json.dumps(sample) + "\n")
            fh.flush()


def summarise(samples: list[dict[str, Any]], start: float, end: float, focus: str) -> dict:
    """A window of samples: the step's thread, the rest of its process, the GPU, every kind.

    ``focus`` is the kind of the process that runs the step (``driver`` or
    ``ray::RayTrainWorker``); in each sample its busiest process of that kind is the one read.
    """
    inside = [s for s in samples if start < s["t"] - s["dt"] / 2 <= end]
    if not inside:
        return {"samples": 0}
    step, other, gpu, kinds = [], [], [], {}
    states: dict[str, Counter[str]] = {}
    for s in inside:
        of_focus = [p for p in s["procs"] if p["kind"] == focus]
        busiest = max(of_focus, key=lambda p: sum(c for _, c in p["threads"]), default=None)
        threads = busiest["threads"] if busiest else []
        polled = (s.get("states") or {}).get(str(busiest["pid"]), {}) if busiest else {}
        for role, counts in polled.items():
            states.setdefault(role, Counter()).update(counts)
        autograd = sum(c for n, c in threads if n.startswith(AUTOGRAD))
        rest = sorted((c for n, c in threads if not n.startswith(AUTOGRAD)), reverse=True)
        step.append(autograd + (rest[0] if rest else 0.0))
        other.append(sum(rest[1:]))
        if s.get("gpu"):
            gpu.append(sum(s["gpu"]) / len(s["gpu"]))
        for p in s["procs"]:
            kinds[p["kind"]] = kinds.get(p["kind"], 0.0) + sum(c for _, c in p["threads"])
    n = len(inside)
    out = {
        "samples": n,
        "step_thread_cores": _mean(step),
        "other_thread_cores": _mean(other),
        "cores_by_kind": {
            k: round(v / n, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:6]
        },
    }
    if gpu:
        out["gpu_util_pct"] = round(sum(gpu) / len(gpu), 1)
    if any("host_busy" in s for s in inside):
        out["host_busy_cores"] = _mean(s.get("host_busy", 0.0) for s in inside)
        out["steal_cores"] = _mean(s.get("steal", 0.0) for s in inside)
    clocks = [sum(s["sm_mhz"]) / len(s["sm_mhz"]) for s in inside if s.get("sm_mhz")]
    if clocks:
        out["gpu_sm_mhz"] = round(sum(clocks) / len(clocks))
    slowed = [any(s["slowdown"]) for s in inside if s.get("slowdown")]
    if slowed:
        out["gpu_slowdown_share"] = _mean(slowed)
    if states:
        out["step_thread_states"] = {role: _shares(c) for role, c in sorted(states.items())}
        out["step_thread_polls"] = {role: sum(c.values()) for role, c in sorted(states.items())}
    return out


def _shares(counts: dict[str, int], top: int = 6) -> dict[str, float]:
    """The ``top`` most frequent states as shares of all polls (the rest as ``other``)."""
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    out = {k: round(n / total, 3) for k, n in ranked[:top]}
    if len(ranked) > top:
        out["other"] = round(sum(n for _, n in ranked[top:]) / total, 3)
    return out


def _mean(values: Any) -> float:
    got = [float(v) for v in values]
    return round(sum(got) / len(got), 3) if got else 0.0


class Usage:
    """The sampler beside this process, started on entry and stopped on exit; ``window`` then
    summarises a span of wall-clock time (``time.time()`` values)."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        fd, self.path = tempfile.mkstemp(prefix="lepton-usage-", suffix=".jsonl")
        os.close(fd)
        self._proc: subprocess.Popen | None = None
        self._kept: list[dict[str, Any]] | None = None  # the samples, once stopped

    def __enter__(self) -> Usage:
        args = [sys.executable, "-m", "benchmarks._usage", self.path]
        args += ["--driver", str(os.getpid()), "--interval", str(self.interval)]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self._proc = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        self._kept = self.samples()  # and the file goes
        os.unlink(self.path)

    def samples(self) -> list[dict[str, Any]]:
        if self._kept is not None:
            return self._kept
        with open(self.path) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def window(self, start: float, end: float, focus: str) -> dict[str, Any]:
        return summarise(self.samples(), start, end, focus)

    def attach(self, r: dict[str, Any], windows: dict[str, tuple[float, float, str]]) -> None:
        """Each side's summary into its entry of the result ``r`` (side -> start, end, focus)."""
        for side, (start, end, focus) in windows.items():
            r[side]["usage"] = self.window(start, end, focus)


def sampled(enabled: bool, body: Callable[[Usage | None], dict[str, Any]]) -> dict[str, Any]:
    """``body(usage)`` with the sampler running beside it, or ``body(None)`` when not enabled."""
    if not enabled:
        return body(None)
    with Usage() as usage:
        return body(usage)


def add_arg(ap: argparse.ArgumentParser) -> None:
    """A benchmark's ``--no-usage``: no sampler beside the run."""
    ap.add_argument(
        "--no-usage",
        dest="usage",
        action="store_false",
        help="no per-thread CPU and GPU-utilisation sampler beside the run (benchmarks/_usage.py)",
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks._usage", description=__doc__)
    ap.add_argument("out", help="JSON lines file to write")
    ap.add_argument("--driver", type=int, required=True, help="the benchmark's own process id")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):  # run by hand and stopped with ^C
        sample_forever(args.out, args.driver, args.interval)


if __name__ == "__main__":
    main()
