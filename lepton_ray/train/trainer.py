"""``Trainer``: the one-call API over Ray Train.

trainer = Trainer(num_workers=2)
trainer.fit(model, train_dataset, batch_size=100, epochs=10)
trainer.train_results  # {'train_loss': ..., 'train_accuracy': ..., 'checkpoint': 's3://...'}
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from typing import Any

import torch
from torch import nn

from lepton_ray import checkpoint, storage
from lepton_ray.config import DataConfig, ScalingConfig, TrainConfig, build_train_config, to_dict
from lepton_ray.data import (
    DatasetInfo,
    describe_ray_dataset,
    from_torch,
    open_dataset,
    read_ray,
    shuffle_mode,
)
from lepton_ray.errors import ConfigError, DataError, LeptonError, TrainingError, one_line
from lepton_ray.models import preferred_memory_format, spec_of
from lepton_ray.runtime import ensure_ray
from lepton_ray.train import batching, strategy
from lepton_ray.train.loop import RunSpec, train_loop_per_worker
from lepton_ray.train.storage_retry import (
    StorageInterrupted,
    controller_storage_failure,
    run_resuming,
)
from lepton_ray.train.task import monitorable

_SCALING_FIELDS = {f.name for f in dataclasses.fields(ScalingConfig)}
# The epoch plan's order for each DataConfig.shuffle (see lepton_ray.train.sampling).
_ORDERS = {"global": "shuffled", "files": "sequential", "none": "sequential-unshuffled"}


class Trainer:
    """Elastic data-parallel training of a PyTorch model on Ray Train.

    ``num_workers`` is an int, a ``(min, max)`` range (elastic) or ``"auto"``; it may be given
    positionally (``Trainer(4)``). Other keyword arguments are fields of :class:`ScalingConfig`
    (``use_gpu``, ``resources_per_worker``, ``placement_strategy``, ...) or defaults for
    :meth:`fit` (``storage``, ``endpoint_url``, ``run_name``, ``max_failures``, ``strategy``, ...).
    ``strategy="fsdp"`` shards parameters, gradients and optimizer state across the workers
    (``docs/sharded.md``); ``"ddp"``, the default, gives each worker a whole copy.

        trainer = Trainer(num_workers=(2, 8), use_gpu=True)
        trainer.fit(model, "s3://bucket/datasets/cifar10/train", batch_size=512, epochs=30)
        trainer.train_results["checkpoint"]  # 's3://bucket/runs/run-.../checkpoint_epoch0030_...'
    """

    def __init__(self, num_workers: int | tuple[int, int] | str = 2, **kwargs: Any):
        if "num_nodes" in kwargs:  # the name older docs use for the worker count
            num_workers = kwargs.pop("num_nodes")
        scaling = {k: kwargs.pop(k) for k in list(kwargs) if k in _SCALING_FIELDS}
        self.scaling = ScalingConfig(num_workers=num_workers, **scaling)
        self.defaults = kwargs
        self.train_results: dict[str, Any] = {}

    def fit(
        self,
        model: nn.Module,
        train_dataset: Any,
        val_dataset: Any = None,
        *,
        batch_size: int | None = None,
        epochs: int | None = None,
        endpoint_url: str | None = None,
        data: DataConfig | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Train ``model`` on ``train_dataset`` and return (and keep) ``train_results``.

        Args:
            model: any ``nn.Module`` mapping (N, C, H, W) images to (N, classes) logits.
            train_dataset: a prepared-dataset URI, a :class:`DatasetInfo`, a
                ``torch.utils.data.Dataset`` of (image, label) or a Ray Dataset with
                ``image``/``label`` columns.
            val_dataset: the same kinds, validated on after every epoch (optional).
            batch_size: the global batch, summed over the workers, whatever their number
                (default: ``TrainConfig.batch_size``, 100).
            epochs: passes over the training set (default: ``TrainConfig.epochs``, 10).
            endpoint_url: S3-compatible endpoint for s3:// URIs.
            data: the input pipeline (:class:`DataConfig`).
            **kwargs: :class:`TrainConfig` and :class:`OptimConfig` fields (``lr``,
                ``run_name``, ``checkpoint_every_steps``, ...).
        """
        opts = {**self.defaults, **kwargs}
        if endpoint_url is not None:
            opts["endpoint_url"] = endpoint_url
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        cfg = build_train_config(
            scaling=self.scaling, data=data, batch_size=batch_size, epochs=epochs, **opts
        )
        self.train_results = fit(model, train_dataset, val_dataset, cfg)
        return self.train_results


