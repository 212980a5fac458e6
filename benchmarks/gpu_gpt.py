"""Benchmark on one GPU: a GPT-2 124M-shaped model trained by ``Trainer.fit`` against a plain loop.

Claim (issue 17): ``Trainer(1, use_gpu=True, strategy=...)`` trains at >= 0.95 of the tokens/s of a
plain PyTorch loop of the same model in the same run, and at least at the speed of nanoGPT's own
``bench.py`` on the same GPU.

The model: ``build_model("gpt")`` at GPT-2 124M's shape (12 layers, 12 heads, 768 wide, context
1,024, vocabulary padded to 50,304 as nanoGPT does), bf16 autocast, ``torch.compile``, fused AdamW.
The tokens are bytes (values < 256), which changes no FLOP. Both sides run the same work: the same
model class and optimizer (the library's ``build_optimizer`` and LR schedule), the same global batch
of ``--batch-size`` blocks of 1,024 tokens, the same uint8 token blocks resident on the GPU, gathered
per step through a fresh permutation each epoch and split into inputs and next-token targets there.
tokens/s is the mean over the epochs after the first (compilation and warm-up); each clock stops
after the GPU is done.

MFU = tokens/s x FLOPs per token / peak FLOP/s, with FLOPs per token = 6N + 12 L H Q T (N non-embedding parameters,
L layers, H heads of width Q, context T; ``GPT.flops_per_token``, from the PaLM paper's appendix B as
nanoGPT's ``estimate_mfu``), against the datasheet's dense bf16 peak and against the peak a large bf16
matmul reaches on this GPU in this run.

nanoGPT's ``bench.py`` is its public source, run unchanged from an ignored folder
(``.bench_ext/nanoGPT``: ``git clone https://github.com/karpathy/nanoGPT``, never copied into the
project) with ``--real_data=False --batch_size=B --compile=True``; its "time per iteration" gives its
tokens/s (its printed MFU is against an A100's peak, so it is not used).

    python -m benchmarks.gpu_gpt [--strategies ddp,fsdp] [--batch-size 12] [--steps 150]

Without a GPU (or with ``--tiny``) it runs a 2-layer model: a wiring check, not a measurement, whose
result is printed and never written to ``benchmarks/results/`` or the doc (unless ``--out``).
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _gpu, harness
from benchmarks.harness import Goal, Timer, fmt, mean_after_warmup, table

KEY = "gpu_gpt"
NANOGPT = harness.ROOT / ".bench_ext" / "nanoGPT"
# Dense bf16 tensor-core peaks from the datasheets (no sparsity), in FLOP/s.
DATASHEET_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
GPT2 = {"vocab_size": 50304, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}
TINY = {"vocab_size": 256, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64}


def goals(strategies: list[str]) -> list[Goal]:
    out = []
    for s in strategies:
        out.append(Goal(f"{s}: Trainer ÷ plain loop >= 0.95", f"ratio.{s}", ">=", 0.95))
        out.append(
            Goal(f"{s}: Trainer ÷ nanoGPT bench.py >= 1.0", f"ratio_vs_nanogpt.{s}", ">=", 1.0)
        )
    return out


def matmul_peak(dev: Any, n: int = 8192, reps: int = 50) -> float:
    """FLOP/s of a bf16 (n x n) @ (n x n) matmul, the best of three timed rounds."""
    import torch

    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    best = math.inf
    for _ in range(3):
        with Timer(dev) as t:
            for _ in range(reps):
                a @ b
        best = min(best, t.seconds)
    return 2 * n**3 * reps / best


OPTIM = {"optimizer": "adamw", "lr": 6e-4, "weight_decay": 0.1}


def text_dataset(rows: int, block: int, store: str, seed: int = 0) -> Any:
    """A prepared byte-level text dataset whose train split has at least ``rows`` blocks: random
    printable ASCII (one file), cut by ``lepton_ray.data.prepare`` as any text is."""
    from lepton_ray.data import prepare

    rng = np.random.default_rng(seed)
    n = int((rows / 0.85 + 8) * block)  # the held-out tenth is random: room to spare
    text = rng.integers(32, 127, n, dtype=np.uint8)
    text[rng.random(n) < 0.02] = ord("\n")
    path = Path(store) / "random.txt"
    path.write_bytes(text.tobytes())
    return prepare(f"text:{path}", f"{store}/text", block_size=block)["train"]


def train_blocks(info: Any) -> np.ndarray:
    """The train split's token blocks as (rows, block + 1) uint8, in id order."""
    from lepton_ray.data.dataset import read_arrays

    images, _, ids = read_arrays(info)
    return images.reshape(len(images), -1)[np.argsort(ids)]


