"""A prepared dataset: its manifest, and reading it (whole as numpy, or streamed by Ray Data).

A prepared dataset is a folder (local or ``s3://``) holding Parquet shards and a
``manifest.json``. Rows are ``id`` (int64, stable across epochs and runs), ``image`` (raw HWC
uint8 bytes, or PNG) and ``label`` (int64). A text dataset (``kind: "text"``) stores byte-level
token blocks the same way, each as an "image" of shape (1, block_size + 1, 1) with label 0 (see
:mod:`lepton_ray.data.text`); a labelled-text dataset (``kind: "text-label"``) one text a row, as
(1, block_size, 1) byte tokens with its class (see :mod:`lepton_ray.data.labelled_text`); a click dataset (``kind: "ctr"``) stores rows of dense float32 and
int32 table ids so, labels 0/1 (see :mod:`lepton_ray.data.ctr`). The manifest lists the shards with their checksums, the
row count, the image shape, the classes and the per-channel mean/std. It is written last
(:mod:`lepton_ray.data.writer`), so a reader that finds a manifest finds complete shards.

A manifest is data, not instructions: every field is checked when it is read, and a shard path
must be a plain relative name inside the dataset's folder (no ``..``, no absolute path, no empty
part, no backslash), so a tampered manifest can make a read fail but never read, or make a rewrite
delete, anything outside the folder.

Checksums: :func:`read_arrays` verifies every shard's sha256; the Ray Data path (:func:`read_ray`)
checks each shard's row count against the manifest, and its sha256 only for a ``DatasetInfo`` with
``verify`` set (``DataConfig.verify_checksums``; :mod:`lepton_ray.data.shard_source` fetches each
shard whole, so it can). Off by default: measured here (one core of this Xeon, shared), sha256 of a
64 MiB shard takes 60 ms, about as long as pyarrow takes to decode it (65-75 ms), so every epoch
would spend twice the CPU on reading, on the CPUs that also decode and augment. TCP/TLS already
guard the bytes in transit; what the sha256 adds is catching an object changed or swapped after its
manifest was written.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from lepton_ray import storage
from lepton_ray.data import labelled_text
from lepton_ray.data.shard_file import read_shard, read_shard_columns
from lepton_ray.data.transforms import (
    ENCODINGS,
    Preprocessor,
    check_augment,
    decode_encoded,
    decode_raw,
)
from lepton_ray.errors import DataError, NotFoundError

if TYPE_CHECKING:
    import ray.data

FORMAT = "lepton-dataset/1"
MANIFEST = "manifest.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
KINDS = ("image", "text", "text-label", "ctr")
TOKEN_KINDS = ("text", "text-label")  # rows of byte tokens (block_size, vocab_size)


@dataclass(frozen=True)
class DatasetInfo:
    """What a prepared dataset's manifest says about it."""

    uri: str
    num_rows: int
    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shards: tuple[dict, ...] = ()
    encoding: str = "raw"
    endpoint_url: str | None = None
    manifest: dict = field(default_factory=dict, repr=False, compare=False)
    kind: str = "image"  # "text": token blocks (data.text); "text-label": labelled texts
    # (data.labelled_text); "ctr": click rows (data.ctr)
    verify: bool = field(default=False, compare=False)  # read_ray checks each shard's sha256

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def block_size(self) -> int:
        """A text dataset's tokens per block that the model reads (a text row holds one more, a
        labelled-text row exactly these)."""
        return int(self.manifest["block_size"]) if self.kind in TOKEN_KINDS else 0

    @property
    def vocab_size(self) -> int:
        """A text dataset's vocabulary (256: bytes)."""
        return int(self.manifest["vocab_size"]) if self.kind in TOKEN_KINDS else 0

    def model_kwargs(self) -> dict[str, Any]:
        """The constructor arguments this data fixes for a registered model: ``in_channels`` and
        ``num_classes`` for images, ``vocab_size`` and ``block_size`` for text (the ``gpt``),
        and ``num_classes`` too for labelled text (the ``bert``), ``cardinalities`` and ``dense``
        for click data (the ``dlrm``)."""
        if self.kind == "text":
            return {"vocab_size": self.vocab_size, "block_size": self.block_size}
        if self.kind == "text-label":
            return {
                "vocab_size": self.vocab_size,
                "block_size": self.block_size,
                "num_classes": self.num_classes,
            }
        if self.kind == "ctr":
            return {
                "cardinalities": list(self.manifest["cardinalities"]),
                "dense": self.manifest["dense"],
            }
        return {"in_channels": self.shape[2], "num_classes": self.num_classes}

    def kind_fields(self) -> dict[str, Any]:
        """What a run records of its data's kind beside shape and classes (the checkpoint's
        ``data`` section, which chooses the loop's task): a text or labelled-text set's
        ``block_size`` and ``vocab_size``, a click set's ``cardinalities``, ``dense`` and
        ``planted_auc``."""
        if self.kind in TOKEN_KINDS:
            return {"block_size": self.block_size, "vocab_size": self.vocab_size}
        if self.kind == "ctr":
            keys = ("cardinalities", "dense", "planted_auc")
            return {k: self.manifest[k] for k in keys if k in self.manifest}
        return {}

    def only(self, shards: Iterable[int]) -> DatasetInfo:
        """The same dataset read through the shards at positions ``shards`` of :attr:`shards`, in
        that order (an epoch plan's or a worker's piece; ``num_rows`` stays the whole set's)."""
        return dataclasses.replace(self, shards=tuple(self.shards[s] for s in shards))

    @property
    def pixel_bytes(self) -> int:
        """The decoded (uint8) size of all the images: what a shuffle or a cache holds."""
        return self.num_rows * int(np.prod(self.shape))

    def location(self) -> storage.Location:
        return storage.resolve(self.uri, self.endpoint_url)

    def preprocessor(
        self,
        augment: tuple[str, ...] = (),
        seed: int | None = None,
        normalize: bool = True,
        epoch: int = 0,
        jpeg: str = "center",
        layout: str = "nchw",
    ) -> Preprocessor:
        """The ``map_batches`` callable that reads this dataset's rows (``jpeg``: how a JPEG
        dataset's rows are cropped, :data:`~lepton_ray.data.transforms.JPEG_CROPS`; ``layout``:
        see :class:`~lepton_ray.data.transforms.Preprocessor`)."""
        return Preprocessor(
            self.shape,
            self.mean,
            self.std,
            augment=augment,
            seed=seed,
            encoding=self.encoding,
            normalize=normalize,
            epoch=epoch,
            jpeg=jpeg,
            layout=layout,
        )


