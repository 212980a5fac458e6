"""Text as byte-level token blocks, stored the way pixels are.

Tokens are UTF-8 bytes: a vocabulary of 256, no tokenizer to download or train. Documents (files,
Parquet rows, topics) are joined in a fixed order with ``EOT`` (byte 0, which UTF-8 text never
holds) after each, and the token stream is cut into blocks of ``block_size + 1`` tokens: the
model reads the first ``block_size`` and predicts the last ``block_size`` (each shifted by one).

Blocks overlap by one token: block ``i`` holds tokens ``[i*T, i*T + T]`` (``T = block_size``), so
every token after the first is a target exactly once, and a block's id is ``i`` (its offset in
the stream is ``id * T``). The tail shorter than a block is left out. E.g. 1,000 tokens at T = 256:
blocks 0..2 cover tokens 0..768; tokens 769..999 are dropped.

A block is a row of a prepared dataset like an image of shape ``(1, T + 1, 1)`` (the same
fixed-width ``image`` column, a ``label`` of 0, an ``id``); the manifest says ``kind: "text"``
with ``vocab_size``, ``block_size`` and ``tokenizer: "bytes"``. So sharding, the epoch plans,
exact resume, the device cache and the ring feed handle text unchanged. The validation split
(``test``) is a seeded random tenth of the blocks, held out whole, as ``mnist5k`` holds out digits.

Sources (``lepton-ray data prepare SOURCE DEST --block-size T``):

- ``text:PATH``: a UTF-8 text file, or a folder of ``.txt`` files (sorted by path, recursively);
  local or ``s3://``.
- ``text-parquet:PATH[:COLUMN]``: a string column (default ``text``) of a Parquet file or folder
  of them; each row is a document.
- ``pydoc-topics``: the reference text shipped with Python itself (``pydoc_data/topics.py``,
  ~0.7 MB of English about the language), one document per topic: never a download.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton_ray import storage
from lepton_ray.errors import DataError

VOCAB_SIZE = 256
EOT = 0  # ends every document
DEFAULT_BLOCK_SIZE = 256
VAL_FRACTION = 0.1
TEXT_BUILTINS = ("pydoc-topics",)


# --- tokens and blocks (pure) ----------------------------------------------------------------
def encode(text: str) -> np.ndarray:
    """``str`` -> its UTF-8 bytes as uint8 tokens."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).copy()


def decode(tokens: Any) -> str:
    """Tokens -> text (a block can cut a multi-byte character: such bytes become U+FFFD)."""
    return np.asarray(tokens, np.uint8).tobytes().decode("utf-8", errors="replace")


def join_documents(docs: Iterable[bytes]) -> np.ndarray:
    """Documents (UTF-8 bytes) as one token stream, ``EOT`` after each; empty ones left out."""
    parts = [d + bytes([EOT]) for d in docs if d]
    return np.frombuffer(b"".join(parts), np.uint8)


def check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise DataError(f"block_size must be a whole number >= 2, got {block_size!r}")
    return block_size


