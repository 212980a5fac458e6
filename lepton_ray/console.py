"""What a command, a pipeline or a notebook prints: lepton_ray's lines, not Ray's.

By default Ray's output stays out of the terminal and in the Ray session's log folder, whose path is
printed once:

- the workers' and actors' output (Ray Train's controller and workers, Ray Data's tasks, Serve's
  controller, proxy and replicas with their access log) is not streamed to the driver
  (``ray.init(log_to_driver=False)``); Ray writes it to ``<session>/logs/`` as always;
- the driver's own Ray loggers (``ray``, ``ray.data``, ``ray.serve``) print errors only; what they
  would have printed goes to ``<session>/logs/lepton-driver-<pid>.log`` (Ray Data's driver log
  also to its own ``logs/ray-data/``), and so do the messages raylets push to every driver (a
  worker pool starting many workers at once, the pending task of an actor killed on purpose);
- Ray's notebook notice that ipywidgets is missing, logged while ``ray`` is imported, is dropped
  when this module was imported first (lepton_ray's own modules import it before Ray).

What a user must act on is printed by lepton_ray itself, in one line, from the driver (see
:class:`~lepton_ray.train.progress.ProgressBar`). ``--verbose`` (the CLI and the pipelines) or
``LEPTON_VERBOSE=1`` leaves Ray's output exactly as Ray prints it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

VERBOSE_ENV = "LEPTON_VERBOSE"
# Ray's loggers with a console handler in a driver process (``ray.train``/``ray.tune`` propagate to
# ``ray``); ``ray.serve`` replaces its handlers when it is imported, so it is imported first.
RAY_LOGGERS = ("ray", "ray.data", "ray.serve")
DRIVER_LOG = "lepton-driver-{pid}.log"
WIDGET_NOTICES = "ray.widgets"  # logs "Missing packages: ['ipywidgets']" at import, in a notebook


def verbose() -> bool:
    """True when Ray's own output should reach the terminal (``LEPTON_VERBOSE`` set, not 0)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """``--verbose``: set ``LEPTON_VERBOSE=1`` before Ray starts, so jobs and workers inherit it."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
        logging.getLogger(WIDGET_NOTICES).setLevel(logging.NOTSET)


def quiet_ray() -> bool:
    """Called before ``ray.init``; returns its ``log_to_driver``: False unless verbose.

    Quiet (the default): Ray's driver-side loggers print errors only, their records kept in the
    session's log folder instead, and the folder's path is printed once Ray has started (one of
    Ray's post-init hooks). Verbose: nothing changes. Idempotent.
    """
    if verbose():
        return True
    import ray
    import ray.data  # noqa: F401  (each configures its logger when imported: configure it first)
    import ray.serve  # noqa: F401

    hooks = ray._private.worker._post_init_hooks
    if announce_logs not in hooks:
        hooks.append(announce_logs)
    _route_error_channel()
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if _is_console(handler):
                handler.setLevel(logging.ERROR)
        if _SESSION_LOG not in logger.handlers:
            logger.addHandler(_SESSION_LOG)
    return False


def announce_logs() -> str | None:
    """Print the Ray session's log folder once per session (one line on stderr); its path."""
    folder = logs_dir()
    if folder is not None and folder != _announced["folder"] and not verbose():
        _announced["folder"] = folder
        print(
            f"[ray] logs in {folder} (--verbose or LEPTON_VERBOSE=1 prints them here)",
            file=sys.stderr,
            flush=True,
        )
    return folder


def logs_dir() -> str | None:
    """The log folder of the Ray session this process is connected to, if any."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else None


VERBOSE_HELP = (
    "print Ray's own output here too (its workers', Ray Data's, Serve's), as LEPTON_VERBOSE=1 does"
)


def entry_point(verbose_flag: bool) -> None:
    """What a command or pipeline does first: ``--verbose`` applied (before Ray starts), and its
    warnings printed as one line each (``warning: <message>``), not Python's two (file:line, then
    the source line); both left as they are with ``--verbose``."""
    set_verbose(verbose_flag)
    if not verbose():
        warnings.formatwarning = _one_line


def skipped_rows_note(split: str, manifest: dict[str, Any]) -> str | None:
    """One line when preparing a split left bad rows out (``skip_bad``), naming the first."""
    n = int(manifest.get("skipped_rows", 0))
    if not n:
        return None
    first = (manifest.get("skipped_examples") or ["?"])[0]
    return f"{split}: {n} unreadable or mismatched rows left out (the first: {first})"


_announced: dict[str, str | None] = {"folder": None}


def _one_line(message: Any, category: type, *args: Any, **kwargs: Any) -> str:
    return f"warning: {message}\n"


def _route_error_channel() -> None:
    """Quiet, the lines raylets push to every driver go to the driver's log file, not stdout.

    Ray's driver prints them from a thread (``listen_error_messages``) through the module-level
    ``print_to_stdstream``, looked up at each call: wrapped here, and left alone with ``--verbose``.
    What a user must act on surfaces elsewhere: a failed worker as the run's error, a lagging or
    restarted one through the progress board.
    """
    import ray

    worker = ray._private.worker
    original = worker.print_to_stdstream
    if getattr(original, "lepton_routed", False):
        return

    def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool) -> None:
        if verbose():
            original(data, ignore_prefix)
            return
        for line in data.get("lines", []):
            _DRIVER_LOGGER.warning("(%s) %s", data.get("pid"), line)

    print_to_stdstream.lepton_routed = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_to_stdstream


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


class _SessionLog(logging.Handler):
    """Writes the driver's Ray records to ``<session logs>/lepton-driver-<pid>.log``. Records
    logged before a session exists (``ray.init`` starting one) are kept and written once it does."""

    MAX_PENDING = 1000

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(
            logging.Formatter(
                "%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"
            )
        )
        self._file: logging.FileHandler | None = None
        self._folder: str | None = None
        self._pending: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        folder = logs_dir()
        if folder is None:
            if len(self._pending) < self.MAX_PENDING:
                self._pending.append(record)
            return
        if folder != self._folder:  # the first session, or a new one after ray.shutdown()
            if self._file is not None:
                self._file.close()
            self._file = logging.FileHandler(
                os.path.join(folder, DRIVER_LOG.format(pid=os.getpid())), delay=True
            )
            self._file.setFormatter(self.formatter)
            self._folder = folder
        for pending in self._pending:
            self._file.emit(pending)
        self._pending.clear()
        self._file.emit(record)


_SESSION_LOG = _SessionLog()
_DRIVER_LOGGER = logging.getLogger("lepton_ray.ray_messages")  # to the driver's log file only
_DRIVER_LOGGER.addHandler(_SESSION_LOG)
_DRIVER_LOGGER.propagate = False
if not verbose():
    logging.getLogger(WIDGET_NOTICES).setLevel(logging.WARNING)
