"""End to end: the main job (``python -m pipelines.demo``) run as a user runs it, in a subprocess
against the S3 test server: accuracy over HTTP, and what it prints (lepton_ray's lines, not Ray's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from tests.ray_noise import ray_noise

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 60  # issue 20: `make demo` prints at most about 60 lines after the install


def test_ray_noise_is_recognised():
    seen = [
        "2026-12-02 03:00:28,144\tINFO worker.py:2029 -- Started a local Ray instance.",
        "\x1b[36m(RayTrainWorker pid=3693)\x1b[0m Moving model to device: cpu",
        "\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed.",
        "x.py:436: RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated",
    ]
    ours = ["[train] epoch  1  loss 1.3170  acc 0.5890", "[ray] logs in /tmp/ray/session_x/logs"]
    assert ray_noise("\n".join(seen + ours)) == seen


def test_demo_trains_serves_and_reaches_98_percent_over_http_in_a_few_lines(
    ray_session, s3_server, s3_bucket, serve_port
):
    # The session's Ray instance stands in for the local one `make demo` starts (one instance on 2
    # cores); the demo attaches to it as a `ray job submit` entrypoint would.
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    env.pop("LEPTON_VERBOSE", None)
    store = f"s3://{s3_bucket}/lepton"
    cmd = [sys.executable, "-m", "pipelines.demo", "--store", store, "--endpoint-url", s3_server]
    proc = subprocess.run(
        [*cmd, "--port", str(serve_port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # as a terminal shows them: together
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    lines = out.splitlines()
    assert len(lines) <= MAX_LINES, out
    assert ray_noise(out) == [], out
    assert "\r" not in out  # not a terminal: progress as plain lines, not a redrawn bar
    assert sum(line.startswith("[ray] logs in ") for line in lines) == 1
    assert sum(line.startswith("[train] epoch ") for line in lines) >= 10  # the per-epoch table

    summary = json.loads(out[out.index("\n{\n") + 1 :])
    res = summary["train_results"]
    assert res["epochs"] == 10
    assert res["checkpoint"].startswith(f"{store}/runs/")
    assert summary["http_accuracy"] >= 0.98, out
    assert any(line.startswith("[http] accuracy") for line in lines)
    # Everything lives in the object store: dataset manifests and a complete checkpoint.
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="lepton/")["Contents"]}
    assert "lepton/datasets/mnist5k/train/manifest.json" in keys
    ckpt_prefix = res["checkpoint"].removeprefix(f"s3://{s3_bucket}/")
    for name in ("manifest.json", "model.safetensors", "train_state.pt", "lepton.json"):
        assert f"{ckpt_prefix}/{name}" in keys
