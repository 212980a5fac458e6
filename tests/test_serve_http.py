"""Ray tier: the HTTP surface of one live endpoint (multipart, bearer token, size limit, fuzzing,
metrics), on a small untrained CNN checkpoint written directly (no training run needed).

One deployment is shared by the whole module; every check that sends something bad then checks that
a good request still gets the answer the model gives locally.
"""

from __future__ import annotations

import http.client
import io
import json
import time
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lepton_ray import build_model, storage
from lepton_ray.checkpoint import publish, write_local
from lepton_ray.data import load_mnist5k
from lepton_ray.models import spec_of

pytestmark = pytest.mark.ray

TOKEN = "s3cret-token"
LIMIT = 100_000
# The endpoint every test here (and benchmarks/chaos.py's fuzz) talks to: a token, a 100 kB body
# limit, at most 4 images per request, one small replica.
ENDPOINT = {
    "name": "http",
    "route_prefix": "/http",
    "auth_token": TOKEN,
    "max_request_bytes": LIMIT,
    "max_images_per_request": 4,
    "max_replicas": 1,
    "num_cpus": 0.25,
}


def make_checkpoint(
    dest, *, seed: int = 0, in_channels: int = 1, width: int = 8, nudge: float = 0.0
) -> str:
    """An untrained CNN saved as a real checkpoint (safetensors + manifest) for 28x28 digits.

    ``nudge`` adds that much to every class's output bias: the same answers (softmax does not see
    a shift shared by all classes), other weights, so another version."""
    import torch

    torch.manual_seed(seed)
    model = build_model("cnn", in_channels=in_channels, num_classes=10, width=width).eval()
    if nudge:
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.bias += nudge
    meta = {
        "model": spec_of(model),
        "metrics": {"val_accuracy": 0.1},
        "data": {
            "shape": [28, 28, in_channels],
            "mean": [0.13] * in_channels,
            "std": [0.31] * in_channels,
            "classes": [str(i) for i in range(10)],
        },
    }
    local = write_local(f"{dest}-local", model, meta)
    return publish(local, storage.resolve(str(dest))).uri


def expected_answer(checkpoint: str, images: np.ndarray) -> list[dict]:
    """What the model says about ``images`` when run here, without Serve."""
    from lepton_ray.serve import ServeConfig
    from lepton_ray.serve.runner import ModelRunner

    return ModelRunner(ServeConfig(checkpoint=checkpoint)).predict_many([images])[0]


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0]).save(buf, format="PNG")
    return buf.getvalue()


def gif() -> bytes:
    """A 28x28 GIF: the right size, a format the endpoint does not take."""
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="GIF")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_mnist5k()["test"][0][:8]


@pytest.fixture(scope="module")
def served(ray_session, serve_port, tmp_path_factory, digits):
    """(url, checkpoint, expected answer for digits[:2]) of an endpoint with a token and a 100 kB limit."""
    from ray import serve

    from lepton_ray import deploy

    ckpt = make_checkpoint(tmp_path_factory.mktemp("serve-http") / "ckpt")
    url = deploy(ckpt, port=serve_port, **ENDPOINT)
    yield url, ckpt, expected_answer(ckpt, digits[:2])
    serve.delete(ENDPOINT["name"])