# --- names and paths read from manifests -----------------------------------------------------
def check_name(name: Any, what: str) -> str:
    """A split or dataset name that becomes one path segment: letters, digits, ``. _ -``, not
    starting with a dot (so never ``..``), at most 128 characters."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise DataError(
            f"bad {what} name {name!r}: use letters, digits, '.', '_' and '-' (not first), "
            "at most 128 characters"
        )
    return name


def check_shard_path(path: Any, manifest_uri: str) -> str:
    """A shard path from a manifest, if it is a plain relative path inside the dataset's folder:
    ``/``-separated names as :func:`check_name` allows them (so no ``..``, ``.``, empty part,
    absolute path, backslash or scheme)."""
    parts = path.split("/") if isinstance(path, str) else [None]
    if not all(isinstance(p, str) and _NAME.fullmatch(p) for p in parts):
        raise DataError(
            f"{manifest_uri} lists shard {path!r}, which is not a relative path inside the "
            "dataset's folder"
        )
    return path


def shard_location(loc: storage.Location, path: Any, manifest_uri: str) -> storage.Location:
    """Where shard ``path`` of the dataset at ``loc`` is; never outside ``loc``."""
    child = loc.join(check_shard_path(path, manifest_uri))
    if not child.path.startswith(loc.path.rstrip("/") + "/"):  # belt and braces
        raise DataError(f"{manifest_uri} lists shard {path!r} outside the dataset's folder")
    return child


def shard_locations(info: DatasetInfo) -> list[storage.Location]:
    """Every shard of ``info``, in manifest order, each checked to lie inside its folder."""
    loc = info.location()
    where = f"{info.uri.rstrip('/')}/{MANIFEST}"
    return [shard_location(loc, s.get("path"), where) for s in info.shards]


# --- the manifest ----------------------------------------------------------------------------
def read_manifest(loc: storage.Location) -> dict:
    """The checked manifest of the dataset at ``loc``; one-line :class:`DataError` when there is
    none or a field is malformed."""
    try:
        m = loc.join(MANIFEST).read_json()
    except NotFoundError:
        raise DataError(
            f"no prepared dataset at {loc.uri} (no {MANIFEST}; run `lepton-ray data prepare`)"
        ) from None
    except ValueError:  # not JSON
        raise DataError(f"{loc.uri}/{MANIFEST} is not valid JSON") from None
    return check_manifest(m, f"{loc.uri.rstrip('/')}/{MANIFEST}")


def check_manifest(m: Any, where: str) -> dict:
    """Check the fields a reader relies on; errors name the manifest and the field."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{where} is not a {FORMAT} manifest")

    def bad(key: str, why: str) -> DataError:
        return DataError(f"{where}: '{key}' {why}")

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not count(m.get("num_rows")):
        raise bad("num_rows", "must be a whole number >= 0")
    shape = m.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(count(d) and d > 0 for d in shape)):
        raise bad("shape", "must be [height, width, channels] of positive whole numbers")
    kind = m.get("kind", "image")
    if kind not in KINDS:
        raise bad("kind", f"must be one of {', '.join(KINDS)}")
    if kind == "text":
        _check_text(m, bad)
    if kind == "text-label":
        labelled_text.check_manifest(m, bad)
    if kind == "ctr":
        _check_ctr(m, bad)
    classes = m.get("classes")
    if not (
        isinstance(classes, list)
        and (classes or kind == "text")
        and all(isinstance(c, str) for c in classes)
    ):
        raise bad("classes", "must be a non-empty list of names")
    for key in ("mean", "std"):
        v = m.get(key)
        if not (
            isinstance(v, list)
            and len(v) == shape[2]
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        ):
            raise bad(key, f"must be {shape[2]} numbers, one per channel")
    if m.get("encoding", "raw") not in ENCODINGS:
        raise bad("encoding", f"must be one of {', '.join(ENCODINGS)}")
    if m.get("encoding") == "jpeg":
        _check_jpeg(m, bad)
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise bad("shards", "must be a list")
    seen = set()
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise bad(f"shards[{i}]", "must be an object")
        check_shard_path(s.get("path"), where)
        if s["path"] in seen:
            raise bad(f"shards[{i}].path", f"repeats {s['path']!r}")
        seen.add(s["path"])
        if not count(s.get("rows")):
            raise bad(f"shards[{i}].rows", "must be a whole number >= 0")
        if not (isinstance(s.get("sha256"), str) and _SHA256.fullmatch(s["sha256"])):
            raise bad(f"shards[{i}].sha256", "must be 64 lowercase hex digits")
    if sum(s["rows"] for s in shards) != m["num_rows"]:
        raise bad("shards", f"hold {sum(s['rows'] for s in shards)} rows, not num_rows")
    return m


