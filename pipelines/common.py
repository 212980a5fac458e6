"""What every pipeline shares: the YAML config, ``--set`` overrides, ``--smoke-test``, exit codes.

    python -m pipelines.NAME --config pipelines/configs/mnist.yaml [--set train.epochs=3] [key=value ...]
                             [--smoke-test]

One YAML file describes an experiment; each pipeline reads the sections it needs. The sections
map one to one onto typed configs: ``dataset`` -> :class:`DatasetSpec`, ``model`` ->
:class:`ModelSpec`, ``train`` -> :class:`lepton_ray.config.TrainConfig` (with its ``optim``,
``data`` and ``scaling``), ``evaluate`` -> :class:`EvalSpec`, ``promote`` -> :class:`PromoteSpec`
(its ``serve`` holds :class:`lepton_ray.serve.ServeConfig` fields). An unknown key anywhere, in the
file or in an override, is a one-line error naming its dotted path.

Exit codes: 0 success, 2 a user error (config, data, storage; one line on stderr), 1 a failure
(training failed, a promotion gate not met, anything unexpected). ``lepton-ray submit`` retries a
job that exits 1, never one that exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lepton_ray.config import TrainConfig, from_dict
from lepton_ray.errors import ConfigError, LeptonError, TrainingError, one_line

# Set by ``lepton-ray submit`` (lepton_ray.jobs) in every attempt's runtime_env.
RUN_NAME_ENV, RESUME_ENV, ATTEMPT_ENV = "LEPTON_RUN_NAME", "LEPTON_RESUME", "LEPTON_ATTEMPT"
SMOKE_ROWS = 500


@dataclass(kw_only=True, frozen=True)
class DatasetSpec:
    """Where the prepared dataset comes from and where it lives."""

    source: str = "mnist5k"
    """What ``prepare_data`` reads: mnist5k, torchvision:NAME (with ``root``), imagefolder:PATH, parquet:PATH."""
    uri: str | None = None
    """The prepared dataset's root (splits below it); default ``<store>/datasets/<source name>``."""
    root: str | None = None
    """Folder a torchvision dataset was downloaded to."""
    skip_bad: bool = False
    """Leave out unreadable or mismatched images (counted in the manifest) instead of failing."""
    limit_rows: int | None = None
    """Keep at most this many rows per split (a seeded random subset)."""
    encoding: Literal["raw", "png"] = "raw"
    """Rows as raw pixels (fastest to read) or PNG (smaller for natural images)."""
    train_split: str = "train"
    """The split to train on."""
    val_split: str | None = "test"
    """The split to validate and evaluate on (none: no validation)."""

    def __post_init__(self) -> None:
        if self.limit_rows is not None and (
            isinstance(self.limit_rows, bool)
            or not isinstance(self.limit_rows, int)
            or self.limit_rows < 1
        ):
            raise ConfigError(
                f"dataset.limit_rows must be a whole number > 0, got {self.limit_rows!r}"
            )
        if self.encoding not in ("raw", "png"):
            raise ConfigError(f"dataset.encoding must be raw or png, got {self.encoding!r}")


@dataclass(kw_only=True, frozen=True)
class ModelSpec:
    """The architecture to train, from the registry in ``lepton_ray.models``."""

    name: str = "cnn"
    """Registered architecture (cnn, resnet18)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments (``in_channels`` and ``num_classes`` come from the dataset)."""


@dataclass(kw_only=True, frozen=True)
class EvalSpec:
    """Which checkpoint to evaluate, on which split."""

    checkpoint: str = "best"
    """``best`` or ``last`` checkpoint of ``train.run_name``, or a checkpoint URI."""
    split: str | None = None
    """Split to evaluate on; default ``dataset.val_split``."""
    batch_size: int = 512
    """Images per forward pass."""


@dataclass(kw_only=True, frozen=True)
class PromoteSpec:
    """Promotion to serving: pick a checkpoint, gate it, point the serving config at it, deploy."""

    checkpoint: str = "best"
    """``best`` or ``last`` checkpoint of ``train.run_name``, or a checkpoint URI (e.g. to roll back)."""
    min_accuracy: float | None = None
    """Evaluate first and refuse the promotion below this accuracy."""
    deploy: bool = False
    """Also deploy (or roll) the Serve application on the Ray cluster."""
    host: str = "127.0.0.1"
    """HTTP host when this starts Serve."""
    port: int = 8000
    """HTTP port when this starts Serve."""
    write_config: str | None = None
    """Also write the Serve config file (for ``serve deploy``) to this local path."""
    serve: dict[str, Any] = field(default_factory=dict, metadata={"schema": "ServeConfig"})
    """:class:`lepton_ray.serve.ServeConfig` fields (all but ``checkpoint``)."""