def fit(model: nn.Module, train_dataset: Any, val_dataset: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg``; see :class:`Trainer`."""
    from lepton_ray.runs import RunLayout, validate_name

    marks = {"fit_called": time.time()}  # train_results["startup_s"]
    run_name = cfg.run_name or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    validate_name("run", run_name)
    root = storage.resolve(cfg.storage or storage.default_store() + "/runs", cfg.endpoint_url)
    # Everything that can be checked without Ray is checked before Ray starts.
    train_src = _source(train_dataset, "train", cfg.endpoint_url)
    val_src = _source(val_dataset, "val", cfg.endpoint_url) if val_dataset is not None else None
    root.ensure_writable()
    run = RunLayout(root.join(run_name))
    latest = run.latest()
    if latest is not None and not cfg.resume:
        raise ConfigError(
            f"run '{run_name}' already exists at {run.uri}: pass resume=True (--resume) to "
            "continue it from its last checkpoint, or choose another run_name"
        )
    if latest is not None:  # sharded or not: the strategy must be able to read it
        strategy.check_resume(cfg.strategy, checkpoint.read_manifest(latest))
    if cfg.checkpoint_every_steps and train_src.needs_ray:
        raise ConfigError(
            "checkpoint_every_steps needs a prepared dataset (a URI, DatasetInfo or torch Dataset): "
            "resuming mid-epoch relies on its stable row ids"
        )
    strategy.check(cfg, model, train_src.needs_ray)
    if train_src.info is not None:
        _check_monitor(cfg, train_src.info.kind)
    ensure_ray()
    marks["ray_ready"] = time.time()
    train_src.resolve(run, "train")
    if val_src is not None:
        val_src.resolve(run, "val")
    info = train_src.info
    if val_src is not None and val_src.info.kind != info.kind:
        raise DataError(
            f"the validation set holds {val_src.info.kind}, the training set {info.kind}"
        )
    if info.kind != "image":  # token blocks, click rows: crops and flips are for images
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=()))
    _check_model(model, info)
    _check_monitor(cfg, info.kind)  # again: a Ray or torch Dataset's kind is known only now
    if cfg.batch_size > info.num_rows:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is larger than the {info.num_rows} training rows"
        )
    # Storage that fails under Ray Train's own bookkeeping is waited out and the run resumed.
    return run_resuming(
        lambda: _run(model, cfg, root, run, train_src, val_src, marks),
        lambda: _resumable(run),
        name=run.name,
    )


def _check_monitor(cfg: TrainConfig, kind: str) -> None:
    """``monitor`` must be a metric runs on this kind of data report, or it would never decide."""
    if cfg.monitor not in monitorable(kind):
        raise ConfigError(
            f"monitor '{cfg.monitor}' is not reported for {kind} data: choose one of "
            + ", ".join(monitorable(kind))
        )


def _resumable(run: Any) -> bool:
    """Whether the run can resume from Ray Train's snapshot: a complete checkpoint, or none yet."""
    from lepton_ray.runs import parse_checkpoint_name

    return run.latest() is not None or not any(map(parse_checkpoint_name, run.root.listdir()))


def _run(
    model: nn.Module,
    cfg: TrainConfig,
    root: storage.Location,
    run: Any,
    train_src: _Source,
    val_src: _Source | None,
    marks: dict[str, float],
) -> dict[str, Any]:
    """Plan the input pipeline, start Ray Train, wait, collect the results (``marks``: the
    driver's times so far, for ``train_results["startup_s"]``)."""
    import ray
    import ray.train
    from ray.data import DataContext, ExecutionOptions
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from lepton_ray.train import prestart
    from lepton_ray.train.backend import TorchBackendConfig
    from lepton_ray.train.observe import RunObserver, divergence
    from lepton_ray.train.progress import ProgressBar, driver_board
    from lepton_ray.train.ray_trainer import FitTrainer
    from lepton_ray.train.timeline import phases

    keep_warm = prestart.keep_alive_s()  # checked before anything starts
    if cfg.data.verify_checksums:  # every read of these sets checks its shards' sha256
        for src in (train_src, val_src):
            if src is not None and src.ray_ds is None:
                src.info = dataclasses.replace(src.info, verify=True)
    info = train_src.info
    shuffle = shuffle_mode(
        info, cfg.data.shuffle, ray.cluster_resources().get("object_store_memory", 0.0)
    )
    prepared = train_src.ray_ds is None
    feed = cfg.data.chosen_feed(cfg.scaling.use_gpu, info.pixel_bytes, prepared)
    if feed == "ring" and not prepared:
        raise ConfigError("data.feed 'ring' needs a prepared dataset (row ids), not a Ray Dataset")
    cached = feed == "cache"
    on_device = cfg.data.augments_on_device(cfg.scaling.use_gpu, feed != "stream")
    datasets = {}
    if train_src.ray_ds is not None:  # a user's Ray Dataset: Ray Train splits it between workers
        datasets["train"] = train_src.ray(  # (or, cached, each worker reads all of it once)
            () if on_device else cfg.data.augment,
            shuffle="none" if cached else shuffle,
            seed=cfg.seed,
            batch_size=cfg.data.preprocess_batch_size,
        )
    if val_src is not None:
        # Not augmented, so the same every epoch: preprocess once and keep it in the object store.
        datasets["val"] = val_src.ray(
            (), shuffle="none", seed=None, batch_size=cfg.data.preprocess_batch_size
        ).materialize()
    meta = {
        "model": checkpoint_spec(model),
        "memory_format": preferred_memory_format(model, info.shape),
        "data": {
            "shape": list(info.shape),
            "mean": list(info.mean),
            "std": list(info.std),
            "classes": list(info.classes),
            "kind": info.kind,  # chooses the loop's task (lepton_ray.train.task)
            **info.kind_fields(),  # text: block_size, vocab_size; ctr: cardinalities, dense
            "train_uri": info.uri,
            "skipped_rows": int(info.manifest.get("skipped_rows", 0)),
        },
        "config": to_dict(cfg),
        "run": {"name": run.name, "uri": run.uri},
        **checkpoint.provenance(),
    }
    ray_scaling = _ray_scaling(cfg.scaling)
    _check_placement(cfg.scaling, ray_scaling["num_workers"])
    total_steps = batching.nominal_steps_per_epoch(info.num_rows, cfg.batch_size) * cfg.epochs
    fit_id = uuid.uuid4().hex
    board = driver_board(fit_id, total_steps) if cfg.progress_bar else None
    # FSDP builds a registered architecture from its spec on each worker; only rank 0 fetches the
    # initial weights (one copy in the object store), not every worker a pickled model.
    from_spec = cfg.strategy in ("fsdp", "pipeline") and "name" in meta["model"]
    spec = RunSpec(
        cfg=cfg,
        model=None if from_spec else model.cpu(),
        init_weights=ray.put(model.cpu().state_dict()) if from_spec else None,
        meta=meta,
        num_train_rows=info.num_rows,
        has_val=val_src is not None,
        run_uri=run.uri,
        endpoint_url=cfg.endpoint_url,
        train_info=None if train_src.ray_ds is not None else info,
        board=board,
        order=_ORDERS[shuffle],
        device_augment=cfg.data.augment if on_device else (),
        feed=feed,
        fit_id=fit_id,
    )
    # Ray Train's default_ingest_options() sets the deprecated exclude_resources (a warning per fit).
    current = DataContext.get_current().execution_options
    options = ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=cfg.data.deterministic,
        verbose_progress=current.verbose_progress,
    )
    # What Ray Train's TorchTrainer runs, with lepton_ray's backend, and no dataset manager when
    # no Ray Dataset is passed (lepton_ray.train.ray_trainer).
    trainer = FitTrainer(
        train_loop_per_worker,
        # By reference: Ray Train hands train_loop_config to its controller and to every worker's
        # set-up besides the train function; inline, each of them unpickled the spec, model
        # included, and the controller imported lepton_ray's training loop for it.
        train_loop_config={"spec": ray.put(spec)},
        scaling_config=ray.train.ScalingConfig(**ray_scaling),
        # Ray's TorchConfig without torch in the controller (a new process every fit), and the
        # workers import sympy (torch._dynamo's slowest import) while the group starts.
        backend_config=TorchBackendConfig(backend=cfg.scaling.process_group_backend()),
        run_config=RunConfig(
            name=run.name,
            storage_path=root.path,
            storage_filesystem=root.fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=[RunObserver(run.uri, cfg.endpoint_url)],
            # Ray's set-up hook for the workers while processes prestarted after an earlier fit
            # may be idle: they have imported torch, and a worker lands on one with the same
            # runtime environment (lepton_ray.train.prestart).
            worker_runtime_env=prestart.worker_runtime_env(
                ray.get_runtime_context().runtime_env, keep_warm
            ),
        ),
        datasets=datasets,
        # Only a user's Ray Dataset is split by Ray Train (unless every worker caches all of it);
        # every worker validates on all of "val".
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"] if "train" in datasets and not cached else [],
            execution_options={k: options for k in datasets},
        ),
    )
    started, marks = time.perf_counter(), dict(marks, trainer_started=time.time())
    bar = ProgressBar(board, fit_id, total_steps) if board is not None else contextlib.nullcontext()
    try:
        with bar:
            result = trainer.fit()
    except LeptonError:
        raise
    except Exception as exc:  # Ray wraps worker errors; surface the root cause in one line
        raise _failure(run.name, exc) from None
    finally:  # the processes this fit started, started again for the next one
        prestart.after_fit(int(marks["trainer_started"] * 1000), keep_warm)
    if result.error is not None:
        raise _failure(run.name, result.error)
    marks["fit_returned"] = time.time()
    if (line := divergence(run, spec.fit_id)) is not None:
        raise _diverged(run, cfg, line)
    last = result.metrics or {}
    out = _results(result, run, time.perf_counter() - started, cfg.epochs)
    marks |= last.get("startup", {}) | (
        {"last_report": last["reported_at"]} if "reported_at" in last else {}
    )
    out["startup_s"] = phases(marks)
    out["data_skipped_rows"] = meta["data"]["skipped_rows"]  # left out when the data was prepared
    return out


