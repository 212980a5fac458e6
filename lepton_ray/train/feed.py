"""Feeding the loop: one interface hands a worker an epoch's batches, whatever their source.

``feed.epoch(epoch, exclude=ids)`` returns :class:`Batches`: how many steps this worker takes in the
epoch and an iterator of exactly that many batches of its ``b_r`` rows (``image`` uint8 NCHW,
``label``, ``id``), without the rows in ``exclude`` (those an interrupted epoch had consumed).

- :class:`CachedFeed`: the whole set in the device's memory (:class:`DeviceCache`), drawn from the
  epoch plan every epoch; no Ray Data work after the first read.
- :class:`StreamedFeed`: a prepared dataset streamed through Ray Data every epoch: each worker reads
  only its rows of the epoch plan (:mod:`lepton_ray.train.sampling`), decoded (and augmented, when
  augmentation runs on the CPUs) by Ray Data's workers, on a thread that reads ahead of the
  training loop and starts the next epoch's read when this one's input is all read.
- :class:`RingFeed`: a prepared dataset larger than the device: each worker streams its piece of
  the epoch plan (shards in an order shuffled per epoch) as whole blocks into a window of rows in
  device memory (:mod:`lepton_ray.train.ring`) and samples every batch from it; the next epoch's
  read starts while this one drains.
- :class:`ShardFeed`: a user's Ray Dataset, split between the workers by Ray Train (no stable ids,
  so no plan: each worker takes the full batches its equal share holds).

A JPEG dataset (:mod:`lepton_ray.data.jpeg`: images of many sizes, each read as a random-resized
crop) always streams: a :class:`StreamedFeed` whose rows Ray Data's CPU tasks decode and crop
(``decode_on="cpu"``), or that hands the worker the JPEG bytes to decode in batches on its own
device (``decode_on="device"``, :func:`jpeg_decode_on` chooses). Either way a row's crop and flip
come from (seed, epoch, id), so they are the same on both paths and after a resume. In a cluster
with CPU-only nodes beside GPU nodes, the CPU decoding runs on the CPU-only nodes
(:func:`cpu_only_nodes`), leaving the GPU nodes' CPUs to the trainers.

``feed.close()`` stops whatever a feed still runs between epochs (a read-ahead of the next epoch).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from lepton_ray.errors import TrainingError
from lepton_ray.train import batching, sampling
from lepton_ray.train.prestart import child_options
from lepton_ray.train.readahead import ReadAhead, batch_bytes
from lepton_ray.train.step import BATCH_DTYPES


@dataclass
class Batches:
    """This worker's share of one epoch: ``steps`` batches from ``batches``."""

    steps: int
    batches: Iterator[dict[str, torch.Tensor]]
    wait_s: float = 0.0  # time spent waiting for the next batch
    # The read serving the epoch, where the feed starts one per epoch (the ring's and the
    # streamed feed's: lepton_ray.train.read_times.ReadTimes), and when the epoch asked for its
    # batches.
    read: Any = None
    started: float = dataclasses.field(default_factory=time.time)

    def read_seconds(self) -> dict[str, float]:
        """The epoch's read in seconds (``ReadTimes.seconds``); nothing for a feed without one."""
        return {} if self.read is None else self.read.seconds(self.started)

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
    id_range: tuple[int, int] | None  # (first, count): every id a batch can carry is in it

    def epoch(self, epoch: int, exclude: np.ndarray | None = None) -> Batches: ...

    def close(self) -> None: ...


