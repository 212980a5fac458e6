"""The ring's reading process: Ray Data's execution and the packing of its blocks, run in an actor
beside each training worker instead of in the worker's process.

A training loop that launches GPU work from Python holds the GIL for most of each step. Run in its
process, Ray Data's streaming executor (task submissions, resource budgets, metrics), its iterator
threads (fetching and deserialising blocks, converting them to numpy) and the packing took the GIL
from it: on the H200 (ResNet-18@32, 204,800-row epochs) the epochs that read the next one ahead ran
at 0.64-0.78 of the last epoch, which read nothing, and a py-spy profile of the worker (``--gil``)
counted 346 samples of those threads holding the GIL against the training thread's 438. Here the
worker only asks for the next block (one actor call), maps it from the node's object store (no copy)
and copies it into pinned memory (numpy's copy, without the GIL): the same profile then counted 17
samples of its reader thread against the training thread's 479, and in one run on one machine the
epochs read ahead went from 36.1k and 30.6k samples/s to 40.1k and 40.8k
(``gpu_train_ring_200k_inproc`` against ``gpu_train_ring_200k_actor`` in docs/benchmarks.md).

:class:`RingReader` (the actor, torch-free so it starts fast) reads one epoch's piece at a time:
``start`` begins a read (stopping any other), a producer thread iterates Ray Data's blocks in plan
order (``preserve_order``), packs each (:class:`~lepton_ray.train.rows.RowLayout`) and keeps a
few of them ready; ``next`` hands over the next block, ``None`` at the end, or raises the read's
error. :class:`RemoteBlocks` is the worker's side of one read: an iterable of packed tensors for
:class:`~lepton_ray.train.ring.BlockReader`, whose ``cancel`` unblocks a read being closed.

The actor runs on the worker's node (its blocks reach the worker through shared memory), takes no
CPU of its own (Ray Data's read tasks take theirs), and is owned by the worker: it dies with it.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from lepton_ray.train.rows import RowLayout

BLOCK_BYTES = 16 << 20  # rows of a block the read hands over, at least (Ray Data's map batch)
READY_BYTES = 64 << 20  # packed blocks the actor keeps ready ahead of ``next``
READ_SHARE = 4  # the node's reads together take at most 1/READ_SHARE of its CPUs by default


def read_cpus(local_workers: int) -> int:
    """CPUs one worker's read may use at once by default: a quarter of its node's Ray CPUs shared
    by the node's training workers, at least one (16 CPUs, 1 worker: 4).

    Reading as fast as the node allows slows the GPU's training loop, whose Python launches the
    kernels: on the H200 a plain loop (ResNet-18@32) ran at 0.85 of its speed beside 15 CPU-bound
    processes (0.86 with those at ``nice 19``), 0.91 beside 8 and 0.99 beside 4. Ray Data's read
    tasks take every CPU by default; the read only needs to outpace the loop."""
    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["NodeID"] == node), 0.0)
    return max(1, int(cpus // (READ_SHARE * max(local_workers, 1))))


def block_rows(row_bytes: int, preprocess_batch: int) -> int:
    """Rows per block of a ring's read: the preprocessing batch, or more where that is under
    :data:`BLOCK_BYTES` (32x32x3 rows: 5,461). Every block costs the executor and the worker the
    same overhead whatever its size; the first draw waits for a sixteenth of the ring anyway."""
    return max(preprocess_batch, BLOCK_BYTES // max(row_bytes, 1))


@dataclass(frozen=True)
class ReadSpec:
    """One read: ``info``'s shards (in plan order), the rows ``keep_ids`` of ``epoch``, packed as
    rows of images of ``shape`` (C, H, W), Ray Data mapping ``batch_size`` rows a call with at
    most ``cpus`` of its tasks at once, in order when ``deterministic``."""

    shape: tuple[int, ...]
    info: Any
    keep_ids: np.ndarray | None
    epoch: int
    batch_size: int
    deterministic: bool
    cpus: int


class RingReader:
    """One worker's reads, one at a time (module docstring). Create it with :func:`start_reader`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: deque[np.ndarray] = deque()
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

        it: Any = None
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
            )
            layout = RowLayout(spec.shape)
            it = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
            for raw in it:
                rows = layout.pack_array(raw)
                with self._cond:
                    while self._ready_bytes >= READY_BYTES and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        break
                    self._ready.append(rows)
                    self._ready_bytes += rows.nbytes
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the worker by next()
            self._error = exc
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # shuts Ray Data's execution down
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def next(self, read: int) -> np.ndarray | None:
        """The next packed block of read ``read``; ``None`` at its end (or once it is stopped)."""
        with self._cond:
            while True:
                if self._read > read or (self._read == read and self._stop):
                    return None  # a later read began, or this one was stopped
                if self._read == read and self._ready:
                    rows = self._ready.popleft()
                    self._ready_bytes -= rows.nbytes
                    self._cond.notify_all()
                    return rows
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

    node = ray.get_runtime_context().get_node_id()
    return (
        _actor_class()
        .options(
            num_cpus=0,
            max_concurrency=2,  # a stop or start beside a next waiting for its block
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        )
        .remote()
    )


class RemoteBlocks:
    """Read ``read`` of ``spec`` by a :class:`RingReader`, begun at once, as packed tensors
    (pinned when ``pin``)."""

    def __init__(self, reader: Any, read: int, spec: ReadSpec, pin: bool):
        self.reader, self.read, self.pin = reader, read, pin
        self.started = reader.start.remote(read, spec)

    def __iter__(self) -> Iterator[Any]:
        import torch

        ray.get(self.started)  # a reader that could not begin fails here, not by waiting
        while True:
            rows = ray.get(self.reader.next.remote(self.read))
            if rows is None:
                return
            # One copy out of the object store (numpy's, without the GIL), into pinned memory
            # on CUDA: the ring copies it to the device asynchronously.
            block = torch.empty(rows.shape, dtype=torch.uint8, pin_memory=self.pin)
            np.copyto(block.numpy(), rows)
            del rows
            yield block

    def cancel(self) -> None:
        """Stop the read: a ``next`` waiting for a block returns ``None``."""
        self.reader.stop.remote(self.read)
