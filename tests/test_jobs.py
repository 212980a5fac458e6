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

from lepton_ray import jobs
from lepton_ray.jobs import (
    Attempt,
    entrypoint_string,
    read_job_report,
    resolve_address,
    retry_delay,
    should_retry,
)
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
        # SIGTERM stops a head at once: by default it first drains its node for up to 30 s (for
        # Serve replicas behind a load balancer), which outlived the 15 s wait below twice a run.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
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
    submit += ["--retry-delay", "0"]
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
    # The config fixes train.run_name: that is the run trained, and the one reported.
    assert out["run_name"] == "healed" and out["attempts"][1]["run_name"] == "healed", out
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


def test_retry_delay_doubles_from_the_base_up_to_the_cap_with_jitter_in_the_upper_half():
    nominal = [5, 10, 20, 40, 60, 60, 60]
    assert [retry_delay(n, jitter=1.0) for n in range(1, 8)] == nominal
    assert [retry_delay(n, jitter=0.0) for n in range(1, 8)] == [v / 2 for v in nominal]
    assert retry_delay(3, jitter=0.5) == 15.0
    draws = [retry_delay(2) for _ in range(200)]
    assert all(5.0 <= d <= 10.0 for d in draws) and len(set(draws)) > 100  # jittered
    assert retry_delay(10_000, jitter=1.0) == 60.0  # no overflow far past the cap
    assert retry_delay(4, base_s=0) == 0.0  # --retry-delay 0: no wait (tests)
    assert retry_delay(1, base_s=1, cap_s=30, jitter=1.0) == 1.0
    for bad in ((0, 5.0, 60.0), (1, -1.0, 60.0), (1, 5.0, -1.0)):
        with pytest.raises(ValueError):
            retry_delay(*bad)


LOGS = """[lepton-ray] something
LEPTON_RUN_NAME=mnist-cnn
[train] run 'mnist-cnn' at s3://b/runs/mnist-cnn
"""
NO_TORCH = """Traceback (most recent call last):
  File "/tmp/ray/session/runtime_resources/pipelines/train.py", line 3, in <module>
    import torch
ModuleNotFoundError: No module named 'torch'
"""


def test_the_job_report_names_the_run_trained_and_a_missing_module():
    assert read_job_report(LOGS) == ("mnist-cnn", None)
    assert read_job_report(LOGS + "LEPTON_RUN_NAME=second\n") == ("second", None)  # the last
    assert read_job_report("") == (None, None)
    assert read_job_report("x LEPTON_RUN_NAME=quoted-mid-line\n") == (None, None)
    assert read_job_report(NO_TORCH) == (None, "torch")
    assert read_job_report(NO_TORCH.replace("'torch'", "'lepton_ray.cli'"))[1] == "lepton_ray"
    assert read_job_report(NO_TORCH.replace("'torch'", "'torchvision'"))[1] is None
    assert read_job_report(NO_TORCH.replace("'torch'", "'yaml'"))[1] is None  # the user's own


class FakeJobs:
    """A JobSubmissionClient that plays back one (status, exit code, logs) per submission."""

    def __init__(self, script: list[tuple[str, int, str]]):
        self.script, self.submitted = list(script), []

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        self.submitted.append(
            {"id": submission_id, "env": runtime_env["env_vars"], "meta": metadata}
        )

    def get_job_info(self, submission_id):
        status, code, _ = self.script[len(self.submitted) - 1]
        return type(
            "Info", (), {"status": status, "message": f"exit {code}", "driver_exit_code": code}
        )

    def get_job_logs(self, submission_id):
        return self.script[len(self.submitted) - 1][2]

    async def tail_job_logs(self, submission_id):
        yield self.get_job_logs(submission_id)


def fake_submit(monkeypatch, script, **kwargs):
    client, waits, out = FakeJobs(script), [], []
    monkeypatch.setattr(jobs, "_client", lambda address: client)
    outcome = jobs.submit(
        ["python", "-m", "pipelines.train"],
        address="http://fake:8265",
        log=out.append,
        output=open(os.devnull, "w"),  # noqa: SIM115 - closed with the process
        sleep=waits.append,
        poll_s=0,
        **kwargs,
    )
    return outcome, client.submitted, waits, out


@pytest.mark.parametrize("follow_logs", [True, False])
def test_submit_waits_between_retries_and_reports_the_run_the_job_trained(monkeypatch, follow_logs):
    script = [("FAILED", 1, "boom\n"), ("FAILED", 1, LOGS), ("SUCCEEDED", 0, LOGS)]
    outcome, submitted, waits, _ = fake_submit(
        monkeypatch, script, max_retries=3, run_name="chosen", follow_logs=follow_logs
    )
    assert outcome.succeeded and [a.status for a in outcome.attempts] == [s for s, _, _ in script]
    assert outcome.run_name == "mnist-cnn"  # what the job said, not what was chosen
    assert outcome.attempts[0].run_name is None and outcome.attempts[2].run_name == "mnist-cnn"
    assert len(waits) == 2 and 2.5 <= waits[0] <= 5 and 5 <= waits[1] <= 10
    assert [s["env"]["LEPTON_RUN_NAME"] for s in submitted] == ["chosen"] * 3
    assert [s["env"].get("LEPTON_RESUME") for s in submitted] == [None, "1", "1"]
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    assert all(s["env"]["PATH"] == f"{bin_dir}:${{PATH}}" for s in submitted)


def test_a_user_set_path_is_kept_and_retry_delay_zero_does_not_wait(monkeypatch):
    script = [("FAILED", 1, ""), ("SUCCEEDED", 0, "")]
    outcome, submitted, waits, _ = fake_submit(
        monkeypatch,
        script,
        max_retries=1,
        retry_delay_s=0,
        runtime_env={"env_vars": {"PATH": "/opt/env/bin"}},
    )
    assert outcome.succeeded and waits == [0.0]
    assert outcome.run_name.startswith("lepton-")  # the job said nothing: the name chosen
    assert [s["env"]["PATH"] for s in submitted] == ["/opt/env/bin"] * 2


@pytest.mark.parametrize(
    ("status", "code", "logs"),
    [("FAILED", 2, "config error\n"), ("FAILED", 1, NO_TORCH), ("STOPPED", None, "")],
)
def test_deterministic_failures_are_never_resubmitted(monkeypatch, status, code, logs):
    outcome, submitted, waits, out = fake_submit(
        monkeypatch, [(status, code, logs)] * 3, max_retries=2
    )
    assert len(submitted) == 1 and waits == [] and outcome.status == status
    if "torch" in logs:
        assert outcome.attempts[0].missing_module == "torch"
        line = [m for m in out if m.startswith("attempt 1: FAILED")][0]
        assert "the job's python cannot import torch" in line and "\n" not in line


def test_a_negative_retry_delay_is_refused(monkeypatch):
    with pytest.raises(jobs.JobError, match="retry_delay must be >= 0"):
        fake_submit(monkeypatch, [("SUCCEEDED", 0, "")], retry_delay_s=-1)
