"""Feeding the loop: one interface hands a worker an epoch's batches, whatever their source.

``feed.epoch(epoch, exclude=ids)`` returns :class:`Batches`: how many steps this worker takes in the
epoch and an iterator of exactly that many batches of its ``b_r`` rows (``image`` uint8 NCHW,
``label``, ``id``), without the rows in ``exclude`` (those an interrupted epoch had consumed).

- :class:`CachedFeed`: the whole set in the device's memory (:class:`DeviceCache`), drawn from the
  epoch plan every epoch; no Ray Data work after the first read.
- :class:`StreamedFeed`: a prepared dataset streamed through Ray Data every epoch: each worker reads
  only its rows of the epoch plan (:mod:`lepton_ray.train.sampling`), decoded (and augmented, when
  augmentation runs on the CPUs) by Ray Data's workers.
- :class:`ShardFeed`: a user's Ray Dataset, split between the workers by Ray Train (no stable ids,
  so no plan: each worker takes the full batches its equal share holds).

A streaming ring in GPU memory, for datasets larger than the device (DESIGN.md), is a fourth.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from lepton_ray.errors import TrainingError
from lepton_ray.train import batching, sampling
from lepton_ray.train.step import BATCH_DTYPES


@dataclass
class Batches:
    """This worker's share of one epoch: ``steps`` batches from ``batches``."""

    steps: int
    batches: Iterator[dict[str, torch.Tensor]]
    wait_s: float = 0.0  # time spent waiting for the next batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        it = iter(self.batches)
        for done in range(self.steps):
            t = time.perf_counter()
            batch = next(it, None)
            self.wait_s += time.perf_counter() - t
            if batch is None:
                raise TrainingError(f"the epoch's data ran out after {done} of {self.steps} steps")
            yield batch
        for _ in it:  # drain the tail (< one batch) so the next epoch starts clean
            pass


class Feed(Protocol):
    def epoch(self, epoch: int, exclude: np.ndarray | None = None) -> Batches: ...


@dataclass
class Plan:
    """What every feed of a prepared dataset shares: the global batch, the worker, the order."""

    seed: int
    global_batch: int
    world: int
    rank: int
    order: str  # "shuffled" | "sequential" | "sequential-unshuffled"

    def of(
        self,
        shard_ids: list[np.ndarray],
        epoch: int,
        exclude: np.ndarray | None,
    ) -> sampling.EpochPlan:
        common = dict(
            seed=self.seed,
            epoch=epoch,
            global_batch=self.global_batch,
            world=self.world,
            rank=self.rank,
            exclude=exclude,
        )
        if self.order == "shuffled":
            return sampling.shuffled_plan(shard_ids, **common)
        return sampling.sequential_plan(
            shard_ids, shuffle_shards=self.order == "sequential", **common
        )


class CachedFeed:
    """Batches drawn from a :class:`~lepton_ray.train.device_cache.DeviceCache` in plan order."""

    def __init__(self, cache: Any, plan: Plan):
        self.cache, self.plan = cache, dataclasses.replace(plan, order="shuffled")
        self.ids = [cache.ids.cpu().numpy()]  # sorted

    def epoch(self, epoch: int, exclude: np.ndarray | None = None) -> Batches:
        p = self.plan.of(self.ids, epoch, exclude)
        rows = torch.from_numpy(np.searchsorted(self.ids[0], p.ids)).to(self.cache.device)
        return Batches(
            p.steps,
            (self.cache.take(rows[s * p.per_step : (s + 1) * p.per_step]) for s in range(p.steps)),
        )


class StreamedFeed:
    """A prepared dataset read through Ray Data every epoch, each worker reading its plan's rows."""

    def __init__(
        self,
        info: Any,
        plan: Plan,
        *,
        augment: tuple[str, ...],
        preprocess_batch: int,
        shuffle_buffer_rows: int,
        pin_memory: bool,
        deterministic: bool = True,
    ):
        from ray.data import DataContext

        from lepton_ray.data import read_shard_ids

        # Blocks in read order (this worker's executions only): with the seeded shuffle buffer,
        # the same batches on the same ranks for a given seed and worker count.
        DataContext.get_current().execution_options.preserve_order = deterministic

        self.info, self.plan, self.augment = info, plan, augment
        self.preprocess_batch, self.buffer, self.pin = (
            preprocess_batch,
            shuffle_buffer_rows,
            pin_memory,
        )
        self.shard_ids = read_shard_ids(info)

    def epoch(self, epoch: int, exclude: np.ndarray | None = None) -> Batches:
        from lepton_ray.data import read_ray

        p = self.plan.of(self.shard_ids, epoch, exclude)
        if p.steps == 0:
            return Batches(0, iter(()))
        shards = dataclasses.replace(self.info, shards=tuple(self.info.shards[s] for s in p.shards))
        ds = read_ray(
            shards,
            augment=self.augment,
            keep_ids=p.ids,
            augment_seed=self.plan.seed,
            epoch=epoch,
            normalize=False,
            batch_size=self.preprocess_batch,
        )
        # A shuffled plan spread this worker's rows over every shard: mix all of them (a
        # dataset is only shuffled whole while it is small). A sequential one streams: a bounded buffer.
        buffer = len(p.ids) if self.plan.order == "shuffled" else min(self.buffer, len(p.ids))
        if self.plan.order == "sequential-unshuffled":
            buffer = 0
        batches = ds.iter_torch_batches(
            batch_size=p.per_step,
            prefetch_batches=2,
            dtypes=BATCH_DTYPES,
            pin_memory=self.pin,
            local_shuffle_buffer_size=buffer or None,
            local_shuffle_seed=(self.plan.seed * 1_000_003 + epoch) if buffer else None,
        )
        return Batches(p.steps, batches)


class ShardFeed:
    """A user's Ray Dataset, split equally between the workers by Ray Train."""

    def __init__(
        self,
        shard: Any,
        *,
        rows: int,
        global_batch: int,
        world: int,
        rank: int,
        shuffle_buffer_rows: int,
        seed: int,
        pin_memory: bool,
    ):
        self.shard, self.seed, self.pin, self.buffer = shard, seed, pin_memory, shuffle_buffer_rows
        self.local_batch = batching.worker_batch(global_batch, world, rank)
        self.steps = min(
            batching.steps_per_epoch(rows, global_batch, world),
            batching.nominal_steps_per_epoch(rows, global_batch),
        )

    def epoch(self, epoch: int, exclude: np.ndarray | None = None) -> Batches:
        if exclude is not None and len(exclude):
            raise TrainingError("a user's Ray Dataset cannot resume mid-epoch (no stable row ids)")
        return Batches(
            self.steps,
            self.shard.iter_torch_batches(
                batch_size=self.local_batch,
                prefetch_batches=2,
                dtypes=BATCH_DTYPES,
                pin_memory=self.pin,
                local_shuffle_buffer_size=self.buffer or None,
                local_shuffle_seed=self.seed + epoch,
            ),
        )