@dataclasses.dataclass
class _Source:
    """A training or validation dataset as given: resolved to a :class:`DatasetInfo`, either a
    prepared dataset (``ray_ds`` None) or a user's Ray Dataset used as it is."""

    given: Any
    endpoint_url: str | None
    info: DatasetInfo | None = None
    ray_ds: Any = None

    @property
    def needs_ray(self) -> bool:
        return type(self.given).__module__.startswith("ray.data")

    def resolve(self, run: Any, split: str) -> None:
        """What needs Ray or writes into the run: a Ray Dataset described, a torch one uploaded."""
        if self.info is not None:
            return
        if self.needs_ray:
            self.info, self.ray_ds = describe_ray_dataset(self.given, split), self.given
        else:  # a torch Dataset, written into the run's folder as a prepared dataset
            self.info = from_torch(self.given, run.data(split))

    def ray(
        self, augment: tuple[str, ...], *, shuffle: str, seed: int | None, batch_size: int
    ) -> Any:
        if self.ray_ds is None:
            return read_ray(
                self.info,
                augment=augment,
                shuffle=shuffle,
                shuffle_seed=seed,
                batch_size=batch_size,
                augment_seed=seed,
                normalize=False,
            )
        from ray.data import RandomSeedConfig

        # A user's Ray Dataset has no shards of ours to reorder: "files" shuffles its blocks.
        reseed = None if seed is None else RandomSeedConfig(seed=seed, reseed_after_execution=True)
        ds = {
            "global": lambda d: d.random_shuffle(seed=reseed),
            "files": lambda d: d.randomize_block_order(seed=seed),
            "none": lambda d: d,
        }[shuffle](self.ray_ds)
        # Built once for all epochs: a seeded augmentation would repeat itself every epoch, so a
        # user's Ray Dataset is augmented from fresh entropy (augment_on="device" is seeded).
        return ds.map_batches(
            self.info.preprocessor(augment, None, normalize=False),
            batch_format="numpy",
            batch_size=batch_size,
        )


