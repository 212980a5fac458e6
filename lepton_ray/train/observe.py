"""Observability of a run: progress on the driver, metrics saved with the run.

- Progress: every worker sends its position and timings to a :class:`ProgressBoard` actor a few
  times per epoch (fire-and-forget actor calls; a ``ray.train.report`` would be a barrier costing
  about a second each). The driver polls the board's summary (epoch, step, samples/s, ETA, world
  size, the slowest worker when one lags) and draws one tqdm bar in a terminal or a notebook, or
  prints a plain line now and then where the output is a log (a pipe, a file, a Ray job).
- Notes: what a user must act on happens inside the workers, whose output stays in Ray's log folder
  (:mod:`lepton_ray.console`); the board turns it into one line each for the driver to print: a
  lagging worker, a worker group restarted or resized, a run resumed from a checkpoint.
- Records: :class:`RunObserver` runs in Ray Train's controller and sees the epoch-end reports; it
  writes each finished epoch to ``<run>/metrics.jsonl``, TensorBoard event files under
  ``<run>/tensorboard/`` and the curves to ``<run>/curves.svg``.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
import uuid
from typing import Any

import ray
from ray.train import UserCallback

from lepton_ray import storage
from lepton_ray.errors import StorageError

LAG_FACTOR = 1.25  # a worker lags when its compute + input wait exceeds the median by this factor


def slowest_worker(per_worker: list[dict[str, Any]]) -> int | None:
    """The rank whose forward compute plus input wait stands out (> LAG_FACTOR x the median), if any."""
    scores = [
        (m.get("fwd_s", 0.0) + m.get("data_wait_s", 0.0), m.get("rank", i))
        for i, m in enumerate(per_worker)
    ]
    if len(scores) < 2:
        return None
    median = statistics.median(s for s, _ in scores)
    worst, rank = max(scores)
    return rank if median > 0 and worst > LAG_FACTOR * median else None


def eta_seconds(done_steps: int, total_steps: int, elapsed_s: float) -> float | None:
    """Seconds left at the average pace so far."""
    if done_steps <= 0 or elapsed_s <= 0:
        return None
    return max(0, total_steps - done_steps) * elapsed_s / done_steps


def group_note(previous_world: int | None, state: dict[str, Any]) -> str | None:
    """The line to print when a worker group reports for the first time (``state`` is its rank
    0's first update): a run resumed, a group restarted after a failure or resized; else None.

    ``step - steps_since_start`` is the optimizer step the group started from: the restored
    checkpoint's, 0 for a fresh start. ``previous_world`` is the size of the group before (None:
    this is the run's first group).
    """
    start = state["step"] - state.get("steps_since_start", 0)
    world = state.get("world_size")
    where = f"the checkpoint at step {start}" if start > 0 else "the start (no checkpoint yet)"
    if previous_world is None:
        return f"resumed from the checkpoint at step {start}" if start > 0 else None
    if world != previous_world:
        return f"worker group resized: {previous_world} -> {_workers(world)}, resumed from {where}"
    return f"worker group restarted after a failure ({_workers(world)}), resumed from {where}"


def _workers(n: Any) -> str:
    return f"{n} worker" + ("" if n == 1 else "s")


def status_line(s: dict[str, Any], loss: float | None = None) -> str:
    """One line of progress from a board summary (the plain-output form of the bar)."""
    total = s.get("total_steps") or 0
    step = min(int(s["step"]), total) if total else int(s["step"])
    parts = [f"epoch {s.get('epoch')}", f"step {step}/{total}"]
    if total:
        parts[-1] += f" ({100 * step // total}%)"
    if s.get("samples_per_second"):
        parts.append(f"{s['samples_per_second']:.0f} samples/s")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if s.get("eta_s") is not None:
        parts.append(f"eta {s['eta_s']:.0f}s")
    parts.append(_workers(s.get("world_size")))
    return "[train] " + "  ".join(parts)


class WorkerProgress:
    """A worker's side of the progress bar: about ten updates per epoch (or every
    ``every_steps``) to the :class:`ProgressBoard`, fire and forget (no barrier)."""

    def __init__(self, board: Any, rank: int, world: int, every_steps: int | None):
        self.board, self.rank, self.world, self.every = board, rank, world, every_steps
        self.group = uuid.uuid4().hex  # rank 0's token tells the board a new worker group began
        self.steps_before = 0  # steps this worker group took in earlier epochs
        self.epoch, self.steps, self.t0 = 0, 0, 0.0

    def start_epoch(self, epoch: int, steps: int, t0: float) -> None:
        self.steps_before += self.steps if self.epoch else 0
        self.epoch, self.steps, self.t0 = epoch, steps, t0
        self.period = self.every or max(1, steps // 10)

    def timing(self, step: Any, batches: Any, done: int) -> dict[str, Any]:
        """What the driver uses to name a lagging worker and to pace the ETA."""
        return {
            "rank": self.rank,
            "fwd_s": step.fwd_s,
            "data_wait_s": batches.wait_s,
            "steps_since_start": self.steps_before + done,
        }

    def update(self, step: Any, sums: Any, i: int, timing: dict[str, Any]) -> None:
        last = i == self.steps - 1
        if self.board is None or not ((i + 1) % self.period == 0 or last):
            return
        samples = (i + 1) * step.cfg.batch_size
        self.board.update.remote(
            self.rank,
            {
                "epoch": self.epoch,
                "step": step.global_step,
                "world_size": self.world,
                "samples_per_second": samples / max(time.perf_counter() - self.t0, 1e-9),
                "train_loss": float(sums[0] / sums[2]) if last and sums[2] else None,
                "group": self.group,
            }
            | timing,
        )


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Latest position of every worker; the driver reads a summary."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.workers: dict[int, dict[str, Any]] = {}
        self.started: float | None = None
        self.first_step = 0
        self.group: str | None = None  # rank 0's token: the worker group reporting now
        self.group_world: int | None = None
        self.notes: list[str] = []  # lines for the driver to print, in order

    def update(self, rank: int, state: dict[str, Any]) -> None:
        if rank == 0 and state.get("group") != self.group:
            note = group_note(self.group_world, state)
            if note:
                self.notes.append(note)
            self.group, self.group_world = state.get("group"), state.get("world_size")
        if self.started is None:  # pace counts from the first report (a resumed run starts mid-way)
            self.started, self.first_step = (
                time.time(),
                state["step"] - state.get("steps_since_start", 0),
            )
        if state.get("world_size") and state["world_size"] != len(self.workers):
            self.workers = {r: w for r, w in self.workers.items() if r < state["world_size"]}
        self.workers[rank] = state

    def summary(self) -> dict[str, Any]:
        if 0 not in self.workers:
            return {"notes": list(self.notes)} if self.notes else {}
        lead = self.workers[0]
        elapsed = time.time() - (self.started or time.time())
        return {
            **lead,
            "total_steps": self.total_steps,
            "eta_s": eta_seconds(
                lead["step"] - self.first_step, self.total_steps - self.first_step, elapsed
            ),
            "slowest_worker": slowest_worker([self.workers[r] for r in sorted(self.workers)]),
            "notes": list(self.notes),
        }


TB_EVENTS = "events.out.tfevents.lepton_ray"  # TensorBoard reads any file named *tfevents*
_TB_KEYS = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "samples_per_second",
    "lr",
    "world_size",
)


class RunObserver(UserCallback):
    """Ray Train callback (controller side): the run's metrics files, written at each epoch end."""

    def __init__(self, run_uri: str, endpoint_url: str | None):
        self.run_uri, self.endpoint_url = run_uri, endpoint_url

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        if metrics and metrics[0].get("epoch_end"):
            self._record_epoch(metrics[0])

    def _record_epoch(self, m: dict[str, Any]) -> None:
        from lepton_ray.runs import RunLayout

        run = RunLayout(storage.resolve(self.run_uri, self.endpoint_url))
        history = [json.loads(line) for line in _read_lines(run.metrics)]
        history = [h for h in history if h["epoch"] < m["epoch"]] + [_plain(m)]
        run.metrics.write_bytes(("\n".join(json.dumps(h) for h in history) + "\n").encode())
        self._tensorboard(history, run)
        from lepton_ray.viz import curves_svg

        run.curves.write_bytes(curves_svg(history).encode())

    def _tensorboard(self, history: list[dict[str, Any]], run: Any) -> None:
        """One event file of every epoch so far, rewritten whole at each epoch end under one name:
        a resumed run (a new controller) replaces it instead of adding a second file of the same
        epochs. Encoded by :mod:`~lepton_ray.train.tb_events` (TensorBoard itself is not needed)."""
        from lepton_ray.train import tb_events

        now = time.time()
        points = [
            (key, m[key], m["epoch"], m.get("reported_at", now))
            for m in history
            for key in _TB_KEYS
            if key in m
        ]
        run.tensorboard.join(TB_EVENTS).write_bytes(tb_events.scalar_file(points, now))


