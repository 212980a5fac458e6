"""Ray tier: ``POST /v1/generate`` on a live endpoint of a small GPT checkpoint written directly
(no training run): the stream arrives while the sequence still runs and concatenates to the
non-streamed answer, concurrent requests answer as they do alone, a disconnect cancels its
sequence, bad requests are 4xx JSON."""

from __future__ import annotations

import itertools
import json
import threading
import time

import pytest
import torch

from lepton_ray import build_model, storage
from lepton_ray.checkpoint import publish, write_local
from lepton_ray.models import spec_of

pytestmark = pytest.mark.ray

TOKEN = "gen-token"
BLOCK = 256
ENDPOINT = {
    "name": "gen",
    "route_prefix": "/gen",
    "auth_token": TOKEN,
    "max_request_bytes": 4096,
    "max_replicas": 1,
    "num_cpus": 0.5,
}


def make_gpt_checkpoint(dest, seed: int = 0) -> str:
    """A 4-layer byte GPT (context 256) saved as a real checkpoint; its matrices are drawn with
    std 0.3 so that its samples depend on it (init's logits are near zero: nearly uniform)."""
    torch.manual_seed(seed)
    model = build_model(
        "gpt", vocab_size=256, block_size=BLOCK, n_layer=4, n_head=4, n_embd=64
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    meta = {
        "model": spec_of(model),
        "data": {
            "kind": "text",
            "block_size": BLOCK,
            "vocab_size": 256,
            "shape": [1, BLOCK + 1, 1],
            "mean": [0.0],
            "std": [1.0],
            "classes": [],
        },
    }
    return publish(write_local(f"{dest}-local", model, meta), storage.resolve(str(dest))).uri


@pytest.fixture(scope="module")
def client(ray_session, serve_port, tmp_path_factory):
    import httpx
    from ray import serve

    from lepton_ray import deploy

    url = deploy(
        make_gpt_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt"), port=serve_port, **ENDPOINT
    )
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c
    serve.delete(ENDPOINT["name"])


def generation(client) -> dict:
    return client.get("/v1/model").json()["generation"]


def events_of(lines) -> list[tuple[str, dict]]:
    """(event name, data) per Server-Sent Event of ``lines`` (an iterator of text lines)."""
    out, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            out.append((name, json.loads(line.removeprefix("data: "))))
    return out


def test_stream_arrives_while_generating_and_concatenates_to_the_answer(client):
    body = {"prompt": "Once upon", "max_new_tokens": 240, "temperature": 0.8, "seed": 3}
    whole = client.post("/v1/generate", json=body)
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    assert answer["finish_reason"] in ("length", "stop") and answer["seed"] == 3
    assert answer["usage"] == {"prompt_tokens": 9, "completion_tokens": len(answer["tokens"])}
    assert len(answer["tokens"]) > 100  # long enough that the stream is seen mid-way

    with client.stream("POST", "/v1/generate", json=body | {"stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = events_of(itertools.islice(lines, 2))  # event: and data: lines
        assert first[0][0] == "token"
        # The first event is here and its sequence still runs: the stream is not buffered.
        assert generation(client)["running"] == 1
        events = first + events_of(lines)
    names = [n for n, _ in events]
    assert names == ["token"] * len(answer["tokens"]) + ["done"]
    assert [d["token"] for _, d in events[:-1]] == answer["tokens"]
    assert "".join(d["text"] for _, d in events) == answer["text"]
    done = events[-1][1]
    assert done["usage"] == answer["usage"] and done["finish_reason"] == answer["finish_reason"]


def test_concurrent_requests_answer_as_they_do_alone(client):
    bodies = [{"prompt": "abc", "max_new_tokens": 60, "seed": s, "top_k": 40} for s in (11, 12, 13)]
    alone = [client.post("/v1/generate", json=b).json()["tokens"] for b in bodies]
    steps = generation(client)["steps"]
    together: list = [None] * 3

    def ask(i: int) -> None:
        together[i] = client.post("/v1/generate", json=bodies[i]).json()["tokens"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone and len(set(map(tuple, alone))) == 3
    # Batched: fewer steps than the three one after another would take.
    assert generation(client)["steps"] - steps < sum(len(a) for a in alone)


def test_a_disconnect_cancels_its_generation_and_frees_its_slot(client):
    before = generation(client)["finished"].get("cancelled", 0)
    body = {"prompt": "x", "max_new_tokens": BLOCK, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/generate", json=body) as r:
        next(r.iter_lines())  # the first token has arrived; then the client goes away
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = generation(client)
        if state["running"] == 0 and state["finished"].get("cancelled", 0) == before + 1:
            break
        time.sleep(0.1)
    assert state["running"] == 0 and state["finished"].get("cancelled", 0) == before + 1, state


@pytest.mark.parametrize(
    "body, status, match",
    [
        ({"prompt": ""}, 422, '"prompt" is empty'),
        ({"prompt": "a" * (BLOCK + 1)}, 422, "longer than the model's context of 256"),
        ({"prompt": "a", "max_new_tokens": 0}, 422, '"max_new_tokens" must be 1..256'),
        ({"prompt": "a", "max_new_tokens": 10_000}, 422, '"max_new_tokens" must be 1..256'),
        ({"prompt": "a" * 5000}, 413, "exceeds the 4096-byte limit"),
    ],
)
def test_bad_requests_are_one_line_4xx_json(client, body, status, match):
    r = client.post("/v1/generate", json=body | {"stream": True})
    assert r.status_code == status and match in r.json()["error"], r.text


def test_auth_and_the_predict_route_of_a_language_model(client):
    r = client.post("/v1/generate", json={"prompt": "a"}, headers={"Authorization": "Bearer no"})
    assert r.status_code == 401 and "bearer token" in r.json()["error"]
    r = client.post("/v1/predict", json={"instances": [[0]]})
    assert r.status_code == 400 and "language model: POST /v1/generate" in r.json()["error"]


def test_client_and_cli_print_the_stream(client, capsys, monkeypatch):
    from lepton_ray import cli
    from lepton_ray.serve.client import generate

    url = str(client.base_url).rstrip("/")
    body = {"prompt": "The end", "max_new_tokens": 50, "temperature": 0.7, "seed": 5}
    answer = client.post("/v1/generate", json=body).json()
    events = list(generate(url, "The end", token=TOKEN, max_new_tokens=50, temperature=0.7, seed=5))
    assert [d["token"] for n, d in events if n == "token"] == answer["tokens"]
    assert events[-1][0] == "done" and events[-1][1]["usage"] == answer["usage"]

    monkeypatch.setenv("LEPTON_SERVE_TOKEN", TOKEN)
    argv = ["generate", url, "The end", "--max-new-tokens", "50", "--temperature", "0.7"]
    assert cli.main([*argv, "--seed", "5"]) == 0
    out = capsys.readouterr()
    assert out.out == answer["text"] + "\n"
    assert f"seed 5, model {answer['model_version']}" in out.err

    assert cli.main(["generate", url, ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lepton-ray: error: HTTP 422") and '"prompt" is empty' in err
    assert "\n" not in err


def test_a_canary_that_generates_other_tokens_is_rolled_back(ray_session, tmp_path):
    """Generation takes part in the canary trial as prediction does: each mirrored request is
    generated by both versions (the client streams stable's tokens), the two token lists are
    compared, and a GPT with other weights is rolled back on its agreement, the verdict stored;
    no client ever sees the canary's tokens."""
    import httpx
    from ray import serve

    from lepton_ray import deploy

    stable, other = (make_gpt_checkpoint(tmp_path / f"c{i}", seed=i) for i in (0, 1))
    app = {**ENDPOINT, "name": "gen-canary", "route_prefix": "/gen-canary", "max_replicas": 1}
    url = deploy(
        stable,
        canary_checkpoint=other,
        canary_share=1.0,
        canary_min_requests=4,
        canary_max_latency_ratio=1e6,  # latency on 2 shared cores is noise at 4 requests
        store=str(tmp_path / "store"),
        **app,
    )
    try:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        ) as c:
            versions = set()
            for i in range(4):  # two streamed, two not: both paths are mirrored
                body = {"prompt": "def ", "max_new_tokens": 24, "seed": i, "stream": i % 2 == 1}
                if i % 2:
                    with c.stream("POST", "/v1/generate", json=body) as r:
                        done = [d for e, d in events_of(r.iter_lines()) if e == "done"]
                    versions.add(done[0]["model_version"])
                else:
                    versions.add(c.post("/v1/generate", json=body).json()["model_version"])
            deadline = time.monotonic() + 60
            # the verdict, then its record in the store (written just after the verdict)
            while not (info := c.get("/v1/model").json())["canary"]["stored"]:
                assert time.monotonic() < deadline, info
                time.sleep(0.2)
        report = info["canary"]
        assert report["state"] == "rolled_back" and report["agreement"] < 0.5, report
        assert report["reason"].startswith("agreement with stable") and report["stored"], report
        assert report["canary"]["errors"] == 0 and report["canary"]["requests"] == 4, report
        assert versions == {info["model_version"]}  # every answer came from stable
    finally:
        serve.delete(app["name"])
