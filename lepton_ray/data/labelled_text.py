"""Labelled text: one text and its class a row, as byte tokens, stored the way pixels are.

A row's ``image`` holds ``block_size`` byte tokens: the text's UTF-8 bytes, cut after
``block_size`` (a long text is truncated, possibly inside a character) or followed by byte 0 up to
``block_size`` (padding; UTF-8 text never holds byte 0 unless it holds U+0000, which is refused).
:func:`tokenize` is the one tokenizer: the data path and the endpoint's ``{"texts": [...]}``
(:func:`lepton_ray.serve.codec.decode_texts`) both call it. A row is an "image" of shape
``(1, block_size, 1)`` with its class index as ``label`` and an ``id`` (its row number in the
source, after bad rows are left out); the manifest says ``kind: "text-label"``, ``tokenizer:
"bytes"``, ``vocab_size: 256``, ``block_size`` and ``classes`` (the label names, sorted: numbers in
numeric order first). A seeded tenth of the rows (at least one) is held out as ``test``, as the
text sources hold out blocks.

Sources (``lepton-ray data prepare SOURCE DEST --block-size T``, default 128):

- ``text-csv:PATH[:TEXTCOL:LABELCOL]``: a CSV file with a header row (columns ``text`` and
  ``label`` unless named), local or ``s3://``.
- ``text-label-parquet:PATH[:TEXTCOL:LABELCOL]``: a Parquet file or folder of them; the text
  column holds strings, the label column strings or integers.
- ``python-snippets``: built in, nothing to download (:func:`python_snippets`).

Bad input is one line: a missing column, a file that is not UTF-8, an empty or null text or label
(``skip_bad`` leaves such rows out and counts them), fewer than 2 rows, one class only.
"""

from __future__ import annotations

import ast
import csv
import io
import re
import sysconfig
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lepton_ray import storage
from lepton_ray.data import text
from lepton_ray.errors import DataError

KIND = "text-label"
DEFAULT_BLOCK_SIZE = 128
BUILTINS = ("python-snippets",)
PREFIXES = ("text-csv", "text-label-parquet")


# --- tokens (pure): the one tokenizer of the data and the endpoint ------------------------------
def text_problem(value: Any) -> str | None:
    """What makes ``value`` unusable as a text, or None: not a string, empty, holding U+0000 (byte
    0 is padding) or a lone surrogate (no UTF-8 for it)."""
    if not isinstance(value, str):
        return f"is {type(value).__name__}, not a string"
    if not value:
        return "is empty"
    if "\x00" in value:
        return "holds U+0000 (byte 0 pads rows)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    return None


def tokenize(texts: Sequence[str], block_size: int) -> np.ndarray:
    """Texts -> (N, block_size) uint8: each text's UTF-8 bytes, truncated to ``block_size`` or
    padded with 0. E.g. block_size 4: "hi" -> [104, 105, 0, 0]; "héllo" -> [104, 195, 169, 108]."""
    out = np.zeros((len(texts), block_size), np.uint8)
    for i, t in enumerate(texts):
        b = t.encode("utf-8")[:block_size]
        out[i, : len(b)] = np.frombuffer(b, np.uint8)
    return out


def manifest_fields(block_size: int) -> dict:
    """What a labelled-text manifest says besides what every dataset's says (its classes are the
    writer's)."""
    return {
        "kind": KIND,
        "tokenizer": "bytes",
        "vocab_size": text.VOCAB_SIZE,
        "block_size": block_size,
    }


def check_manifest(m: dict, bad: Any) -> None:
    """A labelled-text manifest's own fields: bytes as tokens, rows of ``block_size`` of them, raw,
    at least two classes."""
    block = m.get("block_size")
    if not (isinstance(block, int) and not isinstance(block, bool) and block >= 1):
        raise bad("block_size", "must be a whole number >= 1")
    if m.get("tokenizer") != "bytes" or m.get("vocab_size") != 256:
        raise bad("tokenizer", "must be 'bytes' with vocab_size 256")
    if m.get("shape") != [1, block, 1]:
        raise bad("shape", f"must be [1, {block}, 1] for rows of {block} tokens")
    if m.get("encoding", "raw") != "raw":
        raise bad("encoding", "must be 'raw' for labelled text")
    classes = m.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2):
        raise bad("classes", "must name at least 2 classes for labelled text")


