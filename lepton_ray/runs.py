"""The run folder: the one place that knows what a run writes where.

    <runs>/<run>/
        checkpoint_epoch0015_step0000600/   one folder per checkpoint (complete once its
                                            manifest.json exists; see lepton_ray.checkpoint)
        best/<checkpoint>/                  a copy of the best checkpoint so far
        best.json                           pointer to it: {"path": "best/<checkpoint>", "uri",
                                            "metric", "value", "epoch"}; written last
        metrics.jsonl                       one line per finished epoch
        sample_ids/                         ids trained per step (record_sample_ids)
        tensorboard/                        event files
        curves.svg                          the loss/accuracy curves
        eval/<checkpoint>-<split>.json      pipelines.evaluate's results
        exported/<checkpoint>/              a sharded checkpoint consolidated into one file
                                            (pipelines.evaluate and promote, made once)
        pipeline.json                       the resolved pipeline config (pipelines.train)
        data/<split>/                       torch datasets uploaded for the run

    <store>/serving/<app>/current.json      what an application serves (pipelines.promote)

Pointers are data: ``best.json`` is followed only through its ``path``, which must name one
checkpoint folder directly under ``best/`` (its ``uri`` is recomputed, never trusted). Names that
become path parts (runs, Serve apps, datasets, splits) pass :func:`validate_name`.

Everything here reads manifests and pointers only: no torch, no weights.
"""

from __future__ import annotations

import re
import time
import warnings
from typing import Any

from lepton_ray import storage
from lepton_ray.checkpoint import MANIFEST as CHECKPOINT_MANIFEST
from lepton_ray.errors import ConfigError, StorageError

BEST, BEST_POINTER = "best", "best.json"
METRICS, SAMPLE_IDS, TENSORBOARD, CURVES = (
    "metrics.jsonl",
    "sample_ids",
    "tensorboard",
    "curves.svg",
)
EVAL, PIPELINE, DATA, EXPORTED = "eval", "pipeline.json", "data", "exported"
SERVING, CURRENT = "serving", "current.json"
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of its checkpoints

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CHECKPOINT = re.compile(r"checkpoint_epoch(\d{4,})_step(\d{7,})")


