"""``lepton-ray serve`` as a process: ``--detach`` without a cluster is refused, and SIGTERM stops
the endpoint as Ctrl-C does (Serve shut down, exit 0, one line on stderr, no abort dump).

The SIGTERM test starts a Ray instance of its own in the child process (Ray tier: run it under the
lock); the ``--detach`` test starts nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

BIN = Path(sys.executable).parent
RAY_INFO_LINE = re.compile(
    r"^(\x1b\[3\dm)?\((ServeController|ServeReplica|ProxyActor)[^)]*\)(\x1b\[0m)? INFO "
)
REPO = Path(__file__).resolve().parent.parent


def refused(*args: str, **env: str) -> str:
    """``lepton-ray serve ARGS`` with ``env`` added and no RAY_ADDRESS: checks it exits 2 with
    nothing on stdout, and returns its stderr."""
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(
        [str(BIN / "lepton-ray"), "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    return r.stderr


def test_detach_without_a_cluster_is_refused_in_one_line(tmp_path):
    # RAY_TMPDIR: no `ray start` cluster recorded there.
    err = refused(str(tmp_path / "ckpt"), "--detach", RAY_TMPDIR=str(tmp_path))
    assert err.count("\n") == 1 and err.startswith(
        "lepton-ray: error: --detach needs a running Ray cluster (ray start --head, or RAY_ADDRESS)"
    ), err


@pytest.mark.parametrize(
    ("flags", "choice"), [([], None), (["--haproxy"], True), (["--no-haproxy"], False)]
)
def test_the_ingress_flag_has_both_spellings(flags, choice):
    from lepton_ray.cli import build_parser

    assert build_parser().parse_args(["serve", "ckpt", *flags]).haproxy is choice


def test_an_ingress_choice_that_cannot_be_read_exits_2_in_one_line_before_ray_starts(tmp_path):
    from tests.test_serve_http import make_checkpoint

    err = refused(make_checkpoint(tmp_path / "ckpt"), LEPTON_SERVE_HAPROXY="yes")
    assert err.splitlines() == [
        "lepton-ray: error: LEPTON_SERVE_HAPROXY must be 1 (HAProxy) or 0 (Serve's proxy), got 'yes'"
    ], err


class _Reader(threading.Thread):
    """Collects a pipe's lines as they come."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.lines = pipe, []

    def run(self) -> None:
        for line in self.pipe:
            self.lines.append(line)


@pytest.mark.ray
def test_sigterm_stops_serve_cleanly_with_exit_0_and_one_line(tmp_path):
    import httpx
    import psutil

    from lepton_ray.data import load_mnist5k
    from tests.test_serve_http import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt")
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "lepton-ray"), "serve", ckpt, "--port", str(free_port()), "--num-cpus", "0.5"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    out.start()
    err.start()
    try:
        deadline = time.monotonic() + 240
        while not out.lines:
            assert proc.poll() is None, "".join(err.lines)[-3000:]
            assert time.monotonic() < deadline, "no endpoint within 240 s"
            time.sleep(0.5)
        url = json.loads(out.lines[0])["predict"]
        image = load_mnist5k()["test"][0][:1, :, :, 0].tolist()
        assert httpx.post(url, json={"instances": image}, timeout=60).status_code == 200
        children = psutil.Process(proc.pid).children(recursive=True)
        before = len(err.lines)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err.join(timeout=10)
    after = "".join(err.lines[before:])
    assert code == 0, after[-3000:]
    # One line of ours; besides it only the INFO lines that Ray forwards from the endpoint's own
    # processes as they wind down (an access log line, "Replica ... is stopped"): no traceback,
    # no warning, no abort dump.
    ours, *rest = after.splitlines()
    assert ours == "lepton-ray: stopping the endpoint", after[-3000:]
    assert all(RAY_INFO_LINE.match(line) for line in rest), after[-3000:]
    # Ray's processes went with it.
    time.sleep(2)
    alive = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
