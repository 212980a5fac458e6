"""Pure tier: every error the endpoint's app answers is ``{"error": "<one line>"}`` (404, 405, 422,
431, 500 and a model outage's 503 included), checked on the app's own handlers and middleware
with Starlette's in-process test client (no Ray started, no Serve)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lepton_ray.serve.app import (
    MAX_HEADER_BYTES,
    RETRY_AFTER_S,
    Ingress,
    RequestMeter,
    add_error_handlers,
)
from lepton_ray.serve.codec import RequestError


class _Counted:
    """Stands in for a Ray metric: keeps what was recorded."""

    def __init__(self):
        self.seen: list = []

    def observe(self, value, tags):
        self.seen.append(tags)

    def inc(self, tags):
        self.seen.append(tags)


@pytest.fixture
def client():
    ingress = SimpleNamespace(
        cfg=SimpleNamespace(name="t"), latency=_Counted(), requests=_Counted()
    )
    api = FastAPI()
    add_error_handlers(api)
    api.add_middleware(RequestMeter, ingress=ingress)

    @api.post("/v1/predict")
    async def predict(n: int) -> dict:  # a query parameter FastAPI validates
        if n == 0:
            raise RequestError(400, "zero", {"X-Why": "test"})
        if n == 1:
            raise RuntimeError("a bug")
        return {"n": n}

    with TestClient(api, raise_server_exceptions=False) as c:
        c.ingress = ingress
        yield c


@pytest.mark.parametrize(
    ("method", "path", "status", "match"),
    [
        ("get", "/nope", 404, "no route /nope"),
        ("get", "/v1/predict?n=2", 405, "GET is not allowed on /v1/predict"),
        ("post", "/v1/predict?n=x", 422, "invalid request: query.n"),
        ("post", "/v1/predict", 422, "invalid request: query.n"),
        ("post", "/v1/predict?n=0", 400, "zero"),
        ("post", "/v1/predict?n=1", 500, "internal error (RuntimeError)"),
    ],
)
def test_every_error_is_json_of_one_shape(client, method, path, status, match):
    r = getattr(client, method)(path)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert list(r.json()) == ["error"] and match in r.json()["error"], r.text
    assert "a bug" not in r.text  # an unexpected error's message stays in the replica's log


def test_a_request_errors_headers_are_sent(client):
    assert client.post("/v1/predict?n=0").headers["x-why"] == "test"


def test_oversized_headers_get_431_before_the_app_and_are_counted(client):
    big = {"X-Big": "a" * MAX_HEADER_BYTES}
    r = client.post("/v1/predict?n=1", headers=big)  # n=1 would raise: the app never ran
    assert r.status_code == 431 and "exceed the 16384-byte limit" in r.json()["error"], r.text
    assert {"app": "t", "route": "predict", "code": "431"} in client.ingress.requests.seen
    # Many small headers count together; a normal request passes.
    many = {f"X-H{i}": "b" * 100 for i in range(MAX_HEADER_BYTES // 100)}
    assert client.post("/v1/predict?n=2", headers=many).status_code == 431
    assert client.post("/v1/predict?n=2", headers={"X-Small": "c" * 1000}).json() == {"n": 2}


class _DeadReplica:
    """A deployment handle whose every call fails, as one to a killed replica does."""

    class _Method:
        def remote(self, *args):
            async def fail():
                raise ConnectionError("actor died")

            return fail()

    predict = _Method()


def test_a_model_that_cannot_answer_gives_503_with_retry_after():
    from types import MethodType

    cls = Ingress.func_or_class  # its methods on a stand-in: no replica (nor Serve) needed
    ingress = SimpleNamespace(
        cfg=SimpleNamespace(name="t"),
        trial=None,
        stable=_DeadReplica(),
        canary=None,
        version="v1",
        canary_version=None,
        model_calls=_Counted(),
        _ask=cls._ask,
    )
    ingress._record = MethodType(cls._record, ingress)
    ingress._answer = MethodType(cls._answer, ingress)
    with pytest.raises(RequestError) as err:
        asyncio.run(cls._call_model(ingress, np.zeros((1, 2, 2, 1), np.uint8)))
    assert err.value.status == 503 and "retry shortly: ConnectionError" in str(err.value)
    assert err.value.headers == {"Retry-After": str(RETRY_AFTER_S)}
    outcomes = [t["outcome"] for t in ingress.model_calls.seen]
    assert outcomes == ["error", "error"]  # tried twice (the retry on stable) before the 503
