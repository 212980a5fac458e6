"""Benchmark on one GPU: DLRM training, ``Trainer.fit`` against a plain PyTorch loop.

Claim (issue 21): ``Trainer(1, use_gpu=True)`` trains the ``dlrm`` on prepared click data at >= 0.90
of the samples/s of a plain loop of the same model in the same run; ``strategy="fsdp"`` on the one
GPU is reported beside it (no goal).

The data: ``prepare("synthetic-ctr:...")`` (:mod:`lepton_ray.data.ctr`): ``--rows`` training rows,
13 dense features and 8 tables of 1,000,000 / 500,000 / 100,000 / 100,000 / 50,000 / 10,000 / 1,000
/ 100 ids (a skew of sizes as in click logs), a row being 13 float32 and 8 int32 (84 bytes). The
model: ``build_model("dlrm")`` with embeddings 64 wide (1.76M rows: 113M parameters in the tables),
bottom MLP 13-512-256-64, top MLP 100-512-256-1, dot interaction. Both sides: the same initial
weights (seed 0), AdamW (the library's ``build_optimizer``, fused on CUDA; lr 1e-3, no weight
decay, constant schedule), global batch ``--batch-size``, bf16 autocast on a GPU, binary
cross-entropy in float32, no ``torch.compile``.

Fairness (as ``gpu_gpt``'s): the Trainer's feed on one GPU keeps this set in device memory (its
device cache: the uint8 rows on the GPU, a fresh permutation per epoch, each batch gathered and
unpacked there); the plain loop does the same work as a user writes it: the packed uint8 rows and
labels on the GPU, ``torch.randperm`` per epoch, each batch gathered, its bytes viewed as float32
and int32 ids, the model, the loss, backward, the step. samples/s: rows trained (whole batches) ÷
each epoch's wall time, the mean over the epochs after the first; every clock stops after the GPU
is done (the Trainer's epoch clock stops after it reads the epoch's metrics back). Peak memory:
``torch.cuda.max_memory_allocated`` per side.

    python -m benchmarks.gpu_dlrm [--rows 4000000] [--batch-size 8192] [--epochs 3]

Without a GPU (or with ``--tiny``) it runs 20,000 rows, 4 small tables and narrow MLPs: a wiring
check, not a measurement, printed and never written to ``benchmarks/results/`` or the doc (unless
``--out``).
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import _gpu, harness
from benchmarks._gpu_report import on_gpu
from benchmarks.harness import Goal, Timer, fmt, table

KEY = "gpu_dlrm"
CARDS = (1_000_000, 500_000, 100_000, 100_000, 50_000, 10_000, 1_000, 100)
GPU_SIZES = {"cards": CARDS, "model": {"embed_dim": 64, "bottom": [512, 256], "top": [512, 256]}}
TINY = {"rows": 20_000, "cards": (1000, 500, 100, 10), "batch": 512}
TINY_MODEL = {"embed_dim": 16, "bottom": [32], "top": [32]}
DENSE = 13
OPTIM = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant"}
GOALS = [Goal("Trainer (ddp) ÷ plain loop >= 0.90", "ratio.ddp", ">=", 0.90)]


def source(rows: int, cards: tuple[int, ...]) -> str:
    """The click source of ``rows`` rows and these tables (``synthetic-ctr:...``)."""
    c = "/".join(map(str, cards))
    return f"synthetic-ctr:rows={rows},tables={len(cards)},cardinality={c},dense={DENSE},seed=0"


def packed_rows(info: Any) -> tuple[Any, Any]:
    """The train split as the loops take it: uint8 rows (N, 4 * (D + T)) and labels (N,), in id
    order."""
    import numpy as np

    from lepton_ray.data.dataset import read_arrays

    rows, labels, ids = read_arrays(info)
    order = np.argsort(ids)
    return rows.reshape(len(rows), -1)[order], labels[order]


def build(info: Any, sizes: dict) -> Any:
    import torch

    from lepton_ray import build_model

    torch.manual_seed(0)
    return build_model("dlrm", **info.model_kwargs(), **sizes)


def plain_loop(
    info: Any, sizes: dict, rows: Any, labels: Any, batch: int, epochs: int, dev: Any
) -> dict[str, Any]:
    """What a user writes by hand, the packed rows already on the device (see the docstring)."""
    import torch
    import torch.nn.functional as F

    from lepton_ray.config import OptimConfig
    from lepton_ray.dlrm import Features
    from lepton_ray.train.step import build_optimizer, lr_factor

    cuda = dev.type == "cuda"
    model = build(info, sizes).to(dev)
    cfg = OptimConfig(**OPTIM)
    opt = build_optimizer(model, cfg)
    steps = len(rows) // batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps * epochs, cfg))
    x_all = torch.from_numpy(rows).to(dev)  # (N, 4 * (D + T)) uint8
    y_all = torch.from_numpy(labels).to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    rates = []
    for _ in range(epochs):
        with Timer(dev) as t:
            order = torch.randperm(len(x_all), device=dev)
            for s in range(steps):
                idx = order[s * batch : (s + 1) * batch]
                packed, y = x_all[idx], y_all[idx]
                dense = packed[:, : 4 * DENSE].contiguous().view(torch.float32)  # (B, D)
                ids = packed[:, 4 * DENSE :].contiguous().view(torch.int32).long()  # (B, T)
                opt.zero_grad(set_to_none=True)
                with autocast:
                    logits = model(Features(dense, ids))
                loss = F.binary_cross_entropy_with_logits(logits.float(), y.float())
                loss.backward()
                opt.step()
                sched.step()
        rates.append(steps * batch / t.seconds)
    out = {**_gpu.plain_summary(rates), "final_loss": round(loss.item(), 4)}
    out["params"] = sum(p.numel() for p in model.parameters())
    if cuda:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    del model, opt, x_all, y_all
    if cuda:
        torch.cuda.empty_cache()
    return out


def trainer_run(
    strategy: str, info: Any, sizes: dict, batch: int, epochs: int, store: str, gpu: bool
) -> dict[str, Any]:
    """``Trainer(1).fit`` on the prepared set, no validation; in the plain loop's units."""
    from lepton_ray import Trainer
    from lepton_ray.config import DataConfig

    res = Trainer(1, use_gpu=gpu, strategy=strategy).fit(
        build(info, sizes),
        info.uri,
        batch_size=batch,
        epochs=epochs,
        storage=f"{store}/runs",
        run_name=strategy,
        checkpoint_every_epochs=epochs,
        keep_checkpoints=1,
        progress_bar=False,
        data=DataConfig(feed="cache"),  # rows in device memory as the plain loop's (auto agrees)
        **OPTIM,
    )
    out = _gpu.trainer_summary(res, (info.num_rows // batch) * batch)
    out["peak_memory_gib"] = res["history"][-1].get("peak_memory_gib")
    if out["peak_memory_gib"] is not None:
        out["peak_memory_gib"] = round(out["peak_memory_gib"], 2)
    out["final_loss"] = round(res["history"][-1]["train_loss"], 4)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lepton_ray.data import prepare

    _gpu.quiet_ray()
    dev = _gpu.device()
    gpu = dev.type == "cuda"
    tiny = args.tiny or not gpu
    if tiny and args.out is None:  # a wiring check never replaces the committed figures
        args.no_doc = True
    rows, cards = (TINY["rows"], TINY["cards"]) if tiny else (args.rows, CARDS)
    batch = TINY["batch"] if tiny else args.batch_size
    sizes = TINY_MODEL if tiny else GPU_SIZES["model"]
    store = harness.scratch("lepton-gpu-dlrm-")
    with Timer() as t:
        info = prepare(source(rows, cards), f"{store}/data")["train"]
    packed, labels = packed_rows(info)
    r = harness.record(
        KEY,
        setup={
            "model": "dlrm",
            "kwargs": {**info.model_kwargs(), **sizes},
            "source": source(rows, cards),
            "rows_per_epoch": (info.num_rows // batch) * batch,
            "row_bytes": packed.shape[1],
            "global_batch": batch,
            "epochs": args.epochs,
            "precision": "bf16 autocast" if gpu else "fp32",
            "optimizer": f"{OPTIM}, fused AdamW on CUDA",
            "prepare_s": round(t.seconds, 1),
        },
    )
    r["plain"] = plain_loop(info, sizes, packed, labels, batch, args.epochs, dev)
    print(f"plain: {r['plain']}", flush=True)
    for s in [s for s in args.strategies.split(",") if s]:
        try:
            r[f"trainer_{s}"] = trainer_run(s, info, sizes, batch, args.epochs, store, gpu)
        except Exception as exc:  # noqa: BLE001 - recorded; the other strategies still run
            r[f"trainer_{s}"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"trainer_{s}: {r[f'trainer_{s}']}", flush=True)
    return r


def metrics(r: dict[str, Any]) -> dict[str, Any]:
    """Each strategy's samples/s ÷ the plain loop's, from the run's own figures."""
    plain = (r.get("plain") or {}).get("samples_per_s")
    out: dict[str, Any] = {"ratio": {}}
    for k, v in r.items():
        if k.startswith("trainer_") and plain and (v or {}).get("samples_per_s"):
            out["ratio"][k.removeprefix("trainer_")] = round(v["samples_per_s"] / plain, 3)
    return out


def render(r: dict[str, Any], key: str) -> str:
    s, m = r.get("setup", {}), metrics(r)
    p = r.get("plain", {})
    rows = [["plain PyTorch loop", fmt(p.get("samples_per_s")), "1.00", "–", "–"]]
    rows[0].append(fmt(p.get("peak_memory_gib"), 2))
    for k, v in r.items():
        if not k.startswith("trainer_"):
            continue
        label = f"`Trainer.fit`, strategy={k.removeprefix('trainer_')}, feed=cache"
        if "error" in v:
            rows.append([label, f"failed: {v['error'][:90]}", "–", "–", "–", "–"])
            continue
        rows.append(
            [
                label,
                fmt(v["samples_per_s"]),
                f"**{m['ratio'][k.removeprefix('trainer_')]:.2f}**",
                f"{v['data_wait_share']:.0%}",
                f"{fmt(v['fit_wall_s'])} ({fmt(v['fixed_cost_s'])})",
                fmt(v.get("peak_memory_gib"), 2),
            ]
        )
    goals = (
        harness.goal_lines(GOALS, m)
        if on_gpu(r)
        else "No GPU in this run: a wiring check, not a measurement; no goal is judged."
    )
    return "\n\n".join(
        [
            f"## {'GPU' if on_gpu(r) else 'No GPU'}: DLRM training, Trainer against a plain loop "
            f"(`{key}`)",
            harness.provenance(r, key),
            (
                f"Model `dlrm` {s.get('kwargs')} ({fmt(p.get('params'))} parameters); data "
                f"`{s.get('source')}` ({s.get('row_bytes')} bytes a row, prepared in "
                f"{fmt(s.get('prepare_s'))} s); global batch {fmt(s.get('global_batch'))}, "
                f"{fmt(s.get('rows_per_epoch'))} rows an epoch, {s.get('epochs')} epochs a side, "
                f"the first not counted; {s.get('precision')}; {s.get('optimizer')}. samples/s: "
                "rows trained ÷ epoch wall time (GPU synchronised); data wait: share of the loop's "
                "training time spent waiting for a batch; fixed cost: `fit()` wall time minus its "
                "epochs; peak: `torch.cuda.max_memory_allocated`."
            ),
            table(
                ["side", "samples/s", "÷ plain", "data wait", "fit() s (fixed s)", "peak GiB"],
                rows,
            ),
            goals,
        ]
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--strategies", default="ddp,fsdp", help="comma-separated Trainer strategies")
    ap.add_argument("--rows", type=int, default=4_000_000, help="training rows (GPU run)")
    ap.add_argument("--batch-size", type=int, default=8192, help="global batch (GPU run)")
    ap.add_argument("--epochs", type=int, default=3, help="per side; the first is warm-up")
    ap.add_argument("--tiny", action="store_true", help="20,000 rows, a small model: wiring")


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