@dataclass(kw_only=True, frozen=True)
class PipelineConfig:
    """One experiment: data, model, training, evaluation and promotion."""

    store: str | None = None
    """Object-store root (path or s3://bucket/prefix); default ``$LEPTON_STORE`` or ~/.lepton_ray/store."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (else ``$LEPTON_S3_ENDPOINT``)."""
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    """Dataset source and location."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """Architecture."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training run (``storage`` defaults to ``<store>/runs``)."""
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    """Evaluation."""
    promote: PromoteSpec = field(default_factory=PromoteSpec)
    """Promotion to serving."""
    smoke_test: bool = False
    """The cheap version (what ``--smoke-test`` sets): see :func:`smoke`."""

    # --- derived locations -------------------------------------------------------------------
    @property
    def root(self) -> str:
        from lepton_ray.storage import default_store

        return (self.store or default_store()).rstrip("/")

    @property
    def dataset_uri(self) -> str:
        name = (
            self.dataset.source.split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1].lower()
            or "dataset"
        )
        return (self.dataset.uri or f"{self.root}/datasets/{name}").rstrip("/")

    @property
    def runs_uri(self) -> str:
        return (self.train.storage or f"{self.root}/runs").rstrip("/")


# --- loading ---------------------------------------------------------------------------------
def _schema(f: dataclasses.Field) -> type | None:
    """The config class a field holds (nested dataclass, or a dict validated against one)."""
    if f.metadata.get("schema") == "ServeConfig":
        from lepton_ray.serve.config import ServeConfig

        return ServeConfig
    factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
    return factory if dataclasses.is_dataclass(factory) else None


def unknown_key(cls: type, data: Any, prefix: str = "") -> str | None:
    """The dotted path of the first key in ``data`` that ``cls`` (recursively) does not have."""
    if not isinstance(data, dict):
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        path = f"{prefix}{key}"
        if key not in fields:
            return path
        sub = _schema(fields[key])
        if sub is not None and isinstance(data[key], dict):
            found = unknown_key(sub, data[key], path + ".")
            if found:
                return found
    return None


