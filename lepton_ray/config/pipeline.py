"""One experiment in one YAML file: :class:`PipelineConfig` and its sections.

``dataset`` -> :class:`DatasetSpec`, ``model`` -> :class:`ModelSpec`, ``train`` ->
:class:`TrainConfig`, ``evaluate`` -> :class:`EvalSpec`, ``promote`` -> :class:`PromoteSpec` (its
``serve`` holds :class:`ServeConfig` fields). The pipelines in ``pipelines/`` and ``lepton-ray train
--config`` read it; :func:`smoke` is its cheap version.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from lepton_ray.config.schema import Config, FieldError, bad, mismatch, secret_fields, setting
from lepton_ray.config.serve import ServeConfig, module_list
from lepton_ray.config.train import TrainConfig, plain_name

SMOKE_ROWS = 500
"""Rows per split in a smoke run's copy of the dataset."""


@dataclass(kw_only=True, frozen=True)
class DatasetSpec(Config):
    """Where the prepared dataset comes from and where it lives."""

    source: str = "mnist5k"
    """What ``prepare_data`` reads: mnist5k, torchvision:NAME (with ``root``), imagefolder:PATH,
    parquet:PATH; text as byte tokens: pydoc-topics, text:PATH, text-parquet:PATH[:COLUMN];
    labelled text: python-snippets, text-csv:PATH[:TEXTCOL:LABELCOL],
    text-label-parquet:PATH[:TEXTCOL:LABELCOL]."""
    uri: str | None = None
    """The prepared dataset's root (splits below it); default ``<store>/datasets/<source name>``."""
    root: str | None = None
    """Folder a torchvision dataset was downloaded to."""
    skip_bad: bool = False
    """Leave out unreadable or mismatched images (counted in the manifest) instead of failing."""
    limit_rows: int | None = setting(None, ge=1)
    """Keep at most this many rows per split (a seeded random subset)."""
    encoding: Literal["raw", "png"] = "raw"
    """Rows as raw pixels (fastest to read) or PNG (smaller for natural images)."""
    block_size: int | None = setting(None, ge=2)
    """Text sources: tokens a model reads per block (a row holds one more); null: 256. Labelled
    text: tokens per text (longer ones are cut); null: 128."""
    train_split: str = setting("train", check=plain_name)
    """The split to train on."""
    val_split: str | None = setting("test", check=plain_name)
    """The split to validate and evaluate on (null: no validation)."""


# Given by the dataset (``DatasetInfo.model_kwargs``), never by ``model.kwargs``.
_FROM_DATA = ("in_channels", "num_classes", "vocab_size", "block_size", "cardinalities", "dense")


@dataclass(kw_only=True, frozen=True)
class ModelSpec(Config):
    """The architecture to train, from the registry in ``lepton_ray.models``."""

    name: str = "cnn"
    """Registered architecture (cnn, resnet18; gpt for text, bert for labelled text, dlrm for
    click data)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments (``in_channels`` and ``num_classes``, a text dataset's
    ``vocab_size`` and ``block_size``, a click dataset's ``cardinalities`` and ``dense`` come from
    the dataset)."""

    def check(self) -> None:
        # The registry imports torch: only here, when a model is named, never at import.
        from lepton_ray.models import _REGISTRY

        factory = _REGISTRY.get(self.name)
        if factory is None:
            raise bad("name", f"unknown model '{self.name}' (registered: {', '.join(_REGISTRY)})")
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        allowed = [n for n in params if n not in _FROM_DATA]
        hints = _constructor_hints(factory)
        for key, value in self.kwargs.items():
            if key in _FROM_DATA:
                raise bad(f"kwargs.{key}", "comes from the dataset; leave it out")
            if not takes_any and key not in params:
                raise bad(
                    f"kwargs.{key}",
                    f"'{self.name}' takes no argument '{key}' "
                    + (f"(it takes: {', '.join(allowed)})" if allowed else "(it takes none)"),
                )
            try:
                wrong = mismatch(value, hints[key]) if key in hints else None
            except TypeError:  # an annotation the schema does not model: the model checks it
                wrong = None
            if wrong:
                raise bad(f"kwargs.{key}", wrong)


def _constructor_hints(factory: Any) -> dict[str, Any]:
    """The annotations of a registered factory's arguments (a class: its ``__init__``); none when
    they cannot be resolved."""
    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - a forward reference we cannot resolve: no type check
        return {}


@dataclass(kw_only=True, frozen=True)
class EvalSpec(Config):
    """Which checkpoint to evaluate, on which split."""

    checkpoint: str = "best"
    """``best`` or ``last`` checkpoint of ``train.run_name``, or a checkpoint URI."""
    split: str | None = setting(None, check=plain_name)
    """Split to evaluate on; default ``dataset.val_split``."""
    batch_size: int = setting(512, ge=1)
    """Images per forward pass."""
    trusted_modules: tuple[str, ...] = setting((), parse=module_list)
    """Module prefixes whose ``nn.Module`` classes the evaluated checkpoint may name, as
    ``promote.serve.trusted_modules`` (empty: only registered architectures)."""


