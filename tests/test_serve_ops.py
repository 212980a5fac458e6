"""Ray tier: the endpoint under live traffic — autoscaling up and down, a killed replica, a model
update and canary trials (a copy of the model promoted; random weights and a checkpoint that
cannot take the input rolled back; the verdict kept, in the store, over an ingress restart).

Scaling and the killed replica are checked in both layouts: one hop (the model in the HTTP
replica ``ops-ingress``, the default) and two hops (``one_hop=False``: the model in ``ops-model``
behind the ingress). The canary always runs two hops; switching to it from one hop is a rolling
update of the same ingress deployment.

One application ("ops") for the whole module; each test deploys the configuration it needs
(``serve.run`` with an unchanged configuration is a no-op). Nothing here is timed: waits are for
states (replica counts, versions, verdicts), with generous deadlines.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from lepton_ray.data import load_mnist5k
from tests.test_serve_http import make_checkpoint

pytestmark = pytest.mark.ray

APP = "ops"
# Small replicas (2 cores on the test machine) and short delays, so scaling happens in seconds.
SCALING = {
    "name": APP,
    "route_prefix": "/ops",
    "min_replicas": 1,
    "max_replicas": 2,
    "num_cpus": 0.25,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 2.0,
    "look_back_period_s": 2.0,
    "max_batch_size": 8,
}


class Load:
    """Threads that POST good requests back to back until stopped, one digit each, cycling through
    the first ``images`` test digits; every answer is kept."""

    def __init__(self, url: str, threads: int, images: int = 1):
        self.url, self.results, self._stop = url + "/v1/predict", [], threading.Event()
        digits = load_mnist5k()["test"][0][:images, :, :, 0]
        self.bodies = [{"instances": [d.tolist()]} for d in digits]
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def _run(self, first: int) -> None:
        import httpx

        with httpx.Client(timeout=120) as client:
            n = first
            while not self._stop.is_set():
                body, n = self.bodies[n % len(self.bodies)], n + 1
                try:
                    r = client.post(self.url, json=body)
                except httpx.HTTPError as exc:
                    self.results.append((0, repr(exc)))
                    continue
                try:
                    answer = r.json()
                except ValueError:  # not JSON: an error page from a proxy in front of the endpoint
                    self.results.append(
                        (r.status_code if r.status_code != 200 else 0, "text: " + r.text[:200])
                    )
                    continue
                if r.status_code == 200:
                    self.results.append((200, answer.get("model_version") or r.text))
                else:  # the endpoint's own error: say whether it tells when to retry
                    retry = r.headers.get("retry-after")
                    self.results.append(
                        (r.status_code, f"json (retry-after {retry}): {answer.get('error')}")
                    )

    @property
    def failures(self) -> list:
        return [r for r in self.results if r[0] != 200]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


# The deployment that holds the model in each layout.
MODEL_DEPLOYMENT = {True: f"{APP}-ingress", False: f"{APP}-model"}
LAYOUTS = [pytest.param(True, id="one-hop"), pytest.param(False, id="two-hops")]


def running_replicas(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or deployment not in app.deployments:
        return 0
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve-ops")
    return {
        "a": make_checkpoint(root / "a", seed=1),
        "a-copy": make_checkpoint(root / "a-copy", seed=1, nudge=0.5),
        "b": make_checkpoint(root / "b", seed=2),
        "rgb": make_checkpoint(root / "rgb", seed=3, in_channels=3),
    }


@pytest.fixture(scope="module")
def ops(ray_session, serve_port, ckpts):
    """``deploy(checkpoint, **overrides)`` on the module's app -> (url, model version)."""
    from ray import serve

    from lepton_ray import deploy
    from lepton_ray.checkpoint import version

    def _deploy(checkpoint: str, **overrides) -> tuple[str, str]:
        url = deploy(checkpoint, port=serve_port, **(SCALING | overrides))
        return url, version(checkpoint)

    yield _deploy
    serve.delete(APP)


def own_pids() -> set[int]:
    """This test process and every process it started (the local Ray instance's included)."""
    import psutil

    me = psutil.Process()
    return {me.pid} | {p.pid for p in me.children(recursive=True)}


