"""``lepton-ray``: the command line mirrors the Python API one to one.

    lepton-ray data prepare mnist5k ./store/datasets/mnist5k
    lepton-ray data inspect ./store/datasets/mnist5k/train
    lepton-ray train --data ./store/datasets/mnist5k/train --val ./store/datasets/mnist5k/test
    lepton-ray serve ./store/runs/RUN/checkpoint_epoch0015_step0000600
    lepton-ray export ./store/runs/RUN/checkpoint_epoch0015_step0000600 ./store/exported/RUN
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

from lepton_ray.console import VERBOSE_ENV, VERBOSE_HELP, entry_point, verbose


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


def _count_or_auto(text: str) -> int | str:
    """``--max-replicas``: a whole number, or ``auto`` (ServeConfig checks the range)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes N or auto, got {text!r}") from None


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
        block_size=a.block_size,
        crop=a.crop,
    )
    for split, i in infos.items():
        _warn_skipped(split, i.manifest)
    return {
        split: {
            "uri": i.uri,
            "rows": i.num_rows,
            "shape": list(i.shape),
            **({"kind": i.kind, "block_size": i.block_size} if i.block_size else {}),
            **({} if i.kind == "text" else {"classes": len(i.classes)}),
            **(
                {"kind": "ctr", "planted_auc": i.manifest.get("planted_auc")}
                if i.kind == "ctr"
                else {}
            ),
            "skipped_rows": i.manifest.get("skipped_rows", 0),
        }
        for split, i in infos.items()
    }


def _warn_skipped(split: str, manifest: dict[str, Any]) -> None:
    """One line on stderr when preparing left rows out (``--skip-bad``)."""
    from lepton_ray.console import skipped_rows_note

    note = skipped_rows_note(split, manifest)
    if note:
        print(f"lepton-ray: warning: {note}", file=sys.stderr)


def cmd_data_inspect(a: argparse.Namespace) -> Any:
    from lepton_ray.data import open_dataset

    i = open_dataset(a.uri, a.endpoint_url)
    m = i.manifest
    if a.grid and i.block_size:
        raise _UsageError("--grid draws images; this dataset holds text")
    if a.grid and i.kind == "ctr":
        raise _UsageError("--grid draws images; this dataset holds click rows")
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
            "image": f"binary ({i.encoding} uint8 {'x'.join(map(str, i.shape))})"
            + (f": {i.block_size} + 1 byte tokens per block" if i.kind == "text" else "")
            + (f": a text as {i.block_size} byte tokens" if i.kind == "text-label" else "")
            + (_click_row_schema(m) if i.kind == "ctr" else ""),
            "label": "int64" + (" (1: clicked, 0: not)" if i.kind == "ctr" else ""),
        },
        **(_click_fields(i) if i.kind == "ctr" else {}),
        **(
            {"kind": i.kind, "block_size": i.block_size, "vocab_size": i.vocab_size}
            if i.block_size
            else {}
        ),
        "source": m.get("source"),
        "created_at": m.get("created_at"),
        "skipped_rows": m.get("skipped_rows", 0),
        **({"grid": a.grid} if a.grid else {}),
    }


def _click_row_schema(m: dict[str, Any]) -> str:
    """How a click row's bytes read (lepton_ray.data.ctr): dense float32s, then one id per table."""
    dense, tables = m["dense"], len(m["cardinalities"])
    return f": {dense} float32 dense features, then {tables} int32 ids (one a table), little-endian"


def _click_fields(i: Any) -> dict[str, Any]:
    """What a click dataset's manifest says besides rows and labels: the features, each table's
    cardinality, the share of clicks, and the planted model's AUC on the held-out split."""
    m = i.manifest
    counts = m.get("class_counts") or [0, 0]
    return {
        "kind": "ctr",
        "dense": m["dense"],
        "sparse": len(m["cardinalities"]),
        "cardinalities": list(m["cardinalities"]),
        "click_rate": round(counts[1] / max(i.num_rows, 1), 4),
        "planted_auc": m.get("planted_auc"),
    }


