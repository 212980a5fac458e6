"""Benchmark: the reliability suite (issue 19), each fault case reported as a figure.

1. Worker kills: SIGKILLs of training workers (this Ray instance's only) at seeded random points
   of runs that checkpoint every few steps; from the sample log, samples lost and samples trained
   twice beyond what the restored weights had not seen; seconds from each kill to the first step
   of the restarted workers.
2. The S3 server goes away while a checkpoint is written (a proxy in front of moto stops
   listening when it sees the PUT of a checkpoint file, and listens again a few seconds later):
   every checkpoint folder with a manifest must verify, and the run must resume and finish.
3. S3 errors and throttling: a seeded share of requests answered 500 InternalError / 503
   SlowDown by the proxy; storage operations and a prepare + training run through it.
4. A Serve replica SIGKILLed under load (the deployment and load of tests/test_serve_ops.py):
   failed requests out of total, against the bound the test asserts, and how the failures were
   answered (the endpoint's JSON 503, plain text from a proxy, no answer), per HTTP ingress.
5. The bad-request fuzz of tests/test_serve_http.py (the same hypothesis generator): kinds of bad
   request sent, 5xx answers.

Meant for a CPU machine (measured on 2 shared cores); the tests in tests/test_chaos.py run the
same functions, smaller, and assert the invariants.

    python -m benchmarks.chaos [--runs 2] [--kills 2] [--outages 4] [--replica-kills 1] [--fuzz 200]
    python -m benchmarks.chaos --replicas-only [--replica-kills 3] [--ingress both]

``--replicas-only`` measures case 4 alone, behind each ingress (HAProxy, the default where its
binary is present, and Serve's own proxy, ``LEPTON_SERVE_HAPROXY=0``), each on a Ray instance of
its own in a subprocess (the ingress is chosen when Ray starts); its result is ``chaos_replicas``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.harness import Goal, table

KEY = "chaos"
REPLICAS_KEY = "chaos_replicas"
INGRESSES = {"haproxy": "HAProxy", "serve": "Serve's proxy"}
ROWS, BATCH = 1200, 60  # the digits subset: 20 steps an epoch, no partial batch


# --- shared -------------------------------------------------------------------------------------
def digits(dest: str | Path, endpoint_url: str | None = None):
    """1,200 MNIST digits (a seeded choice of the bundled 5k) as a prepared dataset at ``dest``."""
    from lepton_ray.data import load_mnist5k, write_dataset

    x, y, ids = load_mnist5k()["train"]
    sel = np.sort(np.random.default_rng(0).choice(len(x), ROWS, replace=False))
    return write_dataset(
        x[sel],
        y[sel],
        str(dest),
        classes=[str(i) for i in range(10)],
        ids=ids[sel],
        endpoint_url=endpoint_url,
    )


def small_cnn():
    from lepton_ray import build_model

    return build_model("cnn", in_channels=1, num_classes=10, width=8)


def sample_logs(run: Path) -> dict[str, list[dict]]:
    """Per worker process: the steps it trained (tests/test_resume.py's reader)."""
    from tests.test_resume import sample_logs as read

    return read(run)


# --- 1. worker kills ----------------------------------------------------------------------------
def committed_step(run: Path) -> int:
    """Step of the latest checkpoint Ray Train has registered: what a restart restores."""
    from lepton_ray.runs import RunLayout
    from lepton_ray.storage import resolve

    return RunLayout(resolve(str(run))).committed_step()


def own_train_workers() -> list[int]:
    """Pids of the Ray Train workers of the Ray instance this process started (its descendants,
    ``ray::RayTrainWorker`` in the command line), never another process on the machine."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if (p.cmdline() or [""])[0].startswith("ray::RayTrainWorker"):
                out.append(p.pid)
        except psutil.Error:
            continue
    return sorted(out)


class Killer(threading.Thread):
    """SIGKILLs one training worker per planned kill. Kill ``i`` waits until Ray Train has
    committed a checkpoint at step ``targets[i]`` or later, and, after an earlier kill, until a
    worker process started since has logged a step and committed a checkpoint after the step the
    kill left (so the restarted group is training: the killed group's last report may still be
    committed after its kill, and a kill then would hit the group being torn down), then a seeded
    random delay of up to ``max_delay_s`` (so a kill lands anywhere between two checkpoints, a
    checkpoint's upload included), then kills a seeded choice among this run's workers; none once
    the run's last step is committed."""

    def __init__(
        self, run: Path, rng: random.Random, targets: list[int], max_delay_s: float, last: int
    ):
        super().__init__(daemon=True)
        self.run_dir, self.targets, self.last = run, targets, last
        self.delays = [rng.uniform(0, max_delay_s) for _ in targets]
        self.choices = [rng.random() for _ in targets]
        self.kills: list[dict[str, Any]] = []
        self.done = threading.Event()

    def run(self) -> None:
        floor, since = 0, 0.0  # the previous kill's committed step + 1, and its time
        for target, delay, choice in zip(self.targets, self.delays, self.choices, strict=True):
            while not self.done.is_set() and not (
                committed_step(self.run_dir) >= max(target, floor) and self.restarted(since)
            ):
                time.sleep(0.02)
            if self.done.wait(delay):
                return
            pids = own_train_workers()
            if not pids or committed_step(self.run_dir) >= self.last:
                return  # the run has finished: nothing left to interrupt
            pid = pids[int(choice * len(pids))]
            t = time.time()
            os.kill(pid, signal.SIGKILL)
            at = committed_step(self.run_dir)
            self.kills.append({"t": t, "pid": pid, "target": target, "committed": at})
            floor, since = at + 1, t

    def restarted(self, since: float) -> bool:
        """A worker process whose first logged step came after ``since`` (no kill yet: true)."""
        if not since:
            return True
        try:
            logs = sample_logs(self.run_dir)
        except ValueError:  # a line being written: look again
            return False
        return any(s[0]["t"] > since for s in logs.values() if s)


def audit(run: Path, kill_times: list[float], rows: int) -> dict[str, Any]:
    """Samples lost and repeated per epoch, from the sample log and the kill times.

    A worker process belongs to the attempt after the kills before its first logged step. Each
    attempt restored the checkpoint just before its first step; what an attempt trained past the
    step the next attempt restored was thrown away with its weights (the restored weights never
    saw it), so an epoch's samples are each attempt's steps up to the next attempt's restore
    point, and the last attempt's steps. Those must cover the epoch exactly once.
    """
    logs = sample_logs(run)
    kill_times = sorted(kill_times)
    attempts: dict[int, list[dict]] = {}
    for steps in logs.values():
        a = sum(k < steps[0]["t"] for k in kill_times)
        attempts.setdefault(a, []).extend(steps)
    order = sorted(attempts)
    start = {a: min(s["step"] for s in attempts[a]) - 1 for a in order}
    kept: list[dict] = []
    for i, a in enumerate(order):
        cutoff = start[order[i + 1]] if i + 1 < len(order) else float("inf")
        kept += [s for s in attempts[a] if s["step"] <= cutoff]
    epochs = sorted({s["epoch"] for s in kept})
    lost = repeated = 0
    for e in epochs:
        ids = np.concatenate([np.asarray(s["ids"]) for s in kept if s["epoch"] == e])
        unique = np.unique(ids)
        lost += rows - len(unique)
        repeated += len(ids) - len(unique)
    # Recovery: from each kill to the first step trained by the attempt after it.
    firsts = {a: min(s["t"] for s in attempts[a]) for a in order}
    recovery = [round(firsts[i + 1] - k, 2) for i, k in enumerate(kill_times) if i + 1 in firsts]
    redone = sum(
        1 for i, a in enumerate(order[:-1]) for s in attempts[a] if s["step"] > start[order[i + 1]]
    )
    return {
        "epochs_audited": len(epochs),
        "attempts": len(order),
        "restored_steps": [start[a] for a in order[1:]],
        "samples_lost": int(lost),
        "samples_repeated": int(repeated),
        "logged_steps_redone": redone,
        "recovery_s": recovery,
    }


def kill_run(
    data: Any,
    root: str | Path,
    name: str,
    *,
    seed: int,
    kills: int,
    epochs: int = 3,
    every: int = 5,
    max_delay_s: float = 0.5,
) -> dict[str, Any]:
    """One run with ``kills`` seeded worker kills; its figures (see :func:`audit`)."""
    from lepton_ray import Trainer

    steps = epochs * ROWS // BATCH
    rng = random.Random(seed)
    # Distinct targets, a checkpoint interval apart, none in the last epoch's second half (a kill
    # must find the run still training; a restart takes ~10 s on 2 cores).
    slots = list(range(every, steps - steps // (2 * epochs), every))
    targets = sorted(rng.sample(slots, kills))
    run = Path(root) / name
    killer = Killer(run, rng, targets, max_delay_s, last=steps)
    killer.start()
    finished, error = False, None
    t0 = time.perf_counter()
    try:
        res = Trainer(2).fit(
            small_cnn(),
            data,
            batch_size=BATCH,
            epochs=epochs,
            lr=0.05,
            storage=str(root),
            run_name=name,
            checkpoint_every_steps=every,
            record_sample_ids=True,
            max_failures=kills + 1,
            progress_bar=False,
        )
        finished = res["epochs"] == epochs and res["history"][-1]["step"] == steps
    except Exception as exc:  # noqa: BLE001 - a run that fails is a figure, not a crash
        error = f"{type(exc).__name__}: {exc}"
    killer.done.set()
    killer.join(timeout=10)
    out = {
        "seed": seed,
        "kills": len(killer.kills),
        "kill_targets": targets,
        "killed_after_committed_step": [k["committed"] for k in killer.kills],
        "finished": finished,
        "error": error,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out |= audit(run, [k["t"] for k in killer.kills], ROWS)
    return out


# --- 2. the S3 server goes away during a checkpoint ---------------------------------------------
CHECKPOINT_FILE = re.compile(r"/checkpoint_epoch\d+_step(\d+)/([A-Za-z0-9._-]+)$")


def verify_all(run: Any) -> dict[str, Any]:
    """Every checkpoint folder of a run: complete ones (manifest) must verify."""
    from lepton_ray import checkpoint
    from lepton_ray.errors import LeptonError
    from lepton_ray.runs import parse_checkpoint_name

    complete, incomplete, failed = [], [], []
    for name in run.root.listdir():
        if not parse_checkpoint_name(name):
            continue
        loc = run.root.join(name)
        if not loc.join(checkpoint.MANIFEST).exists():
            incomplete.append(name)
            continue
        try:
            checkpoint.verify(loc)
            complete.append(name)
        except LeptonError as exc:
            failed.append(f"{name}: {exc}")
    latest = run.latest()
    latest_ok = latest is not None
    if latest is not None:
        try:
            checkpoint.load_train_state(latest)
        except LeptonError:
            latest_ok = False
    return {
        "complete": len(complete),
        "incomplete": len(incomplete),
        "failed_to_verify": failed,
        "latest_loads": latest_ok,
    }


def outage_run(
    s3_server: str,
    bucket: str,
    data: Any,
    name: str,
    *,
    cut_step: int,
    cut_file: str,
    outage_s: float = 3.0,
    epochs: int = 2,
    every: int = 5,
    workers: int = 2,
) -> dict[str, Any]:
    """A run of ``workers`` checkpointing to ``s3://bucket/runs`` through a proxy that goes down
    when the PUT of ``cut_file`` of the checkpoint at ``cut_step`` arrives (dropping it) and comes
    back ``outage_s`` later. If the run fails anyway it is resumed once (``resume=True``)."""
    from lepton_ray import Trainer, storage
    from lepton_ray.errors import LeptonError
    from lepton_ray.runs import RunLayout
    from tests.s3_faults import S3FaultProxy

    def cut_on(method: str, target: str) -> bool:
        m = CHECKPOINT_FILE.search(target.split("?", 1)[0])
        return (
            method == "PUT"
            and m is not None
            and (int(m.group(1)), m.group(2))
            == (
                cut_step,
                cut_file,
            )
        )

    steps = epochs * ROWS // BATCH
    uri = f"s3://{bucket}/runs"
    with S3FaultProxy(s3_server, cut_on=cut_on, outage_s=outage_s) as proxy:
        fit = {
            "batch_size": BATCH,
            "epochs": epochs,
            "lr": 0.05,
            "storage": uri,
            "endpoint_url": proxy.url,
            "run_name": name,
            "checkpoint_every_steps": every,
            "max_failures": 3,
            "progress_bar": False,
        }
        finished, resumed_by_hand, errors = False, 0, []
        t0 = time.perf_counter()
        for attempt in range(2):
            try:
                res = Trainer(workers).fit(small_cnn(), data, resume=attempt > 0, **fit)
                finished = res["history"][-1]["step"] == steps
                break
            except LeptonError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                proxy.outage_ended.wait(60)
                resumed_by_hand += 1
        wall = time.perf_counter() - t0
        counts = dict(proxy.counts)
        cut, puts = list(proxy.cut_targets), set(proxy.put_paths)
    # Checked on the server directly, not through the proxy.
    check = verify_all(RunLayout(storage.resolve(uri, s3_server).join(name)))
    attempted = {m.group(1) for t in puts if (m := CHECKPOINT_FILE.search(t))}
    return {
        "checkpoints_attempted": len(attempted),
        "cut": f"{cut_file} of the checkpoint at step {cut_step}",
        "outages": counts.get("outages", 0),
        "dropped_requests": counts.get("dropped", 0),
        "cut_requests": cut,
        "finished": finished,
        "resumed_by_hand": resumed_by_hand,
        "errors": errors,
        "wall_s": round(wall, 1),
        **check,
    }


# --- 3. S3 errors and throttling -----------------------------------------------------------------
def storage_round(root: Any, i: int) -> None:
    """One round of what lepton_ray does with a store: write an object, check it, list, read it
    back, delete it (5 requests when nothing fails)."""
    # 1.2 kB. Not smaller than an S3 error body (~250 bytes): pyarrow reads an object into a
    # buffer of its size, and an error body that does not fit fails the read without a retry.
    data = (f"{i:06d}" * 200).encode()
    loc = root.join(f"obj-{i}.bin")
    loc.write_bytes(data)
    assert loc.exists() and f"obj-{i}.bin" in root.listdir()
    assert loc.read_bytes() == data
    loc.delete()


def faults_ops(
    s3_server: str, bucket: str, *, seed: int, p: float, rounds: int, max_per_request: int | None
) -> dict[str, Any]:
    """``rounds`` storage rounds through a proxy answering a share ``p`` of requests (half 500,
    half 503); operations that still failed after the SDK's retries."""
    from lepton_ray import storage
    from lepton_ray.errors import StorageError
    from tests.s3_faults import S3FaultProxy, SeededFaults

    faults = SeededFaults(seed=seed, p500=p / 2, p503=p / 2, max_per_request=max_per_request)
    failed = []
    with S3FaultProxy(s3_server, faults=faults) as proxy:
        root = storage.resolve(f"s3://{bucket}/faults-{seed}", endpoint_url=proxy.url)
        for i in range(rounds):
            try:
                storage_round(root, i)
            except StorageError as exc:
                failed.append(str(exc))
        counts = dict(proxy.counts)
    return {
        "fault_share": p,
        "max_faults_per_request": max_per_request,
        "operations": rounds,
        "requests": counts.get("requests", 0),
        "injected_500": counts.get("injected_500", 0),
        "injected_503": counts.get("injected_503", 0),
        "operations_failed": len(failed),
        "failures": failed[:3],
    }


def faults_train(
    s3_server: str, bucket: str, tmp: Path, *, seed: int, p: float, max_per_request: int | None
) -> dict[str, Any]:
    """Prepare the digits into S3 and train one epoch from and to S3, all through the proxy."""
    from lepton_ray import Trainer
    from tests.s3_faults import S3FaultProxy, SeededFaults

    faults = SeededFaults(seed=seed, p500=p / 2, p503=p / 2, max_per_request=max_per_request)
    finished, error = False, None
    with S3FaultProxy(s3_server, faults=faults) as proxy:
        try:
            data = digits(f"s3://{bucket}/data-{seed}", endpoint_url=proxy.url)
            res = Trainer(2).fit(
                small_cnn(),
                data,
                batch_size=BATCH,
                epochs=1,
                lr=0.05,
                storage=f"s3://{bucket}/runs",
                endpoint_url=proxy.url,
                run_name=f"faults-{seed}",
                checkpoint_every_steps=5,
                max_failures=2,
                progress_bar=False,
            )
            finished = res["history"][-1]["step"] == ROWS // BATCH
        except Exception as exc:  # noqa: BLE001 - a failed run is a figure
            error = f"{type(exc).__name__}: {exc}"
        counts = dict(proxy.counts)
    return {
        "fault_share": p,
        "max_faults_per_request": max_per_request,
        "requests": counts.get("requests", 0),
        "injected_500": counts.get("injected_500", 0),
        "injected_503": counts.get("injected_503", 0),
        "finished": finished,
        "error": error,
    }


# --- 4. a replica killed under load ------------------------------------------------------------
def replica_kills(port: int, tmp: Path, kills: int) -> list[dict[str, Any]]:
    """tests/test_serve_ops.py's killed-replica case, ``kills`` times per layout: requests and
    failures while a model replica is SIGKILLed and replaced, and the test's bound."""
    from ray import serve

    from lepton_ray import deploy
    from lepton_ray.serve.ingress import uses_haproxy
    from tests.test_serve_http import make_checkpoint
    from tests.test_serve_ops import (
        APP,
        MODEL_DEPLOYMENT,
        SCALING,
        Load,
        own_pids,
        replica_pid,
        wait_for,
    )

    ckpt = make_checkpoint(tmp / "serve-ckpt", seed=1)
    threads, out = 4, []
    for one_hop in (True, False):
        url = deploy(ckpt, port=port, **(SCALING | {"one_hop": one_hop}))
        handle = serve.get_deployment_handle(MODEL_DEPLOYMENT[one_hop], app_name=APP)
        for _ in range(kills):
            with Load(url, threads=threads) as load:
                wait_for("traffic", lambda load=load: len(load.results) >= 20)
                pid = replica_pid(handle)
                assert pid in own_pids(), f"{pid} is not a process of this Ray instance"
                os.kill(pid, signal.SIGKILL)
                at = len(load.results)
                wait_for(
                    "a replacement", lambda h=handle, pid=pid: replica_pid(h) not in (None, pid)
                )
                wait_for("answers after", lambda load=load, at=at: len(load.results) >= at + 20)
            failed = load.failures
            out.append(
                {
                    "ingress": "haproxy" if uses_haproxy() else "serve",
                    "layout": "one hop" if one_hop else "two hops",
                    "requests": len(load.results),
                    "failed": len(failed),
                    "json_503": sum(m.startswith("json") for _, m in failed),
                    "text": sum(m.startswith("text") for _, m in failed),
                    "no_answer": sum(s == 0 and not m.startswith("text") for s, m in failed),
                    "bound": threads,  # tests/test_serve_ops.py: at most each client's request
                    "failures": sorted({f"{s} {m[:60]}" for s, m in failed})[:3],
                }
            )
    serve.delete(APP)
    return out


# --- 5. the bad-request fuzz -------------------------------------------------------------------
def request_kind(body: bytes, ctype: str) -> str:
    """What a fuzzed request is, in a few words: its content type and the shape of its body."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        what = "PNG signature + junk" if body.startswith(b"\x89PNG") else "raw bytes"
    else:
        what = f"JSON {type(value).__name__}"
        if isinstance(value, dict) and "instances" in value:
            arr = np.asarray(value["instances"], dtype=object)
            first = arr.flat[0] if arr.size else None
            what = f"instances {arr.shape}" + (
                f", pixel {type(first).__name__}" if first not in (None, 0) else ""
            )
        elif isinstance(value, dict) and "images" in value:
            what = "images: text"
    return f"{ctype or '(none)'} / {what}"


def fuzz(port: int, tmp: Path, examples: int) -> dict[str, Any]:
    """tests/test_serve_http.py's generator against the same endpoint configuration."""
    import httpx
    from hypothesis import HealthCheck, given, settings
    from ray import serve

    from lepton_ray import deploy
    from tests.test_serve_http import ENDPOINT, TOKEN, bodies, content_types, make_checkpoint

    ckpt = make_checkpoint(tmp / "fuzz-ckpt")
    url = deploy(ckpt, port=port, **ENDPOINT)
    seen: list[tuple[str, int]] = []
    good = {"instances": np.zeros((1, 28, 28)).tolist()}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(body=bodies, ctype=content_types)
        def probe(body: bytes, ctype: str) -> None:
            r = c.post(
                "/v1/predict", content=body, headers={"Content-Type": ctype} if ctype else {}
            )
            seen.append((request_kind(body, ctype), r.status_code))

        probe()
        still_good = c.post("/v1/predict", json=good).status_code == 200
    serve.delete(ENDPOINT["name"])
    statuses = Counter(s for _, s in seen)
    return {
        "requests": len(seen),
        "kinds": len({k for k, s in seen if s != 200}),
        "kinds_sent": len({k for k, _ in seen}),
        "answers_4xx": sum(n for s, n in statuses.items() if 400 <= s < 500),
        "answers_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "answers_200": statuses.get(200, 0),
        "statuses": {str(s): n for s, n in sorted(statuses.items())},
        "good_request_answered_after": still_good,
    }


# --- the benchmark -----------------------------------------------------------------------------
def _env() -> None:
    """Fake credentials for moto, as tests/conftest.py sets them, before pyarrow's S3 loads."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "lepton-bench-key")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "lepton-bench-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.replicas_only:
        return run_replicas(args)
    _env()
    import boto3
    import ray
    from moto.server import ThreadedMotoServer
    from ray import serve

    from lepton_ray.runtime import ensure_ray
    from tests.conftest import free_port

    r = harness.record(
        KEY,
        workers=2,
        rows=ROWS,
        global_batch=BATCH,
        checkpoint_every_steps=5,
        s3_retry_budget="3 retries (4 attempts) per request, pyarrow AwsDefaultS3RetryStrategy",
    )
    tmp = harness.scratch("lepton-chaos-")
    s3_port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    server.start()
    s3 = f"http://127.0.0.1:{s3_port}"
    bucket = "lepton-chaos"
    boto3.client("s3", endpoint_url=s3, region_name="us-east-1").create_bucket(Bucket=bucket)
    try:
        ensure_ray(address="local")
        data = digits(tmp / "data")
        r["worker_kills"] = [
            kill_run(data, tmp / "runs", f"kills-{i}", seed=i, kills=args.kills)
            for i in range(args.runs)
        ]
        files = ["model.safetensors", "train_state.pt", "lepton.json", "manifest.json"]
        r["outages"] = [
            outage_run(
                s3, bucket, data, f"outage-{i}", cut_step=5 * (1 + i % 6), cut_file=files[i % 4]
            )
            for i in range(args.outages)
        ]
        r["s3_faults"] = {
            "within_budget": faults_ops(s3, bucket, seed=1, p=0.5, rounds=60, max_per_request=3),
            "independent": faults_ops(s3, bucket, seed=2, p=0.2, rounds=150, max_per_request=None),
            "train_within_budget": faults_train(s3, bucket, tmp, seed=3, p=0.3, max_per_request=3),
        }
        port = free_port()
        r["replica_kills"] = replica_kills(port, tmp, args.replica_kills)
        r["fuzz"] = fuzz(port, tmp, args.fuzz)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            server.stop()
    return r


def run_replicas(args: argparse.Namespace) -> dict[str, Any]:
    """Case 4 alone, behind each ingress asked for; ``--ingress X`` measures X in this process."""
    r = harness.record(KEY, replica_kill_client_threads=4)
    if args.ingress != "both":
        _env()
        import ray
        from ray import serve

        from lepton_ray.runtime import ensure_ray
        from tests.conftest import free_port

        tmp = harness.scratch("lepton-chaos-")
        try:
            ensure_ray(address="local", haproxy=args.ingress == "haproxy")
            r["replica_kills"] = replica_kills(free_port(), tmp, args.replica_kills)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        return r
    r["replica_kills"] = []
    for ingress in INGRESSES:
        out = harness.scratch("lepton-chaos-")
        cmd = [sys.executable, "-m", "benchmarks.chaos", "--replicas-only", "--ingress", ingress]
        cmd += ["--replica-kills", str(args.replica_kills), "--out", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "LEPTON_SERVE_HAPROXY": ""})
        r["replica_kills"] += harness.load_result(out / f"{REPLICAS_KEY}.json")["replica_kills"]
    return r


def replica_metrics(reps: list[dict[str, Any]]) -> dict[str, Any]:
    # Rows measured before the ingress was recorded ran behind Serve's proxy, then the default.
    default = [x for x in reps if x.get("ingress", "serve") == "haproxy"]
    return {
        "over_bound": sum(x["failed"] > x["bound"] for x in reps),
        "default_measured": bool(default),
        "default_text": sum(x["text"] for x in default),
        "default_no_answer": sum(x.get("no_answer", 0) for x in default),
    }


def metrics(r: dict[str, Any]) -> dict[str, Any]:
    """The numbers the goals are judged on, computed from a result."""
    if "worker_kills" not in r:
        return {"replicas": replica_metrics(r["replica_kills"])}
    kills, outages, f = r["worker_kills"], r["outages"], r["s3_faults"]
    reps, fz = r["replica_kills"], r["fuzz"]
    return {
        "kills": {
            "runs": len(kills),
            "kills": sum(k["kills"] for k in kills),
            "finished": sum(k["finished"] for k in kills),
            "all_finished": all(k["finished"] for k in kills),
            "lost": sum(k["samples_lost"] for k in kills),
            "repeated": sum(k["samples_repeated"] for k in kills),
        },
        "outages": {
            "outages": sum(o["outages"] for o in outages),
            "failed_to_verify": sum(len(o["failed_to_verify"]) for o in outages),
            "all_finished": all(o["finished"] for o in outages),
            "latest_loads": all(o["latest_loads"] for o in outages),
        },
        "faults": {
            "failed_within_budget": f["within_budget"]["operations_failed"],
            "train_finished": f["train_within_budget"]["finished"],
        },
        "replicas": replica_metrics(reps),
        "fuzz": {"answers_5xx": fz["answers_5xx"], "good_after": fz["good_request_answered_after"]},
    }


GOALS = [
    Goal("every run with worker kills finishes", "kills.all_finished", "==", True),
    Goal("no sample lost after worker kills", "kills.lost", "==", 0),
    Goal("no sample repeated beyond the unsaved steps", "kills.repeated", "==", 0),
    Goal(
        "no complete checkpoint fails to verify after an outage",
        "outages.failed_to_verify",
        "==",
        0,
    ),
    Goal("the latest checkpoint loads after every outage", "outages.latest_loads", "==", True),
    Goal("every run with an outage finishes", "outages.all_finished", "==", True),
    Goal(
        "no operation fails when faults stay within the retry budget",
        "faults.failed_within_budget",
        "==",
        0,
    ),
    Goal("a run through 500s/503s finishes", "faults.train_finished", "==", True),
    Goal("no replica kill fails more requests than the bound", "replicas.over_bound", "==", 0),
    Goal("no fuzzed request gets a 5xx", "fuzz.answers_5xx", "==", 0),
]
REPLICA_GOALS = [
    Goal("no replica kill fails more requests than the bound", "replicas.over_bound", "==", 0),
    Goal(
        "no plain-text answer behind the default ingress (HAProxy)",
        "replicas.default_text",
        "==",
        0,
    ),
    Goal(
        "no answerless close behind the default ingress (HAProxy)",
        "replicas.default_no_answer",
        "==",
        0,
    ),
]


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 1) if xs else None


def replica_table(reps: list[dict[str, Any]]) -> str:
    return table(
        ["ingress", "layout", "requests", "failed", "JSON 503", "plain text", "no answer", "bound"],
        [
            [
                INGRESSES[x.get("ingress", "serve")],
                x["layout"],
                x["requests"],
                x["failed"],
                x.get("json_503", "–"),
                x.get("text", "–"),
                x.get("no_answer", "–"),
                x["bound"],
            ]
            for x in reps
        ],
    )


REPLICA_CAPTION = (
    "**A Serve replica SIGKILLed under load** (tests/test_serve_ops.py's deployment and load: 4 "
    "client threads; a failed request is the endpoint's JSON 503 with Retry-After, plain text "
    "from a proxy, or a connection closed without an answer)"
)


def render_replicas(r: dict[str, Any], key: str) -> str:
    return "\n".join(
        [
            "## Reliability: a replica killed behind each HTTP ingress",
            "",
            f"{harness.provenance(r, key)} One replica of the application SIGKILLed per row, "
            "each ingress on a Ray instance of its own.",
            "",
            REPLICA_CAPTION,
            "",
            replica_table(r["replica_kills"]),
            "",
            harness.goal_lines(
                [g for g in REPLICA_GOALS if metrics(r)["replicas"]["default_measured"]]
                or REPLICA_GOALS[:1],
                metrics(r),
            ),
            "",
        ]
    )


def render(r: dict[str, Any], key: str) -> str:
    if "worker_kills" not in r:
        return render_replicas(r, key)
    m = metrics(r)
    kills, outages, f = r["worker_kills"], r["outages"], r["s3_faults"]
    recov = [s for k in kills for s in k["recovery_s"]]
    kill_rows = [
        [
            f"seed {k['seed']}",
            k["kills"],
            "yes" if k["finished"] else f"no: {k['error']}",
            k["samples_lost"],
            k["samples_repeated"],
            ", ".join(f"{s:.1f}" for s in k["recovery_s"]) or "–",
        ]
        for k in kills
    ]
    kill_rows.append(
        [
            f"**{m['kills']['runs']} runs**",
            m["kills"]["kills"],
            f"{m['kills']['finished']} of {m['kills']['runs']}",
            m["kills"]["lost"],
            m["kills"]["repeated"],
            f"mean {_mean(recov)}, max {max(recov) if recov else '–'}",
        ]
    )
    outage_rows = [
        [
            o["cut"],
            o["outages"],
            o["checkpoints_attempted"],
            o["complete"],
            len(o["failed_to_verify"]),
            "yes" if o["latest_loads"] else "no",
            ("yes" if o["finished"] else "no")
            + (f" (resumed by hand {o['resumed_by_hand']}x)" if o["resumed_by_hand"] else ""),
        ]
        for o in outages
    ]
    fault_rows = [
        [
            "storage rounds, each request faulted ≤ 3 times",
            f["within_budget"]["requests"],
            f["within_budget"]["injected_500"],
            f["within_budget"]["injected_503"],
            f"{f['within_budget']['operations_failed']} of {f['within_budget']['operations']}",
        ],
        [
            f"storage rounds, independent faults ({f['independent']['fault_share']:.0%})",
            f["independent"]["requests"],
            f["independent"]["injected_500"],
            f["independent"]["injected_503"],
            f"{f['independent']['operations_failed']} of {f['independent']['operations']}",
        ],
        [
            "prepare + 1-epoch run on S3, each request faulted ≤ 3 times",
            f["train_within_budget"]["requests"],
            f["train_within_budget"]["injected_500"],
            f["train_within_budget"]["injected_503"],
            "run finished" if f["train_within_budget"]["finished"] else "run failed",
        ],
    ]
    fz = r["fuzz"]
    return "\n".join(
        [
            "## Reliability: faults injected, figures counted",
            "",
            f"{harness.provenance(r, key)} 2 CPU training workers, {r['rows']:,} digits, global "
            f"batch {r['global_batch']}, a checkpoint every {r['checkpoint_every_steps']} steps; "
            f"S3 is moto behind tests/s3_faults.py's proxy; S3 retry budget: "
            f"{r['s3_retry_budget']}.",
            "",
            "**Worker kills** (SIGKILL of one of this Ray instance's training workers at seeded "
            "random points; samples audited per epoch from the sample log; recovery: kill to the "
            "first step of the restarted workers)",
            "",
            table(
                ["run", "kills", "finished", "samples lost", "samples repeated", "recovery s"],
                kill_rows,
            ),
            "",
            "**S3 server gone while a checkpoint is written** (the proxy stops listening at the "
            "PUT of one file of one checkpoint, dropping it, and listens again 3 s later)",
            "",
            table(
                [
                    "cut at",
                    "outages",
                    "checkpoints attempted",
                    "complete",
                    "complete, failed to verify",
                    "latest loads",
                    "run finished",
                ],
                outage_rows,
            ),
            "",
            "**S3 500 InternalError / 503 SlowDown injected** (seeded, per request)",
            "",
            table(["workload", "requests", "injected 500s", "injected 503s", "failed"], fault_rows),
            "",
            REPLICA_CAPTION,
            "",
            replica_table(r["replica_kills"]),
            "",
            f"**Bad-request fuzz** (tests/test_serve_http.py's generator): {fz['requests']:,} "
            f"requests of {fz['kinds_sent']} kinds ({fz['kinds']} refused), answers "
            f"{fz['statuses']}; 5xx answers: **{fz['answers_5xx']}**; a good request answered "
            f"after: {'yes' if fz['good_request_answered_after'] else 'no'}.",
            "",
            harness.goal_lines(GOALS, m),
            "",
        ]
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--runs", type=int, default=2, help="training runs with worker kills")
    ap.add_argument("--kills", type=int, default=2, help="worker kills per run")
    ap.add_argument("--outages", type=int, default=4, help="runs with an S3 outage")
    ap.add_argument("--replica-kills", type=int, default=1, help="replica kills per layout")
    ap.add_argument("--fuzz", type=int, default=200, help="fuzzed requests")
    ap.add_argument(
        "--replicas-only",
        action="store_true",
        help=f"measure only the replica kills, behind --ingress (result: {REPLICAS_KEY})",
    )
    ap.add_argument(
        "--ingress",
        choices=[*INGRESSES, "both"],
        default="both",
        help="with --replicas-only: which HTTP ingress (haproxy: the default; serve: the opt-out)",
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    key = REPLICAS_KEY if "--replicas-only" in argv else KEY
    harness.main_for(__doc__, key, add_args, run, render, argv)


if __name__ == "__main__":
    main()
