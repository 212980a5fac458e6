"""One training row as bytes: the ring's unit (:mod:`lepton_ray.train.ring`).

torch-free, so that the ring's reading process (:mod:`lepton_ray.train.ring_reader`) packs rows
without importing torch; :meth:`RowLayout.pack` and :meth:`RowLayout.unpack` import it when called.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RowLayout:
    """One row as bytes: the uint8 image (``shape``, C*H*W bytes), padded to 8, then label and id
    as int64. One tensor of rows is one gather per batch and one copy per block."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.pixels = int(np.prod(shape))
        self.meta = -(-self.pixels // 8) * 8  # where label and id start (aligned for int64)
        self.width = self.meta + 16

    def pack_array(self, block: dict[str, Any]) -> np.ndarray:
        """Numpy columns (``image`` (m, *shape) uint8, ``label``, ``id``) -> (m, width) uint8."""
        n = len(block["id"])
        rows = np.empty((n, self.width), np.uint8)
        rows[:, : self.pixels] = np.asarray(block["image"], np.uint8).reshape(n, self.pixels)
        rows[:, self.pixels : self.meta] = 0
        meta = rows[:, self.meta :].view(np.int64)  # (n, 2)
        meta[:, 0] = np.asarray(block["label"], np.int64)
        meta[:, 1] = np.asarray(block["id"], np.int64)
        return rows

    def pack(self, block: dict[str, Any]) -> Any:
        """:meth:`pack_array` as a torch tensor (no copy)."""
        import torch

        return torch.from_numpy(self.pack_array(block))

    def unpack(self, rows: Any) -> dict[str, Any]:
        """(k, width) uint8 tensor -> ``image`` (k, *shape) uint8 (a strided view), ``label``,
        ``id``."""
        import torch

        meta = rows[:, self.meta :].view(torch.int64).t().contiguous()  # (2, k)
        image = rows[:, : self.pixels].view(len(rows), *self.shape)
        return {"image": image, "label": meta[0], "id": meta[1]}
