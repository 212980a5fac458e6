"""One prepared shard read from storage, whole or only some columns, and checked against its manifest.

The one reader of shard files, for every path that reads them: Ray Data's read tasks
(:mod:`lepton_ray.data.shard_source`), a whole small dataset as numpy
(:func:`lepton_ray.data.dataset.read_arrays`) and the row ids a feed plans from
(:func:`lepton_ray.data.dataset.read_shard_ids`, which reads the ``id`` column alone). It imports
no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lepton_ray import storage
from lepton_ray.errors import DataError


def read_shard(
    loc: storage.Location,
    name: str,
    rows: int,
    columns: Sequence[str],
    uri: str,
    sha256: str | None = None,
) -> pa.Table:
    """Shard ``name`` of the dataset at ``uri``: its ``columns``, fetched whole from ``loc``; its
    row count checked against the manifest's ``rows``, and its bytes against ``sha256`` where
    given. Each disagreement is a one-line :class:`~lepton_ray.errors.DataError` naming the shard."""
    data = loc.read_bytes()
    if sha256 is not None and storage.sha256_bytes(data) != sha256:
        raise DataError(f"shard {name} of {uri} does not match its checksum")
    return _checked(_parse(pa.BufferReader(data), name, columns, uri), name, rows, uri)


def read_shard_columns(
    loc: storage.Location, name: str, rows: int, columns: Sequence[str], uri: str
) -> pa.Table:
    """Only ``columns`` of shard ``name``, reading only their bytes: the Parquet footer and those
    columns' chunks (ranged reads on S3), not the pixels beside them; e.g. the row ids every
    training worker plans its epochs from. Its row count is checked as :func:`read_shard` checks
    it; its checksum cannot be (it covers the whole file)."""
    table = loc.read_file(lambda f: _parse(f, name, columns, uri))
    return _checked(table, name, rows, uri)


def _parse(source: Any, name: str, columns: Sequence[str], uri: str) -> pa.Table:
    try:
        return pq.read_table(source, columns=list(columns))
    except (pa.ArrowException, ValueError) as exc:  # not OSError: storage errors stay theirs
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"shard {name} of {uri} is not Parquet with {list(columns)}: {why}"
        ) from None


def _checked(table: pa.Table, name: str, rows: int, uri: str) -> pa.Table:
    if table.num_rows != rows:
        raise DataError(
            f"shard {name} of {uri} holds {table.num_rows} rows; its manifest says {rows}"
        )
    return table
