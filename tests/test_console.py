"""lepton_ray.console: Ray's output kept in its log folder unless verbose; pure tests (no Ray starts)."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from lepton_ray import console


@pytest.mark.parametrize(
    ("value", "expected"), [(None, False), ("", False), ("0", False), ("no", False), ("1", True)]
)
def test_verbose_reads_lepton_verbose(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv("LEPTON_VERBOSE", raising=False)
    else:
        monkeypatch.setenv("LEPTON_VERBOSE", value)
    assert console.verbose() is expected


def test_quiet_ray_keeps_rays_driver_output_off_the_terminal(monkeypatch, capsys):
    import ray

    monkeypatch.delenv("LEPTON_VERBOSE", raising=False)
    assert console.quiet_ray() is False  # log_to_driver
    assert console.quiet_ray() is False  # idempotent: nothing added twice
    for name in console.RAY_LOGGERS:
        handlers = logging.getLogger(name).handlers
        assert handlers.count(console._SESSION_LOG) == 1
        consoles = [h for h in handlers if console._is_console(h)]
        assert consoles and all(h.level == logging.ERROR for h in consoles), name
    logging.getLogger("ray.data").warning("Progress bars disabled (a test record)")
    # what a raylet pushes to every driver (e.g. a worker pool's startup warning)
    ray._private.worker.print_to_stdstream(
        {"lines": ["WARNING: 8 PYTHON worker processes have been started"], "pid": "raylet"},
        False,
    )
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    monkeypatch.setenv("LEPTON_VERBOSE", "1")
    assert console.quiet_ray() is True
    ray._private.worker.print_to_stdstream(
        {"lines": ["shown when verbose"], "pid": "raylet", "is_err": False}, False
    )
    assert "shown when verbose" in capsys.readouterr().out


def test_the_driver_log_keeps_records_from_before_the_session_began(tmp_path, monkeypatch):
    log = console._SessionLog()
    folder: list[str | None] = [None]
    monkeypatch.setattr(console, "logs_dir", lambda: folder[0])
    record = logging.LogRecord("ray", logging.WARNING, "x.py", 1, "token auth notice", (), None)
    log.emit(record)  # ray.init has not started a session yet: kept
    folder[0] = str(tmp_path)
    log.emit(logging.LogRecord("ray", logging.INFO, "y.py", 2, "Started a local Ray", (), None))
    log._file.close()
    lines = (tmp_path / console.DRIVER_LOG.format(pid=os.getpid())).read_text()
    assert [line.split(" -- ")[-1] for line in lines.splitlines()] == [
        "token auth notice",
        "Started a local Ray",
    ]


def test_an_entry_points_warnings_are_one_line(monkeypatch):
    monkeypatch.delenv("LEPTON_VERBOSE", raising=False)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    console.entry_point(False)
    text = warnings.formatwarning(
        "Net trains, but its checkpoints cannot be loaded", UserWarning, "m.py", 3
    )
    assert text == "warning: Net trains, but its checkpoints cannot be loaded\n"


def test_skipped_rows_note():
    assert console.skipped_rows_note("train", {"skipped_rows": 0}) is None
    manifest = {"skipped_rows": 2, "skipped_examples": ["dog/broken.png: not a readable PNG"]}
    assert console.skipped_rows_note("train", manifest) == (
        "train: 2 unreadable or mismatched rows left out (the first: dog/broken.png: not a readable PNG)"
    )