def plain_loop(kw: dict, blocks: np.ndarray, batch: int, epochs: int, dev: Any) -> dict[str, Any]:
    """What a user writes by hand: the token blocks on the GPU, permuted per epoch."""
    import torch
    import torch.nn.functional as F

    from lepton_ray import build_model
    from lepton_ray.config import OptimConfig
    from lepton_ray.train.step import build_optimizer, lr_factor

    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = build_model("gpt", **kw).to(dev)
    cfg = OptimConfig(**OPTIM)
    opt = build_optimizer(model, cfg)
    steps = len(blocks) // batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps * epochs, cfg))
    step_model = torch.compile(model) if cuda else model
    data = torch.from_numpy(blocks).to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    rates = []
    for _ in range(epochs):
        with Timer(dev) as t:
            order = torch.randperm(len(data), device=dev)
            for s in range(steps):
                rows = data[order[s * batch : (s + 1) * batch]].long()
                x, y = rows[:, :-1], rows[:, 1:]
                opt.zero_grad(set_to_none=True)
                with autocast:
                    logits = step_model(x)
                    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                loss.backward()
                opt.step()
                sched.step()
        rates.append(steps * batch * (blocks.shape[1] - 1) / t.seconds)
    out = {
        "tokens_per_s": round(mean_after_warmup(rates), 1),
        "per_epoch": [round(r, 1) for r in rates],
        "final_loss": round(loss.item(), 4),
        "flops_per_token": model.flops_per_token(),
        "params": model.num_params(),
    }
    if cuda:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    del model, opt, data, step_model
    if cuda:
        torch.cuda.empty_cache()
    return out


