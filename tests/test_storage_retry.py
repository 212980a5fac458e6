"""Pure: which failed runs Trainer.fit resumes by itself, how often, and after what waits
(:mod:`lepton_ray.train.storage_retry`). The Ray run is in tests/test_chaos.py."""

from __future__ import annotations

import pytest

from lepton_ray.errors import ConfigError, StorageError, TrainingError
from lepton_ray.train.storage_retry import (
    StorageInterrupted,
    controller_storage_failure,
    run_resuming,
)


class ControllerError(Exception):  # the shape of ray.train.ControllerError
    def __init__(self, failure: BaseException):
        self.controller_failure = failure


class WorkerGroupError(Exception):  # the shape of ray.train.WorkerGroupError
    def __init__(self, failures: dict):
        self.worker_failures = failures


class RayTaskError(Exception):  # Ray's wrapper: the real error is .cause
    def __init__(self, cause: BaseException):
        self.cause = cause


S3_DOWN = OSError("When uploading part for key 'checkpoint_manager_snapshot.json': AWS Error")


@pytest.mark.parametrize(
    ("exc", "storage"),
    [
        (ControllerError(S3_DOWN), True),
        (ControllerError(RayTaskError(S3_DOWN)), True),
        (ControllerError(ValueError("a bug in a callback")), False),
        (ControllerError(StorageError("lepton_ray's own error")), False),
        (WorkerGroupError({0: S3_DOWN}), False),  # workers had max_failures restarts already
        (S3_DOWN, False),
        (ConfigError("bad"), False),
    ],
)
def test_only_storage_failing_under_the_controller_is_resumed(exc, storage):
    assert (controller_storage_failure(exc) is S3_DOWN) is storage


def attempts(*outcomes):
    """``attempt`` raising or returning each of ``outcomes`` in turn; ``calls`` counts them."""
    calls = []

    def attempt():
        calls.append(1)
        out = outcomes[len(calls) - 1]
        if isinstance(out, BaseException):
            raise out
        return out

    return attempt, calls


def resume(attempt, resumable=lambda: True, **kw):
    waits, lines = [], []
    out = run_resuming(attempt, resumable, name="r", sleep=waits.append, log=lines.append, **kw)
    return out, waits, lines


def test_a_run_interrupted_twice_is_resumed_with_backoff_and_one_line_each():
    attempt, calls = attempts(StorageInterrupted("down"), StorageInterrupted("down"), "done")
    out, waits, lines = resume(attempt)
    assert out == "done" and len(calls) == 3
    # retry_delay from 2 s: nominal 2 then 4, each in its upper half.
    assert 1.0 <= waits[0] <= 2.0 and 2.0 <= waits[1] <= 4.0, waits
    assert len(lines) == 2 and all("resuming run 'r'" in line for line in lines), lines
    assert "\n" not in "".join(lines) and "retry 2 of 4" in lines[1]


def test_other_failures_are_not_retried():
    attempt, calls = attempts(TrainingError("a worker raised ValueError"))
    with pytest.raises(TrainingError, match="ValueError"):
        resume(attempt)
    assert len(calls) == 1


def test_retries_are_bounded():
    attempt, calls = attempts(*[StorageInterrupted("down")] * 4)
    with pytest.raises(TrainingError, match=r"down \(gave up after 3 resumed attempts\)$"):
        resume(attempt, retries=3)
    assert len(calls) == 4


def test_storage_still_down_when_checked_counts_as_a_failure_and_waits_again():
    checks = iter([StorageError("unreachable"), True])

    def resumable():
        out = next(checks)
        if isinstance(out, BaseException):
            raise out
        return out

    attempt, calls = attempts(StorageInterrupted("down"), "done")
    out, waits, lines = resume(attempt, resumable)
    assert out == "done" and len(calls) == 2 and len(waits) == 2
    assert "unreachable" in lines[1]


def test_a_run_with_only_incomplete_checkpoints_is_not_resumed():
    attempt, calls = attempts(StorageInterrupted("down"), "done")
    with pytest.raises(TrainingError, match="none complete"):
        resume(attempt, lambda: False)
    assert len(calls) == 1
