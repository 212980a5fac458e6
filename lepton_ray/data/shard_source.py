"""Ray Data's view of a prepared dataset's shards: one read task per shard, planned from the manifest.

``ray.data.read_parquet`` knows nothing of our manifest, so every call looks at the files first:
Ray 2.60's V1 reader samples at least two of them (1,024 rows each) in remote tasks to estimate
their in-memory size, and its V2 reader starts footer-reading actors. Both happen on every call,
i.e. every epoch of a streamed or ring feed and every cache fill, before the first read task.
On 2 CPUs (``benchmarks.gpu_train --model cnn --cases ring --rows 4096 --epochs 3``, two runs
each way, alternated) a ring epoch's first block came 0.10-0.12 s after its read was asked for
instead of 0.38-0.45 s. A cold fit's first step is not shorter: its read tasks wait for new
worker processes as the sampling tasks did (``benchmarks.fixed_cost --workers 2``).

The manifest already lists every shard with its rows, so :class:`ShardSource` plans the read
without touching storage: a task per shard (or per group of shards when Ray asks for fewer tasks),
each fetching its shard whole in one request (:meth:`~lepton_ray.storage.Location.read_bytes`,
with its retries and error messages) and handing it over as one Arrow table of the asked columns.
A shard that does not hold the rows its manifest entry says fails the read with a
:class:`~lepton_ray.errors.DataError` naming it; so does one whose bytes do not match its sha256,
checked where ``info.verify`` is set (``DataConfig.verify_checksums``).

``shuffle`` shuffles the order of the shards afresh on every execution (epoch); with a
``shuffle_seed`` reproducibly, the order of execution ``k`` drawn from ``(shuffle_seed, k)``, as
Ray's ``FileShuffleConfig`` with ``reseed_after_execution`` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from lepton_ray import storage
from lepton_ray.data.shard_file import read_shard

if TYPE_CHECKING:
    from ray.data import DataContext

    from lepton_ray.data.dataset import DatasetInfo


def shard_order(n: int, shuffle: bool, seed: int | None, execution: int) -> list[int]:
    """The shards' order for one execution: as stored, or shuffled; a shuffle with a seed is the
    permutation drawn from ``(seed, execution)``, one without is drawn from fresh entropy."""
    if not shuffle:
        return list(range(n))
    key = None if seed is None else [seed & 0xFFFFFFFFFFFFFFFF, execution]
    return [int(i) for i in np.random.default_rng(key).permutation(n)]


def _size(shard: dict, row_bytes: int, encoding: str) -> int:
    decoded = int(shard["rows"]) * row_bytes
    stored = shard.get("bytes")
    if encoding != "raw" and isinstance(stored, int) and not isinstance(stored, bool):
        return max(1, min(stored, decoded))  # compressed rows stay compressed; never above decoded
    return decoded


class ShardSource(Datasource):
    """A prepared dataset's shards (``info.shards``) as a Ray Data source; see the module's text."""

    def __init__(
        self,
        info: DatasetInfo,
        locations: Sequence[storage.Location],
        columns: Sequence[str],
        shuffle: bool = False,
        shuffle_seed: int | None = None,
    ) -> None:
        """``locations``: where ``info.shards`` are, checked to lie inside the dataset's folder
        (:func:`lepton_ray.data.dataset.shard_locations`)."""
        super().__init__()
        self.uri = info.uri
        self.columns = tuple(columns)
        self.shuffle, self.shuffle_seed = shuffle, shuffle_seed
        # In-memory sizes for Ray's block sizing and memory planning: a raw row's pixels plus its
        # id and label; an encoded (PNG/JPEG) shard's bytes, which its rows keep as they are.
        row = int(np.prod(info.shape)) + 16
        # a shard: (where, name, rows, size, the sha256 to check or None)
        self.shards = [
            (
                loc,
                s["path"],
                int(s["rows"]),
                _size(s, row, info.encoding),
                s["sha256"] if info.verify else None,
            )
            for s, loc in zip(info.shards, locations, strict=True)
        ]

    def get_name(self) -> str:
        return "Shards"

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for _, _, _, size, _ in self.shards)

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: DataContext | None = None,
    ) -> list[ReadTask]:
        execution = getattr(data_context, "_execution_idx", 0) if data_context else 0
        order = shard_order(len(self.shards), self.shuffle, self.shuffle_seed, execution)
        groups = [g for g in np.array_split(np.asarray(order, int), max(1, parallelism)) if len(g)]
        return [self._task([self.shards[i] for i in g], per_task_row_limit) for g in groups]

    def _task(self, shards: list[tuple[Any, ...]], limit: int | None) -> ReadTask:
        columns, uri = self.columns, self.uri

        def read() -> Iterator[pa.Table]:
            for loc, name, rows, _, sha256 in shards:
                yield read_shard(loc, name, rows, columns, uri, sha256)

        meta = BlockMetadata(
            num_rows=None,  # the manifest's word: checked as each shard is read, not trusted before
            size_bytes=sum(size for _, _, _, size, _ in shards),
            input_files=tuple(name for _, name, *_ in shards),
            exec_stats=None,
        )
        return ReadTask(read, meta, per_task_row_limit=limit)