def nanogpt_bench(batch: int, dev: Any) -> dict[str, Any]:
    """nanoGPT's ``bench.py``, unchanged, in a subprocess (random data, its own model)."""
    if dev.type != "cuda":
        return {"error": "skipped: nanoGPT's bench.py needs a GPU"}
    if not (NANOGPT / "bench.py").exists():
        return {"error": f"skipped: no {NANOGPT.relative_to(harness.ROOT)}/bench.py"}
    cmd = [sys.executable, "bench.py", "--real_data=False", f"--batch_size={batch}"]
    proc = subprocess.run(cmd, cwd=NANOGPT, capture_output=True, text=True, timeout=900)
    m = re.search(r"time per iteration: ([0-9.]+)ms", proc.stdout)
    if proc.returncode != 0 or m is None:
        return {"error": f"bench.py exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    ms = float(m.group(1))
    return {"ms_per_iter": ms, "tokens_per_s": round(batch * 1024 / (ms / 1000), 1)}


def trainer_run(
    strategy: str, kw: dict, info: Any, batch: int, epochs: int, store: str, gpu: bool
) -> dict[str, Any]:
    """``Trainer.fit`` on the prepared blocks; tokens/s from each epoch's wall time (its clock
    stops after the epoch's metrics are read back from the GPU, as the plain loop's does)."""
    from lepton_ray import Trainer, build_model

    res = Trainer(1, use_gpu=gpu, strategy=strategy).fit(
        build_model("gpt", **kw),
        info.uri,
        batch_size=batch,
        epochs=epochs,
        storage=f"{store}/runs",
        run_name=strategy,
        compile=gpu,
        checkpoint_every_epochs=epochs,
        keep_checkpoints=1,
        **OPTIM,
    )
    hist = res["history"]
    tokens = (info.num_rows // batch) * batch * kw["block_size"]
    per_epoch = [tokens / h["epoch_time_s"] for h in hist]
    return {
        "tokens_per_s": round(mean_after_warmup(per_epoch), 1),
        "per_epoch": [round(r, 1) for r in per_epoch],
        "loop_tokens_per_s": [round(h["tokens_per_second"], 1) for h in hist],
        "data_wait_s": [round(h["data_wait_s"], 2) for h in hist],
        "final_loss": round(hist[-1]["train_loss"], 4),
        "peak_memory_gib": hist[-1].get("peak_memory_gib"),
        "fit_wall_s": round(res["wall_time_s"], 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    _gpu.quiet_ray()
    dev = _gpu.device()
    gpu = dev.type == "cuda"
    kw = TINY if args.tiny or not gpu else GPT2
    if kw is TINY and args.out is None:  # a wiring check never replaces the committed figures
        args.no_doc = True
    strategies = [s for s in args.strategies.split(",") if s]
    store = harness.scratch("lepton-gpu-gpt-")
    info = text_dataset(args.steps * args.batch_size, kw["block_size"], store)
    blocks = train_blocks(info)
    r = harness.record(
        KEY,
        setup={
            "model": "gpt",
            "kwargs": kw,
            "global_batch_blocks": args.batch_size,
            "tokens_per_step": args.batch_size * kw["block_size"],
            "train_blocks": len(blocks),
            "epochs": args.epochs,
            "precision": "bf16 autocast" if gpu else "fp32",
            "compile": gpu,
            "optimizer": f"AdamW {OPTIM}, fused on CUDA",
        },
    )
    if gpu:
        name = torch.cuda.get_device_name(dev)
        r["peak"] = {
            "matmul_bf16_flops": round(matmul_peak(dev)),
            "datasheet_bf16_flops": next((v for k, v in DATASHEET_PEAK.items() if k in name), None),
        }
    r["plain"] = plain_loop(kw, blocks, args.batch_size, args.epochs, dev)
    print(f"plain: {r['plain']}", flush=True)
    r["nanogpt"] = nanogpt_bench(args.batch_size, dev) if kw is GPT2 else {"error": "tiny run"}
    print(f"nanogpt: {r['nanogpt']}", flush=True)
    for s in strategies:
        try:
            r[f"trainer_{s}"] = trainer_run(s, kw, info, args.batch_size, args.epochs, store, gpu)
        except Exception as exc:  # noqa: BLE001 - recorded; the other strategies still run
            r[f"trainer_{s}"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"trainer_{s}: {r[f'trainer_{s}']}", flush=True)
    return r


def metrics(r: dict[str, Any]) -> dict[str, Any]:
    """Ratios and MFU computed from the run's numbers."""
    out: dict[str, Any] = {"ratio": {}, "ratio_vs_nanogpt": {}, "mfu": {}}
    plain = r["plain"]["tokens_per_s"]
    nano = r.get("nanogpt", {}).get("tokens_per_s")
    fpt = r["plain"]["flops_per_token"]
    peaks = r.get("peak", {})
    sides = {"plain": plain, "nanogpt": nano}
    for k, v in r.items():
        if k.startswith("trainer_") and "tokens_per_s" in v:
            s = k.removeprefix("trainer_")
            sides[s] = v["tokens_per_s"]
            out["ratio"][s] = round(v["tokens_per_s"] / plain, 3)
            if nano:
                out["ratio_vs_nanogpt"][s] = round(v["tokens_per_s"] / nano, 3)
    for side, tps in sides.items():
        if tps:
            out["mfu"][side] = {
                p: round(tps * fpt / peaks[k], 3)
                for p, k in (("datasheet", "datasheet_bf16_flops"), ("matmul", "matmul_bf16_flops"))
                if peaks.get(k)
            }
    return out


def render(r: dict[str, Any], key: str) -> str:
    m = metrics(r)
    setup = r.get("setup", {})
    peaks = r.get("peak", {})
    rows = []
    for side, label in [("plain", "plain PyTorch loop"), ("nanogpt", "nanoGPT bench.py")] + [
        (k.removeprefix("trainer_"), f"`Trainer.fit`, strategy={k.removeprefix('trainer_')}")
        for k in r
        if k.startswith("trainer_")
    ]:
        v = r.get(side) or r.get(f"trainer_{side}") or {}
        if "error" in v:
            rows.append([label, v["error"], "–", "–", "–", "–"])
            continue
        mfu = m["mfu"].get(side, {})
        rows.append(
            [
                label,
                fmt(v.get("tokens_per_s")),
                "1.00" if side == "plain" else fmt(m["ratio"].get(side), 2),
                fmt(mfu.get("datasheet"), 3),
                fmt(mfu.get("matmul"), 3),
                fmt(v.get("peak_memory_gib"), 2),
            ]
        )
    peak_line = (
        f"Peaks: datasheet dense bf16 {fmt(peaks.get('datasheet_bf16_flops', 0) / 1e12)} TFLOP/s, "
        f"measured bf16 8192³ matmul {fmt(peaks.get('matmul_bf16_flops', 0) / 1e12)} TFLOP/s; "
        f"FLOPs per token {fmt(r['plain'].get('flops_per_token'), 0)} "
        f"({fmt(r['plain'].get('params'))} parameters)."
    )
    return "\n\n".join(
        [
            f"## GPU: a GPT-2 124M-shaped model, Trainer against a plain loop (`{key}`)",
            harness.provenance(r, key),
            (
                f"Model `gpt` {setup.get('kwargs')}; global batch {setup.get('global_batch_blocks')} "
                f"blocks ({fmt(setup.get('tokens_per_step'))} tokens) a step; "
                f"{fmt(setup.get('train_blocks'))} training blocks an epoch, {setup.get('epochs')} "
                f"epochs a side, the first not counted; {setup.get('precision')}, torch.compile "
                f"{'on' if setup.get('compile') else 'off'}; {setup.get('optimizer')}. tokens/s: "
                "tokens trained ÷ epoch wall time (GPU synchronised); MFU against the datasheet "
                "and against the measured matmul peak."
            ),
            table(
                ["side", "tokens/s", "÷ plain", "MFU (datasheet)", "MFU (matmul)", "peak GiB"],
                rows,
            ),
            peak_line,
            harness.goal_lines(
                goals([k.removeprefix("trainer_") for k in r if k.startswith("trainer_")]), m
            ),
        ]
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--strategies", default="ddp,fsdp", help="comma-separated Trainer strategies")
    ap.add_argument("--batch-size", type=int, default=12, help="blocks of 1,024 tokens per step")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="per side; the first is warm-up")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: a wiring check")


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