def id_range(ids: list[np.ndarray]) -> tuple[int, int] | None:
    """``(first, count)`` of the smallest range holding every id in ``ids`` (None if empty): what a
    device :class:`~lepton_ray.data.device_transforms.Augmenter` hashes once an epoch."""
    present = [a for a in ids if len(a)]
    if not present:
        return None
    first = min(int(a.min()) for a in present)
    return first, max(int(a.max()) for a in present) - first + 1


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
    """Batches drawn from a :class:`~lepton_ray.train.device_cache.DeviceCache` in plan order.

    An epoch's plan is host work over every row (for 4M rows about 0.5 s here, plus 2 s to map
    ids to cache rows by binary search), so it is kept off the GPU's path: the cache's rows are
    found by subtraction when its ids are one contiguous range (a prepared dataset's are), and the
    next epoch's plan is computed in a thread while this one trains (the same plan: a pure function
    of seed and epoch). A resumed epoch (``exclude``) is planned when asked."""

    def __init__(self, cache: Any, plan: Plan):
        self.cache, self.plan = cache, dataclasses.replace(plan, order="shuffled")
        self.ids = [cache.ids.cpu().numpy()]  # sorted
        ids = self.ids[0]
        contiguous = len(ids) and int(ids[-1]) - int(ids[0]) == len(ids) - 1  # sorted, unique
        self.first = int(ids[0]) if contiguous else None  # then row = id - first
        self.id_range = id_range(self.ids)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="epoch-plan")
        self.next: tuple[int, Future] | None = None

    def _planned(self, epoch: int, exclude: np.ndarray | None) -> tuple[Any, np.ndarray]:
        """The epoch's plan and the cache rows of its ids, in order."""
        p = self.plan.of(self.ids, epoch, exclude)
        rows = p.ids - self.first if self.first is not None else np.searchsorted(self.ids[0], p.ids)
        return p, rows

    def epoch(self, epoch: int, exclude: np.ndarray | None = None) -> Batches:
        if exclude is None and self.next is not None and self.next[0] == epoch:
            p, rows = self.next[1].result()
        else:
            p, rows = self._planned(epoch, exclude)
        self.next = (epoch + 1, self.pool.submit(self._planned, epoch + 1, None))
        idx = torch.from_numpy(rows).to(self.cache.device)
        return Batches(
            p.steps,
            (self.cache.take(idx[s * p.per_step : (s + 1) * p.per_step]) for s in range(p.steps)),
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


_AHEAD_BYTES = 256 << 20  # the most a StreamedFeed queues ahead of its consumer, per worker


@dataclass
class _Read:
    """One epoch's read: its plan (made on the reader's thread when read ahead) and batches."""

    epoch: int
    plan: Future
    batches: ReadAhead


class StreamedFeed:
    """A prepared dataset read through Ray Data every epoch, each worker reading its plan's rows.

    A thread of the worker iterates the epoch's Ray Data batches (JPEGs decoded on the device
    there) into a queue of at most ``ahead_bytes``
    (:class:`~lepton_ray.train.readahead.ReadAhead`); once this epoch's input is
    all read, the next epoch's is planned and starts reading (``epochs`` says whether there is
    one), so Ray Data's restart, and a shuffled plan's wait for its whole buffer, overlap the
    training of the epoch's last batches. Not earlier: the read's iterator runs in this process,
    beside the training loop, and in a trial on an H100 host epochs during which the next one's
    read ran from their start trained at 0.57 and 0.71 of the pace of the epoch after them
    (``gpu_jpeg_readahead_due`` in docs/benchmarks.md). A resumed epoch (``exclude``) is read
    afresh."""

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
        decode_on: str = "cpu",
        device: torch.device | None = None,
        epochs: int = 0,
        ahead_bytes: int = _AHEAD_BYTES,
    ):
        from ray.data import DataContext

        from lepton_ray.data import read_shard_ids

        self.jpeg = info.encoding == "jpeg"
        if decode_on not in ("cpu", "device") or (decode_on == "device" and not self.jpeg):
            raise TrainingError(f"decode_on {decode_on!r}: 'device' is for JPEG datasets, or 'cpu'")
        self.decode_on, self.device = decode_on, device or torch.device("cpu")
        # The training thread's stream: what a batch decoded on the reader's thread is made
        # ready for (each thread has its own current stream).
        self.stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        # Blocks in read order (this worker's executions only): with the seeded shuffle buffer,
        # the same batches on the same ranks for a given seed and worker count.
        DataContext.get_current().execution_options.preserve_order = deterministic

        self.info, self.plan, self.augment = info, plan, augment
        self.preprocess_batch, self.buffer, self.pin = (
            preprocess_batch,
            shuffle_buffer_rows,
            pin_memory,
        )
        self.epochs, self.ahead_bytes = epochs, ahead_bytes
        self.shard_ids = read_shard_ids(info)
        self.id_range = id_range(self.shard_ids)
        self.reading: _Read | None = None  # the epoch being trained
        self.ahead: _Read | None = None  # the next one, read ahead

    def epoch(self, epoch: int, exclude: np.ndarray | None = None) -> Batches:
        started = time.time()
        resumed = exclude is not None and len(exclude) > 0
        ahead, self.ahead = self.ahead, None
        if self.reading is not None:
            self.reading.batches.close()
        self.reading = None
        if ahead is not None and (ahead.epoch != epoch or resumed):
            ahead.batches.close()
            ahead = None
        if ahead is None:
            ahead = self._start(epoch, self.plan.of(self.shard_ids, epoch, exclude))
        p = ahead.plan.result()
        if p.steps == 0:
            ahead.batches.close()
            return Batches(0, iter(()))
        self.reading = ahead
        return Batches(p.steps, self._serve(ahead), read=ahead.batches.times, started=started)

    def _start(self, epoch: int, p: sampling.EpochPlan | None = None) -> _Read:
        """Start reading ``epoch`` (planned on the reader's thread when ``p`` is None)."""
        planned: Future = Future()

        def source() -> Iterator[dict[str, Any]]:
            try:
                plan = p if p is not None else self.plan.of(self.shard_ids, epoch, None)
            except BaseException as exc:
                planned.set_exception(exc)
                raise
            planned.set_result(plan)
            return self._batches(plan, epoch) if plan.steps else iter(())

        def decode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            return self._decode(batch, epoch)

        batches = ReadAhead(
            source,
            self.ahead_bytes,
            size=batch_bytes,
            prepare=decode if self.decode_on == "device" else None,
            name=f"stream-epoch-{epoch}",
        )
        return _Read(epoch, planned, batches)

    def _serve(self, read: _Read) -> Iterator[dict[str, torch.Tensor]]:
        """The epoch's batches, starting the next epoch's read as soon as this one's input is
        all read."""
        for batch in read.batches:
            self._read_ahead(read)
            yield batch
        self._read_ahead(read)

    def _read_ahead(self, read: _Read) -> None:
        nxt = read.epoch + 1
        if self.ahead is None and read.batches.exhausted and nxt < self.epochs:
            self.ahead = self._start(nxt)

    def _batches(self, p: sampling.EpochPlan, epoch: int) -> Iterator[dict[str, Any]]:
        """Ray Data's batches of ``p``'s rows: torch tensors, or for a device-decoded JPEG
        dataset numpy columns of JPEG bytes."""
        from lepton_ray.data import read_ray

        shards = self.info.only(p.shards)
        on_device = self.decode_on == "device"
        order_seed = self.plan.seed * 1_000_003 + epoch
        # A shuffled plan spread this worker's rows over every shard: mix all of them (a
        # dataset is only shuffled whole while it is small). A sequential one streams: a bounded
        # buffer. JPEGs that Ray Data's CPU tasks decode are mixed as compressed bytes, before
        # decoding (an all-to-all of ~27 KB rows, not a buffer of the whole epoch's decoded
        # pixels, which the first batch would wait for): decoding then streams into training.
        mix_bytes = self.jpeg and not on_device and self.plan.order == "shuffled"
        ds = read_ray(
            shards,
            augment=() if on_device else self.augment,
            keep_ids=p.ids,
            augment_seed=self.plan.seed,
            epoch=epoch,
            normalize=False,
            batch_size=self.preprocess_batch,
            jpeg="bytes" if on_device else "random",  # training crops (a JPEG dataset's only)
            decode_args=cpu_only_nodes() if self.jpeg and not on_device else None,
            shuffle="global" if mix_bytes else False,
            shuffle_seed=order_seed if mix_bytes else None,
            task_args=child_options(),  # not this worker's hook (lepton_ray.train.prestart)
        )
        buffer = len(p.ids) if self.plan.order == "shuffled" else min(self.buffer, len(p.ids))
        if self.plan.order == "sequential-unshuffled" or mix_bytes:
            buffer = 0
        shuffle = dict(
            batch_size=p.per_step,
            prefetch_batches=2,
            local_shuffle_buffer_size=buffer or None,
            local_shuffle_seed=order_seed if buffer else None,
        )
        if on_device:  # JPEG bytes, decoded on the device by the reader thread (_decode)
            return ds.iter_batches(batch_format="numpy", **shuffle)
        return ds.iter_torch_batches(dtypes=BATCH_DTYPES, pin_memory=self.pin, **shuffle)

    def _decode(self, b: dict[str, Any], epoch: int) -> dict[str, torch.Tensor]:
        """A batch of JPEG bytes decoded and cropped on this worker's device (one batched
        ``decode_jpeg`` per step; :func:`lepton_ray.data.jpeg.decode`), on the reader's thread:
        nvJPEG's work then waits behind the queued training steps there, not in the loop."""
        from lepton_ray.data.jpeg import decode

        ids = np.asarray(b["id"], np.int64)
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            image = decode(
                list(b["image"]),
                ids,
                self.info.shape[0],
                seed=self.plan.seed,
                epoch=epoch,
                train=True,
                device=self.device,
            )
        return {
            "image": image,
            "label": torch.tensor(b["label"], dtype=torch.int64),  # Ray's arrays are read-only
            "id": torch.tensor(ids),
        }

    def close(self) -> None:
        for read in (self.reading, self.ahead):
            if read is not None:
                read.batches.close()
        self.reading = self.ahead = None


