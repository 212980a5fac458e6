"""Progress of a run: each worker's position, gathered on a board the driver reads and draws.

Every worker sends its position and timings to the driver's :class:`ProgressBoard` a few times per
epoch (fire-and-forget actor calls; a ``ray.train.report`` would be a barrier costing about a
second each). The driver polls the board's summary of its fit (epoch, step, samples/s, ETA, world
size, the slowest worker when one lags) and draws one tqdm bar in a terminal or a notebook, or
prints a plain line now and then where the output is a log (a pipe, a file, a Ray job).

What a user must act on happens inside the workers, whose output stays in Ray's log folder
(:mod:`lepton_ray.console`); the board turns it into one line each for the driver to print: a
lagging worker, a worker group restarted or resized, a run resumed from a checkpoint.

One board serves every fit of a driver (:func:`driver_board`), each fit's state kept under its
``fit_id``. A board of its own per fit was one more Ray worker process for each ``fit()`` to
start, beside Ray Train's: 2.2-2.7 s of CPU each on 2 cores, while the fit itself starts. This
module imports Ray's core only, not Ray Train, and the board's process took 1.1-1.2 s there.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import uuid
from typing import Any

import ray

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
    ``every_steps``) to the :class:`ProgressBoard`, under its fit's ``fit_id``, fire and forget
    (no barrier)."""

    def __init__(
        self, board: Any, fit_id: str, rank: int, world: int, every_steps: int | None
    ) -> None:
        self.board, self.fit_id, self.rank, self.world = board, fit_id, rank, world
        self.every = every_steps
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
            self.fit_id,
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


class _FitProgress:
    """One fit's latest position of every worker."""

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


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest position of every worker of each fit under way; the driver reads a summary.

    A fit is known from :meth:`start` to :meth:`end`; an update for a fit not known (a worker of
    a fit that has ended, still sending) is dropped."""

    def __init__(self) -> None:
        self.fits: dict[str, _FitProgress] = {}

    def start(self, fit_id: str, total_steps: int) -> None:
        self.fits[fit_id] = _FitProgress(total_steps)

    def update(self, fit_id: str, rank: int, state: dict[str, Any]) -> None:
        if fit_id in self.fits:
            self.fits[fit_id].update(rank, state)

    def summary(self, fit_id: str) -> dict[str, Any]:
        fit = self.fits.get(fit_id)
        return fit.summary() if fit is not None else {}

    def end(self, fit_id: str) -> None:
        self.fits.pop(fit_id, None)


_held: tuple[tuple[str, str], Any] | None = None  # (job and node of the driver, its board)


def driver_board(fit_id: str, total_steps: int) -> Any:
    """The board of this driver, with ``fit_id`` started on it: the one its earlier fits used while
    it answers, else a new one (the first fit, Ray started again, the board's process gone).

    The driver holds the board's first handle, the one that keeps a Ray actor alive, between fits;
    it ends with the driver's job or with Ray's shutdown in it. Named for the job: not counted
    among the processes a fit started for itself (:func:`lepton_ray.train.prestart.
    processes_to_start`)."""
    global _held
    here = ray.get_runtime_context()
    ray_driver = (here.get_job_id(), here.get_node_id())  # a node's id is new at each Ray start
    if _held is not None and _held[0] == ray_driver and _started(_held[1], fit_id, total_steps):
        return _held[1]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    board = ProgressBoard.options(
        name=f"lepton_ray.progress.{here.get_job_id()}",
        get_if_exists=True,
        # On the driver's node: a worker node that leaves the cluster does not take it along.
        scheduling_strategy=NodeAffinitySchedulingStrategy(here.get_node_id(), soft=True),
    ).remote()
    board.start.remote(fit_id, total_steps)  # before any update: the workers start after it
    _held = (ray_driver, board)
    return board


def _started(board: Any, fit_id: str, total_steps: int) -> bool:
    """Whether ``board`` answered ``start`` for ``fit_id``: False when it is gone (its node left,
    it was killed) or stuck."""
    try:
        ray.get(board.start.remote(fit_id, total_steps), timeout=10)
    except (ray.exceptions.RayError, TimeoutError):
        return False
    return True


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
        fit_id: str,
        total_steps: int,
        interval_s: float = 0.5,
        *,
        live: bool | None = None,
        line_every_s: float = 30.0,
    ):
        self.board, self.fit_id, self.total, self.interval = board, fit_id, total_steps, interval_s
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
        self.board.end.remote(self.fit_id)  # the board serves the driver's next fit

    def _run(self) -> None:
        view = _Bar(self.total) if self.live else _Lines(self.line_every_s)
        printed, lagged = 0, set()  # a lagging worker is named once a run, not on every flicker
        try:
            while True:
                final = self._stop.wait(self.interval)
                try:
                    s = ray.get(self.board.summary.remote(self.fit_id), timeout=5)
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
