"""``lepton-ray serve`` as a process: ``--detach`` without a cluster is refused, and SIGTERM stops
the endpoint as Ctrl-C does (Serve shut down, exit 0, one line on stderr, no abort dump); the GPU
and token flags of ``serve`` and ``predict`` (pure: deploy and the endpoint stood in for).

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
    # Ray's processes went with it (within 2 s; most are gone by the time it exits).
    deadline = time.monotonic() + 2
    while (alive := [p for p in children if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, alive


def _running(p) -> bool:
    """Whether a process is still there (a zombie is not)."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone between the two calls
        return False


TOKEN = "tok-3f9c2a"


def test_serve_passes_gpu_and_token_flags_to_deploy_and_never_prints_the_token(monkeypatch, capsys):
    """``--use-gpu --gpus-per-replica --auth-token`` reach deploy as ServeConfig fields; stdout and
    stderr show the URLs, never the token. (``--detach`` on a stand-in cluster: no Ray starts.)"""
    import lepton_ray
    from lepton_ray import cli, runtime

    seen = {}

    def fake_deploy(checkpoint, **kwargs):
        seen.update(kwargs, checkpoint=checkpoint)
        return "http://127.0.0.1:9/"

    monkeypatch.setattr(lepton_ray, "deploy", fake_deploy, raising=False)
    monkeypatch.setattr(runtime, "running_cluster_address", lambda: "127.0.0.1:6379")
    monkeypatch.setattr(runtime, "ensure_ray", lambda address: None)
    argv = ["serve", "ckpt", "--detach", "--use-gpu", "--gpus-per-replica", "0.25"]
    assert cli.main([*argv, "--auth-token", TOKEN]) == 0
    assert seen["use_gpu"] is True and seen["gpus_per_replica"] == 0.25
    assert seen["auth_token"] == TOKEN
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err and "v1/predict" in out.out
    # Left out: no GPU, a whole GPU per replica if one is asked for, and the token from the
    # environment (deploy reads $LEPTON_SERVE_TOKEN when auth_token is None).
    assert cli.main(["serve", "ckpt", "--detach"]) == 0
    assert seen["use_gpu"] is False and seen["gpus_per_replica"] == 1.0
    assert seen["auth_token"] is None


@pytest.mark.parametrize(
    ("bad", "line"),
    [
        ("0", "lepton-ray: error: ServeConfig.gpus_per_replica: must be in (0, 1], got 0"),
        ("1.5", "lepton-ray: error: ServeConfig.gpus_per_replica: must be in (0, 1], got 1.5"),
        (
            "half",
            "lepton-ray serve: error: argument --gpus-per-replica: invalid float value: 'half'",
        ),
    ],
)
def test_a_bad_gpu_share_exits_2_in_one_line_before_ray_starts(bad, line, monkeypatch, capsys):
    from lepton_ray import cli, runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(runtime, "ensure_ray", no_ray)
    try:
        code = cli.main(["serve", "ckpt", "--gpus-per-replica", bad])
    except SystemExit as exc:  # argparse's own usage error
        code = exc.code
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == line


def test_predict_sends_the_token_from_the_flag_or_the_environment(tmp_path, monkeypatch, capsys):
    """The request ``lepton-ray predict`` makes carries ``Authorization: Bearer TOKEN`` from
    ``--auth-token``, else ``$LEPTON_SERVE_TOKEN``, else none; a 401 is one line without it."""
    import io
    import urllib.error
    import urllib.request

    from lepton_ray import cli

    sent: list[str | None] = []

    def urlopen(req, timeout):  # the endpoint: 401 unless the token is right
        sent.append(req.get_header("Authorization"))
        if sent[-1] != f"Bearer {TOKEN}":
            body = io.BytesIO(b'{"error": "missing or wrong bearer token"}')
            raise urllib.error.HTTPError(req.full_url, 401, "Unauthorized", {}, body)
        return io.BytesIO(b'{"predictions": [[{"class": "7", "probability": 1.0}]]}')

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    png = tmp_path / "digit.png"
    png.write_bytes(b"\x89PNG stand-in: nothing decodes it")
    url = "http://127.0.0.1:9"
    monkeypatch.setenv("LEPTON_SERVE_TOKEN", "")
    assert cli.main(["predict", url, str(png)]) == 2
    assert cli.main(["predict", url, str(png), "--auth-token", "not-it"]) == 2
    err = capsys.readouterr().err
    assert (
        err.splitlines()
        == ['lepton-ray: error: HTTP 401: {"error": "missing or wrong bearer token"}'] * 2
    )
    assert cli.main(["predict", url, str(png), "--auth-token", TOKEN]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0][0]["class"] == "7"
    monkeypatch.setenv("LEPTON_SERVE_TOKEN", TOKEN)
    assert cli.main(["predict", url, str(png)]) == 0
    assert TOKEN not in "".join(capsys.readouterr())
    assert sent == [None, "Bearer not-it", f"Bearer {TOKEN}", f"Bearer {TOKEN}"]
