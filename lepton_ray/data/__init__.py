"""Datasets in object storage: prepare them once, read them with Ray Data.

- :mod:`~lepton_ray.data.sources`: where rows come from (the built-in digits, torchvision on disk,
  image folders, Parquet, synthetic).
- :mod:`~lepton_ray.data.text`: text as byte-level token blocks, stored as rows like images
  (``text:PATH``, ``text-parquet:PATH[:COLUMN]``, the built-in ``pydoc-topics``).
- :mod:`~lepton_ray.data.ctr`: click data with a planted signal for a recommendation model
  (``synthetic-ctr:rows=N,tables=T,...``), stored as rows of bytes like text.
- :mod:`~lepton_ray.data.writer`: ``prepare`` and friends write Parquet shards, the manifest last.
- :mod:`~lepton_ray.data.dataset`: the manifest (checked: it is data) and the readers.
- :mod:`~lepton_ray.data.transforms`: numpy batch transforms and the Ray Data ``Preprocessor``.
- :mod:`~lepton_ray.data.device_transforms`: their torch twins for the training device
  (import it directly: it needs torch, this package does not).
- :mod:`~lepton_ray.data.rowhash`: the per-row random numbers both share.
"""

from lepton_ray.data.dataset import (
    FORMAT,
    MANIFEST,
    DatasetInfo,
    KeepIds,
    check_name,
    describe_ray_dataset,
    open_dataset,
    read_arrays,
    read_ids,
    read_ray,
    read_shard_ids,
    shuffle_mode,
)
from lepton_ray.data.sources import BUILTIN_SOURCES, load_mnist5k
from lepton_ray.data.transforms import AUGMENTATIONS, Preprocessor, check_augment
from lepton_ray.data.writer import (
    MIN_SHARDS,
    TARGET_SHARD_BYTES,
    DatasetWriter,
    from_torch,
    prepare,
    shard_rows,
    write_dataset,
)

__all__ = [
    "AUGMENTATIONS",
    "BUILTIN_SOURCES",
    "FORMAT",
    "MANIFEST",
    "MIN_SHARDS",
    "TARGET_SHARD_BYTES",
    "DatasetInfo",
    "DatasetWriter",
    "KeepIds",
    "Preprocessor",
    "check_augment",
    "check_name",
    "describe_ray_dataset",
    "from_torch",
    "load_mnist5k",
    "open_dataset",
    "prepare",
    "read_arrays",
    "read_ids",
    "read_ray",
    "read_shard_ids",
    "shard_rows",
    "shuffle_mode",
    "write_dataset",
]