def divergence(run: Any, fit_id: str) -> dict[str, Any] | None:
    """The epoch line in which this ``fit()`` call's run diverged (:func:`lepton_ray.train.loop.
    diverged`), or None."""
    try:
        lines = _read_lines(run.metrics)
    except (StorageError, OSError):  # a finished run is not failed for a file unreadable now
        return None
    last = json.loads(lines[-1]) if lines else {}
    return last if last.get("diverged") and last.get("fit_id") == fit_id else None


def _read_lines(loc: storage.Location) -> list[str]:
    return loc.read_bytes().decode().splitlines() if loc.exists() else []


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in m.items() if k not in ("epoch_end", "rank", "fwd_s", "steps_since_start")
    }


class ProgressBar:
    """Driver side: poll the board and show the run's progress and notes.

    Where someone watches (a terminal, a notebook) it is one tqdm bar (``tqdm.auto``) with the
    notes written above it; where the output is a log (``live`` False: stderr is not a terminal)
    a bar redrawn with ``\\r`` is noise, so it prints a plain line every ``line_every_s`` seconds
    and a last one when training ends, the notes in between.
    """

    def __init__(
        self,
        board: Any,
        total_steps: int,
        interval_s: float = 0.5,
        *,
        live: bool | None = None,
        line_every_s: float = 30.0,
    ):
        self.board, self.total, self.interval = board, total_steps, interval_s
        self.live = _watched() if live is None else live
        self.line_every_s = line_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressBar:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        view = _Bar(self.total) if self.live else _Lines(self.line_every_s)
        printed, lagged = 0, set()  # a lagging worker is named once a run, not on every flicker
        try:
            while True:
                final = self._stop.wait(self.interval)
                try:
                    s = ray.get(self.board.summary.remote(), timeout=5)
                except Exception:  # noqa: BLE001 - progress is best effort
                    s = {}
                notes = s.get("notes", [])
                for note in notes[printed:]:
                    view.note(note)
                printed = len(notes)
                if "step" in s:
                    lag = s.get("slowest_worker")
                    if lag is not None and lag not in lagged:
                        lagged.add(lag)
                        view.note(
                            f"worker {lag} is lagging (compute + input wait > {LAG_FACTOR}x the median)"
                        )
                    view.show(s, final)
                if final:
                    return
        finally:
            view.close()


