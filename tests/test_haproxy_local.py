"""Pure tier: the HAProxy configuration Ray 2.60 writes, as lepton_ray runs it
(:mod:`lepton_ray.serve.haproxy_local`): side listeners on the serving host, a private admin
socket, JSON 503s. Ray's own template is rendered here (no Ray started, no HAProxy run)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from lepton_ray.serve import haproxy_local
from lepton_ray.serve.haproxy_local import UNAVAILABLE, UnsafeConfig, localize


def ray_config(tmp_path, host: str, port: int = 8000) -> str:
    """The configuration Ray's HAProxy manager writes for Serve on ``host:port``."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(
        http_options=HTTPOptions(host=host, port=port),
        socket_path=str(tmp_path / "admin.sock"),
        server_state_base=str(tmp_path),
        server_state_file=str(tmp_path / "state"),
        metrics_socket_path=str(tmp_path / "metrics.sock"),
    )
    api = HAProxyApi(cfg=cfg, config_file_path=str(tmp_path / "haproxy.cfg"))
    api._generate_config_file_internal()
    return (tmp_path / "haproxy.cfg").read_text()


def binds(config: str) -> list[str]:
    return re.findall(r"^\s+bind (\S+)", config, re.MULTILINE)


def test_rays_template_still_opens_the_side_listeners_to_every_interface(tmp_path):
    # What this module exists for; if Ray fixes it, the module can go.
    config = ray_config(tmp_path, "127.0.0.1")
    assert sorted(binds(config)) == sorted(["127.0.0.1:8000", ":9101", "*:8404"])
    assert "mode 666 level admin" in config


def test_every_listener_moves_to_the_serving_host_and_the_socket_is_private(tmp_path):
    config = localize(ray_config(tmp_path, "127.0.0.1"), "/x/503.http")
    assert sorted(binds(config)) == ["127.0.0.1:8000", "127.0.0.1:8404", "127.0.0.1:9101"]
    assert "mode 600 level admin" in config and "mode 666" not in config
    assert re.findall(r"tune.bufsize (\d+)", config) == ["32768"]  # Ray wrote 16384
    assert re.findall(r"errorfile (\d+) (\S+)", config) == [
        ("502", "/x/503.http"),
        ("503", "/x/503.http"),
        ("504", "/x/503.http"),
    ]


def test_serve_on_every_interface_keeps_its_side_listeners_there(tmp_path):
    config = localize(ray_config(tmp_path, "0.0.0.0"))
    assert sorted(binds(config)) == sorted(["*:8000", ":9101", "*:8404"])
    assert "mode 600 level admin" in config


@pytest.mark.parametrize("extra", ["listen other\n  bind *:7000\n", "frontend x\n    bind :7001\n"])
def test_an_unknown_wildcard_listener_is_refused(tmp_path, extra):
    with pytest.raises(UnsafeConfig, match="every interface"):
        localize(ray_config(tmp_path, "127.0.0.1") + extra)


def test_the_error_answer_is_the_endpoints_json_503():
    import json

    head, _, body = UNAVAILABLE.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head
    assert b"Content-Type: application/json" in head
    assert f"Content-Length: {len(body)}".encode() in head and list(json.loads(body)) == ["error"]


def test_the_wrapper_runs_the_real_binary_on_the_localized_copy(tmp_path):
    # A stand-in for HAProxy that prints the arguments it got and the file it was given.
    fake = tmp_path / "fake-haproxy"
    fake.write_text('#!/bin/sh\necho "$@"\ncat "$3"\n')
    fake.chmod(0o700)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(ray_config(tmp_path, "127.0.0.1"))
    r = subprocess.run(
        [
            sys.executable,
            "-I",
            haproxy_local.__file__,
            str(fake),
            "-db",
            "-f",
            str(cfg),
            "-sf",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    args, config = r.stdout.split("\n", 1)
    assert args == f"-db -f {cfg}.local -sf 1"
    assert "127.0.0.1:9101" in config and (tmp_path / "haproxy.cfg.503.http").read_bytes() == (
        UNAVAILABLE
    )
    cfg.write_text(cfg.read_text() + "listen other\n  bind *:7000\n")
    r = subprocess.run(
        [sys.executable, "-I", haproxy_local.__file__, str(fake), "-db", "-f", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and r.stdout == "" and "refusing to start HAProxy" in r.stderr
