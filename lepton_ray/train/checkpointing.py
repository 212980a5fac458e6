"""What a worker saves and restores: checkpoints through Ray Train, the best copy, the sample log.

Ray Train's ``report(metrics, checkpoint)`` is a barrier every worker reaches; rank 0 writes the
checkpoint's files (safetensors weights, optimizer/scheduler/RNG state, ``lepton.json``) and uploads
them with the manifest last (:func:`lepton_ray.checkpoint.publish`). With ``publish_best`` the same
files also go to ``<run>/best/<name>``, then ``best.json`` points at them (written last) and the
previous best is removed. A sharded model (FSDP) is saved by every rank, each its own rows, before
the report; rank 0's manifest, written through the same report, lists them all
(:mod:`lepton_ray.train.sharded`).
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from lepton_ray import checkpoint, storage


@dataclass
class Restored:
    """Where a (re)started worker group picks up: nothing, or the last checkpoint Ray Train kept."""

    weights: dict[str, torch.Tensor] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"metric", "value", "epoch"}
    resizes: list[dict[str, int]] = field(default_factory=list)  # {"step", "from", "to"}
    sharded: Any = None  # a sharded checkpoint's Reader: each rank reads its rows from it

    @property
    def start_epoch(self) -> int:
        if not self.state:
            return 0
        return int(self.state["epoch"]) + (1 if self.state.get("epoch_complete", True) else 0)

    @property
    def consumed(self) -> np.ndarray | None:
        """Ids the interrupted epoch had trained (a mid-epoch checkpoint), else None."""
        if not self.state or self.state.get("epoch_complete", True):
            return None
        return self.state["consumed_ids"].numpy()

    @classmethod
    def latest(cls, endpoint_url: str | None, world: int) -> Restored:
        resumed = ray.train.get_checkpoint()
        if resumed is None:
            return cls()
        loc = storage.Location.from_filesystem(resumed.filesystem, resumed.path, endpoint_url)
        manifest = checkpoint.read_manifest(loc)
        if checkpoint.is_sharded(manifest):
            from lepton_ray.train.sharded import Reader

            reader = Reader(loc, manifest)
            weights, state, meta = None, reader.train_state(), reader.meta
        else:
            reader = None
            weights, state, meta = checkpoint.load_train_state(loc)
            weights = {k.removeprefix("module."): v for k, v in weights.items()}
        out = cls(
            weights,
            state,
            list(meta.get("history", [])),
            meta.get("best"),
            list(meta.get("world_size_changes", [])),
            reader,
        )
        if meta.get("world_size") and meta["world_size"] != world:  # an elastic resize
            step = int(meta.get("metrics", {}).get("step", 0))
            out.resizes.append({"step": step, "from": meta["world_size"], "to": world})
        return out


class EpochTally:
    """What this epoch has trained so far: the (loss * n, correct, n) sums on the device, the ids
    all ranks had consumed at the last checkpoint, the ids this rank trained since (kept on the
    device: a ``.cpu()`` per step would sync the GPU every step), and the sample log."""

    def __init__(
        self,
        device: torch.device,
        rank: int,
        resumed: np.ndarray | None,
        resumed_sums: torch.Tensor | None,
        sample_log: SampleLog | None,
    ):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        if resumed is not None and rank == 0:  # the restored sums are global already: count once
            self.sums += resumed_sums.to(device)
        self.consumed = [] if resumed is None else [resumed]
        self.pending: list[torch.Tensor] = []
        self.log = sample_log

    def trained(self, ids: torch.Tensor | None, epoch: int, step: int) -> None:
        if ids is None:  # a user's Ray Dataset may carry no ids (no mid-epoch resume then)
            return
        self.pending.append(ids)
        if self.log:
            self.log.add(epoch + 1, step, ids)

    def checkpoint(self, world: int) -> tuple[torch.Tensor, np.ndarray]:
        """(global sums, every id consumed this epoch): collectives, so every rank calls it."""
        self.consumed.append(gather_ids(self.pending, world))
        self.pending = []
        self.flush()
        return all_reduce(self.sums.clone()), np.concatenate(self.consumed)

    def flush(self) -> None:
        if self.log:
            self.log.flush()


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def gather_ids(pending: list[torch.Tensor], world: int) -> np.ndarray:
    """The ids every worker trained since the last checkpoint (a collective: all ranks call it)."""
    local = torch.cat(pending).cpu().numpy() if pending else np.zeros(0, np.int64)
    if world == 1 or not dist.is_initialized():
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    return np.concatenate(parts)


class Reporter:
    """Reports an epoch's or a step's metrics to Ray Train, with or without a checkpoint."""

    def __init__(
        self,
        run_uri: str,
        endpoint_url: str | None,
        meta: dict[str, Any],
        rank: int,
        sharded: bool = False,
    ):
        from lepton_ray.runs import RunLayout

        self.run = RunLayout(storage.resolve(run_uri, endpoint_url))
        self.meta, self.rank = meta, rank
        self.sharded = sharded  # strategy fsdp: sharded checkpoints, on one worker too

    def metrics(self, metrics: dict[str, Any]) -> None:
        ray.train.report(metrics)

    def checkpoint(
        self,
        metrics: dict[str, Any],
        model: nn.Module,
        train_state: dict[str, Any],
        *,
        history: list[dict[str, Any]],
        resizes: list[dict[str, int]],
        best: dict[str, Any] | None = None,
        publish_best: bool = False,
    ) -> None:
        """A barrier: every rank calls it; rank 0 writes and uploads (under FSDP every rank
        first uploads its shards, then rank 0 the manifest listing them)."""
        from lepton_ray.runs import checkpoint_name
        from lepton_ray.train import sharded

        name = checkpoint_name(metrics["epoch"], metrics["step"])
        run, world = self.run, metrics["world_size"]
        publish = checkpoint.publish
        if self.sharded:
            dests = [run.root.join(name)] + ([run.best_copy(name)] if publish_best else [])
            shards = sharded.write_shards(dests, model, train_state, self.rank, world)

            def publish(local_dir: str, dest: storage.Location) -> storage.Location:
                return sharded.publish(local_dir, dest, shards, world)

        if self.rank != 0:
            ray.train.report(metrics)
            return

        def upload(ckpt: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
            dest = publish(ckpt.path, run.root.join(dir_name))
            if publish_best:
                publish(ckpt.path, run.best_copy(dir_name))
                run.point_best(dir_name, best or {})
            return ray.train.Checkpoint(path=dest.path, filesystem=dest.fs)

        meta = dict(
            self.meta,
            metrics=metrics,
            history=history,
            epoch=metrics["epoch"],
            epoch_complete=train_state["epoch_complete"],
            best=best,
            world_size=world,
            world_size_changes=resizes,
        )
        with tempfile.TemporaryDirectory() as tmp:
            if publish is checkpoint.publish:
                checkpoint.write_local(tmp, model, meta, train_state)
            else:  # the shards hold weights and train state: lepton.json alone is left
                checkpoint.write_meta(tmp, meta)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
                checkpoint_upload_fn=upload,
            )


class SampleLog:
    """Per-worker record of the ids trained at each step (``record_sample_ids``), written to the
    run's ``sample_ids/`` at each report: for tests and audits of sample-exact resume."""

    def __init__(self, run_uri: str, endpoint_url: str | None, rank: int):
        from lepton_ray.runs import RunLayout

        self.dir = RunLayout(storage.resolve(run_uri, endpoint_url)).sample_ids
        self.prefix = f"rank{rank}-{uuid.uuid4().hex[:8]}"
        self.lines: list[str] = []
        self.seq = 0

    def add(self, epoch: int, step: int, ids: torch.Tensor) -> None:
        self.lines.append(
            json.dumps(
                {"epoch": epoch, "step": step, "t": round(time.time(), 3), "ids": ids.tolist()}
            )
        )

    def flush(self) -> None:
        if self.lines:
            data = "\n".join(self.lines).encode()
            self.dir.join(f"{self.prefix}-{self.seq:05d}.jsonl").write_bytes(data)
            self.lines, self.seq = [], self.seq + 1