def replica_pid(handle) -> int | None:
    """The pid of the model replica that answers this call (None while none can)."""
    try:
        return handle.pid.remote().result(timeout_s=30)
    except Exception:  # noqa: BLE001 - routed to the replica just killed, or none running yet
        return None


def model_info(url: str) -> dict:
    import httpx

    return httpx.get(url + "/v1/model", timeout=60).json()


@pytest.mark.parametrize("one_hop", LAYOUTS)
def test_replicas_scale_up_under_load_and_back_down_after(ops, ckpts, one_hop):
    from ray import serve

    url, version = ops(ckpts["a"], one_hop=one_hop)
    deployments = set(serve.status().applications[APP].deployments)
    assert deployments == ({f"{APP}-ingress"} if one_hop else {f"{APP}-ingress", f"{APP}-model"})
    model = MODEL_DEPLOYMENT[one_hop]
    assert running_replicas(model) == 1
    with Load(url, threads=12) as load:
        wait_for("a second replica under load", lambda: running_replicas(model) == 2)
    assert not load.failures and {v for _, v in load.results} == {version}
    wait_for("scaling back to one replica", lambda: running_replicas(model) == 1)


@pytest.mark.parametrize("one_hop", LAYOUTS)
def test_a_killed_replica_is_replaced_and_service_recovers(ops, ckpts, one_hop):
    from ray import serve

    url, version = ops(ckpts["a"], one_hop=one_hop)
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT[one_hop], app_name=APP)
    with Load(url, threads=4) as load:
        wait_for("traffic", lambda: len(load.results) >= 20)
        pid = replica_pid(handle)
        assert pid in own_pids(), f"{pid} is not a process of this test's Ray instance"
        os.kill(pid, signal.SIGKILL)
        killed_at = len(load.results)
        wait_for("a replacement replica", lambda: replica_pid(handle) not in (None, pid))
        wait_for("answers after the replacement", lambda: len(load.results) >= killed_at + 20)
    from lepton_ray.serve.ingress import uses_haproxy

    failed = load.failures
    ours = [f for f in failed if f[1].startswith("json")]
    text = [f for f in failed if f[1].startswith("text")]
    # A response the replica had begun to write when it died arrives cut (its headers, part of
    # its body): no proxy can replay an answer it has started to forward. One with no answer at
    # all is what HAProxy must not leave.
    cut = [f for f in failed if f[0] == 0 and "without sending complete message body" in f[1]]
    unanswered = [f for f in failed if f[0] == 0 and not f[1].startswith("text") and f not in cut]
    print(  # recorded in the log
        f"killed replica {pid} ({'one hop' if one_hop else 'two hops'}, "
        f"{'HAProxy' if uses_haproxy() else 'Serve proxy'}): {len(failed)} of "
        f"{len(load.results)} requests failed; {len(ours)} as the endpoint's JSON 503, "
        f"{len(text)} as text, {len(cut)} cut mid-answer, {len(unanswered)} without an answer: "
        f"{failed[:3]}"
    )
    # Two hops: the ingress retries a call that died with its replica. One hop: the killed replica
    # was the HTTP replica, so the requests it held fail. Either way a client sees at most its own
    # in-flight request fail (4 client threads); and everything after the replacement succeeds.
    assert len(failed) <= 4, failed
    # Where the endpoint itself answers the failure, it is a 503 that says when to retry.
    assert all(f[0] == 503 and "retry-after 1" in f[1] for f in ours), ours
    # Behind HAProxy (the default) that is every failure: no plain-text 500 from a proxy and no
    # connection closed without an answer (HAProxy's way with a failed reused connection).
    # Serve's own proxy (LEPTON_SERVE_HAPROXY=0) answers a one-hop replica's death itself, as text.
    if uses_haproxy() or not one_hop:
        assert not text, text
        assert not unanswered, unanswered
    assert all(status == 200 for status, _ in load.results[-10:])


def test_a_new_checkpoint_replaces_the_old_without_a_failed_request(ops, ckpts):
    url, old = ops(ckpts["a"])
    with Load(url, threads=4) as load:
        wait_for("traffic", lambda: len(load.results) >= 20)
        _, new = ops(ckpts["b"])  # returns once Serve has rolled every deployment
        n = len(load.results)
        wait_for("answers from the new version", lambda: len(load.results) >= n + 20)
    assert old != new
    assert not load.failures, load.failures[:5]
    versions = [v for _, v in load.results]
    assert versions[0] == old and set(versions[-10:]) == {new}