def _check_text(m: dict, bad: Any) -> None:
    """A text manifest's own fields: bytes as tokens, rows of ``block_size + 1`` of them, raw."""
    block = m.get("block_size")
    if not (isinstance(block, int) and not isinstance(block, bool) and block >= 2):
        raise bad("block_size", "must be a whole number >= 2")
    if m.get("tokenizer") != "bytes" or m.get("vocab_size") != 256:
        raise bad("tokenizer", "must be 'bytes' with vocab_size 256")
    if m.get("shape") != [1, block + 1, 1]:
        raise bad("shape", f"must be [1, {block + 1}, 1] for blocks of {block} + 1 tokens")
    if m.get("encoding", "raw") != "raw":
        raise bad("encoding", "must be 'raw' for text")
    if m.get("classes") != []:
        raise bad("classes", "must be [] for text")


def _check_jpeg(m: dict, bad: Any) -> None:
    """A JPEG manifest's own fields (:mod:`lepton_ray.data.jpeg`): images of any size stored,
    every row read as a ``crop`` x ``crop`` RGB crop, which is its ``shape``."""
    crop = m.get("crop")
    if not (isinstance(crop, int) and not isinstance(crop, bool) and 1 <= crop <= 4096):
        raise bad("crop", "must be a whole number of pixels, 1 to 4096")
    if m.get("shape") != [crop, crop, 3]:
        raise bad("shape", f"must be [{crop}, {crop}, 3]: what a JPEG row is cropped to")
    if m.get("kind", "image") != "image":
        raise bad("kind", "must be 'image' for JPEG rows")