def _known(cls: type, path: str) -> str:
    """The field names valid at the parent of ``path``."""
    for part in path.split(".")[:-1]:
        f = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        cls = _schema(f) if f else None
        if cls is None:
            return ""
    return ", ".join(f.name for f in dataclasses.fields(cls))


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=3`` -> ``("train.epochs", 3)``; the value is parsed as YAML (3, 0.1, true, [a, b], null)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key.path=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, int | float) and ":" in value:  # YAML 1.1 reads 2:1:0 as a base-60 number
        parsed = value
    return key.strip(), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of ``raw`` with each dotted key set (intermediate sections are created)."""
    out = json.loads(json.dumps(raw))
    for key, value in overrides:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


def load_config(
    path: str | os.PathLike | None, overrides: list[str] = (), *, smoke_test: bool = False
) -> PipelineConfig:
    """Read a pipeline YAML, apply ``key=value`` overrides, check every key, build the typed config."""
    import yaml

    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {one_line(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    pairs = [parse_override(o) for o in overrides]
    for where, data in ((f" in {path}", raw), (" in the overrides", apply_overrides(raw, pairs))):
        bad = unknown_key(PipelineConfig, data)
        if bad:
            known = _known(PipelineConfig, bad)
            raise ConfigError(
                f"unknown key '{bad}'{where}" + (f" (known there: {known})" if known else "")
            )
    raw = apply_overrides(raw, pairs)
    serve = (raw.get("promote") or {}).get("serve") or {}
    if serve.get("checkpoint"):
        raise ConfigError(
            "promote.serve.checkpoint is chosen by promote.checkpoint (best, last or a URI)"
        )
    try:
        cfg = from_dict(PipelineConfig, raw)
    except TypeError as exc:  # a section given as a scalar, e.g. "train: 3"
        raise ConfigError(f"bad config structure: {one_line(exc)}") from None
    if smoke_test or cfg.smoke_test:
        cfg = smoke(cfg, keep={k for k, _ in pairs})
    return cfg


def smoke(cfg: PipelineConfig, keep: set[str] = frozenset()) -> PipelineConfig:
    """The cheap version of ``cfg``: a 500-row copy of the dataset (``<uri>-smoke``), one epoch,
    one worker, a run named ``<run_name>-smoke``, a promotion gate of 0 (the evaluation still
    runs). Keys given as overrides (``keep``) stay as given."""

    def pick(key: str, value: Any, current: Any) -> Any:
        return current if key in keep else value

    d, t = cfg.dataset, cfg.train
    dataset = dataclasses.replace(
        d,
        uri=cfg.dataset_uri + "-smoke",
        limit_rows=pick(
            "dataset.limit_rows", min(d.limit_rows or SMOKE_ROWS, SMOKE_ROWS), d.limit_rows
        ),
    )
    scaling = dataclasses.replace(
        t.scaling, num_workers=pick("train.scaling.num_workers", 1, t.scaling.num_workers)
    )
    train = dataclasses.replace(
        t,
        epochs=pick("train.epochs", 1, t.epochs),
        batch_size=pick("train.batch_size", min(t.batch_size, 50), t.batch_size),
        progress_bar=pick("train.progress_bar", False, t.progress_bar),
        scaling=scaling,
        run_name=f"{t.run_name}-smoke"
        if t.run_name and "train.run_name" not in keep
        else t.run_name,
    )
    gate = cfg.promote.min_accuracy
    promote = dataclasses.replace(
        cfg.promote, min_accuracy=pick("promote.min_accuracy", None if gate is None else 0.0, gate)
    )
    return dataclasses.replace(cfg, dataset=dataset, train=train, promote=promote, smoke_test=True)


# --- runs and checkpoints --------------------------------------------------------------------
def run_name_and_resume(cfg: PipelineConfig) -> tuple[str, bool]:
    """The run to train: ``train.run_name``, else the one ``lepton-ray submit`` chose for every
    attempt (``$LEPTON_RUN_NAME``), else a fresh one; resumed when asked to or on a retry."""
    name = (
        cfg.train.run_name
        or os.environ.get(RUN_NAME_ENV)
        or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    return name, cfg.train.resume or os.environ.get(RESUME_ENV) == "1"


def find_checkpoint(cfg: PipelineConfig, which: str) -> str:
    """A checkpoint URI: ``best`` or ``last`` of ``train.run_name`` (or ``$LEPTON_RUN_NAME``), or ``which`` itself."""
    from lepton_ray import storage
    from lepton_ray.checkpoint import MANIFEST

    if which not in ("best", "last"):
        return which
    name = cfg.train.run_name or os.environ.get(RUN_NAME_ENV)
    if not name:
        raise ConfigError(
            f"which run? set train.run_name (or pass a checkpoint URI instead of '{which}')"
        )
    run = storage.resolve(f"{cfg.runs_uri}/{name}", cfg.endpoint_url)
    if which == "best" and run.join("best.json").exists():
        return run.join("best.json").read_json()["uri"]
    done = [
        n
        for n in run.listdir()
        if n.startswith("checkpoint_epoch") and run.join(n, MANIFEST).exists()
    ]
    if not done:
        raise ConfigError(f"run '{name}' has no complete checkpoint at {run.uri}")
    return run.join(max(done)).uri  # names are zero-padded: epoch, then step


# --- the entry point -------------------------------------------------------------------------
def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m pipelines.{name}", description=description)
    p.add_argument(
        "--config", default=None, help="pipeline YAML (e.g. pipelines/configs/mnist.yaml)"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="more overrides, as with --set"
    )
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"cheap run: a {SMOKE_ROWS}-row dataset copy, 1 epoch, 1 worker",
    )
    return p


def main(
    name: str,
    doc: str,
    run: Callable[[PipelineConfig], dict[str, Any]],
    argv: list[str] | None = None,
) -> int:
    """Parse arguments, load the config, run the pipeline, print its summary as JSON; the exit code."""
    args = parser(name, doc.strip().split("\n\n")[0]).parse_args(argv)
    prog = f"pipelines.{name}"
    try:
        cfg = load_config(args.config, [*args.sets, *args.overrides], smoke_test=args.smoke_test)
        summary = run(cfg)
    except TrainingError as exc:
        print(f"{prog}: failed: {one_line(exc)}", file=sys.stderr)
        return 1
    except PipelineFailure as exc:
        print(f"{prog}: failed: {exc}", file=sys.stderr)
        return 1
    except LeptonError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(summary, indent=2, default=str), flush=True)
    return 0


class PipelineFailure(Exception):
    """The pipeline ran but its outcome is a failure (e.g. a promotion gate not met): exit 1."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
