"""Where the training loop's thread spent an epoch: on a CPU, waiting for one, or asleep.

An epoch's wall time (``epoch_time_s``) splits three ways for the thread that runs the loop:

- ``loop_cpu_s``: running on a CPU (its own work: on a GPU, launching the step's kernels);
- ``loop_runqueue_s``: runnable but waiting for a CPU, which the node's other work held;
- the rest, asleep: blocked on the GIL that another thread of the process holds, on a lock, on
  its next batch or on the GPU. ``loop_sleeps`` counts the times it blocked (voluntary context
  switches) and ``loop_preemptions`` the times the kernel took the CPU from it (involuntary).

When the loop's thread, not the GPU, sets the pace, these tell which slowed it: more CPU per
sample is more work per step, runqueue time is a busy node, and sleeps beyond the GPU's own pace
are other threads or processes holding what the loop needs. The kernel keeps the figures per
thread (``/proc/thread-self/schedstat`` and ``status``); where it does not (another OS, a kernel
without them) only ``loop_cpu_s`` is reported.
"""

from __future__ import annotations

import time
from pathlib import Path

_PROC = Path("/proc/thread-self")


def _scheduler(proc: Path) -> tuple[float, int, int] | None:
    """The calling thread's seconds waiting on a runqueue, voluntary and involuntary context
    switches; None where the kernel does not say."""
    try:
        runqueue_ns = int((proc / "schedstat").read_text().split()[1])
        switches = {}
        for line in (proc / "status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                switches[name] = int(value)
        return (
            runqueue_ns / 1e9,
            switches["voluntary_ctxt_switches"],
            switches["nonvoluntary_ctxt_switches"],
        )
    except (OSError, ValueError, IndexError, KeyError):
        return None


class ThreadClock:
    """The calling thread's figures since the previous :meth:`lap` (or since it was made). Make
    it, and lap it, on the thread it measures."""

    def __init__(self, proc: Path = _PROC):
        self._proc = proc
        self._last = self._read()

    def _read(self) -> tuple[float, tuple[float, int, int] | None]:
        return time.thread_time(), _scheduler(self._proc)

    def lap(self) -> dict[str, float | int]:
        """``loop_cpu_s`` and, where the kernel keeps them, ``loop_runqueue_s``, ``loop_sleeps``
        and ``loop_preemptions`` since the last lap."""
        (cpu0, sched0), (cpu1, sched1) = self._last, self._read()
        self._last = (cpu1, sched1)
        out: dict[str, float | int] = {"loop_cpu_s": round(cpu1 - cpu0, 4)}
        if sched0 is not None and sched1 is not None:
            out["loop_runqueue_s"] = round(sched1[0] - sched0[0], 4)
            out["loop_sleeps"] = sched1[1] - sched0[1]
            out["loop_preemptions"] = sched1[2] - sched0[2]
        return out