def _check_ctr(m: dict, bad: Any) -> None:
    """A click manifest's own fields (:mod:`lepton_ray.data.ctr`): rows of ``dense`` float32 and
    one int32 id per table, raw, labels 0/1."""
    cards, dense = m.get("cardinalities"), m.get("dense")
    if not (
        isinstance(cards, list)
        and cards
        and all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c < 2**31 for c in cards)
    ):
        raise bad("cardinalities", "must be a non-empty list of whole numbers >= 1")
    if not (isinstance(dense, int) and not isinstance(dense, bool) and dense >= 0):
        raise bad("dense", "must be a whole number >= 0")
    if m.get("shape") != [1, 4 * (dense + len(cards)), 1]:
        raise bad(
            "shape",
            f"must be [1, {4 * (dense + len(cards))}, 1]: {dense} float32, {len(cards)} int32",
        )
    if m.get("encoding", "raw") != "raw":
        raise bad("encoding", "must be 'raw' for click data")
    if m.get("classes") != ["0", "1"]:
        raise bad("classes", "must be ['0', '1'] for click data")
    auc = m.get("planted_auc")
    if auc is not None and not (isinstance(auc, int | float) and not isinstance(auc, bool)):
        raise bad("planted_auc", "must be a number")


def info_from_manifest(loc: storage.Location, m: dict) -> DatasetInfo:
    return DatasetInfo(
        uri=loc.uri,
        num_rows=int(m["num_rows"]),
        shape=tuple(m["shape"]),
        classes=tuple(m["classes"]),
        mean=tuple(m["mean"]),
        std=tuple(m["std"]),
        shards=tuple(m["shards"]),
        encoding=m.get("encoding", "raw"),
        endpoint_url=loc.endpoint_url,
        manifest=m,
        kind=m.get("kind", "image"),
    )


def open_dataset(uri: str, endpoint_url: str | None = None) -> DatasetInfo:
    """Read a prepared dataset's manifest (fails with a clear error when there is none)."""
    loc = storage.resolve(uri, endpoint_url)
    return info_from_manifest(loc, read_manifest(loc))


