"""Observability of a run: progress on the driver, metrics saved with the run.

- Progress: every worker sends its position and timings to a :class:`ProgressBoard` actor a few
  times per epoch (fire-and-forget actor calls; a ``ray.train.report`` would be a barrier costing
  about a second each). The driver polls the board's summary (epoch, step, samples/s, ETA, world
  size, the slowest worker when one lags) and draws a tqdm bar, in a terminal or a notebook.
- Records: :class:`RunObserver` runs in Ray Train's controller and sees the epoch-end reports; it
  writes each finished epoch to ``<run>/metrics.jsonl``, TensorBoard event files under
  ``<run>/tensorboard/`` and the curves to ``<run>/curves.png``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.train import UserCallback

from lepton_ray import storage

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


class WorkerProgress:
    """A worker's side of the progress bar: about ten updates per epoch (or every
    ``every_steps``) to the :class:`ProgressBoard`, fire and forget (no barrier)."""

    def __init__(self, board: Any, rank: int, world: int, every_steps: int | None):
        self.board, self.rank, self.world, self.every = board, rank, world, every_steps
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
                "train_loss": float(sums[0] / sums[2]) if last else None,
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

    def update(self, rank: int, state: dict[str, Any]) -> None:
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
            return {}
        lead = self.workers[0]
        elapsed = time.time() - (self.started or time.time())
        return {
            **lead,
            "total_steps": self.total_steps,
            "eta_s": eta_seconds(
                lead["step"] - self.first_step, self.total_steps - self.first_step, elapsed
            ),
            "slowest_worker": slowest_worker([self.workers[r] for r in sorted(self.workers)]),
        }


class RunObserver(UserCallback):
    """Ray Train callback (controller side): the run's metrics files, written at each epoch end."""

    def __init__(self, run_uri: str, endpoint_url: str | None):
        self.run_uri, self.endpoint_url = run_uri, endpoint_url
        self._tb_dir: str | None = None
        self._writer: Any = None

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
        self._tensorboard(m, run)
        try:
            from lepton_ray.viz import plot_history

            with tempfile.TemporaryDirectory() as tmp:
                fig = plot_history(history, f"{tmp}/curves.png")
                import matplotlib.pyplot as plt

                plt.close(fig)
                run.curves.upload_file(f"{tmp}/curves.png")
        except (
            ImportError
        ):  # matplotlib is a dependency, but a cluster image may lack it: the plot is optional
            return

    def _tensorboard(self, m: dict[str, Any], run: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        if self._writer is None:
            self._tb_dir = tempfile.mkdtemp(prefix="lepton-tb-")
            self._writer = SummaryWriter(self._tb_dir)
        for key in (
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "samples_per_second",
            "lr",
            "world_size",
        ):
            if key in m:
                self._writer.add_scalar(key, m[key], m["epoch"])
        self._writer.flush()
        for f in Path(self._tb_dir).iterdir():
            run.tensorboard.join(f.name).upload_file(f)


def _read_lines(loc: storage.Location) -> list[str]:
    return loc.read_bytes().decode().splitlines() if loc.exists() else []


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in m.items() if k not in ("epoch_end", "rank", "fwd_s", "steps_since_start")
    }


class ProgressBar:
    """Driver side: poll the board and draw a tqdm bar (``tqdm.auto``: terminal or notebook)."""

    def __init__(self, board: Any, total_steps: int, interval_s: float = 0.5):
        self.board, self.total, self.interval = board, total_steps, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressBar:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, unit="step", desc="training", dynamic_ncols=True)
        last_note = None
        try:
            while not self._stop.wait(self.interval):
                try:
                    s = ray.get(self.board.summary.remote(), timeout=5)
                except Exception:  # noqa: BLE001 - the bar is best effort
                    continue
                if not s:
                    continue
                bar.n = min(int(s["step"]), self.total)
                post = {"epoch": s.get("epoch"), "workers": s.get("world_size")}
                if s.get("samples_per_second"):
                    post["samples/s"] = f"{s['samples_per_second']:.0f}"
                if s.get("train_loss") is not None:
                    post["loss"] = f"{s['train_loss']:.4f}"
                if s.get("val_accuracy") is not None:
                    post["val_acc"] = f"{s['val_accuracy']:.4f}"
                if s.get("eta_s") is not None:
                    post["eta"] = f"{s['eta_s']:.0f}s"
                bar.set_postfix(post, refresh=False)
                bar.refresh()
                note = s.get("slowest_worker")
                if note is not None and note != last_note:
                    bar.write(
                        f"[lepton_ray] worker {note} is lagging (compute + input wait > {LAG_FACTOR}x the median)"
                    )
                last_note = note
        finally:
            bar.close()
