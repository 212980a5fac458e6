"""Records of a run, kept with it: :class:`RunObserver` runs in Ray Train's controller and sees
the epoch-end reports; it writes each finished epoch to ``<run>/metrics.jsonl``, TensorBoard event
files under ``<run>/tensorboard/`` and the curves to ``<run>/curves.svg``; :func:`divergence` reads
back the epoch in which a fit diverged. A run's progress while it trains is
:mod:`lepton_ray.train.progress`'s.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ray.train import UserCallback

from lepton_ray import storage
from lepton_ray.errors import StorageError

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
