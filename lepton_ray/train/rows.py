"""One training row as bytes: the ring's unit (:mod:`lepton_ray.train.ring`).

torch-free, so that the ring's reading process (:mod:`lepton_ray.train.ring_reader`) packs rows
without importing torch; :meth:`RowLayout.pack` and :meth:`RowLayout.unpack` import it when called.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RowLayout:
    """One row as bytes: the uint8 image of ``shape`` (C, H, W), stored as (H, W, C) as prepared
    datasets store it (so a raw dataset's pixels are copied as they are read, and each unpacked
    image is channels-last in memory, the layout the convnets train in), padded to 8, then label
    and id as int64. One tensor of rows is one gather per batch and one copy per block."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.pixels = int(np.prod(shape))
        self.meta = -(-self.pixels // 8) * 8  # where label and id start (aligned for int64)
        self.width = self.meta + 16

    def pack_array(self, block: Any, out: np.ndarray | None = None) -> np.ndarray:
        """A block -> (m, width) uint8 rows, written into ``out`` (e.g. pinned memory) if given.

        The block is numpy columns (``image`` (m, H, W, C) uint8, ``label``, ``id``) or an Arrow
        table of them as Ray Data hands it over: ``image`` as Parquet stored it (fixed-width
        bytes per row, read in place) or a tensor column. The pixels are copied once, into the
        rows; numpy does the copy without holding the GIL."""
        n = _num_rows(block)
        rows = np.empty((n, self.width), np.uint8) if out is None else out
        if rows.shape != (n, self.width) or rows.dtype != np.uint8:
            raise ValueError(f"rows for {n} of width {self.width}, got {rows.dtype} {rows.shape}")
        at = 0
        for part in _image_parts(block["image"], self.pixels):
            m = len(part) // self.pixels
            rows[at : at + m, : self.pixels] = part.reshape(m, self.pixels)
            at += m
        if at != n:
            raise ValueError(f"a block of {n} rows has {at} images")
        rows[:, self.pixels : self.meta] = 0
        meta = rows[:, self.meta :].view(np.int64)  # (n, 2)
        meta[:, 0] = _column(block["label"])
        meta[:, 1] = _column(block["id"])
        return rows

    def pack(self, block: Any, pin: bool = False) -> Any:
        """:meth:`pack_array` as a torch tensor: numpy's rows (no copy), or with ``pin`` rows
        written straight into pinned memory (which the ring copies to the device asynchronously)."""
        import torch

        if not pin:
            return torch.from_numpy(self.pack_array(block))
        rows = torch.empty((_num_rows(block), self.width), dtype=torch.uint8, pin_memory=True)
        self.pack_array(block, out=rows.numpy())
        return rows

    def unpack(self, rows: Any) -> dict[str, Any]:
        """(k, width) uint8 tensor -> ``image`` (k, C, H, W) uint8 (a strided view; each image
        channels-last in memory), ``label``, ``id``."""
        import torch

        meta = rows[:, self.meta :].view(torch.int64).t().contiguous()  # (2, k)
        c, h, w = self.shape
        image = rows[:, : self.pixels].view(len(rows), h, w, c).permute(0, 3, 1, 2)
        return {"image": image, "label": meta[0], "id": meta[1]}


def _num_rows(block: Any) -> int:
    """Rows of a block: numpy columns or an Arrow table."""
    return len(block["id"]) if isinstance(block, dict) else block.num_rows


def _column(col: Any) -> np.ndarray:
    """An int64 numpy view (or copy) of a numpy or Arrow column."""
    if hasattr(col, "to_numpy"):  # Arrow (numpy arrays have no to_numpy)
        col = col.to_numpy()
    return np.asarray(col, np.int64)


def _image_parts(col: Any, row_bytes: int) -> list[np.ndarray]:
    """A block's images as flat uint8 arrays of whole rows: the numpy array itself, or one per
    Arrow chunk, viewing Arrow's buffer where the pixels are bytes per row (as Parquet stored
    them: :func:`~lepton_ray.data.transforms.arrow_pixels`)."""
    import pyarrow as pa

    from lepton_ray.data.transforms import arrow_pixels

    if not isinstance(col, pa.ChunkedArray | pa.Array):
        return [np.ascontiguousarray(col, np.uint8).reshape(-1)]
    parts = []
    for chunk in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
        t = chunk.type
        if pa.types.is_fixed_size_binary(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
            parts.append(arrow_pixels(chunk, row_bytes))
        else:  # a tensor column: images Ray Data turned into Arrow after a decode
            parts.append(
                np.ascontiguousarray(chunk.to_numpy(zero_copy_only=False), np.uint8).reshape(-1)
            )
    return parts