def cpu_only_nodes(nodes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Ray remote args that keep decoding tasks on the cluster's CPU-only nodes, when it has
    both GPU nodes and CPU-only ones (else ``{}``: anywhere). ``nodes``: ``ray.nodes()``, read
    each epoch, so nodes that joined since take part. E.g. a GPU node and two CPU nodes ``a``, ``b``:
    ``{"label_selector": {"ray.io/node-id": "in(a,b)"}}``."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    alive = [n for n in nodes if n.get("Alive")]
    gpu = [n for n in alive if n.get("Resources", {}).get("GPU")]
    cpu_only = [n["NodeID"] for n in alive if n not in gpu and n.get("Resources", {}).get("CPU")]
    if not gpu or not cpu_only:
        return {}
    return {"label_selector": {"ray.io/node-id": f"in({','.join(sorted(cpu_only))})"}}


def jpeg_decode_on(augment_on: str, device: torch.device) -> str:
    """Where a JPEG dataset's training rows are decoded: on the worker's device when it is a GPU
    (nvJPEG decodes faster than the CPUs beside it), else by Ray Data's CPU tasks;
    ``DataConfig.augment_on`` (``cpu`` or ``device``) overrides that, as for augmentation."""
    if augment_on in ("cpu", "device"):
        return augment_on
    return "device" if device.type == "cuda" else "cpu"


_QUEUE_BYTES = 2 << 30  # the most host memory a RingFeed's read-ahead holds by default


def default_queue_rows(capacity: int, row_width: int) -> int:
    """A RingFeed's host read-ahead by default: a ring's worth of rows, within 2 GiB."""
    return min(capacity, _QUEUE_BYTES // row_width)


class RingFeed:
    """A prepared dataset larger than the device, streamed through a ring of rows in its memory.

    Each worker reads only its piece of the epoch plan (``sequential``: shards in an order shuffled
    per (seed, epoch)), decoded and unaugmented, as whole blocks (no re-batching on the CPUs); the
    loop augments on the device, as with the cache. ``rows`` is the ring's size, capped at this
    worker's rows per epoch and, on a GPU, at half of its free memory. When an epoch's input is all
    in the ring the next epoch's read starts (``epochs`` says whether there is one), so Ray Data's
    restart overlaps the drain. ``queue_rows`` bounds the host blocks read ahead (default: the
    ring's size, enough to refill it at once when the next epoch starts, within 2 GiB of host
    memory). The reads run in a :class:`~lepton_ray.train.ring_reader.RingReader` actor beside
    the worker, with at most ``read_cpus`` of Ray Data's tasks at once, each reading about
    ``read_task_bytes`` of pixels (:func:`~lepton_ray.train.ring_reader.read_task_bytes`).
    """

    def __init__(
        self,
        info: Any,
        plan: Plan,
        *,
        rows: int,
        epochs: int,
        device: torch.device,
        preprocess_batch: int,
        deterministic: bool = True,
        queue_rows: int | None = None,
        read_cpus: int = 1,
        read_task_bytes: int | None = None,
    ):
        import ray

        from lepton_ray.data import read_shard_ids
        from lepton_ray.train.ring import Ring, RowLayout
        from lepton_ray.train.ring_reader import start_reader

        self.info, self.epochs, self.preprocess_batch = info, epochs, preprocess_batch
        self.plan = dataclasses.replace(plan, order="sequential")
        self.shard_ids = read_shard_ids(info)
        self.id_range = id_range(self.shard_ids)
        h, w, c = info.shape
        full = self.plan.of(self.shard_ids, 0, None)
        capacity = min(rows, max(full.steps * full.per_step, 1))
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            capacity = min(capacity, free // 2 // RowLayout((c, h, w)).width)
        if capacity < full.per_step:
            raise TrainingError(
                f"the ring holds {capacity} rows, fewer than a worker's batch of {full.per_step}"
            )
        self.ring = Ring(capacity, (c, h, w), device)
        self.queue_rows = queue_rows or default_queue_rows(capacity, self.ring.layout.width)
        self.reading: Any = None  # the BlockReader of the epoch being trained
        self.ahead: tuple[int, Any] | None = None  # (epoch, BlockReader) read ahead
        self.deterministic, self.read_cpus = deterministic, read_cpus
        self.read_task_bytes = read_task_bytes
        self.reader: Any = None  # the RingReader actor
        self.reads = 0
        if ray.is_initialized():  # its process starts now, before the first read asks for it
            self.reader = start_reader()

    def epoch(self, epoch: int, exclude: np.ndarray | None = None) -> Batches:
        from lepton_ray.train.ring import ring_generator, serve

        started = time.time()
        p = self.plan.of(self.shard_ids, epoch, exclude)
        resumed = exclude is not None and len(exclude) > 0
        reader = None
        if self.ahead is not None and self.ahead[0] == epoch and not resumed:
            reader = self.ahead[1]
        elif self.ahead is not None:
            self.ahead[1].close()
        self.ahead = None
        if self.reading is not None:
            self.reading.close()
        self.reading = None
        if p.steps == 0:
            if reader is not None:
                reader.close()
            return Batches(0, iter(()))
        self.reading = reader or self._read(p, epoch)
        generator = ring_generator(self.plan.seed, epoch, self.plan.rank, self.ring.device)
        blocks = self._then_read_ahead(self.reading, epoch)
        batches = serve(self.ring, blocks, p.steps, p.per_step, generator)
        return Batches(p.steps, batches, read=self.reading.times, started=started)

    def _read(self, p: sampling.EpochPlan, epoch: int) -> Any:
        """A BlockReader of ``p``'s rows, read and packed by this worker's RingReader actor
        (:mod:`lepton_ray.train.ring_reader`: Ray Data off the training process's GIL)."""
        from lepton_ray.train.ring import BlockReader
        from lepton_ray.train.ring_reader import ReadSpec, RemoteBlocks, block_rows, start_reader

        if self.reader is None:
            self.reader = start_reader()
        shards = self.info.only(p.shards)
        self.reads += 1
        spec = ReadSpec(
            self.ring.layout.shape,
            shards,
            p.ids,
            epoch,
            block_rows(self.ring.layout.pixels, self.preprocess_batch),
            self.deterministic,
            self.read_cpus,
            self.read_task_bytes,
        )
        blocks = RemoteBlocks(self.reader, self.reads, spec, pin=self.ring.device.type == "cuda")
        return BlockReader(blocks, self.ring.layout, self.queue_rows)

    def _then_read_ahead(self, reader: Any, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        yield from reader
        if epoch + 1 < self.epochs and self.ahead is None:
            p = self.plan.of(self.shard_ids, epoch + 1, None)
            if p.steps:
                self.ahead = (epoch + 1, self._read(p, epoch + 1))

    def close(self) -> None:
        for reader in (self.reading, self.ahead[1] if self.ahead else None):
            if reader is not None:
                reader.close()
        self.reading = self.ahead = None
        if self.reader is not None:
            import ray

            ray.kill(self.reader)
            self.reader = None


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
        self.id_range = None  # a user's rows: ids, if any, unknown ahead
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

    def close(self) -> None:
        pass  # Ray Train owns the split