class ServeFields(dict):
    """``promote.serve``: a plain dict whose ``repr`` hides secret values (a logged config must not
    show the token; :func:`~lepton_ray.config.to_dict` leaves them out of anything written)."""

    def __repr__(self) -> str:
        hidden = secret_fields(ServeConfig)
        return repr({k: "<secret>" if k in hidden else v for k, v in self.items()})


@dataclass(kw_only=True, frozen=True)
class PromoteSpec(Config):
    """Promotion to serving: pick a checkpoint, gate it, point the serving config at it, deploy."""

    checkpoint: str = "best"
    """``best`` or ``last`` checkpoint of ``train.run_name``, or a checkpoint URI (e.g. to roll back)."""
    min_accuracy: float | None = setting(None, ge=0, le=1)
    """Classifiers: evaluate first and refuse the promotion below this accuracy."""
    min_auc: float | None = setting(None, ge=0, le=1)
    """Click models: evaluate first and refuse the promotion below this AUC."""
    max_perplexity: float | None = setting(None, ge=1)
    """Language models: evaluate first and refuse the promotion above this perplexity."""
    deploy: bool = False
    """Also deploy (or roll) the Serve application on the Ray cluster."""
    host: str = "127.0.0.1"
    """HTTP host when this starts Serve."""
    port: int = setting(8000, ge=1, le=65535)
    """HTTP port when this starts Serve."""
    write_config: str | None = None
    """Also write the Serve config file (for ``serve deploy``) to this local path."""
    serve: dict[str, Any] = field(default_factory=dict, metadata={"schema": lambda: ServeConfig})
    """:class:`ServeConfig` fields (all but ``checkpoint``, which ``checkpoint`` above chooses)."""

    def check(self) -> None:
        if "checkpoint" in self.serve:
            raise bad("serve.checkpoint", "is chosen by promote.checkpoint (best, last or a URI)")
        known = [f.name for f in dataclasses.fields(ServeConfig) if f.name != "checkpoint"]
        for key in self.serve:
            if key not in known:
                raise bad(f"serve.{key}", f"unknown key (known there: {', '.join(known)})")
        try:  # the values as promote will use them; the checkpoint is only known then
            cfg = ServeConfig(checkpoint="promote.checkpoint", **self.serve)
        except FieldError as exc:
            raise bad(f"serve.{exc.key}", exc.problem) from None
        object.__setattr__(self, "serve", ServeFields({k: getattr(cfg, k) for k in self.serve}))

    def serve_config(self, checkpoint: str, **defaults: Any) -> ServeConfig:
        """The :class:`ServeConfig` to promote ``checkpoint`` with (``defaults`` under ``serve``)."""
        return ServeConfig(checkpoint=checkpoint, **{**defaults, **self.serve})


@dataclass(kw_only=True, frozen=True)
class PipelineConfig(Config):
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
    """The cheap version (what ``--smoke-test`` sets): a 500-row copy of the dataset, one epoch,
    one worker, a run named ``<run_name>-smoke``, promotion gates any checkpoint passes."""

    @property
    def root(self) -> str:
        """The object-store root: ``store``, else ``$LEPTON_STORE``, else ~/.lepton_ray/store."""
        from lepton_ray.storage import default_store

        return (self.store or default_store()).rstrip("/")

    @property
    def dataset_uri(self) -> str:
        """The prepared dataset's root: ``dataset.uri``, else ``<root>/datasets/<source name>``."""
        kind, _, arg = self.dataset.source.partition(":")
        if "=" in arg and "/" not in arg:  # options (synthetic-ctr:rows=N,...): the kind names it
            arg = kind
        name = (arg or kind).rstrip("/").rsplit("/", 1)[-1].lower() or "dataset"
        return (self.dataset.uri or f"{self.root}/datasets/{name}").rstrip("/")

    @property
    def runs_uri(self) -> str:
        """Where runs go: ``train.storage``, else ``<root>/runs``."""
        return (self.train.storage or f"{self.root}/runs").rstrip("/")


def smoke(cfg: PipelineConfig, keep: frozenset[str] | set[str] = frozenset()) -> PipelineConfig:
    """The cheap version of ``cfg``: a 500-row copy of the dataset (``<uri>-smoke``), one epoch,
    one worker, a run named ``<run_name>-smoke``, promotion gates any checkpoint passes (0, or
    no bound on perplexity; the evaluation still runs). Keys given as overrides (``keep``,
    dotted) stay as given."""

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
    # Every gate set becomes one any checkpoint passes, so the evaluation still runs.
    gates = {"min_accuracy": 0.0, "min_auc": 0.0, "max_perplexity": sys.float_info.max}
    p = cfg.promote
    promote = dataclasses.replace(
        p,
        **{
            k: pick(f"promote.{k}", None if getattr(p, k) is None else v, getattr(p, k))
            for k, v in gates.items()
        },
    )
    return dataclasses.replace(cfg, dataset=dataset, train=train, promote=promote, smoke_test=True)
