"""User-facing errors: one line that names the problem, never a Ray stack trace."""

from __future__ import annotations


class LeptonError(Exception):
    """A mistake the user can fix (bad input, bad URI, bad config). Printed as one line."""


class StorageError(LeptonError):
    """Object storage could not be read or written: missing bucket or object, unreachable
    endpoint, rejected credentials."""


class NotFoundError(StorageError):
    """The object or folder asked for does not exist (its bucket does). Callers that treat a
    missing object as "not there yet" catch this type, never the message text."""


class ConfigError(LeptonError, ValueError):
    """A configuration value is invalid; the message names the field."""


class CheckpointError(LeptonError):
    """A checkpoint is missing, incomplete, corrupt, or names code it may not run."""


class DataError(LeptonError):
    """A dataset is missing, malformed or does not fit the model."""


class TrainingError(LeptonError):
    """Training failed; the message carries the root cause from the worker."""


def one_line(exc: BaseException) -> str:
    """The first meaningful line of an exception, for CLIs and HTTP errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
