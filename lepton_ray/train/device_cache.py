"""The training set held in each worker's device memory: for datasets that fit (``DataConfig.cache``).

A GPU trains small images faster than Ray Data's CPU workers can read, shuffle and hand them over
every epoch (measured on an H200: ResNet-18 at 32x32 trains ~50k samples/s; the Ray Data pipeline
delivers 14k-28k/s). A dataset of that kind is small (CIFAR-10 is 150 MB as uint8), so each worker
reads it once through Ray Data, decoded and unaugmented, keeps it on its device, and draws every
epoch from it: augmentation then runs on the device too.

Each epoch is drawn from the cache in the order of the epoch plan (:mod:`lepton_ray.train.sampling`,
``shuffled_plan``, by :class:`lepton_ray.train.feed.CachedFeed`): one permutation of all rows from
(seed, epoch), cut into global batches, worker ``r`` taking its slice of each. So a global batch
holds the same samples whatever the number of workers, every sample is trained once per epoch, and
a resumed epoch (any world size) continues the same permutation without the samples consumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


class DeviceCache:
    """All training rows (uint8 images, labels, ids) on ``device``, sorted by id."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]], device: torch.device):
        images, labels, ids = [], [], []
        for b in batches:
            images.append(b["image"])
            labels.append(b["label"])
            ids.append(b["id"] if "id" in b else None)
        if not images:
            raise ValueError("the training set is empty: nothing to cache")
        if any(
            i is None for i in ids
        ):  # a user's Ray Dataset without ids: number rows as they came
            id_all = torch.arange(sum(len(x) for x in labels), dtype=torch.int64)
        else:
            id_all = torch.cat(ids).to(torch.int64).cpu()
        order = torch.argsort(id_all)  # independent of the order Ray Data delivered the blocks in
        self.ids = id_all[order].to(device)
        self.images = torch.cat(images)[order].to(device)
        self.labels = torch.cat(labels).to(torch.int64)[order].to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def take(self, rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """A batch of the given row positions: image, label and id of each."""
        return {"image": self.images[rows], "label": self.labels[rows], "id": self.ids[rows]}

    def chunks(self, size: int) -> Iterator[dict[str, torch.Tensor]]:
        """All rows in id order, ``size`` at a time (for validation)."""
        for i in range(0, len(self), size):
            yield self.take(slice(i, i + size))
