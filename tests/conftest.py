"""Shared fixtures: one local Ray instance and one S3-compatible server (moto) per session.

The S3 server is moto's standalone ``ThreadedMotoServer`` on 127.0.0.1 and a free port, spoken to
over HTTP by pyarrow with fake credentials, the way s3fs's own test suite does it.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

# Fake credentials for moto, set before anything imports pyarrow's S3 or boto3.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "lepton-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "lepton-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller takes one report per worker per health-check poll (a worker's report
# queue holds one), so every ray.train.report after the first waits for the next poll: the
# tests' fits report every few steps. lepton_ray.runtime polls every 0.1 s on a local instance
# (Ray's default: 2 s); set here too for the clusters and `ray start` heads the tests start, and
# the subprocesses, which inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# A replica that stops (every serve.delete, scale-down and rolling update) keeps answering this
# long after HAProxy stops sending it requests. lepton_ray.serve.ingress's default is 5 s (HAProxy
# reloads in < 1 s); 2 s here, still twice that, and HAProxy retries a refused connection anyway.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
# No idle processes prestarted after each fit for the next one (lepton_ray.train.prestart; default
# 300 s). The suite's consecutive fits rarely match (other worker counts, resources, runtime
# environments, subprocesses of their own), so on 2 cores the prestarted processes, each importing
# torch, mostly competed for the CPU with the next test: test_sharding.py and
# test_uneven_workers.py took 100 s with this off against 137 s with it on, and test_resume.py
# 85-94 s against 151 s. Nothing the other tests assert depends on it (a fit without warm
# processes starts its own); tests/test_prestart.py turns it on to check that a fit lands on the
# training worker prestarted after the one before. Set LEPTON_PRESTART_S to run the suite with it.
os.environ.setdefault("LEPTON_PRESTART_S", "0")
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("LEPTON_VERBOSE", None)  # the tests check the default (quiet) output
os.environ.pop("LEPTON_S3_ENDPOINT", None)
os.environ.pop("AWS_ENDPOINT_URL", None)


def pytest_report_header(config) -> str:
    """The host the suite runs on, at the top of its output: the suite's time moves with the
    host's speed (20.6 min on 2 AMD cores that add a million numbers in Python in 20 ms, 33 min in
    a CI run on 2 cores whose speed was not recorded)."""
    from benchmarks.harness import cpu_model, host_speed

    speed = host_speed()["python_loop_ms"]
    return f"host: {cpu_model()}, {os.cpu_count()} CPUs, a million Python additions in {speed} ms"


def _polls_a_closed_socket(thread) -> bool:
    """A ``socketserver`` thread still in ``serve_forever`` after its socket was closed."""
    target = getattr(thread, "_target", None)  # set while the thread runs
    server = getattr(target, "__self__", None)
    sock = getattr(server, "socket", None)
    return (
        getattr(target, "__name__", "") == "serve_forever"
        and sock is not None
        and sock.fileno() == -1
    )


@pytest.fixture(autouse=True, scope="module")
def _no_server_left_polling_a_closed_socket():
    """A test server closed without ``shutdown()`` keeps its ``serve_forever`` thread polling the
    closed socket, a core spun for the rest of the session (two such threads once made every later
    Ray module slower): the module that leaves one fails."""
    yield
    import threading

    left = [t.name for t in threading.enumerate() if _polls_a_closed_socket(t)]
    assert not left, f"server threads left polling a closed socket (call shutdown() first): {left}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server on loopback."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the test S3 server; returns its name."""
    import boto3

    name = f"lepton-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def ray_session(_ray_shutdown_at_end):
    """The shared local Ray instance (started on first use; restarted if a test module that needs
    a cluster of its own, like the elastic tests, shut it down)."""
    import ray

    from lepton_ray.runtime import ensure_ray

    if not ray.is_initialized():
        ensure_ray(address="local")
    yield ray


@pytest.fixture(scope="session")
def _ray_shutdown_at_end():
    yield
    import ray

    if ray.is_initialized():
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_port() -> int:
    """The one HTTP port Ray Serve listens on for the whole session (Serve starts its proxy once)."""
    return free_port()