@pytest.fixture(scope="module")
def client(served):
    import httpx

    with httpx.Client(
        base_url=served[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as c:
        yield c


def assert_good_request_answered(client, served, digits) -> None:
    r = client.post("/v1/predict", json={"instances": digits[:2, :, :, 0].tolist()})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == served[2]


def test_multipart_upload_answers_like_json_and_the_local_model(client, served, digits):
    files = [
        ("file", ("a.png", png(digits[0]), "image/png")),
        ("file", ("b.png", png(digits[1]), "image/png")),
    ]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == served[2]
    assert r.json()["model_version"] == client.get("/v1/model").json()["model_version"]


def test_binary_bodies_answer_like_json_and_the_local_model(client, served, digits):
    import io

    two = digits[:2]  # (2, 28, 28, 1) uint8
    npy = io.BytesIO()
    np.save(npy, two[..., 0])
    for body, headers in [
        (two.tobytes(), {"Content-Type": "application/octet-stream", "X-Shape": "2,28,28,1"}),
        (npy.getvalue(), {"Content-Type": "application/x-npy"}),
    ]:
        r = client.post("/v1/predict", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == served[2], headers
    r = client.post(
        "/v1/predict",
        content=two.tobytes()[:-1],
        headers={"Content-Type": "application/octet-stream", "X-Shape": "2,28,28,1"},
    )
    assert r.status_code == 400 and "needs 1568" in r.json()["error"], r.text


NO_FILES = b'--zz\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--zz--\r\n'


@pytest.mark.parametrize(
    ("files", "status", "match"),
    [
        ([], 400, "no file parts"),
        ([("file", ("x.txt", b"hello", "text/plain"))], 415, "not a readable PNG"),
        ([("file", (f"{i}.png", b"x", "image/png")) for i in range(5)], 413, "the limit is 4"),
        ([("file", (f"{i}.png", b"x", "image/png")) for i in range(50)], 413, "the limit is 4"),
        ([("file", ("a.gif", gif(), "image/gif"))], 415, "not a readable PNG or JPEG"),
    ],
)
def test_bad_multipart_uploads_get_a_4xx_json_error(client, served, digits, files, status, match):
    if files:
        r = client.post("/v1/predict", files=files)
    else:
        r = client.post(
            "/v1/predict",
            content=NO_FILES,
            headers={"Content-Type": "multipart/form-data; boundary=zz"},
        )
    assert r.status_code == status and match in r.json()["error"], r.text
    assert_good_request_answered(client, served, digits)


def test_bearer_token_is_required_except_for_healthz(served, digits):
    import httpx

    url = served[0]
    body = {"instances": digits[:1, :, :, 0].tolist()}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.post(f"{url}/v1/predict", json=body, headers=headers)
        assert r.status_code == 401 and "bearer token" in r.json()["error"], r.text
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/v1/model").status_code == 401
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    assert (
        httpx.post(
            f"{url}/v1/predict", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
        ).status_code
        == 200
    )


def test_bodies_over_the_limit_get_413_declared_or_chunked(client, served, digits):
    r = client.post(
        "/v1/predict", content=b"0" * (LIMIT + 1), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and "exceeds" in r.json()["error"]
    # chunked: no Content-Length, so the ingress counts bytes as they arrive
    host, port = served[0].split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(
        "POST",
        "/http/v1/predict",
        body=iter([b"[" * 60_000, b"1" * 60_000]),
        encode_chunked=True,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    resp = conn.getresponse()
    assert resp.status == 413 and "exceeds" in json.loads(resp.read())["error"]
    conn.close()
    assert_good_request_answered(client, served, digits)


def test_oversized_headers_get_431_json_before_the_body_is_read(client, served, digits):
    def post(padding: int):
        body = {"instances": digits[:1, :, :, 0].tolist()}
        return client.post("/v1/predict", json=body, headers={"X-Padding": "a" * padding})

    r = post(20_000)  # over the endpoint's 16 KiB, within HAProxy's buffer: the endpoint answers
    assert r.status_code == 431 and "16384-byte limit" in r.json()["error"], r.text[:300]
    # 4 MB (answered 200 before headers were bounded): the endpoint's 431 behind Serve's proxy;
    # HAProxy stops it at its 32 KiB buffer with its own HTML 400 (no errorfile applies there).
    r = post(4 << 20)
    assert r.status_code in (431, 400) and r.status_code < 500, r.text[:300]
    assert_good_request_answered(client, served, digits)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("get", "/nope", 404), ("get", "/v1/predict", 405), ("delete", "/v1/model", 405)],
)
def test_router_errors_are_json_of_the_same_shape(client, method, path, status):
    r = client.request(method.upper(), path)
    assert r.status_code == status and list(r.json()) == ["error"], r.text


def test_json_booleans_are_not_pixels(client, served, digits):
    instance = digits[0, :, :, 0].tolist()
    instance[0][0] = True
    r = client.post("/v1/predict", json={"instances": [instance]})
    assert r.status_code == 422 and "not true/false" in r.json()["error"], r.text
    assert_good_request_answered(client, served, digits)


# --- property-based fuzzing of the live endpoint ----------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=40,
)
pixel = st.one_of(
    st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=2)
)


def _instances(shape: tuple, n: int, poison) -> bytes:
    """``n`` instances of ``shape`` (all zeros), the first pixel replaced by ``poison`` if given."""
    arr = np.zeros((n, *shape), dtype=object)
    if poison is not None and arr.size:
        arr.flat[0] = poison
    return json.dumps({"instances": arr.tolist()}).encode()


bodies = st.one_of(
    st.binary(max_size=3000),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(
        _instances,
        st.sampled_from([(28, 28), (784,), (27, 28), (28, 28, 3), (1,), ()]),
        st.integers(0, 6),
        st.none() | pixel,
    ),
    st.lists(st.text(max_size=30), max_size=3).map(lambda xs: json.dumps({"images": xs}).encode()),
    st.binary(max_size=200).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
)
content_types = st.sampled_from(
    [
        "application/json",
        "image/png",
        "image/jpeg",
        "application/octet-stream",
        "application/x-npy",
        "text/plain",
        "",
        "multipart/form-data",
        "multipart/form-data; boundary=xyz",
        "application/x-www-form-urlencoded",
    ]
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
@given(body=bodies, ctype=content_types)
def test_fuzzed_requests_never_get_a_5xx_and_never_poison_the_replica(
    client, served, digits, body, ctype
):
    r = client.post("/v1/predict", content=body, headers={"Content-Type": ctype} if ctype else {})
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 200:
        assert (
            400 <= r.status_code < 500 and isinstance(r.json()["error"], str) and r.json()["error"]
        )
    assert_good_request_answered(client, served, digits)


def test_prometheus_metrics_are_exported(client, served, digits):
    import ray

    assert_good_request_answered(client, served, digits)
    assert client.get("/v1/model", headers={"Authorization": "Bearer nope"}).status_code == 401
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = (
        "ray_lepton_serve_requests",
        "ray_lepton_serve_request_latency_ms_bucket",
        "ray_lepton_serve_model_calls",
        "ray_lepton_serve_batch_size_bucket",
    )
    deadline = time.monotonic() + 90
    while True:  # workers push metrics to the node's agent every few seconds
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
        # The series of this test's own requests, not only the names (earlier tests' requests
        # may have exported those already).
        missing = [m for m in (*wanted, 'route="predict"', 'code="401"') if m not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, missing
