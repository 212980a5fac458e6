"""The ring's reading process: Ray Data's execution run in an actor beside each training worker
instead of in the worker's process; the blocks it reads go from the object store to the worker.

A training loop that launches GPU work from Python holds the GIL for most of each step. Run in its
process, Ray Data's streaming executor (task submissions, resource budgets, metrics), its iterator
threads (fetching and deserialising blocks, converting them to numpy) and the packing took the GIL
from it: on the H200 (ResNet-18@32, 204,800-row epochs) the epochs that read the next one ahead ran
at 0.64-0.78 of the last epoch, which read nothing, and a py-spy profile of the worker (``--gil``)
counted 346 samples of those threads holding the GIL against the training thread's 438. With the
executor here the same profile counted 17 samples of the worker's reader thread against the
training thread's 479, and in one run on one machine the epochs read ahead went from 36.1k and
30.6k samples/s to 40.1k and 40.8k (``gpu_train_ring_200k_inproc`` against
``gpu_train_ring_200k_actor`` in docs/benchmarks.md).

Each block is copied once on the host. Ray Data's tasks read the Parquet shards and pass a raw
dataset's rows on as read (an Arrow table whose pixels are the decompressed column, ``layout=
"nhwc"`` of :func:`lepton_ray.data.read_ray`); the actor hands the worker only each block's
reference (:class:`Piece`); the worker maps the block from the node's object store and packs it
(:class:`~lepton_ray.train.rows.RowLayout`, pixels as stored) straight into pinned memory, which
the ring copies to the device. Before, the tasks transposed the pixels to (C, H, W), the actor
fetched, packed and returned each block (two more copies, the second into the object store) and
the worker copied it once more: on 2 CPUs an epoch of 204,800 32x32 rows took 4.7 CPU-seconds
then, 2.5 now (``benchmarks.ring_read``, ``ring_read_before`` and ``ring_read`` in
docs/benchmarks.md).

:class:`RingReader` (the actor, torch-free so it starts fast) reads one epoch's piece at a time:
``start`` begins a read (stopping any other), a producer thread iterates Ray Data's output in plan
order (``preserve_order``) and keeps the references of a few blocks ready; ``next`` hands over the
next one, ``None`` at the end, or raises the read's error. :class:`RemoteBlocks` is the worker's
side of one read: an iterable of packed tensors for :class:`~lepton_ray.train.ring.BlockReader`,
whose ``cancel`` unblocks a read being closed.

The actor runs on the worker's node (its blocks reach the worker through shared memory), takes no
CPU of its own (Ray Data's read tasks take theirs), and is owned by the worker: it dies with it.
It and its reads' tasks run without the training workers' set-up hook, which their runtime
environment would otherwise pass on: none of them imports torch
(:func:`lepton_ray.train.prestart.child_options`).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from lepton_ray.train.read_times import ReadTimes
from lepton_ray.train.rows import RowLayout

BLOCK_BYTES = 16 << 20  # rows of a block the read hands over, at least (Ray Data's map batch)
READY_BYTES = 64 << 20  # blocks the actor keeps ready (referenced) ahead of ``next``
TASK_BYTES = 64 << 20  # pixels one read task reads, at most (read_task_bytes)
STORE_SHARE = 64  # ... and at most 1/STORE_SHARE of the node's object store per worker there
READ_SHARE = 2  # the node's reads together take at most 1/READ_SHARE of its CPUs by default


def read_cpus(local_workers: int) -> int:
    """CPUs one worker's read may use at once by default: half of its node's Ray CPUs shared by
    the node's training workers, at least one (16 CPUs, 1 worker: 8).

    Reading as fast as the node allows slows the GPU's training loop, whose Python launches the
    kernels: on the H200 a plain loop (ResNet-18@32) ran at 0.85 of its speed beside 15 CPU-bound
    processes (0.86 with those at ``nice 19``), 0.91 beside 8 and 0.99 beside 4. Ray Data's read
    tasks take every CPU by default; the read only needs to outpace the loop, and it rests
    whenever the ring is full, so its tasks are not CPU-bound neighbours all the time. A quarter
    of the node did not always outpace it: on two H100 machines (16 CPUs, 1 worker, 2026-12-06,
    ``benchmarks.ring_interference`` with the phases ``plain,ring_ray``, runs alternated) the
    step on Ray Data's read ran at 0.918, 0.915 and 0.955 of the plain step with 4 CPUs, 0.983,
    0.968 and 0.980 with 8 (``ring_read_cpus_4_*``, ``ring_read_cpus_8_*`` in
    docs/benchmarks.md)."""
    cpus = node_resource("CPU")
    return max(1, int(cpus // (READ_SHARE * max(local_workers, 1))))


def read_task_bytes(local_workers: int) -> int:
    """Pixels one task of a worker's read reads (:func:`lepton_ray.data.dataset.as_read_tasks`):
    :data:`TASK_BYTES`, or less where the node's object store is small: its shards leave the task
    as one block (Ray Data joins what a task yields up to 128 MiB), and a read holds some blocks
    in the store at once.

    Measured on 2 CPUs (``benchmarks.streaming --feed ring``: 1,000,000 noisy 32x32 rows, raw
    pixels, a 1 GiB store; nothing spilled in any run): with a task per 12 MiB shard the store
    peaked at 520 MiB, in tasks of 2 shards at 712 MiB, of 5 shards at 676-977 MiB; a budget for
    Ray Data's executor (``resource_limits.object_store_memory``, 64 or 256 MiB) did not lower
    it. So a task reads at most 1/:data:`STORE_SHARE` of the store per training worker on the
    node: a shard a task on a 1 GiB store, 64 MiB on a GPU node's store of tens of GiB."""
    store = node_resource("object_store_memory")
    if not store:  # not reported: the default
        return TASK_BYTES
    return max(1, min(TASK_BYTES, int(store // (STORE_SHARE * max(local_workers, 1)))))


def node_resource(name: str) -> float:
    """How much of resource ``name`` (``CPU``, ``object_store_memory``) this process's node has;
    0 where it reports none."""
    node = ray.get_runtime_context().get_node_id()
    return next((n["Resources"].get(name, 0.0) for n in ray.nodes() if n["NodeID"] == node), 0.0)


def block_rows(row_bytes: int, preprocess_batch: int) -> int:
    """Rows per block of a ring's read: the preprocessing batch, or more where that is under
    :data:`BLOCK_BYTES` (32x32x3 rows: 5,461). Every block costs the executor and the worker the
    same overhead whatever its size; the first draw waits for a sixteenth of the ring anyway."""
    return max(preprocess_batch, BLOCK_BYTES // max(row_bytes, 1))


@dataclass(frozen=True)
class ReadSpec:
    """One read: ``info``'s shards (in plan order), the rows ``keep_ids`` of ``epoch``, packed as
    rows of images of ``shape`` (C, H, W), Ray Data mapping ``batch_size`` rows a call with at
    most ``cpus`` of its tasks at once, each reading about ``task_bytes`` of pixels (None:
    :func:`read_task_bytes` of one worker on the node), in order when ``deterministic``."""

    shape: tuple[int, ...]
    info: Any
    keep_ids: np.ndarray | None
    epoch: int
    batch_size: int
    deterministic: bool
    cpus: int
    task_bytes: int | None = None


@dataclass(frozen=True)
class Piece:
    """One block of a read, by reference: rows ``start`` to ``start + rows`` of the Arrow block
    ``ref`` (all of it when ``rows`` is None), about ``size`` bytes in the object store."""

    ref: Any
    start: int
    rows: int | None
    size: int


def _pieces(bundle: Any) -> list[Piece]:
    """The blocks of one of Ray Data's output bundles (a block may be handed over in slices)."""
    out = []
    for entry, part in zip(bundle.blocks, bundle.slices, strict=True):
        size = int(entry.metadata.size_bytes or 0)
        if part is None:
            out.append(Piece(entry.ref, 0, None, size))
        else:
            out.append(Piece(entry.ref, part.start_offset, part.num_rows, size))
    return out


class RingReader:
    """One worker's reads, one at a time (module docstring). Create it with :func:`start_reader`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: deque[Piece] = deque()
        self._ready_bytes = 0
        self._read = -1  # the read being served
        self._done, self._stop = True, False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, read: int, spec: ReadSpec) -> None:
        """Begin read ``read`` of ``spec``."""
        self.stop()
        with self._cond:
            self._read, self._done, self._stop, self._error = read, False, False, None
            self._cond.notify_all()  # stop() emptied the blocks ready
        self._thread = threading.Thread(target=self._run, args=(spec,), daemon=True)
        self._thread.name = f"ring-read-{read}"
        self._thread.start()

    def _run(self, spec: ReadSpec) -> None:
        from ray.data import DataContext

        from lepton_ray.data import read_ray

        bundles: Any = None
        try:
            options = DataContext.get_current().execution_options  # this process's: the actor's
            options.preserve_order = spec.deterministic
            options.resource_limits = options.resource_limits.copy(cpu=spec.cpus)
            ds = read_ray(
                spec.info,
                keep_ids=spec.keep_ids,
                augment=(),
                normalize=False,
                epoch=spec.epoch,
                batch_size=spec.batch_size,
                layout="nhwc",
                read_task_bytes=spec.task_bytes or read_task_bytes(1),
            )
            # References only: the blocks stay in the object store until the worker maps them.
            bundles = ds.iter_internal_ref_bundles()
            for bundle in bundles:
                for piece in _pieces(bundle):
                    with self._cond:
                        while self._ready_bytes >= READY_BYTES and not self._stop:
                            self._cond.wait()
                        if self._stop:
                            return
                        self._ready.append(piece)
                        self._ready_bytes += piece.size
                        self._cond.notify_all()
        except BaseException as exc:  # handed to the worker by next()
            self._error = exc
        finally:
            bundles = None  # its last reference: Ray Data shuts the execution down
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def next(self, read: int) -> list[Piece] | None:
        """The next block of read ``read`` (in a list: Ray hands the worker its reference);
        ``None`` at its end (or once it is stopped)."""
        with self._cond:
            while True:
                if self._read > read or (self._read == read and self._stop):
                    return None  # a later read began, or this one was stopped
                if self._read == read and self._ready:
                    piece = self._ready.popleft()
                    self._ready_bytes -= piece.size
                    self._cond.notify_all()
                    return [piece]
                if self._read == read and self._done:
                    if self._error is not None:
                        raise self._error
                    return None
                self._cond.wait()  # its next block (or its start, for a caller that did not wait)

    def stop(self, read: int | None = None) -> None:
        """Stop the read in progress (``read``: only if it is that one) and wait for its thread."""
        with self._cond:
            if read is not None and read != self._read:
                return
            self._stop = True
            self._ready.clear()
            self._ready_bytes = 0
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()


@functools.cache
def _actor_class() -> Any:
    return ray.remote(RingReader)


def start_reader() -> Any:
    """A :class:`RingReader` actor on this node, owned by this process (so it dies with it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from lepton_ray.train.prestart import child_options

    node = ray.get_runtime_context().get_node_id()
    return (
        _actor_class()
        .options(
            num_cpus=0,
            max_concurrency=2,  # a stop or start beside a next waiting for its block
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            **child_options(),  # neither it nor its reads' tasks import torch (its parent's hook)
        )
        .remote()
    )


class RemoteBlocks:
    """Read ``read`` of ``spec`` by a :class:`RingReader`, begun at once, as packed tensors
    (pinned when ``pin``); ``times`` records its course."""

    def __init__(self, reader: Any, read: int, spec: ReadSpec, pin: bool):
        self.reader, self.read, self.spec, self.pin = reader, read, spec, pin
        self.times = ReadTimes(requested=time.time())
        self.cancelled = False
        self.started = reader.start.remote(read, spec)

    def __iter__(self) -> Iterator[Any]:
        import pyarrow as pa

        ray.get(self.started)  # a reader that could not begin fails here, not by waiting
        layout = RowLayout(self.spec.shape)
        while True:
            pieces = ray.get(self.reader.next.remote(self.read))
            if pieces is None:
                if not self.cancelled:  # ran out, not stopped
                    self.times.done = time.time()
                return
            for piece in pieces:
                # Mapped from the node's object store (no copy), its pixels copied once, by
                # numpy without the GIL, into pinned memory on CUDA (the ring copies that to the
                # device asynchronously).
                table = ray.get(piece.ref)
                if not isinstance(table, pa.Table):  # a pandas block
                    table = pa.Table.from_pandas(table, preserve_index=False)
                if piece.rows is not None:
                    table = table.slice(piece.start, piece.rows)
                block = layout.pack(table, pin=self.pin)
                del table
                if self.times.first_block is None:
                    self.times.first_block = time.time()
                self.times.blocks += 1
                self.times.rows += block.shape[0]
                yield block

    def cancel(self) -> None:
        """Stop the read: a ``next`` waiting for a block returns ``None``."""
        self.cancelled = True
        self.reader.stop.remote(self.read)
