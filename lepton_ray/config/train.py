"""Training configs: one run (:class:`TrainConfig`) with its optimiser, input pipeline and workers.

The ``train`` section of a pipeline YAML, with ``optim``, ``data`` and ``scaling`` below it.
Credentials are never part of a config: only URIs and endpoints are.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lepton_ray.config.schema import Config, bad, setting
from lepton_ray.errors import ConfigError

SHUFFLES = ("auto", "global", "files", "none")
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def plain_name(value: str) -> str:
    """A run or application name: it becomes one folder, so no ``/``, no ``..``, no leading dot."""
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"must be a plain name (letters, digits, '.', '_', '-'; not starting with '.' or '-'), "
            f"got {value!r}"
        )
    return value


def augment_names(value: Any) -> Any:
    """``"random_crop,hflip"`` -> ``("random_crop", "hflip")``: a YAML or CLI string is a
    comma-separated list of names (not a sequence of one-letter names)."""
    if isinstance(value, str):
        return tuple(name.strip() for name in value.split(",") if name.strip())
    return value


def known_augmentations(names: tuple[str, ...]) -> tuple[str, ...]:
    # numpy only, imported when a DataConfig is built: the registry of names
    from lepton_ray.data.transforms import check_augment

    return check_augment(names)


def parse_fault(spec: str | None) -> tuple[int, int, int] | None:
    """``"EPOCH:STEP:RANK"`` (1-based epoch and step within it) -> a tuple, for fault injection."""
    if not spec:
        return None
    try:
        epoch, step, rank = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"fault_injection must look like EPOCH:STEP:RANK, got {spec!r}") from None
    return epoch, step, rank


def _fault(spec: str) -> str:
    try:
        epoch, step, rank = parse_fault(spec) or (1, 1, 0)
    except ValueError:
        raise ValueError(f"must look like EPOCH:STEP:RANK, got {spec!r}") from None
    if epoch < 1 or step < 1 or rank < 0:
        raise ValueError(f"epoch and step count from 1, ranks from 0; got {spec!r}")
    return spec


def _shuffle(value: bool | str) -> str:
    return {True: "auto", False: "none"}.get(value, value)  # type: ignore[arg-type]


def _worker_range(value: Any) -> Any:
    if isinstance(value, tuple) and value[0] > value[1]:
        raise ValueError(f"a (min, max) range needs min <= max, got {list(value)}")
    return value


@dataclass(kw_only=True, frozen=True)
class DataConfig(Config):
    """How training data is read and augmented."""

    augment: tuple[str, ...] = setting(
        ("random_crop",), parse=augment_names, check=known_augmentations
    )
    """Augmentations applied to training batches, by name (see ``lepton_ray.data.transforms``); a
    string is a comma-separated list."""
    shuffle: bool | Literal["auto", "global", "files", "none"] = setting("auto", check=_shuffle)
    """How the training set is reshuffled every epoch (the epoch plan, ``lepton_ray.train.sampling``):
    ``global`` (a permutation of all row ids from the seed and epoch, cut into global batches;
    each worker reads only its rows and mixes all of them), ``files`` (the shards in an order
    shuffled per epoch, each worker streaming one contiguous piece of them through a local buffer
    of ``shuffle_buffer_rows``: bounded memory for datasets of any size), ``none`` (stored order),
    or ``auto`` (``global`` while the dataset takes at most a quarter of the cluster's object
    store, else ``files``). ``True`` means ``auto``. A user's Ray Dataset is shuffled by Ray Data
    instead (``global``: ``random_shuffle``; ``files``: block order)."""
    shuffle_buffer_rows: int = setting(4096, ge=1)
    """Rows each worker mixes locally when ``shuffle`` is ``files``."""
    preprocess_batch_size: int = setting(1024, ge=1)
    """Rows per ``map_batches`` call on the CPU preprocessing workers (bigger: less per-call overhead),
    capped so that one call returns at most 16 MiB of decoded pixels (111 rows of 224x224x3)."""
    augment_on: Literal["auto", "cpu", "device"] = "auto"
    """Where ``augment`` runs: ``cpu`` (Ray Data's CPU workers, in ``map_batches``), ``device`` (the
    training loop, on the worker's GPU or CPU, with :mod:`lepton_ray.data.device_transforms`), or ``auto``
    (``device`` when training on GPUs, whose CPU cores cannot augment as fast as a GPU trains; else
    ``cpu``)."""
    feed: Literal["auto", "cache", "ring", "stream"] = "auto"
    """Where each worker's batches come from (``lepton_ray.train.feed``): ``cache`` (the whole
    training set read once, decoded and unaugmented, into each worker's device memory; every epoch
    drawn from it, augmented there), ``ring`` (for a prepared dataset larger than that: each worker
    streams its shards, in an order shuffled per epoch, as whole blocks into a window of
    ``ring_rows`` rows in device memory and samples every batch from it, augmenting there),
    ``stream`` (Ray Data batches every epoch, shuffled as ``shuffle`` says), or ``auto``: on GPUs,
    unless ``augment_on`` is ``cpu``, ``cache`` while the set takes at most ``cache_max_bytes``, else
    ``ring`` (``stream`` for a user's Ray Dataset or ``shuffle`` ``none``); ``stream`` on CPUs."""
    ring_rows: int = setting(262_144, ge=1)
    """Rows the ring holds on each worker's device (capped at the worker's rows per epoch and at
    half the GPU's free memory); a row is served about this many rows after it was read."""
    ring_read_cpus: int = setting(0, ge=0)
    """CPUs each worker's ring read may use at once (Ray Data's tasks); 0: half of the node's CPUs
    shared by its workers, at least one. More reads faster but slows a GPU's training loop
    (``lepton_ray.train.ring_reader.read_cpus``)."""
    cache: Literal["auto", "off", "device"] = "auto"
    """The older spelling of ``feed``: ``device`` is ``feed="cache"``, ``off`` is ``feed="stream"``."""
    cache_max_bytes: int = setting(4 << 30, ge=1)
    """The largest training set (decoded bytes) that ``feed="auto"`` keeps on each GPU."""
    deterministic: bool = True
    """Hand batches to the workers in a fixed order, so a run is reproducible given its seed and
    worker count (Ray Data's ``preserve_order``). False lets a fast block overtake a slow one."""
    verify_checksums: bool = False
    """Check each shard of a prepared dataset against its manifest's sha256 as training and
    validation read it (a changed shard fails the read, naming it). Row counts are always checked.
    Costs about as much CPU as decoding the shard (sha256: ~1 GB/s a core), every epoch."""

    def check(self) -> None:
        legacy = {"device": "cache", "off": "stream"}.get(self.cache)
        if legacy and self.feed not in ("auto", legacy):
            raise bad("cache", f"{self.cache!r} says feed {legacy!r}, but feed is {self.feed!r}")
        feed = legacy or self.feed
        if feed in ("cache", "ring") and self.augment_on == "cpu" and self.augment:
            key = "cache" if legacy else "feed"
            raise bad(
                key,
                f"{getattr(self, key)!r} augments on the device; it cannot go with augment_on 'cpu'",
            )
        if feed == "ring" and self.shuffle in (False, "none"):
            raise bad("feed", "'ring' shuffles within its window; stored order needs feed 'stream'")

    def chosen_feed(self, use_gpu: bool, dataset_bytes: int, prepared: bool = True) -> str:
        """``cache``, ``ring`` or ``stream``: the feed ``feed`` (or ``cache``) resolves to for a
        training set of ``dataset_bytes`` decoded (``prepared``: with row ids, not a user's Ray
        Dataset, which the ring cannot plan)."""
        legacy = {"device": "cache", "off": "stream"}.get(self.cache)
        if self.feed != "auto" or legacy:
            return legacy or self.feed
        if not use_gpu or self.augment_on == "cpu":
            return "stream"
        if dataset_bytes <= self.cache_max_bytes:
            return "cache"
        return "ring" if prepared and self.shuffle not in (False, "none") else "stream"

    def caches_on_device(self, use_gpu: bool, dataset_bytes: int) -> bool:
        """Whether each worker keeps the training set on its device (``chosen_feed`` is ``cache``)."""
        return self.chosen_feed(use_gpu, dataset_bytes) == "cache"

    def augments_on_device(self, use_gpu: bool, cached: bool = False) -> bool:
        """Whether the training loop, not Ray Data, applies ``augment`` (resolves ``auto``);
        ``cached``: the rows are in device memory (the cache or the ring), so always there."""
        return bool(self.augment) and (
            cached or self.augment_on == "device" or (self.augment_on == "auto" and use_gpu)
        )


@dataclass(kw_only=True, frozen=True)
class ScalingConfig(Config):
    """Where training runs: worker count, resources and placement."""

    num_workers: int | tuple[int, int] | Literal["auto"] = setting(2, ge=1, check=_worker_range)
    """An int, a ``[min, max]`` range for elastic training, or ``auto``."""
    use_gpu: bool = False
    """GPU workers (one GPU each unless ``resources_per_worker`` says a share); otherwise CPU workers."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """The collective backend: ``auto`` picks NCCL for workers with a whole GPU each and gloo for CPU
    workers and for workers sharing a GPU (``{"GPU": 0.5}``; NCCL refuses two ranks on one device)."""
    resources_per_worker: dict[str, float] | None = setting(None, ge=0)
    """Ray resources per worker, e.g. ``{"CPU": 2, "GPU": 1, "memory": 4e9}``."""
    placement_strategy: PlacementStrategy = "PACK"
    """Placement-group strategy for the workers' bundles."""
    elastic_resize_monitor_interval_s: float = setting(60.0, gt=0)
    """How often an elastic run checks whether it can grow."""
    wait_for_resources: bool = False
    """Skip the fail-fast placement check (for autoscaling clusters that add nodes on demand)."""

    def process_group_backend(self) -> str:
        """The backend ``auto`` resolves to (see ``backend``)."""
        if self.backend != "auto":
            return self.backend
        gpus = (self.resources_per_worker or {}).get("GPU", 1)
        return "nccl" if self.use_gpu and gpus >= 1 else "gloo"


@dataclass(kw_only=True, frozen=True)
class OptimConfig(Config):
    """Optimiser and learning-rate schedule (indexed by optimizer step, independent of world size)."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    """SGD with Nesterov momentum, or AdamW."""
    lr: float = setting(0.1, gt=0)
    """Peak learning rate for the global batch."""
    momentum: float = setting(0.9, ge=0, lt=1)
    """SGD momentum."""
    weight_decay: float = setting(5e-4, ge=0)
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    """Learning-rate schedule over the whole run."""
    warmup_fraction: float = setting(0.25, ge=0, lt=1)
    """Share of steps spent warming up (onecycle and cosine)."""
    grad_clip: float | None = setting(None, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""


@dataclass(kw_only=True, frozen=True)
class TrainConfig(Config):
    """One training run."""

    batch_size: int = setting(100, ge=1)
    """Global batch per optimizer step, summed over workers; fixed whatever the world size."""
    epochs: int = setting(10, ge=1)
    """Passes over the training set."""
    max_micro_batch: int | None = setting(None, ge=1)
    """Largest per-worker forward/backward; bigger shares are accumulated (no_sync)."""
    seed: int = setting(0, ge=0)
    """Seeds model init, shuffling and augmentation."""
    run_name: str | None = setting(None, check=plain_name)
    """Run folder under the storage root; same name + ``resume`` continues a run."""
    storage: str | None = None
    """Where runs and checkpoints go (path or s3://); default ``$LEPTON_STORE/runs``."""
    endpoint_url: str | None = None
    """S3-compatible endpoint for ``storage`` and dataset URIs."""
    max_failures: int = setting(2, ge=0)
    """Worker-group restarts (from the last checkpoint) before the run fails."""
    checkpoint_every_epochs: int = setting(1, ge=1)
    """Checkpoint cadence in epochs (the last epoch is always checkpointed)."""
    checkpoint_every_steps: int | None = setting(None, ge=1)
    """Also checkpoint every N optimizer steps, mid-epoch (sample-exact resume from there)."""
    progress_every_steps: int | None = setting(None, ge=1)
    """Progress updates per epoch sent to the driver (default: about ten; no barrier)."""
    progress_bar: bool = True
    """Draw a tqdm progress bar on the driver (terminal or notebook)."""
    compile: bool = False
    """Wrap the model in ``torch.compile`` on each worker."""
    strategy: Literal["ddp", "fsdp", "pipeline"] = "ddp"
    """How workers hold the model (``docs/sharded.md``): ``ddp`` (each a whole copy, gradients
    all-reduced), ``fsdp`` (parameters, gradients and optimizer state sharded per block with FSDP2,
    on one worker whole; checkpoints written by every rank, resumable at any worker count,
    ``lepton-ray export`` makes one file for Serve) or ``pipeline`` (the model's blocks split
    across workers)."""
    pipeline_stages: int | None = setting(None, ge=1)
    """``strategy="pipeline"``: stages per pipeline, each a worker holding some of the model's
    blocks; the worker count must be a multiple of it, the pipelines then data-parallel replicas
    (null: one stage per worker)."""
    pipeline_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """``strategy="pipeline"``: ``gpipe`` (every micro-batch forward, then every one backward) or
    ``1f1b`` (one forward, one backward in turn: at most ``pipeline_stages`` micro-batches'
    activations held at once)."""
    pipeline_micro_batches: int | None = setting(None, ge=1)
    """``strategy="pipeline"``: micro-batches each pipeline splits its rows of a step into (null:
    two per stage, one for a single stage); ``1f1b`` needs at least one per stage."""
    early_stopping_patience: int | None = setting(None, ge=1)
    """Stop after this many epochs without improvement of ``monitor``."""
    monitor: Literal[
        "val_loss", "val_accuracy", "val_perplexity", "val_auc", "train_loss", "train_accuracy"
    ] = "val_loss"
    """Metric for early stopping and the best checkpoint: losses and ``val_perplexity`` (text) are
    minimised, accuracies and ``val_auc`` (click data) maximised; a ``val_*`` metric without a
    validation set falls back to ``train_loss``."""
    resume: bool = False
    """Continue the run named ``run_name`` from its last checkpoint (any world size)."""
    record_sample_ids: bool = False
    """Write the ids trained at every step to ``<run>/sample_ids/`` (audits, tests)."""
    fault_injection: str | None = setting(None, check=_fault)
    """Chaos testing: ``"EPOCH:STEP:RANK"`` raises on that rank at that step, first attempt only
    (quote it in YAML, which reads 2:1:0 as a number)."""
    keep_checkpoints: int = setting(2, ge=1)
    """How many checkpoints to keep (plus the best)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input pipeline."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers and resources."""

    def check(self) -> None:
        if self.resume and not self.run_name:
            raise bad("resume", "needs run_name: the run to continue")
        if self.strategy == "pipeline":
            self.check_pipeline()

    def check_pipeline(self) -> None:
        """Workers, stages and micro-batches that fit together, checked before Ray starts. An
        elastic range works with one stage per worker (``pipeline_stages`` null: as many stages as
        the workers of the moment, the whole model checkpointed, so a resize re-cuts it) or with
        one stage (data-parallel replicas); it is checked at its largest count."""
        workers, stages = self.scaling.num_workers, self.pipeline_stages
        if workers == "auto":
            raise bad(
                "strategy",
                "'pipeline' needs a worker count or a (min, max) range, not num_workers 'auto'",
            )
        if not isinstance(workers, int):
            if stages not in (None, 1):
                raise bad(
                    "pipeline_stages",
                    f"{stages} stages need a fixed worker count (a multiple of them), not "
                    f"num_workers {workers!r}; for an elastic range leave pipeline_stages null "
                    f"(one stage per worker) or 1",
                )
            workers = workers[1]
        stages = workers if stages is None else stages
        if workers % stages:
            raise bad(
                "pipeline_stages",
                f"{stages} does not divide the {workers} workers into whole pipelines",
            )
        micro = self.pipeline_micro_batches
        if self.pipeline_schedule == "1f1b" and micro is not None and micro < stages:
            raise bad(
                "pipeline_micro_batches",
                f"{micro} is fewer than the {stages} stages, which '1f1b' needs at least",
            )


_OPTIM_FIELDS = frozenset(f.name for f in dataclasses.fields(OptimConfig))
_TRAIN_FIELDS = frozenset(
    f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("optim", "data", "scaling")
)


def build_train_config(
    *,
    scaling: ScalingConfig,
    data: DataConfig | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    **kwargs: Any,
) -> TrainConfig:
    """The :class:`TrainConfig` that ``Trainer.fit(..., **kwargs)`` describes.

    ``kwargs`` are :class:`TrainConfig` and :class:`OptimConfig` field names, flat (``lr=0.05,
    run_name="r"``); ``batch_size``/``epochs`` of None take the config's defaults. An unknown name
    fails with ``unknown fit() argument 'x'``; a bad value with the field's usual one-line error.

        >>> build_train_config(scaling=ScalingConfig(num_workers=1), epochs=3, lr=0.05).optim.lr
        0.05
    """
    unknown = sorted(set(kwargs) - _TRAIN_FIELDS - _OPTIM_FIELDS)
    if unknown:
        raise ConfigError(f"unknown fit() argument '{unknown[0]}'")
    given = {"batch_size": batch_size, "epochs": epochs}
    return TrainConfig(
        **{k: v for k, v in given.items() if v is not None},
        optim=OptimConfig(**{k: v for k, v in kwargs.items() if k in _OPTIM_FIELDS}),
        data=data or DataConfig(),
        scaling=scaling,
        **{k: v for k, v in kwargs.items() if k in _TRAIN_FIELDS},
    )