def _source(dataset: Any, split: str, endpoint_url: str | None) -> _Source:
    """Check what can be checked before Ray starts: a URI's manifest, the dataset's type."""
    if isinstance(dataset, DatasetInfo):
        return _Source(dataset, endpoint_url, dataset)
    if isinstance(dataset, str):
        return _Source(dataset, endpoint_url, open_dataset(dataset, endpoint_url))
    if type(dataset).__module__.startswith("ray.data") or isinstance(
        dataset, torch.utils.data.Dataset
    ):
        return _Source(dataset, endpoint_url)
    raise DataError(
        f"unsupported {split} dataset type {type(dataset).__name__}: use a prepared-dataset URI, "
        "a torch Dataset or a Ray Dataset"
    )


def checkpoint_spec(model: nn.Module) -> dict[str, Any]:
    """The spec a checkpoint records; a warning when the model trains but could never be rebuilt
    from its checkpoint (a class from ``__main__``, or one whose constructor needs arguments the
    spec does not record: only ``build_model`` records them)."""
    import inspect
    import warnings

    spec = spec_of(model)
    if "class" not in spec:
        return spec
    cls = type(model)
    required = [
        p.name
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if cls.__module__ == "__main__" or required:
        why = (
            "it is defined in __main__"
            if cls.__module__ == "__main__"
            else (
                f"its constructor needs {', '.join(required)}, which a checkpoint does not record"
            )
        )
        warnings.warn(
            f"{cls.__qualname__} trains, but its checkpoints cannot be loaded or served: {why} "
            "(define it in an importable module with defaults for its arguments, or register it "
            "with lepton_ray.models.register)",
            stacklevel=3,
        )
    return spec


def _check_model(model: nn.Module, info: DatasetInfo) -> None:
    if info.kind == "ctr":
        return _check_click_model(model, info)
    h, w, c = info.shape
    text = info.kind == "text"
    tokens = info.kind in ("text", "text-label")  # byte tokens, int64 (N, T): gpt, bert
    # Token blocks: a short probe (a long context costs seconds on the driver's CPU), and the
    # model's own block_size where it says one.
    t = min(info.block_size, 16)
    if tokens and getattr(model, "block_size", info.block_size) < info.block_size:
        raise DataError(
            f"the model's block_size {model.block_size} is shorter than the dataset's rows of "
            f"{info.block_size} tokens"
        )
    probe = torch.zeros(2, t, dtype=torch.long) if tokens else torch.zeros(2, c, h, w)
    what = "token blocks (int64 tokens)" if tokens else f"images of shape {(c, h, w)}"
    out = _probe(model, probe, what)
    if text:
        # A vocabulary padded past the data's (nanoGPT's 50,304 for GPT-2's 50,257) is fine.
        if out.ndim != 3 or tuple(out.shape[:2]) != (2, t) or out.shape[2] < info.vocab_size:
            raise DataError(
                f"the model outputs {tuple(out.shape)} for tokens of shape (2, {t}), not "
                f"(2, {t}, V) with V >= {info.vocab_size}: next-token logits over (at least) the "
                f"{info.vocab_size} byte values"
            )
        return
    if out.ndim != 2 or out.shape[1] != info.num_classes:
        raise DataError(
            f"the model outputs {tuple(out.shape[1:])} per image but the dataset has "
            f"{info.num_classes} classes"
        )


def _probe(model: nn.Module, probe: Any, what: str) -> torch.Tensor:
    """``model(probe)`` in eval mode without gradients; a failure is one line naming ``what``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(probe)
    except Exception as exc:
        raise DataError(f"the model cannot take the dataset's {what}: {one_line(exc)}") from None
    finally:
        model.train(was_training)


def _check_click_model(model: nn.Module, info: DatasetInfo) -> None:
    """A click model takes :class:`~lepton_ray.dlrm.Features` and gives one logit per row."""
    from lepton_ray.dlrm import Features

    cards, dense = info.manifest["cardinalities"], info.manifest["dense"]
    probe = Features(torch.zeros(2, dense), torch.zeros(2, len(cards), dtype=torch.long))
    out = _probe(model, probe, f"click rows ({dense} dense features, {len(cards)} tables)")
    if tuple(out.shape) != (2,):
        raise DataError(
            f"the model outputs {tuple(out.shape)} for 2 click rows, not (2,): one logit per row"
        )
    held = getattr(model, "cardinalities", cards)
    if any(m < c for m, c in zip(held, cards, strict=False)) or len(held) != len(cards):
        raise DataError(f"the model's tables hold {held} ids, the dataset's {cards}")


def _ray_scaling(s: ScalingConfig) -> dict[str, Any]:
    num_workers = s.num_workers
    if num_workers == "auto":
        import ray

        free = ray.available_resources()
        per = s.resources_per_worker or {}
        key, need = ("GPU", per.get("GPU", 1)) if s.use_gpu else ("CPU", per.get("CPU", 1))
        num_workers = max(1, int(free.get(key, 0) // need) - (0 if s.use_gpu else 1))
    return {
        "num_workers": num_workers,
        "use_gpu": s.use_gpu,
        "resources_per_worker": s.resources_per_worker,
        "placement_strategy": s.placement_strategy,
        "elastic_resize_monitor_interval_s": s.elastic_resize_monitor_interval_s,
    }


def _check_placement(s: ScalingConfig, num_workers: int | tuple[int, int]) -> None:
    """Fail in a second, naming what is missing, when the cluster can never place the workers,
    or place them and leave no CPU for Ray Data to feed them (which would wait forever)."""
    import ray

    from lepton_ray.train.placement import unschedulable_reason, worker_bundle

    if s.wait_for_resources:
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    least = num_workers if isinstance(num_workers, int) else num_workers[0]
    reason = unschedulable_reason(
        nodes,
        worker_bundle(s.use_gpu, s.resources_per_worker),
        least,
        s.placement_strategy,
        data_cpus=1.0,
    )
    if reason:
        raise ConfigError(f"{reason} (set wait_for_resources=True if an autoscaler will add nodes)")


def _failure(name: str, exc: BaseException) -> TrainingError:
    """The one-line error for a failed run: :class:`StorageInterrupted` when storage failed under
    Ray Train's controller (:func:`run_resuming` resumes it), else a :class:`TrainingError`."""
    kind = StorageInterrupted if controller_storage_failure(exc) is not None else TrainingError
    return kind(f"training run '{name}' failed: {_root_cause(exc)}")


def _diverged(run: Any, cfg: TrainConfig, last: dict[str, Any]) -> TrainingError:
    """The one-line error for a run whose loss stopped being a number, naming what to change."""
    latest = run.latest()
    kept = f"its last checkpoint, {latest.uri}, is from before" if latest else "no checkpoint kept"
    return TrainingError(
        f"training run '{run.name}' diverged: train_loss {last['train_loss']} in epoch "
        f"{last['epoch']} (step {last['step']}); {kept}. Lower optim.lr (it was "
        f"{cfg.optim.lr:g}), set optim.grad_clip or raise optim.warmup_fraction"
    )


def _root_cause(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = next(iter(failures.values()))
    controller = getattr(exc, "controller_failure", None)
    if controller is not None:
        exc = controller
    while getattr(exc, "cause", None) is not None:  # RayTaskError chains
        exc = exc.cause
    if isinstance(exc, LeptonError):
        return one_line(exc)
    return f"{type(exc).__name__}: {storage.redact(one_line(exc))}"


def _results(result: Any, run: Any, elapsed: float, cfg_epochs: int) -> dict[str, Any]:
    """``train_results``: the history from the last checkpoint's metadata (not its weights)."""
    ckpt = None
    if result.checkpoint is not None:
        ckpt = storage.Location.from_filesystem(
            result.checkpoint.filesystem, result.checkpoint.path, run.root.endpoint_url
        )
    meta = checkpoint.read_meta(ckpt) if ckpt is not None else {}
    history = meta.get("history", [])
    last = history[-1] if history else dict(result.metrics or {})
    best = run.read_best()
    out = {
        "train_loss": last.get("train_loss"),
        "train_accuracy": last.get("train_accuracy"),
        "epochs": last.get("epoch"),
        "samples_per_second": (sum(h["samples_per_second"] for h in history) / len(history))
        if history
        else None,
        "checkpoint": ckpt.uri if ckpt is not None else None,
        "best_checkpoint": best["uri"] if best else None,
        "best": {k: best[k] for k in ("metric", "value", "epoch")} if best else None,
        "stopped_early": bool(last.get("epoch")) and last.get("epoch") < cfg_epochs,
        "world_size_changes": meta.get("world_size_changes", []),
        "run": run.uri,
        "wall_time_s": elapsed,
        "history": history,
    }
    if "val_accuracy" in last:
        out["val_loss"] = last["val_loss"]
        out["val_accuracy"] = last["val_accuracy"]
    # next-token runs; a click model's val_auc
    for key in ("perplexity", "val_perplexity", "tokens_per_second", "val_auc"):
        if key in last:
            out[key] = last[key]
    return out