def class_names(labels: Iterable[str]) -> list[str]:
    """The distinct labels, sorted: whole numbers in numeric order first, then the rest."""
    return sorted(set(labels), key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def labelled_blocks(
    name: str,
    texts: list[str],
    labels: list[str],
    block_size: int,
    skipped: list[str] | None = None,
) -> text.Blocks:
    """Labelled texts as rows (N, 1, T, 1) in a ``train`` and a held-out ``test`` split."""
    t = text.check_block_size(block_size)
    if len(texts) < 2:
        raise DataError(
            f"{name}: {len(texts)} labelled row(s); at least 2 are needed (one is held out)"
        )
    classes = class_names(labels)
    if len(classes) < 2:
        raise DataError(
            f"{name}: every row has label {classes[0]!r}: a classifier needs at least 2 classes"
        )
    index = {c: i for i, c in enumerate(classes)}
    rows = tokenize(texts, t).reshape(len(texts), 1, t, 1)
    y = np.asarray([index[label] for label in labels], np.int64)
    splits = {
        split: (rows[idx], y[idx], idx.astype(np.int64))
        for split, idx in text.split_blocks(len(texts)).items()
    }
    return text.Blocks(name, splits, manifest_fields(t), list(skipped or []), classes)


# --- sources ---------------------------------------------------------------------------------
def is_source(source: str) -> bool:
    return source in BUILTINS or source.partition(":")[0] in PREFIXES


def canonical(source: str) -> str:
    """The name a labelled-text source is recorded under (what makes ``prepare`` idempotent)."""
    if source in BUILTINS:
        return f"builtin:{source}"
    kind, _, arg = source.partition(":")
    path, text_col, label_col = _columns_arg(source, arg)
    return f"{kind}:{storage.resolve(path).uri}:{text_col}:{label_col}"


def load(
    source: str, block_size: int, *, skip_bad: bool = False, endpoint_url: str | None = None
) -> text.Blocks:
    """The rows of a labelled-text source (see the module docstring)."""
    if source == "python-snippets":
        texts, labels = python_snippets()
        return labelled_blocks(canonical(source), texts, labels, block_size)
    kind, _, arg = source.partition(":")
    if not arg:
        raise DataError(f"{source!r} names no path: use {kind}:PATH[:TEXTCOL:LABELCOL]")
    path, text_col, label_col = _columns_arg(source, arg)
    loc = storage.resolve(path, endpoint_url)
    rows = _Rows(skip_bad)
    if kind == "text-csv":
        _read_csv(loc, text_col, label_col, rows)
    else:
        _read_parquet(loc, text_col, label_col, rows)
    return labelled_blocks(canonical(source), rows.texts, rows.labels, block_size, rows.skipped)


def _columns_arg(source: str, arg: str) -> tuple[str, str, str]:
    """``PATH[:TEXTCOL:LABELCOL]`` -> (path, text column, label column); a tail with a ``/`` is
    part of the path (``s3://``)."""
    head, sep, label_col = arg.rpartition(":")
    if not (sep and label_col and "/" not in label_col):
        return arg, "text", "label"
    path, sep, text_col = head.rpartition(":")
    if not (sep and text_col and "/" not in text_col):
        raise DataError(
            f"{source!r}: name both columns, PATH:TEXTCOL:LABELCOL (or neither: text, label)"
        )
    return path, text_col, label_col


class _Rows:
    """Texts and label names as they are read; a bad row raises, or with ``skip_bad`` is counted."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.texts: list[str] = []
        self.labels: list[str] = []
        self.skipped: list[str] = []

    def add(self, value: Any, label: Any, where: str) -> None:
        if value is None:
            problem = "text is null"
        elif (wrong := text_problem(value)) is not None:
            problem = f"text {wrong}"
        elif label is None or label == "":
            problem = "label is null" if label is None else "label is empty"
        else:
            self.texts.append(value)
            self.labels.append(str(label))
            return
        self.bad(where, problem)

    def bad(self, where: str, problem: str) -> None:
        if not self.skip_bad:
            raise DataError(f"{where}: {problem}")
        self.skipped.append(f"{where}: {problem}")


def _read_csv(loc: storage.Location, text_col: str, label_col: str, rows: _Rows) -> None:
    if loc.is_dir():
        raise DataError(f"{loc.uri} is a folder: text-csv reads one CSV file")
    if not loc.exists():
        raise DataError(f"no CSV file at {loc.uri}")
    body = text.utf8(loc.read_bytes(), loc.uri).decode("utf-8-sig")  # a BOM is not a column name
    reader = csv.reader(io.StringIO(body, newline=""))
    header = next(reader, None)
    if not header:
        raise DataError(f"{loc.uri}: no header row (the first line names the columns)")
    missing = [c for c in (text_col, label_col) if c not in header]
    if missing:
        raise DataError(
            f"{loc.uri}: no column {missing[0]!r} (has {', '.join(header)}); name the columns as "
            "text-csv:PATH:TEXTCOL:LABELCOL"
        )
    ti, li = header.index(text_col), header.index(label_col)
    name = Path(loc.path).name
    for row in reader:
        if not row:  # a blank line
            continue
        where = f"{name} line {reader.line_num}"
        if len(row) != len(header):
            rows.bad(where, f"has {len(row)} fields, the header {len(header)}")
        else:
            rows.add(row[ti], row[li], where)


def _read_parquet(loc: storage.Location, text_col: str, label_col: str, rows: _Rows) -> None:
    import pyarrow as pa

    for f, table in text.parquet_tables(loc):
        for col in (text_col, label_col):
            if col not in table.column_names:
                raise DataError(
                    f"{f.uri}: no column {col!r} (has {', '.join(table.column_names)}); name the "
                    "columns as text-label-parquet:PATH:TEXTCOL:LABELCOL"
                )
        texts, labels = table.column(text_col), table.column(label_col)
        if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
            raise DataError(f"{f.uri}: column {text_col!r} holds {texts.type}, not text (string)")
        if not (
            pa.types.is_string(labels.type)
            or pa.types.is_large_string(labels.type)
            or pa.types.is_integer(labels.type)
        ):
            raise DataError(
                f"{f.uri}: column {label_col!r} holds {labels.type}, not labels (string or integer)"
            )
        name = Path(f.path).name
        for row, (value, label) in enumerate(
            zip(texts.to_pylist(), labels.to_pylist(), strict=True)
        ):
            rows.add(value, label, f"{name} row {row}")


# --- the built-in corpus ------------------------------------------------------------------------
# Standard-library modules whose sources CPython ships (a fixed list: the corpus does not depend on
# what else is installed); a file a Python version lacks is left out.
SNIPPET_MODULES = (
    "argparse ast base64 bisect calendar collections/__init__ configparser contextlib csv "
    "dataclasses datetime difflib enum fractions ftplib functools gettext heapq http/client "
    "inspect ipaddress json/decoder json/encoder logging/__init__ mailbox operator optparse "
    "pickle pprint queue random shlex shutil smtplib statistics string subprocess tarfile "
    "textwrap threading tokenize traceback typing unittest/case urllib/parse uuid"
).split()
MIN_SNIPPET = 40  # characters (stripped): shorter paragraphs say too little to label


def _paragraphs(body: str) -> list[str]:
    """Blank-line-separated paragraphs of ``body``, dedented, of at least ``MIN_SNIPPET``
    characters."""
    parts = re.split(r"\n[ \t]*\n", body)
    return [textwrap.dedent(p.strip("\n")) for p in parts if len(p.strip()) >= MIN_SNIPPET]


def _source_snippets(src: str) -> tuple[list[str], list[str]]:
    """One module's (code paragraphs, docstring paragraphs): its docstrings' lines are taken out
    of the code before it is cut into paragraphs, so no snippet is in both."""
    tree = ast.parse(src)
    docs, docstring_lines = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs += _paragraphs(doc)
                first = node.body[0]
                docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    lines = src.splitlines()
    code = "\n".join(line for i, line in enumerate(lines, 1) if i not in docstring_lines)
    return _paragraphs(code), docs


def python_snippets(seed: int = 0) -> tuple[list[str], list[str]]:
    """The built-in labelled corpus: paragraphs of text about Python, each labelled by what it is.

    - ``code``: paragraphs of the source of :data:`SNIPPET_MODULES` (comments kept, docstrings
      taken out);
    - ``docstring``: paragraphs of those modules' docstrings (module, class, function);
    - ``reference``: paragraphs of the language reference shipped as ``pydoc_data/topics.py``.

    Paragraphs are separated by blank lines and dedented, at least 40 characters. A text found
    under two labels is left out; each class is cut to the size of the smallest (a seeded choice),
    so the majority class is a third. Deterministic for a given Python version (3.11.7: 1,634 per
    class). Not trivial: prose is in all three (comments in code, examples in docstrings and the
    reference), and lengths overlap.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code: list[str] = []
    docs: list[str] = []
    for module in SNIPPET_MODULES:
        path = stdlib / f"{module}.py"
        if path.is_file():
            c, d = _source_snippets(path.read_text("utf-8"))
            code += c
            docs += d
    if not code:
        raise DataError(f"this Python ships no standard-library sources under {stdlib}")
    reference = [p for doc in text.pydoc_topics() for p in _paragraphs(doc.decode("utf-8"))]
    by_class = {"code": set(code), "docstring": set(docs), "reference": set(reference)}
    seen_twice = set()
    for a, sa in by_class.items():
        for b, sb in by_class.items():
            if a < b:
                seen_twice |= sa & sb
    rng = np.random.default_rng(seed)
    n = min(len(s - seen_twice) for s in by_class.values())
    texts, labels = [], []
    for label, found in by_class.items():
        pool = sorted(found - seen_twice)
        texts += [pool[i] for i in np.sort(rng.permutation(len(pool))[:n])]
        labels += [label] * n
    return texts, labels