# ``lepton-ray train`` flags that mirror a config field: dest -> dotted key in the pipeline YAML.
# Each defaults to None ("the config's value"); its --help shows the config class's default.
_TRAIN_FLAGS = {
    "model": "model.name",
    "workers": "train.scaling.num_workers",
    "strategy": "train.strategy",
    "use_gpu": "train.scaling.use_gpu",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.optim.lr",
    "optimizer": "train.optim.optimizer",
    "seed": "train.seed",
    "augment": "train.data.augment",
    "augment_on": "train.data.augment_on",
    "cache": "train.data.cache",
    "max_failures": "train.max_failures",
    "placement_strategy": "train.scaling.placement_strategy",
    "resources_per_worker": "train.scaling.resources_per_worker",
    "checkpoint_every_steps": "train.checkpoint_every_steps",
    "early_stopping_patience": "train.early_stopping_patience",
    "storage": "train.storage",
    "run_name": "train.run_name",
    "resume": "train.resume",
    "endpoint_url": "endpoint_url",
}


def train_config(a: argparse.Namespace) -> Any:
    """The :class:`~lepton_ray.config.PipelineConfig` a ``lepton-ray train`` command line asks
    for: ``--config`` (or the defaults), then ``--set`` overrides, then the flags given."""
    from lepton_ray.config import load_config

    flags = [
        (_TRAIN_FLAGS[d], v) for d, v in vars(a).items() if d in _TRAIN_FLAGS and v is not None
    ]
    return load_config(a.config, [*a.sets, *flags])


def cmd_train(a: argparse.Namespace) -> Any:
    import dataclasses

    from lepton_ray import build_model, fit, open_dataset

    cfg = train_config(a)
    if a.data:
        train_uri, val_uri = a.data, a.val
    elif a.config:
        d = cfg.dataset
        train_uri = f"{cfg.dataset_uri}/{d.train_split}"
        val_uri = a.val or (f"{cfg.dataset_uri}/{d.val_split}" if d.val_split else None)
    else:
        raise _UsageError("which data? pass --data URI, or --config FILE with a dataset section")
    info = open_dataset(train_uri, cfg.endpoint_url)
    model = build_model(cfg.model.name, **info.model_kwargs(), **cfg.model.kwargs)
    tcfg = dataclasses.replace(
        cfg.train,
        storage=cfg.runs_uri,
        endpoint_url=cfg.train.endpoint_url or cfg.endpoint_url,
    )
    res = fit(model, info, val_uri, tcfg)
    return {k: v for k, v in res.items() if k != "history"}


def cmd_serve(a: argparse.Namespace) -> Any:
    import signal
    import time

    from lepton_ray import deploy
    from lepton_ray.runtime import ensure_ray, running_cluster_address

    if a.detach:
        # The endpoint must outlive this command: only a cluster started apart from it does.
        address = running_cluster_address()
        if address is None:
            raise _UsageError(
                "--detach needs a running Ray cluster (ray start --head, or RAY_ADDRESS); "
                "without one the endpoint would stop with this command: drop --detach"
            )
        try:
            ensure_ray(address)
        except ConnectionError as exc:
            raise _UsageError(
                f"--detach: cannot reach the Ray cluster at {address}: {exc}"
            ) from None
    url = deploy(
        a.checkpoint,
        host=a.host,
        port=a.port,
        endpoint_url=a.endpoint_url,
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        max_batch_size=a.max_batch_size,
        num_cpus=a.num_cpus,
        use_gpu=a.use_gpu,
        gpus_per_replica=a.gpus_per_replica,
        auth_token=a.auth_token,  # None: deploy reads $LEPTON_SERVE_TOKEN
        max_request_bytes=a.max_request_bytes,
        canary_checkpoint=a.canary,
        canary_share=a.canary_share,
        canary_min_requests=a.canary_min_requests,
        haproxy=a.haproxy,
    )
    print(json.dumps({"endpoint": url, "predict": f"{url}/v1/predict"}), flush=True)
    if a.detach:
        return None

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # SIGTERM (systemd, docker stop, kill) stops the endpoint as Ctrl-C does. Ray's own handler,
    # installed by ray.init, kills the node's processes under the running driver instead.
    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        import ray
        from ray import serve

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut this short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("lepton-ray: stopping the endpoint", file=sys.stderr, flush=True)
        serve.shutdown()
        ray.shutdown()
    return None


def cmd_export(a: argparse.Namespace) -> Any:
    from lepton_ray.checkpoint import describe
    from lepton_ray.train.sharded import export

    dest = export(a.checkpoint, a.dest, a.endpoint_url)
    d = describe(dest)
    return {
        "checkpoint": d.location.uri,
        "version": d.version,
        "exported_from": d.meta["exported_from"],
    }


