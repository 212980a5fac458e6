"""Typed configuration: one small frozen dataclass per component, validated on construction.

YAML files in ``pipelines/configs/`` map onto these one to one (:func:`from_dict` rejects unknown
keys by name). Credentials are never part of a config: only URIs and endpoints are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lepton_ray.errors import ConfigError

SHUFFLES = ("auto", "global", "files", "none")
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """How training data is read and augmented."""

    augment: tuple[str, ...] = ("random_crop",)
    """Augmentations applied to training batches, by name (see ``lepton_ray.transforms``)."""
    shuffle: bool | Literal["auto", "global", "files", "none"] = "auto"
    """How the training set is reshuffled every epoch: ``global`` (Ray Data's all-to-all
    ``random_shuffle``: the whole epoch passes through the object store), ``files`` (shard order
    shuffled per epoch plus a local buffer of ``shuffle_buffer_rows`` in each worker: streams with
    bounded memory), ``none``, or ``auto`` (``global`` while the dataset takes at most a quarter
    of the cluster's object store, else ``files``). ``True`` means ``auto``."""
    shuffle_buffer_rows: int = 4096
    """Rows each worker mixes locally when ``shuffle`` is ``files``."""
    preprocess_batch_size: int = 1024
    """Rows per ``map_batches`` call on the CPU preprocessing workers (bigger: less per-call overhead)."""
    augment_on: Literal["auto", "cpu", "device"] = "auto"
    """Where ``augment`` runs: ``cpu`` (Ray Data's CPU workers, in ``map_batches``), ``device`` (the
    training loop, on the worker's GPU or CPU, with :mod:`lepton_ray.device_transforms`), or ``auto``
    (``device`` when training on GPUs, whose CPU cores cannot augment as fast as a GPU trains; else
    ``cpu``)."""
    cache: Literal["auto", "off", "device"] = "auto"
    """``device``: each worker reads the whole training set once (decoded, unaugmented uint8) into
    its device's memory and draws every epoch from it, augmenting there
    (:mod:`lepton_ray.train.device_cache`); no Ray Data work per epoch. ``off``: stream every epoch
    through Ray Data. ``auto``: ``device`` when training on GPUs, the set takes at most
    ``cache_max_bytes`` and ``augment_on`` is not ``cpu``; else ``off``."""
    cache_max_bytes: int = 4 << 30
    """The largest training set (decoded bytes) that ``cache="auto"`` keeps on each GPU."""
    deterministic: bool = True
    """Hand batches to the workers in a fixed order, so a run is reproducible given its seed and
    worker count (Ray Data's ``preserve_order``). False lets a fast block overtake a slow one."""

    def __post_init__(self) -> None:
        from lepton_ray.transforms import check_augment

        try:
            object.__setattr__(self, "augment", check_augment(tuple(self.augment)))
        except ValueError as exc:
            raise ConfigError(f"DataConfig.augment: {exc}") from None
        _positive(self, "preprocess_batch_size")
        _positive(self, "shuffle_buffer_rows")
        shuffle = {True: "auto", False: "none"}.get(self.shuffle, self.shuffle)
        if shuffle not in SHUFFLES:
            raise ConfigError(
                f"DataConfig.shuffle: {self.shuffle!r} is not one of {', '.join(SHUFFLES)}"
            )
        object.__setattr__(self, "shuffle", shuffle)
        if self.augment_on not in ("auto", "cpu", "device"):
            raise ConfigError(
                f"DataConfig.augment_on: {self.augment_on!r} is not one of auto, cpu, device"
            )
        if self.cache not in ("auto", "off", "device"):
            raise ConfigError(f"DataConfig.cache: {self.cache!r} is not one of auto, off, device")
        if self.cache == "device" and self.augment_on == "cpu" and self.augment:
            raise ConfigError(
                "DataConfig: cache='device' augments on the device; it cannot be combined with "
                "augment_on='cpu'"
            )
        _positive(self, "cache_max_bytes")

    def caches_on_device(self, use_gpu: bool, dataset_bytes: int) -> bool:
        """Whether each worker keeps the training set on its device (resolves ``cache="auto"``)."""
        if self.cache != "auto":
            return self.cache == "device"
        return use_gpu and self.augment_on != "cpu" and dataset_bytes <= self.cache_max_bytes

    def augments_on_device(self, use_gpu: bool, cached: bool = False) -> bool:
        """Whether the training loop, not Ray Data, applies ``augment`` (resolves ``auto``)."""
        return bool(self.augment) and (
            cached or self.augment_on == "device" or (self.augment_on == "auto" and use_gpu)
        )


@dataclass(kw_only=True, frozen=True)
class ScalingConfig:
    """Where training runs: worker count, resources and placement."""

    num_workers: int | tuple[int, int] | Literal["auto"] = 2
    """An int, a ``(min, max)`` range for elastic training, or ``"auto"``."""
    use_gpu: bool = False
    """GPU workers (one GPU each unless ``resources_per_worker`` says a share); otherwise CPU workers."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """The collective backend: ``auto`` picks NCCL for workers with a whole GPU each and gloo for CPU
    workers and for workers sharing a GPU (``{"GPU": 0.5}``; NCCL refuses two ranks on one device)."""
    resources_per_worker: dict[str, float] | None = None
    """Ray resources per worker, e.g. ``{"CPU": 2, "GPU": 1, "memory": 4e9}``."""
    placement_strategy: PlacementStrategy = "PACK"
    """Placement-group strategy for the workers' bundles."""
    elastic_resize_monitor_interval_s: float = 60.0
    """How often an elastic run checks whether it can grow."""
    wait_for_resources: bool = False
    """Skip the fail-fast placement check (for autoscaling clusters that add nodes on demand)."""

    def __post_init__(self) -> None:
        nw = self.num_workers
        if isinstance(nw, list):
            nw = tuple(nw)
            object.__setattr__(self, "num_workers", nw)
        if nw == "auto":
            pass
        elif isinstance(nw, bool) or not (
            isinstance(nw, int)
            or (isinstance(nw, tuple) and len(nw) == 2 and all(isinstance(v, int) for v in nw))
        ):
            raise ConfigError(
                f"ScalingConfig.num_workers must be an int, a (min, max) pair or 'auto', got {nw!r}"
            )
        elif isinstance(nw, int) and nw < 1:
            raise ConfigError(f"ScalingConfig.num_workers must be >= 1, got {nw}")
        elif isinstance(nw, tuple) and not (1 <= nw[0] <= nw[1]):
            raise ConfigError(
                f"ScalingConfig.num_workers range must satisfy 1 <= min <= max, got {nw}"
            )
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(
                f"ScalingConfig.backend must be auto, nccl or gloo, got {self.backend!r}"
            )
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(
                f"ScalingConfig.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {self.placement_strategy!r}"
            )

    def process_group_backend(self) -> str:
        """The backend ``auto`` resolves to (see ``backend``)."""
        if self.backend != "auto":
            return self.backend
        gpus = (self.resources_per_worker or {}).get("GPU", 1)
        return "nccl" if self.use_gpu and gpus >= 1 else "gloo"


@dataclass(kw_only=True, frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule (indexed by optimizer step, independent of world size)."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    """SGD with Nesterov momentum, or AdamW."""
    lr: float = 0.1
    """Peak learning rate for the global batch."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    """Learning-rate schedule over the whole run."""
    warmup_fraction: float = 0.25
    """Share of steps spent warming up (onecycle and cosine)."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value."""

    def __post_init__(self) -> None:
        _positive(self, "lr")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(
                f"OptimConfig.optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}"
            )
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise ConfigError(
                f"OptimConfig.schedule must be onecycle, cosine or constant, got {self.schedule!r}"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(
                f"OptimConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}"
            )


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """One training run."""

    batch_size: int = 100
    """Global batch per optimizer step, summed over workers; fixed whatever the world size."""
    epochs: int = 10
    """Passes over the training set."""
    max_micro_batch: int | None = None
    """Largest per-worker forward/backward; bigger shares are accumulated (no_sync)."""
    seed: int = 0
    """Seeds model init, shuffling and augmentation."""
    run_name: str | None = None
    """Run folder under the storage root; same name + ``resume`` continues a run."""
    storage: str | None = None
    """Where runs and checkpoints go (path or s3://); default ``$LEPTON_STORE/runs``."""
    endpoint_url: str | None = None
    """S3-compatible endpoint for ``storage`` and dataset URIs."""
    max_failures: int = 2
    """Worker-group restarts (from the last checkpoint) before the run fails."""
    checkpoint_every_epochs: int = 1
    """Checkpoint cadence in epochs (the last epoch is always checkpointed)."""
    checkpoint_every_steps: int | None = None
    """Also checkpoint every N optimizer steps, mid-epoch (sample-exact resume from there)."""
    progress_every_steps: int | None = None
    """Progress updates per epoch sent to the driver (default: about ten; no barrier)."""
    progress_bar: bool = True
    """Draw a tqdm progress bar on the driver (terminal or notebook)."""
    compile: bool = False
    """Wrap the model in ``torch.compile`` on each worker."""
    early_stopping_patience: int | None = None
    """Stop after this many epochs without improvement of ``monitor``."""
    monitor: str = "val_loss"
    """Metric for early stopping and the best checkpoint (``*loss`` is minimised, others maximised)."""
    resume: bool = False
    """Continue the run named ``run_name`` from its last checkpoint (any world size)."""
    record_sample_ids: bool = False
    """Write the ids trained at every step to ``<run>/sample_ids/`` (audits, tests)."""
    fault_injection: str | None = None
    """Chaos testing: ``"EPOCH:STEP:RANK"`` raises on that rank at that step, first attempt only."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (plus the best)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input pipeline."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers and resources."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "checkpoint_every_epochs", "keep_checkpoints"):
            _positive(self, name, integer=True)
        for name in (
            "max_micro_batch",
            "checkpoint_every_steps",
            "early_stopping_patience",
            "progress_every_steps",
        ):
            if getattr(self, name) is not None:
                _positive(self, name, integer=True)
        if self.monitor not in ("val_loss", "val_accuracy", "train_loss", "train_accuracy"):
            raise ConfigError(
                f"TrainConfig.monitor must be val_loss, val_accuracy, train_loss or train_accuracy, got {self.monitor!r}"
            )
        if self.resume and not self.run_name:
            raise ConfigError("TrainConfig.resume needs run_name: the run to continue")
        if self.fault_injection is not None:
            from lepton_ray.train.sampling import parse_fault

            try:
                parse_fault(self.fault_injection)
            except ValueError as exc:
                raise ConfigError(f"TrainConfig.{exc}") from None
        if self.max_failures < 0:
            raise ConfigError(f"TrainConfig.max_failures must be >= 0, got {self.max_failures}")


def _positive(obj: Any, name: str, integer: bool = False) -> None:
    value = getattr(obj, name)
    cls = type(obj).__name__
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        raise ConfigError(
            f"{cls}.{name} must be a {'whole ' if integer else ''}number, got {value!r}"
        )
    if value <= 0:
        raise ConfigError(f"{cls}.{name} must be > 0, got {value}")


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from a (YAML) dict; nested dataclasses recurse; unknown keys fail."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{unknown[0]}' for {cls.__name__} (known: {', '.join(fields)})"
        )
    kwargs = {}
    for k, v in data.items():
        ftype = (
            fields[k].default_factory
            if fields[k].default_factory is not dataclasses.MISSING
            else None
        )
        if dataclasses.is_dataclass(ftype) and isinstance(v, dict):
            v = from_dict(ftype, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return dataclasses.asdict(cfg)
