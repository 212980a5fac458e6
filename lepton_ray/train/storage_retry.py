"""Resume a run that Ray Train gave up on because storage went away under its own bookkeeping.

Ray Train's controller writes ``checkpoint_manager_snapshot.json`` into the run folder after every
checkpoint, and reads it when a run starts. That write has no retries of ours and is outside
``max_failures`` (which restarts the worker group, not the controller): an object store that is
down for a few seconds at that moment failed the whole run, which ``resume=True`` then continued.
:func:`run_resuming` does that itself: when the run failed for a storage reason (the controller's
own error, an ``OSError`` at its root: pyarrow's S3 and local I/O errors), and the run folder has
a complete checkpoint or none was written yet, it starts the run again, resumed from the snapshot
Ray Train last wrote (written before Ray deletes old checkpoints, so what it names still exists).
Everything else (a lepton_ray error, a user's exception, a worker group out of ``max_failures``)
fails at once, as before.

Waits are :func:`lepton_ray.jobs.retry_delay` (the one backoff of the package), from
``STORAGE_RETRY_BASE_S``: 2, 4, 8, 16 s nominal, each drawn from its upper half.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from lepton_ray.errors import LeptonError, StorageError, TrainingError
from lepton_ray.jobs import retry_delay

T = TypeVar("T")
STORAGE_RETRIES = 4
STORAGE_RETRY_BASE_S = 2.0
STORAGE_RETRY_CAP_S = 30.0


class StorageInterrupted(TrainingError):
    """The run failed because storage failed under Ray Train's controller (see the module)."""


def controller_storage_failure(exc: BaseException) -> BaseException | None:
    """The storage error at the root of ``exc`` if Ray Train's controller failed on storage
    (``ray.train.ControllerError`` whose cause is an ``OSError``), else None.

    A worker group's failure is not one: it already had ``max_failures`` restarts, and its
    cause may be the user's code. Neither is a lepton_ray error, whatever its kind.
    """
    cause = getattr(exc, "controller_failure", None)
    while getattr(cause, "cause", None) is not None:  # RayTaskError chains
        cause = cause.cause
    if isinstance(cause, OSError) and not isinstance(cause, LeptonError):
        return cause
    return None


def run_resuming(
    attempt: Callable[[], T],
    resumable: Callable[[], bool],
    *,
    name: str,
    retries: int = STORAGE_RETRIES,
    base_s: float = STORAGE_RETRY_BASE_S,
    sleep: Callable[[float], Any] = time.sleep,
    log: Callable[[str], Any] = print,
) -> T:
    """``attempt()``, run again after each :class:`StorageInterrupted` it raises, up to
    ``retries`` times, waiting :func:`retry_delay` first and logging one line each time.

    ``resumable()`` is asked after each wait: False (a run folder with checkpoints, none of
    them complete) ends it with a :class:`TrainingError`; a :class:`StorageError` (storage still
    down) counts as one more failure.
    """
    failures = 0
    while True:
        try:
            return attempt()
        except StorageInterrupted as exc:
            failed = exc
        while True:  # wait, then check the run can resume; storage may still be down
            failures += 1
            if failures > retries:
                raise TrainingError(f"{failed} (gave up after {retries} resumed attempts)")
            delay = retry_delay(failures, base_s, STORAGE_RETRY_CAP_S)
            log(
                f"[lepton-ray] {failed}; resuming run '{name}' from its last checkpoint in "
                f"{delay:.1f} s (retry {failures} of {retries})"
            )
            sleep(delay)
            try:
                ok = resumable()
            except StorageError as exc:
                failed = exc
                continue
            if not ok:
                raise TrainingError(
                    f"{failed}; run '{name}' has checkpoints but none complete, so it is not "
                    "resumed: start it again under another run_name"
                )
            break
