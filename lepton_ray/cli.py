"""``lepton-ray``: the command line mirrors the Python API one to one.

    lepton-ray data prepare mnist5k ./store/datasets/mnist5k
    lepton-ray data inspect ./store/datasets/mnist5k/train
    lepton-ray train --data ./store/datasets/mnist5k/train --val ./store/datasets/mnist5k/test
    lepton-ray serve ./store/runs/RUN/checkpoint_epoch0015_step0000600
    lepton-ray predict http://127.0.0.1:8000 digit.png

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
        raise argparse.ArgumentTypeError(f"--workers takes N, MIN,MAX or auto, got {text!r}") from None


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

    infos = prepare(a.source, a.dest, endpoint_url=a.endpoint_url, overwrite=a.overwrite, root=a.root,
                    skip_bad=a.skip_bad, encoding=a.encoding)
    return {split: {"uri": i.uri, "rows": i.num_rows, "shape": list(i.shape), "classes": len(i.classes),
                    "skipped_rows": i.manifest.get("skipped_rows", 0)} for split, i in infos.items()}


def cmd_data_inspect(a: argparse.Namespace) -> Any:
    from lepton_ray.data import open_dataset

    i = open_dataset(a.uri, a.endpoint_url)
    m = i.manifest
    if a.grid:
        from lepton_ray.viz import augmentation_grid

        augmentation_grid(i, augment=tuple(x for x in a.augment.split(",") if x)).save(a.grid)
    return {"uri": i.uri, "rows": i.num_rows, "shape": list(i.shape), "classes": list(i.classes),
            "class_counts": dict(zip(i.classes, m.get("class_counts", []), strict=False)),
            "mean": list(i.mean), "std": list(i.std), "shards": len(i.shards),
            "schema": {"id": "int64", "image": f"binary ({i.encoding} uint8 {'x'.join(map(str, i.shape))})",
                       "label": "int64"},
            "source": m.get("source"), "created_at": m.get("created_at"),
            "skipped_rows": m.get("skipped_rows", 0), **({"grid": a.grid} if a.grid else {})}


def cmd_train(a: argparse.Namespace) -> Any:
    from lepton_ray import Trainer, build_model, open_dataset

    info = open_dataset(a.data, a.endpoint_url)
    model = build_model(a.model, in_channels=info.shape[2], num_classes=info.num_classes)
    trainer = Trainer(a.workers, use_gpu=a.use_gpu, placement_strategy=a.placement_strategy,
                      resources_per_worker=a.resources_per_worker)
    opts = {k: v for k, v in {"lr": a.lr, "optimizer": a.optimizer, "run_name": a.run_name,
                              "storage": a.storage, "max_failures": a.max_failures, "seed": a.seed,
                              "checkpoint_every_steps": a.checkpoint_every_steps,
                              "early_stopping_patience": a.early_stopping_patience,
                              "resume": a.resume or None}.items() if v is not None}
    if a.augment is not None:
        from lepton_ray.config import DataConfig

        opts["data"] = DataConfig(augment=tuple(x for x in a.augment.split(",") if x))
    res = trainer.fit(model, info, a.val, batch_size=a.batch_size, epochs=a.epochs, endpoint_url=a.endpoint_url, **opts)
    return {k: v for k, v in res.items() if k != "history"}


def cmd_serve(a: argparse.Namespace) -> Any:
    import time

    from lepton_ray import deploy

    url = deploy(a.checkpoint, host=a.host, port=a.port, endpoint_url=a.endpoint_url,
                 min_replicas=a.min_replicas, max_replicas=a.max_replicas, max_batch_size=a.max_batch_size)
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
    req = urllib.request.Request(a.url.rstrip("/") + "/v1/predict", data=json.dumps({"images": images}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise _UsageError(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None
    except urllib.error.URLError as exc:
        raise _UsageError(f"cannot reach {a.url}: {exc.reason}") from None


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lepton-ray", description="Elastic PyTorch training and serving on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    ep = {"flags": ("--endpoint-url",), "kw": {"default": None, "help": "S3-compatible endpoint (else $LEPTON_S3_ENDPOINT)"}}

    data = sub.add_parser("data", help="prepare and inspect datasets in object storage")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="write a dataset as Parquet shards + manifest")
    prep.add_argument("source", help="mnist5k, torchvision:MNIST|FashionMNIST|CIFAR10 (with --root), "
                      "imagefolder:PATH|s3://..., parquet:PATH")
    prep.add_argument("dest", help="destination URI (path or s3://bucket/prefix)")
    prep.add_argument("--overwrite", action="store_true", help="rewrite even if already prepared")
    prep.add_argument("--root", default=None, help="folder a torchvision dataset was downloaded to")
    prep.add_argument("--skip-bad", action="store_true", help="leave out unreadable or mismatched images (counted)")
    prep.add_argument("--encoding", choices=("raw", "png"), default="raw",
                      help="store rows as raw pixels (fastest to read) or PNG (smaller; decoded by Ray Data workers)")
    prep.add_argument(*ep["flags"], **ep["kw"])
    prep.set_defaults(fn=cmd_data_prepare)
    insp = dsub.add_parser("inspect", help="schema, row count and class balance of a prepared dataset")
    insp.add_argument("uri")
    insp.add_argument("--grid", default=None, metavar="PNG", help="write sample images, before (top) and after augmentation")
    insp.add_argument("--augment", default="random_crop", help="comma-separated augmentations for --grid")
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
    tr.add_argument("--augment", default=None, metavar="A,B",
                    help="training augmentations: random_crop, hflip, rotate, affine, color_jitter ('' for none)")
    tr.add_argument("--max-failures", type=int, default=None)
    tr.add_argument("--placement-strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    tr.add_argument("--resources-per-worker", type=_json_dict, default=None,
                    help='JSON, e.g. \'{"CPU": 2, "GPU": 1, "memory": 4e9}\'')
    tr.add_argument("--checkpoint-every-steps", type=int, default=None, help="also checkpoint mid-epoch")
    tr.add_argument("--early-stopping-patience", type=int, default=None)
    tr.add_argument("--storage", default=None, help="runs root (path or s3://); default $LEPTON_STORE/runs")
    tr.add_argument("--run-name", default=None)
    tr.add_argument("--resume", action="store_true", help="continue --run-name from its last checkpoint")
    tr.add_argument(*ep["flags"], **ep["kw"])
    tr.set_defaults(fn=cmd_train)

    sv = sub.add_parser("serve", help="deploy a checkpoint as an HTTP endpoint with Ray Serve")
    sv.add_argument("checkpoint", help="checkpoint URI")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--min-replicas", type=int, default=1)
    sv.add_argument("--max-replicas", type=int, default=2)
    sv.add_argument("--max-batch-size", type=int, default=64)
    sv.add_argument("--detach", action="store_true", help="return once deployed (the Ray cluster keeps serving)")
    sv.add_argument(*ep["flags"], **ep["kw"])
    sv.set_defaults(fn=cmd_serve)

    pr = sub.add_parser("predict", help="classify PNG/JPEG files with a running endpoint")
    pr.add_argument("url", help="endpoint base URL, e.g. http://127.0.0.1:8000")
    pr.add_argument("files", nargs="+")
    pr.set_defaults(fn=cmd_predict)
    return p


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
        print(f"lepton-ray: unexpected error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return 1
    if out is not None:
        print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