def cmd_predict(a: argparse.Namespace) -> Any:
    import base64
    import os
    import urllib.error
    import urllib.request
    from pathlib import Path

    given = [
        name
        for name, v in (("image files", a.files), ("--features", a.features), ("--text", a.text))
        if v
    ]
    if len(given) > 1:
        raise _UsageError(
            f"give one of image files, --features or --text, not {' and '.join(given)}"
        )
    if a.features is not None:  # a click model's rows; the endpoint checks every value
        body: dict[str, Any] = {"features": _json_object(a.features, "--features")}
    elif a.text:  # a text classifier's texts, as given (the endpoint checks and tokenises them)
        body = {"texts": a.text}
    elif a.files:
        images = []
        for f in a.files:
            try:
                images.append(base64.b64encode(Path(f).read_bytes()).decode())
            except OSError as exc:
                raise _UsageError(f"cannot read {f}: {exc.strerror}") from None
        body = {"images": images}
    else:
        raise _UsageError("nothing to predict: give image files, --features JSON or --text TEXT")
    token = a.auth_token or os.environ.get("LEPTON_SERVE_TOKEN") or None
    req = urllib.request.Request(
        a.url.rstrip("/") + "/v1/predict",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise _UsageError(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None
    except urllib.error.URLError as exc:
        raise _UsageError(f"cannot reach {a.url}: {exc.reason}") from None


def _json_object(text: str, flag: str) -> dict[str, Any]:
    """A flag's JSON object, given inline or as ``@FILE`` (curl's convention)."""
    from pathlib import Path

    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise _UsageError(f"{flag}: cannot read {text[1:]}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _UsageError(f"{flag} is not valid JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(value, dict):
        raise _UsageError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def cmd_generate(a: argparse.Namespace) -> Any:
    import os
    import urllib.error

    from lepton_ray.serve.client import generate

    token = a.auth_token or os.environ.get("LEPTON_SERVE_TOKEN") or None
    options = {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature}
    options |= {"top_k": a.top_k, "seed": a.seed}
    try:
        for event, data in generate(a.url, a.prompt, token=token, **options):
            if event == "error":  # the stream had begun: not the request's fault
                print(f"\nlepton-ray: generation failed: {data.get('error')}", file=sys.stderr)
                return _Exit(None, 1)
            sys.stdout.write(data.get("text", "") + ("\n" if event == "done" else ""))
            sys.stdout.flush()  # each token as it arrives
            if event == "done":
                usage = data.get("usage", {})
                print(
                    f"-- {usage.get('completion_tokens')} tokens ({data.get('finish_reason')}), "
                    f"seed {data.get('seed')}, model {data.get('model_version')}",
                    file=sys.stderr,
                )
    except RuntimeError as exc:  # an HTTP error status, with the endpoint's message
        raise _UsageError(str(exc)) from None
    except urllib.error.URLError as exc:
        raise _UsageError(f"cannot reach {a.url}: {exc.reason}") from None
    return None


def cmd_submit(a: argparse.Namespace) -> Any:
    from lepton_ray.jobs import submit

    entrypoint = a.entrypoint[1:] if a.entrypoint[:1] == ["--"] else a.entrypoint
    if not entrypoint:
        raise _UsageError(
            "no entrypoint: put the command after --, e.g. -- python -m pipelines.train --config ..."
        )
    env = dict(a.runtime_env_json or {})
    pairs = dict(kv.split("=", 1) for kv in a.env)
    if verbose():  # the job's own output, as this command's
        pairs = {VERBOSE_ENV: "1", **pairs}
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


TOKEN_HELP = (
    "else $LEPTON_SERVE_TOKEN, the better place for it: a flag's value shows in the process list"
)

# ``lepton-ray serve`` flags that mirror a ServeConfig field: dest -> field.
_SERVE_FLAGS = {
    "min_replicas": "min_replicas",
    "max_replicas": "max_replicas",
    "max_batch_size": "max_batch_size",
    "num_cpus": "num_cpus",
    "use_gpu": "use_gpu",
    "gpus_per_replica": "gpus_per_replica",
    "auth_token": "auth_token",
    "max_request_bytes": "max_request_bytes",
    "canary": "canary_checkpoint",
    "canary_share": "canary_share",
    "canary_min_requests": "canary_min_requests",
    "endpoint_url": "endpoint_url",
}


def _config_flags(
    parser: argparse.ArgumentParser, table: dict[str, str], *, defaults: bool = False
) -> Any:
    """``flag("--epochs")``: add a flag that mirrors the config field ``table`` names for it.

    Its type, choices (a ``Literal``) and on/off form (a ``bool``: ``--use-gpu/--no-use-gpu``) come
    from the field's annotation, its help from the field's docstring plus the config's default.
    The parser's default is None ("keep the config's value"), or with ``defaults`` the config
    class's default itself; never a number restated here.
    """
    import dataclasses
    import types
    import typing

    from lepton_ray.config import PipelineConfig, ServeConfig
    from lepton_ray.config.docs import field_docs, markdown, value_text
    from lepton_ray.config.schema import _hints, range_text

    def field_of(key: str) -> tuple[type, dataclasses.Field]:
        cls: Any = ServeConfig if table is _SERVE_FLAGS else PipelineConfig
        *parents, name = key.split(".")
        for part in parents:
            cls = _hints(cls)[part]
        return cls, {f.name: f for f in dataclasses.fields(cls)}[name]

    def flag(name: str, help_extra: str = "", **kw: Any) -> None:
        dest = name[2:].replace("-", "_")
        cls, f = field_of(table[dest])
        tp = _hints(cls)[f.name]
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        arms = [t for t in typing.get_args(tp) if t is not type(None)] if union else [tp]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        literal = [t for t in arms if typing.get_origin(t) is typing.Literal]
        if "type" not in kw:
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif literal:
                kw["choices"] = typing.get_args(literal[0])
            else:
                kw["type"] = next((t for t in arms if t in (int, float)), str)
        doc = markdown(field_docs(cls).get(f.name, "")).replace("`", "").replace("%", "%%")
        limits = range_text(f.metadata)
        text = f"{doc}{' Must be ' + limits + '.' if limits else ''}"
        text += f" ({help_extra}; " if help_extra else " ("
        text += f"default: {value_text(default)}, {cls.__name__}.{f.name})"
        parser.add_argument(name, dest=dest, default=default if defaults else None, help=text, **kw)

    return flag


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
        help="mnist5k, torchvision:MNIST|FashionMNIST|KMNIST|CIFAR10|CIFAR100 (with --root), "
        "imagefolder:PATH|s3://..., parquet:PATH, synthetic:ROWS:HxWxC[:CLASSES]; text (byte "
        "tokens): pydoc-topics, text:FILE|FOLDER, text-parquet:PATH[:COLUMN]; labelled text: "
        "python-snippets, text-csv:PATH[:TEXTCOL:LABELCOL], "
        "text-label-parquet:PATH[:TEXTCOL:LABELCOL]; click data with a planted signal: "
        "synthetic-ctr:rows=N,tables=T,cardinality=C,dense=D,seed=S",
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
        choices=("raw", "png", "jpeg"),
        default="raw",
        help="store rows as raw pixels (fastest to read), PNG (smaller; decoded by Ray Data "
        "workers), or, for a folder of JPEGs of any size, their own bytes (cropped as read)",
    )
    prep.add_argument(
        "--crop",
        type=int,
        default=None,
        help="with --encoding jpeg: the side every row is cropped to as it is read (default 224)",
    )
    prep.add_argument(
        "--rows-per-shard",
        type=int,
        default=None,
        help="rows per Parquet shard (default: ~64 MiB of pixels, at least 8 shards)",
    )
    prep.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="text sources: tokens a model reads per block (default 256; a row holds one more); "
        "labelled text: tokens per text, longer ones cut (default 128)",
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

    tr = sub.add_parser(
        "train",
        help="train a model with Ray Train (prints train_results as JSON)",
        description="Train on a prepared dataset. With --config, the pipeline YAML's dataset, "
        "model and train sections; --set KEY=VALUE and the flags below override it. A flag left "
        "out keeps the config's value (the default shown is the config class's).",
    )
    tr.add_argument("--config", default=None, metavar="FILE", help="pipeline YAML")
    tr.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.optim.momentum=0.8 (repeatable)",
    )
    tr.add_argument(
        "--data", default=None, help="prepared training dataset URI (default: from --config)"
    )
    tr.add_argument("--val", default=None, help="prepared validation dataset URI")
    flag = _config_flags(tr, _TRAIN_FLAGS)
    flag("--model", metavar="NAME")
    flag("--workers", type=_workers, metavar="N|MIN,MAX|auto")
    flag("--strategy")
    flag("--use-gpu")
    flag("--epochs")
    flag("--batch-size")
    flag("--lr")
    flag("--optimizer")
    flag("--seed")
    flag("--augment", type=str, metavar="A,B", help_extra="'' for none")
    flag("--augment-on")
    flag("--cache")
    flag("--max-failures")
    flag("--placement-strategy")
    flag("--resources-per-worker", type=_json_dict, metavar="JSON")
    flag("--checkpoint-every-steps")
    flag("--early-stopping-patience")
    flag("--storage", metavar="URI")
    flag("--run-name")
    flag("--resume")
    flag("--endpoint-url", metavar="URL")
    tr.set_defaults(fn=cmd_train)

    sv = sub.add_parser(
        "serve",
        help="deploy a checkpoint as an HTTP endpoint with Ray Serve",
        epilog="Set LEPTON_SERVE_TOKEN to require 'Authorization: Bearer <token>'.",
    )
    sv.add_argument("checkpoint", help="checkpoint URI")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    # Defaults are ServeConfig's own values (cmd_serve passes every one to deploy).
    flag = _config_flags(sv, _SERVE_FLAGS, defaults=True)
    flag("--min-replicas")
    flag("--max-replicas", type=_count_or_auto, metavar="N|auto")
    flag("--max-batch-size")
    flag("--num-cpus")
    flag("--use-gpu")
    flag("--gpus-per-replica")
    flag("--auth-token", TOKEN_HELP, metavar="TOKEN")
    sv.add_argument(
        "--haproxy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the HTTP ingress of the Ray instance this starts: HAProxy (the default where its "
        "binary is present) or, with --no-haproxy, Serve's own proxy; same as "
        "LEPTON_SERVE_HAPROXY=1/0",
    )
    flag("--max-request-bytes")
    flag("--canary", metavar="CHECKPOINT")
    flag("--canary-share")
    flag("--canary-min-requests")
    sv.add_argument(
        "--detach", action="store_true", help="return once deployed (the Ray cluster keeps serving)"
    )
    flag("--endpoint-url", metavar="URL")
    sv.set_defaults(fn=cmd_serve)

    ex = sub.add_parser(
        "export",
        help="consolidate a sharded (fsdp) checkpoint into one that load_model and serve read",
    )
    ex.add_argument("checkpoint", help="sharded checkpoint URI")
    ex.add_argument("dest", help="new checkpoint folder (path or s3://bucket/prefix)")
    ex.add_argument(*ep["flags"], **ep["kw"])
    ex.set_defaults(fn=cmd_export)

    pr = sub.add_parser(
        "predict",
        help="classify PNG/JPEG files or texts, or score click features, with a running endpoint",
    )
    pr.add_argument("url", help="endpoint base URL, e.g. http://127.0.0.1:8000")
    pr.add_argument("files", nargs="*", help="PNG/JPEG files (an image classifier)")
    pr.add_argument(
        "--features",
        default=None,
        metavar="JSON|@FILE",
        help='a click model\'s rows: {"dense": [[...], ...], "sparse": [[...], ...]}, sent as '
        '{"features": ...}; answers click probabilities',
    )
    pr.add_argument(
        "--text",
        action="append",
        default=None,
        metavar="TEXT",
        help='a text for a text classifier (repeat for several), sent as {"texts": [...]}',
    )
    _token_flag(pr)
    pr.set_defaults(fn=cmd_predict)

    gn = sub.add_parser(
        "generate", help="stream a language model's continuation of a prompt from an endpoint"
    )
    gn.add_argument("url", help="endpoint base URL, e.g. http://127.0.0.1:8000")
    gn.add_argument("prompt", help="the text to continue")
    gn.add_argument("--max-new-tokens", type=int, metavar="N", help="default 64")
    gn.add_argument("--temperature", type=float, metavar="T", help="0: greedy; default 1.0")
    gn.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest only")
    gn.add_argument("--seed", type=int, metavar="S", help="repeatable output (default: random)")
    _token_flag(gn)
    gn.set_defaults(fn=cmd_generate)

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
    for parser in (p, prep, insp, tr, sv, ex, pr, sb, bn):  # before or after the command's name
        parser.add_argument(
            "--verbose",
            action="store_true",
            default=False if parser is p else argparse.SUPPRESS,
            help=VERBOSE_HELP,
        )
    return p


def _token_flag(parser: argparse.ArgumentParser) -> None:
    """``--auth-token`` of the commands that call an endpoint."""
    parser.add_argument(
        "--auth-token",
        default=None,
        metavar="TOKEN",
        help=f"sent as 'Authorization: Bearer TOKEN' ({TOKEN_HELP})",
    )


def _key_value(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lepton_ray.errors import LeptonError, one_line

    entry_point(args.verbose)

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