def _watched() -> bool:
    """True in a notebook kernel or when stderr is a terminal: a live bar is read, not logged."""
    return _in_notebook() or sys.stderr.isatty()


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return type(ip).__name__ == "ZMQInteractiveShell"


class _Bar:
    """One tqdm bar (a widget in a notebook with ipywidgets, else text); notes written above it."""

    def __init__(self, total: int) -> None:
        import importlib.util

        if _in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
            from tqdm.notebook import tqdm
        else:  # tqdm.auto would warn that ipywidgets is missing; Jupyter draws the text bar fine
            from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", desc="training", dynamic_ncols=True)

    def show(self, s: dict[str, Any], final: bool) -> None:
        self.bar.n = min(int(s["step"]), self.bar.total)
        post = {"epoch": s.get("epoch"), "workers": s.get("world_size")}
        if s.get("samples_per_second"):
            post["samples/s"] = f"{s['samples_per_second']:.0f}"
        if s.get("train_loss") is not None:
            post["loss"] = f"{s['train_loss']:.4f}"
        if s.get("eta_s") is not None:
            post["eta"] = f"{s['eta_s']:.0f}s"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def note(self, text: str) -> None:
        self.bar.write(f"[train] {text}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    """Plain lines on stderr: one every ``every_s`` seconds and a last one; notes as they come."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self.last_at, self.last_line = every_s, time.monotonic(), ""
        self.loss: float | None = None  # known at an epoch's end: shown until the next one

    def show(self, s: dict[str, Any], final: bool) -> None:
        if s.get("train_loss") is not None:
            self.loss = s["train_loss"]
        line = status_line(s, self.loss)
        due = time.monotonic() - self.last_at >= self.every_s
        if (due or final) and line != self.last_line:
            print(line, file=sys.stderr, flush=True)
            self.last_at, self.last_line = time.monotonic(), line

    def note(self, text: str) -> None:
        print(f"[train] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Nothing to release: each line was printed and flushed as it came."""
