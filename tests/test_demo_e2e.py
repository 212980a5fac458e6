"""End to end: the main job (pipelines.demo) against the S3 test server, accuracy over HTTP."""

from __future__ import annotations

import boto3
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.e2e]


def test_demo_trains_serves_and_reaches_98_percent_over_http(
    ray_session, s3_server, s3_bucket, serve_port
):
    from pipelines.demo import run

    lines: list[str] = []
    summary = run(
        f"s3://{s3_bucket}/lepton",
        endpoint_url=s3_server,
        epochs=15,
        workers=2,
        port=serve_port,
        log=lines.append,
    )
    res = summary["train_results"]
    assert res["epochs"] == 15
    assert res["checkpoint"].startswith(f"s3://{s3_bucket}/lepton/runs/")
    assert summary["http_accuracy"] >= 0.98, lines
    # Everything lives in the object store: dataset manifests and a complete checkpoint.
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="lepton/")["Contents"]}
    assert "lepton/datasets/mnist5k/train/manifest.json" in keys
    ckpt_prefix = res["checkpoint"].removeprefix(f"s3://{s3_bucket}/")
    for name in ("manifest.json", "model.safetensors", "train_state.pt", "lepton.json"):
        assert f"{ckpt_prefix}/{name}" in keys
    assert any(line.startswith("[http] accuracy") for line in lines)
