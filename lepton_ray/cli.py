"""``lepton-ray``: the command line mirrors the Python API one to one.

    lepton-ray data prepare mnist5k ./store/datasets/mnist5k
    lepton-ray data inspect ./store/datasets/mnist5k/train
    lepton-ray train --data ./store/datasets/mnist5k/train --val ./store/datasets/mnist5k/test
    lepton-ray serve ./store/runs/RUN/checkpoint_epoch0015_step0000600
    lepton-ray predict http://127.0.0.1:8000 digit.png
    lepton-ray submit --max-retries 2 -- python -m pipelines.train --config pipelines/configs/mnist.yaml
    lepton-ray bench train_overhead --epochs 2

Heavy imports (torch, Ray) happen inside the commands, so ``--help`` is instant. Exit codes:
0 success, 2 a usage or input error (message on stderr), 1 an unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _workers(text: str) -> int | tuple[int, int] | str:
    if text == "auto":
        return text
    try:
        if "," in text or ":" in text:
            lo, hi = text.replace(":", ",").split(",")
            return (int(lo), int(hi))
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--workers takes N, MIN,MAX or auto, got {text!r}"
        ) from None


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def cmd_data_prepare(a: argparse.Namespace) -> Any:
    from lepton_ray.data import prepare

    infos = prepare(
        a.source,
        a.dest,
        endpoint_url=a.endpoint_url,
        overwrite=a.overwrite,
        root=a.root,
        skip_bad=a.skip_bad,
        encoding=a.encoding,
        rows_per_shard=a.rows_per_shard,
    )
    return {
        split: {
            "uri": i.uri,
            "rows": i.num_rows,
            "shape": list(i.shape),
            "classes": len(i.classes),
            "skipped_rows": i.manifest.get("skipped_rows", 0),
        }
        for split, i in infos.items()
    }


def cmd_data_inspect(a: argparse.Namespace) -> Any:
    from lepton_ray.data import open_dataset

    i = open_dataset(a.uri, a.endpoint_url)
    m = i.manifest
    if a.grid:
        from lepton_ray.viz import augmentation_grid

        augmentation_grid(i, augment=tuple(x for x in a.augment.split(",") if x)).save(a.grid)
    return {
        "uri": i.uri,
        "rows": i.num_rows,
        "shape": list(i.shape),
        "classes": list(i.classes),
        "class_counts": dict(zip(i.classes, m.get("class_counts", []), strict=False)),
        "mean": list(i.mean),
        "std": list(i.std),
        "shards": len(i.shards),
        "schema": {
            "id": "int64",
            "image": f"binary ({i.encoding} uint8 {'x'.join(map(str, i.shape))})",
            "label": "int64",
        },
        "source": m.get("source"),
        "created_at": m.get("created_at"),
        "skipped_rows": m.get("skipped_rows", 0),
        **({"grid": a.grid} if a.grid else {}),
    }


def cmd_train(a: argparse.Namespace) -> Any:
    from lepton_ray import Trainer, build_model, open_dataset

    info = open_dataset(a.data, a.endpoint_url)
    model = build_model(a.model, in_channels=info.shape[2], num_classes=info.num_classes)
    trainer = Trainer(
        a.workers,
        use_gpu=a.use_gpu,
        placement_strategy=a.placement_strategy,
        resources_per_worker=a.resources_per_worker,
    )
    opts = {
        k: v
        for k, v in {
            "lr": a.lr,
            "optimizer": a.optimizer,
            "run_name": a.run_name,
            "storage": a.storage,
            "max_failures": a.max_failures,
            "seed": a.seed,
            "checkpoint_every_steps": a.checkpoint_every_steps,
            "early_stopping_patience": a.early_stopping_patience,
            "resume": a.resume or None,
        }.items()
        if v is not None
    }
    data = {
        k: v for k, v in {"augment_on": a.augment_on, "cache": a.cache}.items() if v is not None
    }
    if a.augment is not None:
        data["augment"] = tuple(x for x in a.augment.split(",") if x)
    if data:
        from lepton_ray.config import DataConfig

        opts["data"] = DataConfig(**data)
    res = trainer.fit(
        model,
        info,
        a.val,
        batch_size=a.batch_size,
        epochs=a.epochs,
        endpoint_url=a.endpoint_url,
        **opts,
    )
    return {k: v for k, v in res.items() if k != "history"}


def cmd_serve(a: argparse.Namespace) -> Any:
    import time

    from lepton_ray import deploy

    url = deploy(
        a.checkpoint,
        host=a.host,
        port=a.port,
        endpoint_url=a.endpoint_url,
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        max_batch_size=a.max_batch_size,
        num_cpus=a.num_cpus,
        max_request_bytes=a.max_request_bytes,
        canary_checkpoint=a.canary,
        canary_share=a.canary_share,
        canary_min_requests=a.canary_min_requests,
        haproxy=a.haproxy or None,
    )
    print(json.dumps({"endpoint": url, "predict": f"{url}/v1/predict"}), flush=True)
    if a.detach:
        return None
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return None


def cmd_predict(a: argparse.Namespace) -> Any:
    import base64
    import urllib.error
    import urllib.request
    from pathlib import Path

    images = []
    for f in a.files:
        try:
            images.append(base64.b64encode(Path(f).read_bytes()).decode())
        except OSError as exc:
            raise _UsageError(f"cannot read {f}: {exc.strerror}") from None
    req = urllib.request.Request(
        a.url.rstrip("/") + "/v1/predict",
        data=json.dumps({"images": images}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise _UsageError(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None
    except urllib.error.URLError as exc:
        raise _UsageError(f"cannot reach {a.url}: {exc.reason}") from None


def cmd_submit(a: argparse.Namespace) -> Any:
    from lepton_ray.jobs import submit

    entrypoint = a.entrypoint[1:] if a.entrypoint[:1] == ["--"] else a.entrypoint
    if not entrypoint:
        raise _UsageError(
            "no entrypoint: put the command after --, e.g. -- python -m pipelines.train --config ..."
        )
    env = dict(a.runtime_env_json or {})
    pairs = dict(kv.split("=", 1) for kv in a.env)
    if pairs:
        env["env_vars"] = {**env.get("env_vars", {}), **pairs}
    outcome = submit(
        entrypoint,
        address=a.address,
        max_retries=a.max_retries,
        working_dir=a.working_dir or None,
        runtime_env=env,
        run_name=a.run_name,
        follow_logs=not a.no_logs,
        retry_delay_s=a.retry_delay,
    )
    return _Exit(outcome.to_dict(), 0 if outcome.succeeded else 1)


def _benchmarks_dir() -> Any:
    from pathlib import Path

    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / "benchmarks" / "__init__.py").is_file():
            return root / "benchmarks"
    raise _UsageError(
        "no benchmarks/ folder here or next to the lepton_ray package (run from the repository root)"
    )


def benchmark_names(folder: Any) -> dict[str, str]:
    """Benchmark scripts in ``folder`` by name, with the first line of each docstring (not imported)."""
    import ast

    out = {}
    for f in sorted(folder.glob("*.py")):
        tree = ast.parse(f.read_text())
        if f.stem.startswith("_") or not any(getattr(n, "name", None) == "main" for n in tree.body):
            continue
        doc = (ast.get_docstring(tree) or "").strip().splitlines()
        out[f.stem] = doc[0] if doc else ""
    return out


def cmd_bench(a: argparse.Namespace) -> Any:
    import subprocess

    folder = _benchmarks_dir()
    names = benchmark_names(folder)
    if not a.name or a.name == "list":
        return names
    if a.name not in names:
        raise _UsageError(f"unknown benchmark '{a.name}' (known: {', '.join(names)})")
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    code = subprocess.call([sys.executable, "-m", f"benchmarks.{a.name}", *args], cwd=folder.parent)
    return _Exit(None, 0 if code == 0 else (2 if code == 2 else 1))


class _Exit:
    """A command's output plus the exit code it asks for."""

    def __init__(self, out: Any, code: int):
        self.out, self.code = out, code


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lepton-ray", description="Elastic PyTorch training and serving on Ray."
    )
    sub = p.add_subparsers(dest="command", required=True)
    ep = {
        "flags": ("--endpoint-url",),
        "kw": {"default": None, "help": "S3-compatible endpoint (else $LEPTON_S3_ENDPOINT)"},
    }

    data = sub.add_parser("data", help="prepare and inspect datasets in object storage")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="write a dataset as Parquet shards + manifest")
    prep.add_argument(
        "source",
        help="mnist5k, torchvision:MNIST|FashionMNIST|CIFAR10 (with --root), "
        "imagefolder:PATH|s3://..., parquet:PATH",
    )
    prep.add_argument("dest", help="destination URI (path or s3://bucket/prefix)")
    prep.add_argument("--overwrite", action="store_true", help="rewrite even if already prepared")
    prep.add_argument("--root", default=None, help="folder a torchvision dataset was downloaded to")
    prep.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out unreadable or mismatched images (counted)",
    )
    prep.add_argument(
        "--encoding",
        choices=("raw", "png"),
        default="raw",
        help="store rows as raw pixels (fastest to read) or PNG (smaller; decoded by Ray Data workers)",
    )
    prep.add_argument(
        "--rows-per-shard",
        type=int,
        default=None,
        help="rows per Parquet shard (default: ~64 MiB of pixels, at least 8 shards)",
    )
    prep.add_argument(*ep["flags"], **ep["kw"])
    prep.set_defaults(fn=cmd_data_prepare)
    insp = dsub.add_parser(
        "inspect", help="schema, row count and class balance of a prepared dataset"
    )
    insp.add_argument("uri")
    insp.add_argument(
        "--grid",
        default=None,
        metavar="PNG",
        help="write sample images, before (top) and after augmentation",
    )
    insp.add_argument(
        "--augment", default="random_crop", help="comma-separated augmentations for --grid"
    )
    insp.add_argument(*ep["flags"], **ep["kw"])
    insp.set_defaults(fn=cmd_data_inspect)

    tr = sub.add_parser("train", help="train a model with Ray Train (prints train_results as JSON)")
    tr.add_argument("--data", required=True, help="prepared training dataset URI")
    tr.add_argument("--val", default=None, help="prepared validation dataset URI")
    tr.add_argument("--model", default="cnn", help="registered architecture (cnn, resnet18)")
    tr.add_argument("--workers", type=_workers, default=2, help="N, MIN,MAX (elastic) or auto")
    tr.add_argument("--use-gpu", action="store_true")
    tr.add_argument("--epochs", type=int, default=15)
    tr.add_argument("--batch-size", type=int, default=100, help="global batch")
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument(
        "--augment",
        default=None,
        metavar="A,B",
        help="training augmentations: random_crop, hflip, rotate, affine, color_jitter ('' for none)",
    )
    tr.add_argument(
        "--augment-on",
        choices=["auto", "cpu", "device"],
        default=None,
        help="augment in Ray Data's CPU workers or in the loop on the training device (auto: device on GPUs)",
    )
    tr.add_argument(
        "--cache",
        choices=["auto", "off", "device"],
        default=None,
        help="keep the training set in each worker's device memory (auto: on GPUs, sets up to 4 GiB)",
    )
    tr.add_argument("--max-failures", type=int, default=None)
    tr.add_argument(
        "--placement-strategy",
        default="PACK",
        choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
    )
    tr.add_argument(
        "--resources-per-worker",
        type=_json_dict,
        default=None,
        help='JSON, e.g. \'{"CPU": 2, "GPU": 1, "memory": 4e9}\'',
    )
    tr.add_argument(
        "--checkpoint-every-steps", type=int, default=None, help="also checkpoint mid-epoch"
    )
    tr.add_argument("--early-stopping-patience", type=int, default=None)
    tr.add_argument(
        "--storage", default=None, help="runs root (path or s3://); default $LEPTON_STORE/runs"
    )
    tr.add_argument("--run-name", default=None)
    tr.add_argument(
        "--resume", action="store_true", help="continue --run-name from its last checkpoint"
    )
    tr.add_argument(*ep["flags"], **ep["kw"])
    tr.set_defaults(fn=cmd_train)

    sv = sub.add_parser(
        "serve",
        help="deploy a checkpoint as an HTTP endpoint with Ray Serve",
        epilog="Set LEPTON_SERVE_TOKEN to require 'Authorization: Bearer <token>'.",
    )
    sv.add_argument("checkpoint", help="checkpoint URI")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--min-replicas", type=int, default=1)
    sv.add_argument("--max-replicas", type=int, default=2)
    sv.add_argument("--max-batch-size", type=int, default=64, help="1 disables batching")
    sv.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per model replica")
    sv.add_argument(
        "--haproxy",
        action="store_true",
        help="serve HTTP through Ray Serve's HAProxy ingress (opt-in, a few ms less per request; "
        "needs the 'haproxy' extra; same as LEPTON_SERVE_HAPROXY=1)",
    )
    sv.add_argument("--max-request-bytes", type=int, default=8 << 20, help="larger bodies get 413")
    sv.add_argument(
        "--canary",
        default=None,
        metavar="CHECKPOINT",
        help="send --canary-share of the traffic to this checkpoint; promote or roll back on its own",
    )
    sv.add_argument("--canary-share", type=float, default=0.1)
    sv.add_argument(
        "--canary-min-requests", type=int, default=50, help="canary requests before the verdict"
    )
    sv.add_argument(
        "--detach", action="store_true", help="return once deployed (the Ray cluster keeps serving)"
    )
    sv.add_argument(*ep["flags"], **ep["kw"])
    sv.set_defaults(fn=cmd_serve)

    pr = sub.add_parser("predict", help="classify PNG/JPEG files with a running endpoint")
    pr.add_argument("url", help="endpoint base URL, e.g. http://127.0.0.1:8000")
    pr.add_argument("files", nargs="+")
    pr.set_defaults(fn=cmd_predict)

    sb = sub.add_parser(
        "submit",
        help="run a command as a Ray job; resubmit it (resuming its run) when it fails",
        description="Submit ENTRYPOINT as a Ray job through the dashboard's job API, follow its logs, "
        "and resubmit it when it FAILED, up to --max-retries times: every attempt trains the same "
        "run, and retries resume it from its last checkpoint (LEPTON_RUN_NAME, LEPTON_RESUME=1 in the "
        "job's environment). An entrypoint exiting with 2 (bad input) is not retried. Prints the "
        "attempts as JSON; exit 0 when the job succeeded, 1 when it failed, 2 on a usage error.",
    )
    sb.add_argument(
        "--address",
        default=None,
        help="dashboard URL (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS if http(s), else http://127.0.0.1:8265)",
    )
    sb.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="resubmissions after a failed attempt (default 2)",
    )
    sb.add_argument(
        "--retry-delay",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="wait before the first resubmission, doubled each time up to 60 s, with jitter "
        "(default 5; 0: no wait)",
    )
    sb.add_argument(
        "--working-dir",
        default=".",
        help="uploaded once and used by every attempt (default .); '' for none",
    )
    sb.add_argument(
        "--runtime-env-json", type=_json_dict, default=None, help="Ray runtime_env as JSON"
    )
    sb.add_argument(
        "--env",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable)",
    )
    sb.add_argument(
        "--run-name", default=None, help="run name for every attempt when the config names none"
    )
    sb.add_argument("--no-logs", action="store_true", help="do not stream the job's logs")
    sb.add_argument(
        "entrypoint",
        nargs=argparse.REMAINDER,
        help="-- then the command, e.g. -- python -m pipelines.train ...",
    )
    sb.set_defaults(fn=cmd_submit)

    bn = sub.add_parser(
        "bench",
        help="run a benchmark from benchmarks/ by name (no name: list them)",
        description="Run benchmarks/NAME.py (python -m benchmarks.NAME) from the repository root; "
        "arguments after the name go to the benchmark. Without a name, list the benchmarks.",
    )
    bn.add_argument("name", nargs="?", default=None, help="e.g. train_overhead, recovery, gpu")
    bn.add_argument(
        "args", nargs=argparse.REMAINDER, help="arguments for the benchmark, e.g. --epochs 2"
    )
    bn.set_defaults(fn=cmd_bench)
    return p


def _key_value(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lepton_ray.errors import LeptonError, one_line

    try:
        out = args.fn(args)
    except (LeptonError, _UsageError) as exc:
        print(f"lepton-ray: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, not a stack trace
        print(
            f"lepton-ray: unexpected error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr
        )
        return 1
    code = 0
    if isinstance(out, _Exit):
        out, code = out.out, out.code
    if out is not None:
        print(json.dumps(out, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
