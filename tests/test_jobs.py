"""Job submission against a real head node (``ray start --head``), outputs in the S3 test server.

The head is a cluster of its own, apart from the session's shared local instance: its own
``--temp-dir``, free loopback ports, 3 CPUs, ``RAY_AUTH_MODE=disabled``. It is stopped by
signalling the ``ray start --block`` process this module started (which takes its Ray processes
down with it), never with ``ray stop``, which would stop every Ray instance on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from lepton_ray.jobs import Attempt, entrypoint_string, resolve_address, should_retry
from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONFIG = "pipelines/configs/mnist.yaml"
SMOKE = ["--smoke-test", "model.kwargs.width=8"]


def run_cmd(
    *args: str, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """A command from the repository root, as a user would type it (by default without a token)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _kill_leftovers(marker: str) -> None:
    """SIGKILL processes whose command line names this head's temp dir (only ours carry it)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@contextlib.contextmanager
def head_node(**auth: str):
    """A head node on loopback: yields the dashboard URL. ``auth``: RAY_AUTH_* settings (default disabled)."""
    temp = tempfile.mkdtemp(
        prefix="lrj", dir="/tmp"
    )  # short: Ray's socket paths have a length limit
    dash = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        **auth,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    ports = {
        f"--{name}": free_port()
        for name in (
            "port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
        )
    }
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        "--num-cpus=3",
        "--object-store-memory=300000000",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *(f"{k}={v}" for k, v in ports.items()),
    ]
    log = open(Path(temp) / "ray-start.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    "ray start exited: " + (Path(temp) / "ray-start.log").read_text()[-2000:]
                )
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:  # 401 with token auth: up, and guarded
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the head node's dashboard did not come up within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        _kill_leftovers(temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    with head_node() as url:
        yield url


@pytest.fixture(scope="module")
def bucket(s3_server):
    import boto3

    name = f"lepton-jobs-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def s3_keys(s3_server: str, bucket: str, prefix: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    return {
        k: s3.get_object(Bucket=bucket, Key=k)["Body"].read()
        if k.endswith((".json", ".jsonl"))
        else b""
        for k in keys
    }


@pytest.fixture(scope="module")
def cli_job(head, s3_server, bucket):
    """``ray job submit`` (the CLI) of prepare_data && train, as the README shows it."""
    store = f"store=s3://{bucket}/lepton"
    script = (
        f"python -m pipelines.prepare_data --config {CONFIG} --smoke-test {store} && "
        f"python -m pipelines.train --config {CONFIG} {' '.join(SMOKE)} {store}"
    )
    runtime_env = {"env_vars": {"LEPTON_S3_ENDPOINT": s3_server}}
    ray_job = [str(BIN / "ray"), "job", "submit", "--address", head, "--working-dir", "."]
    env_json = json.dumps(runtime_env)
    return run_cmd(
        *ray_job, "--runtime-env-json", env_json, "--", "bash", "-c", script, timeout=480
    )


@pytest.mark.ray
@pytest.mark.e2e
def test_ray_job_submit_runs_the_train_pipeline_into_object_storage(cli_job, s3_server, bucket):
    assert cli_job.returncode == 0, cli_job.stdout[-3000:] + cli_job.stderr[-3000:]
    assert "succeeded" in cli_job.stdout + cli_job.stderr
    objects = s3_keys(s3_server, bucket, "lepton/")
    run = "lepton/runs/mnist-cnn-smoke/"
    assert "lepton/datasets/mnist5k-smoke/train/manifest.json" in objects
    manifests = [
        k
        for k in objects
        if k.startswith(run + "checkpoint_epoch0001_") and k.endswith("/manifest.json")
    ]
    assert len(manifests) == 1
    assert [json.loads(line)["epoch"] for line in objects[run + "metrics.jsonl"].splitlines()] == [
        1
    ]
    assert json.loads(objects[run + "pipeline.json"])["train"]["run_name"] == "mnist-cnn-smoke"


@pytest.mark.ray
@pytest.mark.e2e
def test_job_submission_client_runs_a_pipeline_on_the_same_cluster(
    cli_job, head, s3_server, bucket
):
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert cli_job.returncode == 0
    client = JobSubmissionClient(head)
    sid = client.submit_job(
        entrypoint=f"python -m pipelines.evaluate --config {CONFIG} --smoke-test store=s3://{bucket}/lepton "
        "evaluate.checkpoint=last",
        runtime_env={"working_dir": str(REPO), "env_vars": {"LEPTON_S3_ENDPOINT": s3_server}},
    )
    deadline = time.monotonic() + 300
    while (status := client.get_job_status(sid)) not in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    ):
        assert time.monotonic() < deadline, "the evaluation job did not finish"
        time.sleep(1)
    logs = client.get_job_logs(sid)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    result = json.loads(logs[logs.index("{\n") :])
    assert result["rows"] == 500 and result["checkpoint"].startswith(
        f"s3://{bucket}/lepton/runs/mnist-cnn-smoke/"
    )
    assert result["written_to"].replace(f"s3://{bucket}/", "") in s3_keys(
        s3_server, bucket, "lepton/runs/mnist-cnn-smoke/eval/"
    )


def sample_steps(objects: dict[str, bytes], run: str) -> dict[str, list[tuple[int, int]]]:
    """(epoch, step) trained by each worker process, from ``record_sample_ids`` logs."""
    out: dict[str, list[tuple[int, int]]] = {}
    for key, body in objects.items():
        if key.startswith(run + "sample_ids/"):
            proc = key.rsplit("/", 1)[1].rsplit("-", 1)[0]
            out.setdefault(proc, []).extend(
                (r["epoch"], r["step"]) for r in map(json.loads, body.splitlines())
            )
    return out


@pytest.mark.ray
@pytest.mark.e2e
def test_lepton_ray_submit_resubmits_a_failed_job_which_resumes_its_run(
    cli_job, head, s3_server, bucket
):
    assert cli_job.returncode == 0  # the prepared dataset comes from there
    # Attempt 1 trains epoch 1 (checkpointed), then the whole job fails at epoch 2, step 1
    # (no worker restarts). Attempt 2 must resume from epoch 1, not start over.
    args = [
        *SMOKE,
        f"store=s3://{bucket}/lepton",
        "train.run_name=healed",
        "train.epochs=2",
        "train.fault_injection=2:1:0",
        "train.max_failures=0",
        "train.record_sample_ids=true",
    ]
    submit = [str(BIN / "lepton-ray"), "submit", "--address", head, "--max-retries", "2"]
    env = f"LEPTON_S3_ENDPOINT={s3_server}"
    r = run_cmd(
        *submit,
        "--env",
        env,
        "--",
        *"python -m pipelines.train --config".split(),
        CONFIG,
        *args,
        timeout=540,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    out, logs = json.loads(r.stdout), r.stderr[-6000:]
    assert [(a["status"], a["exit_code"]) for a in out["attempts"]] == [
        ("FAILED", 1),
        ("SUCCEEDED", 0),
    ], logs
    assert "injected fault at epoch 2 step 1 on rank 0" in out["attempts"][0]["message"], logs
    assert "[train] run 'healed'" in r.stderr and "(resuming), attempt 2" in r.stderr, logs

    run = "lepton/runs/healed/"
    objects = s3_keys(s3_server, bucket, run)
    steps = sample_steps(objects, run)
    by_epoch = {e: [p for p, s in steps.items() if any(ep == e for ep, _ in s)] for e in (1, 2)}
    assert len(by_epoch[1]) == 1 and len(by_epoch[2]) == 1 and by_epoch[1] != by_epoch[2], steps
    assert [s for s in steps[by_epoch[1][0]]] == [
        (1, i) for i in range(1, 11)
    ]  # epoch 1 trained once
    assert [s for s in steps[by_epoch[2][0]]] == [
        (2, i) for i in range(11, 21)
    ]  # attempt 2: epoch 2 only
    assert [json.loads(line)["epoch"] for line in objects[run + "metrics.jsonl"].splitlines()] == [
        1,
        2,
    ]


@pytest.mark.ray
@pytest.mark.e2e
def test_a_user_error_is_not_retried(head):
    submit = [
        str(BIN / "lepton-ray"),
        "submit",
        "--address",
        head,
        "--max-retries",
        "2",
        "--no-logs",
    ]
    r = run_cmd(
        *submit, "--", *"python -m pipelines.train --config".split(), CONFIG, "train.epoch=1"
    )
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert [(a["status"], a["exit_code"]) for a in out["attempts"]] == [("FAILED", 2)]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_cmd(str(BIN / "lepton-ray"), *args, timeout=120)


@pytest.mark.parametrize("sub", ["submit", "bench"])
def test_submit_and_bench_have_help(sub):
    r = run_cli(sub, "--help")
    assert r.returncode == 0 and f"usage: lepton-ray {sub}" in r.stdout


def test_bench_lists_the_benchmarks_and_rejects_unknown_names():
    r = run_cli("bench")
    assert r.returncode == 0 and "train_overhead" in json.loads(r.stdout)
    r = run_cli("bench", "nosuch")
    assert r.returncode == 2 and r.stderr.startswith(
        "lepton-ray: error: unknown benchmark 'nosuch' (known: "
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("submit", "--address", "http://127.0.0.1:9", "--", "true"),
            "cannot reach the Ray dashboard at http://127.0.0.1:9",
        ),
        (("submit", "--address", "http://127.0.0.1:9"), "no entrypoint: put the command after --"),
        (("submit", "--env", "NOEQUALS", "--", "true"), "expected KEY=VALUE"),
    ],
)
def test_submit_usage_errors_exit_2_with_one_line(args, message):
    r = run_cli(*args)
    assert (
        r.returncode == 2
        and message in r.stderr.strip().splitlines()[-1]
        and "Traceback" not in r.stderr
    )


def test_retry_policy_and_entrypoint_quoting(monkeypatch):
    assert should_retry(Attempt("a", "FAILED", 1)) and should_retry(Attempt("a", "FAILED", None))
    assert not should_retry(Attempt("a", "FAILED", 2))  # a usage error fails the same way again
    assert not should_retry(Attempt("a", "STOPPED")) and not should_retry(
        Attempt("a", "SUCCEEDED", 0)
    )
    assert entrypoint_string(["python", "-m", "x", "--set", "a=b c"]) == "python -m x --set 'a=b c'"
    assert entrypoint_string(["python -m a && python -m b"]) == "python -m a && python -m b"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address, not the dashboard's
    assert resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert (
        resolve_address(None) == "http://head:8265"
        and resolve_address("http://x:1") == "http://x:1"
    )


@pytest.mark.ray
@pytest.mark.e2e
def test_a_token_auth_cluster_takes_jobs_only_with_its_token(tmp_path):
    token = uuid.uuid4().hex
    with head_node(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) as url:
        submit = [str(BIN / "lepton-ray"), "submit", "--address", url, "--working-dir", ""]
        job = [
            "--",
            "python",
            "-c",
            "import ray; ray.init(); print('CPUs', ray.cluster_resources()['CPU'])",
        ]
        r = run_cmd(*submit, *job)  # the client's RAY_AUTH_MODE is disabled: no token sent
        assert r.returncode == 2 and "Missing authentication token" in r.stderr
        wrong = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token", "HOME": str(tmp_path)}
        r = run_cmd(*submit, *job, env=wrong)
        assert r.returncode == 2 and "Invalid authentication token" in r.stderr
        r = run_cmd(*submit, *job, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout)["status"] == "SUCCEEDED" and "CPUs 3.0" in r.stderr