def validate_name(kind: str, name: Any) -> str:
    """``name`` if it is one safe path segment (``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``: no ``/``,
    no ``..``, no leading dot), else a one-line :class:`ConfigError` naming ``kind`` and the value.

    For names users give that become folders: runs, Serve apps, datasets, splits. ``run_name=..``
    once deleted a whole store; this is why.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it becomes a folder name)"
        )
    return name


def checkpoint_name(epoch: int, step: int) -> str:
    """The folder name of the checkpoint taken at ``epoch`` after optimizer step ``step``:
    ``checkpoint_name(15, 600) == "checkpoint_epoch0015_step0000600"`` (zero-padded, so names sort
    in training order up to epoch 9999 / step 9,999,999; :func:`parse_checkpoint_name` sorts
    correctly past that)."""
    if epoch < 0 or step < 0:
        raise ValueError(f"epoch and step must be >= 0, got {epoch}, {step}")
    return f"checkpoint_epoch{epoch:04d}_step{step:07d}"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """(epoch, step) of a checkpoint folder name, or None for any other name."""
    m = _CHECKPOINT.fullmatch(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


class RunLayout:
    """The paths of one run folder (see the module docstring), over a :class:`storage.Location`.

    >>> run = RunLayout.under("s3://bucket/runs", "mnist")      # doctest: +SKIP
    >>> run.checkpoint(15, 600).uri                              # doctest: +SKIP
    's3://bucket/runs/mnist/checkpoint_epoch0015_step0000600'
    """

    def __init__(self, root: storage.Location):
        self.root = root

    @classmethod
    def under(
        cls, runs: str | storage.Location, name: str, endpoint_url: str | None = None
    ) -> RunLayout:
        """The run called ``name`` (validated) under the runs folder ``runs``."""
        return cls(storage.resolve(runs, endpoint_url).join(validate_name("run", name)))

    @classmethod
    def of_checkpoint(cls, ckpt: storage.Location) -> tuple[RunLayout, str]:
        """(the run a checkpoint folder belongs to, the checkpoint's name): its parent folder, or
        the run above ``best/`` or ``exported/`` for a copy. A checkpoint outside any run gets its
        parent."""
        parent = ckpt.parent
        if parent.name in (BEST, EXPORTED) and parse_checkpoint_name(ckpt.name):
            parent = parent.parent
        return cls(parent), ckpt.name

    @property
    def uri(self) -> str:
        return self.root.uri

    @property
    def name(self) -> str:
        return self.root.name

    def __repr__(self) -> str:
        return f"RunLayout({self.root.uri!r})"

    # --- checkpoints -----------------------------------------------------------------------
    def checkpoint(self, epoch: int, step: int) -> storage.Location:
        """Where the checkpoint of (epoch, step) goes."""
        return self.root.join(checkpoint_name(epoch, step))

    def checkpoints(self) -> list[storage.Location]:
        """The complete checkpoints (manifest present), oldest first by (epoch, step)."""
        named = sorted(
            (key, name) for name in self.root.listdir() if (key := parse_checkpoint_name(name))
        )
        done = [self.root.join(name) for _, name in named]
        return [c for c in done if c.join(CHECKPOINT_MANIFEST).exists()]

    def latest(self) -> storage.Location | None:
        """The latest complete checkpoint, or None. Checked newest first, so a run with many
        checkpoints costs one or two existence checks."""
        named = sorted(
            ((key, name) for name in self.root.listdir() if (key := parse_checkpoint_name(name))),
            reverse=True,
        )
        for _, name in named:
            loc = self.root.join(name)
            if loc.join(CHECKPOINT_MANIFEST).exists():
                return loc
        return None

    def committed_step(self, settle_s: float = 2.0) -> int:
        """The step of the latest checkpoint Ray Train has registered for this run, i.e. where a
        restart of the worker group resumes (0 before the first): read from Ray Train's own
        ``checkpoint_manager_snapshot.json``, which it writes into the run folder. For tests and
        benchmarks that must act right after a checkpoint is committed.

        Ray Train rewrites the file in place (truncate, then write), so a read can land between the
        two and find it empty or cut short: such a read is retried for up to ``settle_s`` rather
        than taken for "no checkpoint yet" (a step that seems to go back to 0)."""
        deadline = time.monotonic() + settle_s
        while True:
            try:
                snapshot = self.root.join(RAY_TRAIN_SNAPSHOT).read_json()
            except StorageError:
                return 0
            except ValueError:  # being rewritten: read it again
                if time.monotonic() >= deadline:
                    return 0
                time.sleep(0.01)
                continue
            try:
                return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
            except (KeyError, TypeError, ValueError):
                return 0

    # --- the best checkpoint ---------------------------------------------------------------
    @property
    def best_dir(self) -> storage.Location:
        return self.root.join(BEST)

    @property
    def best_pointer(self) -> storage.Location:
        return self.root.join(BEST_POINTER)

    def best_copy(self, name: str) -> storage.Location:
        """Where the copy of checkpoint ``name`` goes when it becomes the best."""
        return self.best_dir.join(_checkpoint_segment(name, self.best_pointer))

    def read_best(self) -> dict[str, Any] | None:
        """``best.json`` (metric, value, epoch, path, uri), or None when there is none yet.

        Its ``path`` must be ``best/<checkpoint name>``; its ``uri`` is recomputed from that path,
        so a pointer cannot send a reader (or a delete) anywhere else. A bad pointer is a one-line
        :class:`StorageError`.
        """
        try:
            record = self.best_pointer.read_json()
        except storage.NotFoundError:
            return None
        except ValueError:
            raise StorageError(f"{self.best_pointer.uri} is not JSON") from None
        if not isinstance(record, dict):
            raise StorageError(f"{self.best_pointer.uri} is not a JSON object")
        path = record.get("path")
        prefix = BEST + "/"
        if not isinstance(path, str) or not path.startswith(prefix):
            raise StorageError(
                f"{self.best_pointer.uri} must point at a checkpoint folder directly under "
                f"{BEST}/, got {path!r}"
            )
        copy = self.best_copy(path[len(prefix) :])
        return {**record, "path": path, "uri": copy.uri}

    def point_best(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        """Make ``best/<name>`` (already published) the best: write ``best.json`` (last, the
        commit point), then delete the previous best copy. Returns the pointer written.

        A previous pointer that does not name a folder under ``best/`` is overwritten, and
        nothing is deleted for it.
        """
        try:
            previous = self.read_best()
        except StorageError as exc:
            warnings.warn(f"ignoring the previous best: {exc}", stacklevel=2)
            previous = None
        copy = self.best_copy(name)
        pointer = {**record, "path": f"{BEST}/{copy.name}", "uri": copy.uri}
        self.best_pointer.write_json(pointer)
        if previous and previous["path"] != pointer["path"]:
            self.root.join(previous["path"]).delete()
        return pointer

    # --- the other files of a run ----------------------------------------------------------
    @property
    def metrics(self) -> storage.Location:
        return self.root.join(METRICS)

    @property
    def sample_ids(self) -> storage.Location:
        return self.root.join(SAMPLE_IDS)

    @property
    def tensorboard(self) -> storage.Location:
        return self.root.join(TENSORBOARD)

    @property
    def curves(self) -> storage.Location:
        return self.root.join(CURVES)

    @property
    def pipeline(self) -> storage.Location:
        return self.root.join(PIPELINE)

    def eval_result(self, checkpoint: str, split: str) -> storage.Location:
        """Where the evaluation of checkpoint folder ``checkpoint`` on ``split`` goes."""
        checkpoint = validate_name("checkpoint", checkpoint)
        return self.root.join(EVAL, f"{checkpoint}-{validate_name('split', split)}.json")

    def exported(self, checkpoint: str) -> storage.Location:
        """Where the consolidated copy of sharded checkpoint folder ``checkpoint`` goes."""
        return self.root.join(EXPORTED, validate_name("checkpoint", checkpoint))

    def data(self, split: str) -> storage.Location:
        """Where a torch dataset given to ``fit`` for ``split`` is uploaded."""
        return self.root.join(DATA, validate_name("split", split))


def serving_home(
    store: str | storage.Location, app: str, endpoint_url: str | None = None
) -> storage.Location:
    """``<store>/serving/<app>``: the pointer (``current.json``) and Serve config of an app."""
    return storage.resolve(store, endpoint_url).join(SERVING, validate_name("app", app))


def _checkpoint_segment(name: Any, pointer: storage.Location) -> str:
    if not isinstance(name, str) or "/" in name or parse_checkpoint_name(name) is None:
        raise StorageError(
            f"{pointer.uri} must point at a checkpoint folder directly under {BEST}/, "
            f"got {BEST}/{name}"
        )
    return name