# --- reading ---------------------------------------------------------------------------------
def read_arrays(info: DatasetInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A whole (small) prepared dataset as numpy: (images NHWC uint8, labels, ids). Checksums verified."""
    columns = ("id", "image", "label")
    tables = [
        read_shard(loc, s["path"], int(s["rows"]), columns, info.uri, s["sha256"])
        for s, loc in zip(info.shards, shard_locations(info), strict=True)
    ]
    t = pa.concat_tables(tables)
    ids = t.column("id").to_numpy()
    if info.encoding == "jpeg":  # evaluation's centre crops
        from lepton_ray.data.jpeg import decode_cpu

        images = decode_cpu(
            t.column("image").to_pylist(), ids, info.shape[0], seed=None, epoch=0, train=False
        )
    elif info.encoding == "raw":
        images = decode_raw(t.column("image"), info.shape)
    else:
        images = decode_encoded(t.column("image").to_pylist(), info.shape, ids)
    if not images.flags.writeable:  # a view of Arrow's buffer: the caller gets its own array
        images = images.copy()
    return images, t.column("label").to_numpy(), ids


def read_shard_ids(info: DatasetInfo) -> list[np.ndarray]:
    """The row ids of each shard, in manifest order (reads only the ``id`` column)."""
    return [
        read_shard_columns(loc, s["path"], int(s["rows"]), ("id",), info.uri)
        .column("id")
        .to_numpy()
        .astype(np.int64)
        for s, loc in zip(info.shards, shard_locations(info), strict=True)
    ]


def read_ids(info: DatasetInfo) -> np.ndarray:
    """Every row id of a prepared dataset (reads only the ``id`` column)."""
    parts = read_shard_ids(info)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class KeepIds:
    """``map_batches`` filter: keep only the rows whose ``id`` is in ``ids`` (vectorised)."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.sort(np.asarray(ids, np.int64))

    def __call__(self, batch: dict[str, Any] | pa.Table) -> dict[str, np.ndarray] | pa.Table:
        if isinstance(batch, pa.Table):
            mask = np.isin(batch.column("id").to_numpy().astype(np.int64, copy=False), self.ids)
            return batch if mask.all() else batch.filter(pa.array(mask))
        mask = np.isin(np.asarray(batch["id"], np.int64), self.ids)
        return {k: np.asarray(v)[mask] for k, v in batch.items()}


READ_TASK_BYTES = 64 << 20
MIN_READ_TASKS = 8


def as_read_tasks(info: DatasetInfo, task_bytes: int = READ_TASK_BYTES) -> int:
    """Read tasks for raw rows passed through as read (the ring's reads): each reads whole shards,
    about ``task_bytes`` of pixels, but there are no fewer than :data:`MIN_READ_TASKS`
    (one per shard below that), so that a small read still spreads over CPUs. A task's shards
    share what Ray spends per task and per block (scheduling it, finishing it in the reading
    process's executor, handing its output over): Ray Data joins what a task yields into one
    block up to its target block size (128 MiB), so a block holds a task's shards.

    Worked example, 1M 32x32x3 rows in 245 shards of 12 MiB: 49 tasks of 5 shards. Measured on 2
    CPUs (``benchmarks.ring_read``, 204,800 rows in 50 shards, raw pixels), the ring's read of an
    epoch took 1.96-1.99 CPU-seconds with a task and a block per shard, 0.82-1.36 in tasks of 5
    (eight runs; the tasks' own share 1.12-1.17 against 0.46-0.98). Tasks of 5 that handed each
    shard over as a block of its own took 1.50-1.55 (the tasks 1.0): Ray's cost is per block as
    much as per task. Joined, a block is as large as its task's shards, so the ring's reads size
    tasks to the node's object store
    (:func:`lepton_ray.train.ring_reader.read_task_bytes`)."""
    shards = len(info.shards)
    if not shards:
        return 1
    largest = max(int(s["rows"]) for s in info.shards) * max(int(np.prod(info.shape)), 1)
    per_task = max(1, task_bytes // max(largest, 1))
    return max(min(shards, MIN_READ_TASKS), math.ceil(shards / per_task))


def read_ray(
    info: DatasetInfo,
    *,
    augment: tuple[str, ...] = (),
    shuffle_seed: int | None = None,
    shuffle: bool | str = False,
    batch_size: int = 256,
    augment_seed: int | None = None,
    keep_ids: np.ndarray | None = None,
    normalize: bool = True,
    epoch: int = 0,
    jpeg: str = "center",
    decode_args: dict[str, Any] | None = None,
    layout: str = "nchw",
    task_args: dict[str, Any] | None = None,
    read_task_bytes: int = READ_TASK_BYTES,
) -> ray.data.Dataset:
    """A Ray Dataset of preprocessed rows (``image`` float32 CHW, ``label``, ``id``; with
    ``normalize=False`` the images stay uint8 CHW, to be normalised where they are consumed).

    ``shuffle`` reshuffles on every execution (i.e. every epoch), reproducibly from
    ``shuffle_seed``: ``"global"`` (or True) shuffles all rows through the object store;
    ``"files"`` only shuffles the order of the shards, so the dataset streams with bounded memory
    (pair it with a local shuffle buffer where the batches are consumed). ``keep_ids`` keeps only
    those rows (filtered before decoding). Decoding and augmentation run in ``map_batches`` on CPU
    workers; each row is augmented from (``augment_seed``, ``epoch``, its id), so the dataset
    augments the same way on every execution: read one per epoch for a fresh augmentation.
    A JPEG dataset's rows are cropped as ``jpeg`` says: ``center`` (evaluation), ``random``
    (training: keyed like augmentation), or ``bytes`` (left encoded for the worker's device).
    ``decode_args``: Ray remote args of the decoding tasks (where they may run); ``task_args``: of
    every task the dataset runs (a training worker's runtime environment without its set-up hook:
    :func:`lepton_ray.train.prestart.child_options`). ``layout="nhwc"``
    (with ``normalize=False``) leaves images as stored, (N, H, W, C); a raw dataset's rows then
    pass through as read (:class:`~lepton_ray.data.transforms.Preprocessor`), by tasks of about
    ``read_task_bytes`` of pixels each (:func:`as_read_tasks`).
    """
    import ray.data
    from ray.data import RandomSeedConfig

    from lepton_ray.data.shard_source import ShardSource

    mode = {True: "global", False: "none"}.get(shuffle, shuffle)
    if mode not in ("global", "files", "none"):
        raise DataError(f"unknown shuffle {shuffle!r} (global, files or none)")
    pre = info.preprocessor(check_augment(augment), augment_seed, normalize, epoch, jpeg, layout)
    # Raw rows passed through as read have nothing to batch or spread out: a task and a block
    # per few shards (as_read_tasks; Ray Data otherwise splits each file's output to make
    # 200 blocks, and a split read or a batch size keeps it from fusing the map into the read
    # tasks). On 2 CPUs, 204,800 32x32 rows in 50 shards through the ring's reader: 2.4
    # CPU-seconds a task per shard, not 3.9.
    whole = {"override_num_blocks": as_read_tasks(info, read_task_bytes)} if pre.as_read else {}
    # Planned from the manifest (shard_source): no sampling tasks or footer reads per execution.
    source = ShardSource(
        info, shard_locations(info), ("id", "image", "label"), mode == "files", shuffle_seed
    )
    task = task_args or {}
    ds = ray.data.read_datasource(source, **whole, **task)
    if keep_ids is not None:
        ds = ds.map_batches(KeepIds(keep_ids), batch_format="pyarrow", zero_copy_batch=True, **task)
    if mode == "global":
        seed = (
            None
            if shuffle_seed is None
            else RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True)
        )
        ds = ds.random_shuffle(seed=seed, **task)
    # Arrow batches: the pixels are read in place from the Parquet column's buffer.
    return ds.map_batches(
        pre,
        batch_format="pyarrow",
        zero_copy_batch=True,
        batch_size=None if pre.as_read else decode_batch_rows(info.shape, batch_size, normalize),
        **{**task, **(decode_args or {})},
    )


DECODED_BATCH_BYTES = 16 << 20
"""The most decoded pixels one ``map_batches`` call of :func:`read_ray` returns."""


def decode_batch_rows(shape: Sequence[int], batch_size: int, normalize: bool) -> int:
    """Rows per decoding call: ``batch_size``, capped at :data:`DECODED_BATCH_BYTES` of output.

    Small rows keep the asked size (32x32x3 uint8: 5,461 rows fit). A JPEG dataset's 224x224x3
    rows take 147 KiB each, so 1,024 of them made 147 MiB blocks: a few long tasks that left CPUs
    idle and a consumer that waited for whole blocks. Capped, such a set is decoded 111 rows a call.
    Measured on 2 CPUs, 1,024 JPEGs in 8 shards, decoded and
    iterated through a whole-epoch shuffle buffer (the second epoch): 155 images/s at 1,024 rows a
    call, 364 at 111."""
    row = int(np.prod(shape)) * (4 if normalize else 1)
    return max(1, min(batch_size, DECODED_BATCH_BYTES // max(row, 1)))


def shuffle_mode(info: DatasetInfo, requested: str, object_store_bytes: float) -> str:
    """Resolve ``auto``: a global shuffle while the dataset takes at most a quarter of the object
    store (it passes through it whole every epoch), else shard-order shuffling that streams."""
    if requested != "auto":
        return requested
    return "global" if info.pixel_bytes <= object_store_bytes / 4 else "files"


def _count_labels(ds: Any, split: str) -> tuple[int, int]:
    """Rows and classes (the largest label + 1) of a Ray Dataset, in one pass over its labels,
    whole blocks at a time. Not ``ds.count()`` and ``ds.max("label")``: two executions,
    and Ray Data's ``max`` is a hash aggregation that starts aggregator actors (13 s of a
    400-row ``fit()`` on 2 CPUs)."""
    from ray.data.dataset import MaterializedDataset

    # Blocks already in the object store are read where they are; a projection would be a task
    # per block (from_items makes 200: 3-6 s on 2 CPUs against 0.4 s).
    labels_of = ds if isinstance(ds, MaterializedDataset) else ds.select_columns(["label"])
    rows, low, high = 0, 0, -1
    for batch in labels_of.iter_batches(batch_size=None, batch_format="numpy"):
        labels = np.asarray(batch["label"])
        if labels.dtype.kind not in "biuf":
            raise DataError(
                f"the {split} Ray Dataset's labels must be class indices, got {labels.dtype} values"
            )
        if labels.size:
            rows += len(labels)
            low, high = min(low, int(labels.min())), max(high, int(labels.max()))
    if low < 0:
        raise DataError(f"the {split} Ray Dataset's labels must be class indices >= 0, got {low}")
    return rows, high + 1


def describe_ray_dataset(ds: Any, split: str) -> DatasetInfo:
    """Shape, classes and channel statistics of a user's Ray Dataset with ``image`` (uint8 HWC)
    and ``label`` columns (statistics from its first 2,048 rows)."""
    cols = set(ds.columns() or [])
    if not {"image", "label"} <= cols:
        raise DataError(
            f"the {split} Ray Dataset needs 'image' and 'label' columns, has {sorted(cols)}"
        )
    sample = ds.take_batch(2048, batch_format="numpy")
    images = np.asarray(sample["image"])
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(
            f"the {split} Ray Dataset's images must be uint8 HW or HWC arrays, got {images.dtype} {images.shape}"
        )
    if images.ndim == 3:
        raise DataError(
            f"the {split} Ray Dataset's images must have a channel axis (H, W, C), got {images.shape[1:]}"
        )
    x = images.astype(np.float64) / 255.0
    num_rows, n_classes = _count_labels(ds, split)
    return DatasetInfo(
        uri=f"ray-dataset:{split}",
        num_rows=num_rows,
        shape=tuple(images.shape[1:]),
        classes=tuple(str(i) for i in range(n_classes)),
        mean=tuple(x.mean(axis=(0, 1, 2))),
        std=tuple(np.maximum(x.std(axis=(0, 1, 2)), 1e-6)),
    )
