"""Benchmark on one GPU: generation from a GPT-2 124M-shaped model, batched and not, in-process and
over HTTP.

Claim (issue 21): continuous batching (:class:`lepton_ray.generation.Scheduler`) makes >= 10x the
tokens/s of the same Scheduler serving one request at a time, at 64 concurrent streams; and the
endpoint's per-token cost over a plain PyTorch KV-cache loop at batch 1 is reported.

The model: ``build_model("gpt")`` at GPT-2 124M's shape (12 layers, 12 heads, 768 wide, context
1,024, vocabulary padded to 50,304 as nanoGPT does) with its random initial weights (seed 0): no
trained GPT of that size exists here, and a step's work does not depend on the weights. Prompts are
``--prompt-len`` random printable bytes (seeded); every request asks ``--new-tokens`` tokens at
temperature 1.0, top-k 50, its own seed. In-process requests have no stop token, so each makes
exactly ``--new-tokens``; over HTTP the default stop token (byte 0) applies and the tokens
counted are the token events received.

- (a) ``plain``: a hand-written KV-cache loop at batch 1 over the same model's modules (its own
  cache tensors, ``scaled_dot_product_attention`` over the cached prefix, no mask, top-k sampling
  with ``torch.multinomial`` on the device), reading each token back (``.item()``) as a streaming
  loop must. Per-token latency: the median decode step; TTFT: the prompt's forward and first draw.
- (b) ``sched``: the Scheduler (64 slots, the endpoint's default ``max_batch_size``) fed
  ``--requests`` requests by a closed loop holding 1, 16 or 64 in flight (a new one is submitted as
  one ends). Aggregate tokens/s = all tokens ÷ first submit to last token; TTFT per request =
  submit to first token (p50/p99); per-stream tokens/s = a request's tokens after its first ÷ the
  time from its first token to its last (median over requests).
- (c) one request at a time: (b) at concurrency 1, the same requests through the same Scheduler;
  the goal is (b) at 64 ÷ (c).
- (d) ``http``: ``lepton_ray.deploy`` of the same model written as a checkpoint (``use_gpu``, one
  replica, 64 slots), ``POST /v1/generate`` with ``stream: true`` from :mod:`benchmarks._sse`
  (processes of asyncio raw-socket streams); TTFT and tokens/s taken in the client. A deployed
  replica computes in ``ServeConfig.precision``'s default, bfloat16 on a GPU (float32 on a CPU),
  the dtype (a)-(c) run in, so (d) is compared with them directly.

Every figure is a wall-clock time whose end follows a token read back to the host, so the GPU's
queued work is inside it. One warm-up request per model (and per endpoint) runs first.

    python -m benchmarks.gpu_generate [--parts plain,sched,http] [--requests 64]

Without a GPU (or with ``--tiny``) it runs a 2-layer model with the same parts: a wiring check, not
a measurement, printed and never written to ``benchmarks/results/`` or the doc (unless ``--out``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from benchmarks import _gpu, harness
from benchmarks._gpu_report import on_gpu
from benchmarks.harness import Goal, fmt, table

KEY = "gpu_generate"
GPT2 = {"vocab_size": 50304, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}
TINY = {"vocab_size": 4096, "block_size": 128, "n_layer": 2, "n_head": 2, "n_embd": 64}
SAMPLING = {"temperature": 1.0, "top_k": 50}
SLOTS = 64  # the endpoint's default max_batch_size: its scheduler's slots
GOALS = [Goal("continuous batching ÷ one at a time at 64 streams >= 10", "speedup_64", ">=", 10)]


def prompts(n: int, length: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``n`` prompts of ``length`` random printable ASCII bytes (the same over HTTP as a string)."""
    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(32, 127, length)) for _ in range(n)]


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (linear between ranks, numpy's default); None for no values.
    E.g. [10, 20, 30, 40] -> p50 25.0, p99 39.7."""
    return float(np.percentile(values, q)) if values else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A level's figures from per-request records (``sent``, ``first``, ``end``, ``tokens``, any
    one clock). E.g. two requests sent at 0, first tokens at 0.1 and 0.3, 11 tokens each, ending at
    1.1 and 1.3: 22 tokens / 1.3 s = 16.9 tokens/s; TTFT p50 200 ms; per stream 10 / 1.0 s = 10."""
    failed = [r for r in records if r.get("error")]
    ok = [r for r in records if not r.get("error") and r.get("first") is not None]
    # Over HTTP a stream whose first draw is the stop token ends with no token: not an error.
    out: dict[str, Any] = {"requests": len(records), "errors": len(failed)}
    out["without_tokens"] = len(records) - len(failed) - len(ok)
    if not ok:
        return out
    wall = max(r["end"] for r in ok) - min(r["sent"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)
    ttft = [(r["first"] - r["sent"]) * 1e3 for r in ok]
    streams = [(r["tokens"] - 1) / (r["end"] - r["first"]) for r in ok if r["end"] > r["first"]]
    per_token = [(r["end"] - r["first"]) * 1e3 / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    return out | {
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(percentile(ttft, 50), 2),
        "ttft_p99_ms": round(percentile(ttft, 99), 2),
        "per_stream_tokens_per_s": round(percentile(streams, 50), 1) if streams else None,
        "per_token_ms": round(percentile(per_token, 50), 3) if per_token else None,
    }


def build(kw: dict, dev: Any, dtype: Any) -> Any:
    import torch

    from lepton_ray import build_model

    torch.manual_seed(0)
    model = build_model("gpt", **kw).to(dev)
    return (model if dtype is None else model.to(dtype)).eval()


# --- (a) the plain loop ------------------------------------------------------------------------
def plain_generate(model: Any, prompt: tuple[int, ...], new: int, seed: int) -> dict[str, Any]:
    """One request by hand: prefill the prompt into per-layer caches, then one token at a time."""
    import torch
    import torch.nn.functional as F

    w = model.tok_emb.weight
    dev, dt = w.device, w.dtype
    nh, C, P = model.n_head, model.n_embd, len(prompt)
    ks = [torch.empty(1, nh, P + new, C // nh, device=dev, dtype=dt) for _ in model.blocks]
    vs = [torch.empty_like(k) for k in ks]
    gen = torch.Generator(device=dev).manual_seed(seed)

    def heads(x: Any) -> list[Any]:  # (1, T, C) -> q, k, v of (1, nh, T, hs)
        return [t.unflatten(2, (nh, C // nh)).transpose(1, 2) for t in x.split(C, dim=2)]

    def draw(logits: Any) -> Any:  # (1, V) -> (1, 1) token id, on the device
        vals, idx = torch.topk(logits.float() / SAMPLING["temperature"], SAMPLING["top_k"])
        return idx.gather(1, torch.multinomial(F.softmax(vals, -1), 1, generator=gen))

    t0 = time.perf_counter()
    with torch.inference_mode():
        x = model.tok_emb(torch.tensor([prompt], device=dev)) + model.pos_emb.weight[:P]
        for i, b in enumerate(model.blocks):
            q, k, v = heads(b.attn.qkv(b.ln_1(x)))
            ks[i][:, :, :P], vs[i][:, :, :P] = k, v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b.attn.proj(y.transpose(1, 2).reshape(1, P, C))
            x = x + b.mlp(b.ln_2(x))
        token = draw(model.head(model.ln_f(x[:, -1])))
        tokens, stamps = [token.item()], [time.perf_counter()]
        for pos in range(P, P + new - 1):
            x = model.tok_emb(token) + model.pos_emb.weight[pos]  # (1, 1, C)
            for i, b in enumerate(model.blocks):
                q, k, v = heads(b.attn.qkv(b.ln_1(x)))
                ks[i][:, :, pos], vs[i][:, :, pos] = k[:, :, 0], v[:, :, 0]
                y = F.scaled_dot_product_attention(
                    q, ks[i][:, :, : pos + 1], vs[i][:, :, : pos + 1]
                )
                x = x + b.attn.proj(y.transpose(1, 2).reshape(1, 1, C))
                x = x + b.mlp(b.ln_2(x))
            token = draw(model.head(model.ln_f(x[:, -1])))
            tokens.append(token.item())
            stamps.append(time.perf_counter())
    return {"sent": t0, "first": stamps[0], "end": stamps[-1], "tokens": len(tokens)}


def plain_part(model: Any, prompt_list: list[tuple], new: int) -> dict[str, Any]:
    plain_generate(model, prompt_list[0], new, seed=0)  # warm-up
    records = [plain_generate(model, p, new, seed=i) for i, p in enumerate(prompt_list)]
    return summarize(records)


# --- (b), (c) the Scheduler in-process ---------------------------------------------------------
def drive(sched: Any, requests: list[Any], concurrency: int) -> list[dict[str, Any]]:
    """A closed loop over one Scheduler: ``concurrency`` requests in flight until all have run."""
    todo = list(reversed(requests))
    recs: dict[int, dict[str, Any]] = {}

    def submit() -> None:
        seq = sched.submit(todo.pop())
        recs[seq.id] = {"sent": time.perf_counter(), "first": None, "tokens": 0}

    for _ in range(min(concurrency, len(todo))):
        submit()
    while sched.busy:
        events = sched.step()  # tokens are read back to the host inside: the GPU is done
        now = time.perf_counter()
        for seq, token in events:
            r = recs[seq.id]
            if token is not None:
                r["tokens"] += 1
                r["first"] = r["first"] or now
            if seq.done:
                r["end"] = now
                if todo:
                    submit()
    return list(recs.values())


def sched_part(
    model: Any, requests: list[Any], levels: list[int], at_1: int | None = None
) -> dict[str, Any]:
    """Each level's figures; ``at_1``: run only that many requests at concurrency 1."""
    from lepton_ray.generation import Scheduler

    sched = Scheduler(model, slots=SLOTS)
    drive(sched, requests[: min(SLOTS, max(levels))], max(levels))  # warm-up at the widest batch
    return {
        str(c): summarize(drive(sched, requests[: at_1 if c == 1 and at_1 else None], c))
        for c in levels
    }


# --- (d) the endpoint --------------------------------------------------------------------------
def checkpoint(model: Any, store: str) -> str:
    """``model`` (on the CPU, float32) as a published text checkpoint in ``store``."""
    from lepton_ray import storage
    from lepton_ray.checkpoint import publish, write_local
    from lepton_ray.models import spec_of

    bs, vocab = model.block_size, model.vocab_size
    meta = {
        "model": spec_of(model),
        "data": {
            "kind": "text",
            "block_size": bs,
            "vocab_size": vocab,
            "shape": [1, bs + 1, 1],
            "mean": [0.0],
            "std": [1.0],
            "classes": [],
        },
    }
    local = write_local(f"{store}/ckpt-local", model, meta)
    return publish(local, storage.resolve(f"{store}/ckpt")).uri


def http_part(
    kw: dict,
    prompt_list: list[tuple],
    new: int,
    levels: list[int],
    at_1: int,
    gpu: bool,
    store: str,
) -> dict[str, Any]:
    from benchmarks import _sse
    from lepton_ray import deploy

    uri = checkpoint(build(kw, "cpu", None), store)
    t0 = time.perf_counter()
    url = deploy(
        uri,
        port=8000,
        name="gen",
        route_prefix="/gen",
        use_gpu=gpu,
        min_replicas=1,
        max_replicas=1,
        max_batch_size=SLOTS,
    )
    out: dict[str, Any] = {"deploy_s": round(time.perf_counter() - t0, 1), "levels": {}}
    bodies = [
        json.dumps(
            {"prompt": bytes(p).decode(), "max_new_tokens": new, "seed": i, "stream": True}
            | SAMPLING
        ).encode()
        for i, p in enumerate(prompt_list)
    ]
    out["warmup"] = summarize(_sse.streams(url + "/v1/generate", bodies[:SLOTS], concurrency=SLOTS))
    for c in levels:
        n = at_1 if c == 1 else max(c, len(bodies))
        recs = _sse.streams(url + "/v1/generate", bodies[:n], concurrency=c)
        out["levels"][str(c)] = summarize(recs)
        out["levels"][str(c)]["error_kinds"] = sorted({r["error"] for r in recs if r.get("error")})[
            :3
        ]
        print(f"http c={c}: {out['levels'][str(c)]}", flush=True)
    return out


# --- the run -----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lepton_ray.generation import Request
    from lepton_ray.serve.runner import compute_dtype

    _gpu.quiet_ray()
    dev = _gpu.device()
    gpu = dev.type == "cuda"
    kw = TINY if args.tiny or not gpu else GPT2
    if kw is TINY and args.out is None:  # a wiring check never replaces the committed figures
        args.no_doc = True
    new = args.new_tokens if kw is GPT2 else min(args.new_tokens, 48)
    plen = args.prompt_len if kw is GPT2 else min(args.prompt_len, 16)
    levels = [int(c) for c in args.levels.split(",")]
    parts = set(args.parts.split(","))
    prompt_list = prompts(args.requests, plen)
    reqs = [
        Request(prompt=p, max_new_tokens=new, seed=i, stop_token=None, **SAMPLING)
        for i, p in enumerate(prompt_list)
    ]
    fast = torch.bfloat16 if gpu else torch.float32
    r = harness.record(
        KEY,
        setup={
            "model": "gpt",
            "kwargs": kw,
            "weights": "random (seed 0)",
            "prompt_tokens": plen,
            "new_tokens": new,
            "sampling": SAMPLING,
            "requests": args.requests,
            "http_requests_at_1": args.http_at_1,
            "levels": levels,
            "slots": SLOTS,
            "dtype_in_process": str(fast).removeprefix("torch."),
            # what the replica computes in (ServeConfig.precision "auto" on this device)
            "dtype_endpoint": str(compute_dtype("auto", dev)).removeprefix("torch."),
        },
    )
    model = build(kw, dev, fast)
    if "plain" in parts:
        r["plain"] = plain_part(model, prompt_list[: args.plain_requests], new)
        print(f"plain: {r['plain']}", flush=True)
    if "sched" in parts:
        r["sched"] = sched_part(model, reqs, levels, None)
        print(f"sched: {r['sched']}", flush=True)
    del model
    if gpu:
        torch.cuda.empty_cache()
    if "http" in parts:
        try:
            store = harness.scratch("lepton-gpu-gen-")
            r["http"] = http_part(kw, prompt_list, new, levels, args.http_at_1, gpu, store)
        except Exception as exc:  # noqa: BLE001 - recorded; (a)-(c) stand without it
            r["http"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"http: {r['http']}", flush=True)
    return r


def metrics(r: dict[str, Any]) -> dict[str, Any]:
    """The goal's ratio and (d)'s overheads, from the run's own figures."""
    m: dict[str, Any] = {}
    sched = r.get("sched", {})
    one, wide = sched.get("1", {}).get("tokens_per_s"), sched.get("64", {}).get("tokens_per_s")
    if one and wide:
        m["speedup_64"] = round(wide / one, 2)
    s = r.get("setup", {})
    same = s.get("dtype_endpoint", "float32") == s.get("dtype_in_process")
    base = (r.get("plain") or {}).get("per_token_ms") if same else None
    at1 = ((r.get("http") or {}).get("levels") or {}).get("1", {})
    levels = (r.get("http") or {}).get("levels") or {}
    inproc = (r.get("sched") if same else None) or {}
    for c, v in levels.items():  # the endpoint ÷ the same Scheduler in-process, same dtype
        if v.get("tokens_per_s") and (inproc.get(c) or {}).get("tokens_per_s"):
            m.setdefault("http_vs_in_process", {})[c] = round(
                v["tokens_per_s"] / inproc[c]["tokens_per_s"], 2
            )
    if base and at1.get("per_token_ms"):
        m["http_per_token_overhead_ms"] = round(at1["per_token_ms"] - base, 3)
        m["http_per_token_ratio"] = round(at1["per_token_ms"] / base, 2)
    return m


def _row(label: str, dtype: str, c: Any, v: dict[str, Any]) -> list[Any]:
    if "tokens_per_s" not in v:
        return [label, dtype, c, v.get("error") or f"{v.get('errors')} errors", "", "", "", ""]
    return [
        label,
        dtype,
        c,
        fmt(v["tokens_per_s"]),
        fmt(v.get("ttft_p50_ms"), 1),
        fmt(v.get("ttft_p99_ms"), 1),
        fmt(v.get("per_stream_tokens_per_s")),
        fmt(v.get("per_token_ms"), 2),
    ]


def render(r: dict[str, Any], key: str) -> str:
    s, m = r.get("setup", {}), metrics(r)
    fast, served = s.get("dtype_in_process"), s.get("dtype_endpoint", "float32")
    rows = []
    if "plain" in r:
        rows.append(_row("(a) plain KV-cache loop, batch 1", fast, 1, r["plain"]))
    for c, v in r.get("sched", {}).items():
        what = "(c) Scheduler, one at a time" if c == "1" else "(b) Scheduler"
        rows.append([*_row(what, fast, int(c), v)])
    http = r.get("http") or {}
    if "error" in http:
        rows.append(["(d) endpoint, SSE", served, "–", f"failed: {http['error'][:90]}"] + [""] * 4)
    for c, v in (http.get("levels") or {}).items():
        rows.append(_row("(d) endpoint, SSE", served, int(c), v))
    overhead = (
        f"The endpoint's per-token time at 1 stream over the plain loop's ({fast}): "
        f"+{fmt(m['http_per_token_overhead_ms'], 2)} ms ({fmt(m['http_per_token_ratio'], 2)}x)."
        if "http_per_token_overhead_ms" in m
        else "The endpoint's per-token overhead over the plain loop: not measured in this run."
    )
    if m.get("http_vs_in_process"):
        overhead += (
            f" The endpoint's tokens/s ÷ the Scheduler's in-process ({fast}) at "
            + ", ".join(
                f"{c} stream{'s' * (c != '1')}: {fmt(v, 2)}"
                for c, v in m["http_vs_in_process"].items()
            )
            + "."
        )
    goals = (
        harness.goal_lines(GOALS, m)
        if on_gpu(r)
        else "No GPU in this run: a wiring check, not a measurement; no goal is judged."
    )
    return "\n\n".join(
        [
            f"## {'GPU' if on_gpu(r) else 'No GPU'}: generation from a GPT-2 124M-shaped model, "
            f"batched and not (`{key}`)",
            harness.provenance(r, key),
            (
                f"Model `gpt` {s.get('kwargs')}, {s.get('weights')} weights; prompts of "
                f"{s.get('prompt_tokens')} random printable bytes, {s.get('new_tokens')} new tokens "
                f"each, sampling {s.get('sampling')}; the Scheduler has {s.get('slots')} slots; "
                f"{s.get('requests')} requests per level in-process (a closed loop holding "
                f"`streams` in flight), {s.get('http_requests_at_1')} over HTTP at 1 stream. "
                "tokens/s: all tokens ÷ first send to last token; TTFT: send to first token; per "
                "stream: tokens after the first ÷ first to last token (median); per token: the "
                "median over requests of that interval per token. The endpoint computes in "
                f"{served} (`ServeConfig.precision` auto), the in-process sides in {fast}."
            ),
            table(
                [
                    "side",
                    "dtype",
                    "streams",
                    "tokens/s",
                    "TTFT p50 ms",
                    "TTFT p99 ms",
                    "per-stream tokens/s",
                    "per token ms",
                ],
                rows,
            ),
            overhead,
            goals,
        ]
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--parts", default="plain,sched,http", help="comma-separated: plain,sched,http")
    ap.add_argument("--levels", default="1,16,64", help="concurrent streams per level")
    ap.add_argument("--requests", type=int, default=64, help="requests per in-process level")
    ap.add_argument("--plain-requests", type=int, default=4, help="requests through (a)")
    ap.add_argument("--http-at-1", type=int, default=16, help="HTTP requests at 1 stream")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (tiny: at most 16)")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens per request (tiny: <= 48)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: a wiring check")


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
