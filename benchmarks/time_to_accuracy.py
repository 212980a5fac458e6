"""Benchmark: wall time from the command line to >= 98% test accuracy on the built-in MNIST subset.

Claim measured: what a user waits, Ray start-up included, for ``lepton-ray data prepare mnist5k``
then ``lepton-ray train --workers 1`` (the ``cnn``, batch 100) to reach 98% test accuracy, and that
the checkpoint it writes loads in a process that sees no GPU. Meant for one GPU (``--use-gpu``, the
default when torch sees one); runs on a CPU as well.

Each run's history is read from its checkpoint's metadata (``lepton_ray.checkpoint.read_meta``, no
weights). Runs of ``--epochs`` and, if given, ``--short-epochs``.

    python -m benchmarks.time_to_accuracy [--epochs 15] [--short-epochs 6] [--no-doc]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks._gpu_report import render

KEY = "time_to_accuracy"

# Loads weights and optimizer state with no GPU visible; prints where the tensors are.
CPU_LOAD_CHECK = r"""
import json, sys, torch
from lepton_ray import load_model
from lepton_ray.checkpoint import load_train_state
from lepton_ray.storage import resolve
model, meta = load_model(sys.argv[1])
weights, state, _ = load_train_state(resolve(sys.argv[1]))
devs = set()
def walk(o):
    if isinstance(o, torch.Tensor): devs.add(str(o.device))
    elif isinstance(o, dict): [walk(v) for v in o.values()]
    elif isinstance(o, (list, tuple)): [walk(v) for v in o]
walk(state); walk(weights)
h, w, c = meta["data"]["shape"]
out = model(torch.zeros(2, c, h, w))
print(json.dumps({"cuda_visible": torch.cuda.is_available(), "state_devices": sorted(devs),
                  "output_shape": list(out.shape), "ok": True}))
"""


def cli(args: list[str], log: Path, timeout: float) -> tuple[int, str, float]:
    """``lepton-ray ARGS`` in a subprocess: exit code, stdout, wall seconds (stderr to ``log``)."""
    with log.open("a") as f, harness.Timer() as t:
        f.write(f"\n$ lepton-ray {' '.join(args)}\n")
        f.flush()
        try:
            p = subprocess.run(
                [sys.executable, "-m", "lepton_ray.cli", *args],
                stdout=subprocess.PIPE,
                stderr=f,
                text=True,
                timeout=timeout,
            )
            out, rc = p.stdout, p.returncode
        except subprocess.TimeoutExpired as exc:
            out, rc = str(exc.stdout or ""), 124
    return rc, out, t.seconds


def last_json(text: str) -> dict[str, Any]:
    """The command's result: the last JSON object it printed."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return {}


def train_run(
    data: Path, runs: Path, epochs: int, gpu: bool, log: Path, timeout: float
) -> dict[str, Any]:
    from lepton_ray.checkpoint import read_meta

    argv = ["train", "--data", f"{data}/train", "--val", f"{data}/test", "--workers", "1"]
    argv += ["--epochs", str(epochs), "--batch-size", "100", "--storage", str(runs)]
    argv += ["--run-name", f"mnist-e{epochs}"] + (["--use-gpu"] if gpu else [])
    rc, out, wall = cli(argv, log, timeout)
    res = last_json(out)
    history = read_meta(res["checkpoint"]).get("history", []) if res.get("checkpoint") else []
    accs = [h.get("val_accuracy") for h in history]
    return {
        "command": "lepton-ray "
        + " ".join(argv).replace(str(data), "DIR").replace(str(runs), "RUNS"),
        "exit_code": rc,
        "epochs": epochs,
        "train_wall_s": round(wall, 1),
        "fit_wall_s": round(res["wall_time_s"], 1) if res.get("wall_time_s") else None,
        "val_accuracy": res.get("val_accuracy"),
        "val_accuracy_per_epoch": [round(a, 4) if a is not None else None for a in accs],
        "first_epoch_at_98": next(
            (h["epoch"] for h in history if (h.get("val_accuracy") or 0) >= 0.98), None
        ),
        "epoch_time_s": [round(h["epoch_time_s"], 2) for h in history],
        "checkpoint": res.get("checkpoint"),
    }


def cpu_load_check(ckpt: str) -> dict[str, Any]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(
        [sys.executable, "-c", CPU_LOAD_CHECK, ckpt],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        return {"ok": False, "error": lines[-1] if lines else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    os.environ.pop("RAY_ADDRESS", None)  # a fresh local Ray, never someone else's cluster
    gpu = torch.cuda.is_available() if args.use_gpu is None else args.use_gpu
    r = harness.record(KEY, use_gpu=gpu)
    store = harness.scratch("lepton-tta-")
    log = store / "cli.log"
    rc, _, prep = cli(["data", "prepare", "mnist5k", str(store / "mnist5k")], log, 300)
    r["mnist"] = {"prepare_wall_s": round(prep, 1), "prepare_exit_code": rc, "runs": []}
    for epochs in [args.epochs] + ([args.short_epochs] if args.short_epochs else []):
        run_ = train_run(store / "mnist5k", store / "runs", epochs, gpu, log, args.timeout)
        r["mnist"]["runs"].append(run_)
        print(f"{epochs} epochs: {run_}", flush=True)
    ckpt = r["mnist"]["runs"][0]["checkpoint"]
    if ckpt:
        r["checkpoint_on_cpu"] = cpu_load_check(ckpt)
    if any(x["exit_code"] for x in r["mnist"]["runs"]):
        print(f"a command failed; its stderr is in {log}", flush=True)
    return r


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--short-epochs", type=int, default=6, help="a second, shorter run (0: none)")
    gpu = ap.add_mutually_exclusive_group()
    gpu.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None)
    gpu.add_argument("--cpu", dest="use_gpu", action="store_false", help="train on the CPU")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per command")


def main(argv: list[str] | None = None) -> None:
    harness.main_for(__doc__, KEY, add_args, run, render, argv)


if __name__ == "__main__":
    main()