def cut_blocks(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """(L,) tokens -> (N, block_size + 1) blocks overlapping by one token, N = (L - 1) // T: a
    read-only view (no copy) of ``tokens``."""
    t = check_block_size(block_size)
    n = (len(tokens) - 1) // t
    if n < 1:
        return np.zeros((0, t + 1), np.uint8)
    return np.lib.stride_tricks.as_strided(
        tokens, (n, t + 1), (t * tokens.strides[0], tokens.strides[0]), writeable=False
    )


def split_blocks(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Block indices per split: a seeded ``VAL_FRACTION`` of ``n`` (at least one) held out as
    ``test``, the rest ``train``; each sorted. E.g. n = 25 -> 2 test blocks, 23 train."""
    k = max(1, round(n * VAL_FRACTION))
    held = np.random.default_rng(seed).permutation(n)[:k]
    mask = np.zeros(n, bool)
    mask[held] = True
    return {"train": np.flatnonzero(~mask), "test": np.flatnonzero(mask)}


def manifest_fields(block_size: int) -> dict:
    """What a text dataset's manifest says besides what every dataset's says."""
    return {
        "kind": "text",
        "tokenizer": "bytes",
        "vocab_size": VOCAB_SIZE,
        "block_size": block_size,
    }


@dataclass(frozen=True)
class Blocks:
    """A text source cut into blocks, per split ``(rows (N, 1, T + 1, 1) uint8, labels 0, ids)``
    with ids the block indices; what :mod:`lepton_ray.data.sources` makes a ``Source`` of. Labelled
    text (:mod:`lepton_ray.data.labelled_text`) comes the same way, with its class names."""

    name: str
    splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    manifest: dict
    skipped: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # labelled text only; token blocks have none


def text_blocks(
    name: str, tokens: np.ndarray, block_size: int, skipped: list[str] | None = None
) -> Blocks:
    """The blocks of ``tokens`` in a ``train`` and a held-out ``test`` split."""
    t = check_block_size(block_size)
    if len(tokens) == 0:
        raise DataError(f"{name}: the text is empty")
    blocks = cut_blocks(tokens, t)
    if len(blocks) < 2:
        raise DataError(
            f"{name}: {len(tokens)} tokens make {len(blocks)} block(s) of {t + 1}; at least 2 are "
            "needed (one is held out for validation): use a smaller block_size or more text"
        )
    splits = {}
    for split, idx in split_blocks(len(blocks)).items():
        rows = blocks[idx].reshape(len(idx), 1, t + 1, 1)  # fancy indexing: a copy
        splits[split] = (rows, np.zeros(len(idx), np.int64), idx.astype(np.int64))
    return Blocks(name, splits, manifest_fields(t), list(skipped or []))


# --- sources ---------------------------------------------------------------------------------
def is_text_source(source: str) -> bool:
    return source in TEXT_BUILTINS or source.partition(":")[0] in ("text", "text-parquet")


def canonical(source: str) -> str:
    """The name a text source is recorded under (what makes ``prepare`` idempotent)."""
    if source in TEXT_BUILTINS:
        return f"builtin:{source}"
    kind, _, arg = source.partition(":")
    if kind == "text":
        return f"text:{storage.resolve(arg).uri}"
    path, column = _parquet_arg(arg)
    return f"text-parquet:{storage.resolve(path).uri}:{column}"


def load(
    source: str, block_size: int, *, skip_bad: bool = False, endpoint_url: str | None = None
) -> Blocks:
    """The blocks of a text source (see the module docstring)."""
    if source == "pydoc-topics":
        return text_blocks(f"builtin:{source}", join_documents(pydoc_topics()), block_size)
    kind, _, arg = source.partition(":")
    if not arg:
        raise DataError(f"{source!r} names no path: use {kind}:PATH")
    skipped: list[str] = []
    if kind == "text":
        docs = list(_text_files(storage.resolve(arg, endpoint_url), skip_bad, skipped))
    else:
        path, column = _parquet_arg(arg)
        docs = list(_parquet_column(storage.resolve(path, endpoint_url), column, skip_bad, skipped))
    return text_blocks(canonical(source), join_documents(docs), block_size, skipped)


def pydoc_topics() -> list[bytes]:
    """The topics of Python's own ``pydoc_data/topics.py``, in name order, as UTF-8."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its documentation data
        raise DataError("this Python has no pydoc_data.topics (built without its docs)") from None
    return [topics[k].encode("utf-8") for k in sorted(topics)]


def _parquet_arg(arg: str) -> tuple[str, str]:
    """``PATH[:COLUMN]`` -> (path, column); a tail with a ``/`` is part of the path (``s3://``)."""
    path, sep, tail = arg.rpartition(":")
    if sep and tail and "/" not in tail:
        return path, tail
    return arg, "text"


def utf8(data: bytes, where: str) -> bytes:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    return data


def _text_files(loc: storage.Location, skip_bad: bool, skipped: list[str]) -> Iterable[bytes]:
    if loc.is_dir():
        files = sorted(_walk(loc), key=lambda f: f.uri)
        if not files:
            raise DataError(f"no .txt files under {loc.uri}")
    elif loc.exists():
        files = [loc]
    else:
        raise DataError(f"no text file or folder at {loc.uri}")
    for f in files:
        try:
            yield utf8(f.read_bytes(), f.uri)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))


def _walk(loc: storage.Location) -> Iterable[storage.Location]:
    for name in loc.listdir():
        child = loc.join(name)
        if child.is_dir():
            yield from _walk(child)
        elif name.endswith(".txt"):
            yield child


def parquet_tables(loc: storage.Location) -> Iterable[tuple[storage.Location, Any]]:
    """``(file, pyarrow.Table)`` for a Parquet file, or each ``.parquet`` file of a folder in path
    order, read whole (local or ``s3://``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = (
        sorted((loc.join(n) for n in loc.listdir() if n.endswith(".parquet")), key=lambda f: f.uri)
        if loc.is_dir()
        else [loc]
    )
    if not files or not files[0].exists():
        raise DataError(f"no Parquet files at {loc.uri}")
    for f in files:
        try:
            yield f, pq.read_table(io.BytesIO(f.read_bytes()))
        except pa.ArrowInvalid as exc:
            raise DataError(f"{f.uri}: not a readable Parquet file ({exc})") from None


def _parquet_column(
    loc: storage.Location, column: str, skip_bad: bool, skipped: list[str]
) -> Iterable[bytes]:
    import pyarrow as pa

    for f, table in parquet_tables(loc):
        if column not in table.column_names:
            raise DataError(
                f"{f.uri}: no column {column!r} (has {', '.join(table.column_names)}); name the "
                "text column as text-parquet:PATH:COLUMN"
            )
        col = table.column(column)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise DataError(f"{f.uri}: column {column!r} holds {col.type}, not text (string)")
        for row, value in enumerate(col.to_pylist()):
            if value is None:
                if not skip_bad:
                    raise DataError(f"{Path(f.path).name} row {row}: {column!r} is null")
                skipped.append(f"{Path(f.path).name} row {row}: {column!r} is null")
                continue
            yield value.encode("utf-8")