def traffic_until_the_verdict(url: str) -> tuple[Load, int, dict]:
    """Traffic (16 different digits) until the canary is judged, and 10 answers more:
    (load, answers before, report)."""
    with Load(url, threads=2, images=16) as load:
        wait_for("the verdict", lambda: model_info(url)["canary"]["state"] != "trial")
        n = len(load.results)
        wait_for("answers after the verdict", lambda: len(load.results) >= n + 10)
    return load, n, model_info(url)["canary"]


# Latency on 2 shared cores is noise at 10 requests, so these tests leave it out of the verdict
# (clean-clone CI runs saw a canary's median at 61 ms against the stable's 8.9, rolled back at a 5x
# bound, and another at 22.9 against 10.3, which added a latency clause to a verdict on answers);
# the pure tests judge that criterion, these the answers, the errors and the store.
CANARY = {"canary_share": 0.5, "canary_min_requests": 10, "canary_max_latency_ratio": 1e6}


def test_canary_that_answers_as_stable_does_is_promoted(ops, ckpts, tmp_path):
    url, stable = ops(ckpts["a"], canary_checkpoint=ckpts["a-copy"], store=str(tmp_path), **CANARY)
    canary = model_info(url)["canary"]["model_version"]
    assert canary != stable
    load, n, report = traffic_until_the_verdict(url)
    assert report["state"] == "promoted" and report["agreement"] == 1.0, report
    assert report["canary"]["errors"] == 0 and report["stored"], report
    assert not load.failures
    # During the trial stable answers every request (the verdict waits for 10 mirrored ones, each
    # answered by stable; with 2 client threads one later answer may be recorded first); then all
    # of the traffic goes to the canary.
    versions = [v for _, v in load.results]
    assert versions.index(canary) >= CANARY["canary_min_requests"] - 1, versions
    assert set(versions[-10:]) == {canary}


def test_canary_with_random_weights_is_rolled_back_and_a_restarted_ingress_keeps_it(
    ops, ckpts, tmp_path
):
    from ray import serve

    url, stable = ops(
        ckpts["a"], canary_checkpoint=ckpts["b"], store=str(tmp_path), **CANARY
    )  # b: other random weights, which answer another class than a's for every digit
    load, _, report = traffic_until_the_verdict(url)
    assert report["state"] == "rolled_back" and report["agreement"] == 0.0, report
    assert report["reason"] == "agreement with stable 0.00 < 0.9" and report["stored"], report
    assert not load.failures and {v for _, v in load.results} == {stable}  # none saw the canary
    # The verdict is in the store: a new ingress replica takes it before any request.
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT[True], app_name=APP)
    pid = replica_pid(handle)
    assert pid in own_pids(), f"{pid} is not a process of this test's Ray instance"
    os.kill(pid, signal.SIGKILL)
    wait_for("a new ingress replica", lambda: replica_pid(handle) not in (None, pid))
    after = _answered(lambda: model_info(url)["canary"])
    assert after["state"] == "rolled_back" and after["canary"]["requests"] == 0, after
    assert after["reason"] == report["reason"] and after["stored"], after


def _answered(call: Callable[[], dict]) -> dict:
    """``call()`` once it answers (the ingress being replaced answers 503 for a moment)."""
    out: list[dict] = []

    def attempt() -> bool:
        try:
            out.append(call())
        except (KeyError, ValueError, OSError):
            return False
        return True

    wait_for("an answer", attempt)
    return out[0]


def test_canary_that_fails_is_rolled_back_and_users_see_no_error(ops, ckpts, tmp_path):
    # A checkpoint for 3-channel images cannot take the stable model's 1-channel input: every call fails.
    url, stable = ops(ckpts["b"], canary_checkpoint=ckpts["rgb"], store=str(tmp_path), **CANARY)
    load, _, report = traffic_until_the_verdict(url)
    assert report["state"] == "rolled_back" and report["canary"]["error_rate"] == 1.0, report
    assert report["stable"]["error_rate"] == 0.0
    assert not load.failures, load.failures[:5]  # the canary only ever saw mirrored requests
    assert {v for _, v in load.results} == {stable}
