"""Prepare the experiment's dataset into object storage (Parquet shards + manifest per split).

    python -m pipelines.prepare_data --config pipelines/configs/mnist.yaml
    python -m pipelines.prepare_data --config pipelines/configs/mnist.yaml --smoke-test   # 500-row copy

Reads ``dataset.source`` and writes ``<dataset.uri>/<split>/``. Idempotent: a split already
prepared from the same source (and row limit) is left as it is. With ``dataset.limit_rows`` each
split is a seeded random subset of that many rows.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lepton_ray.config import PipelineConfig
from lepton_ray.console import skipped_rows_note
from pipelines import common
from pipelines.common import log


def run(cfg: PipelineConfig) -> dict[str, Any]:
    from lepton_ray import prepare

    d = cfg.dataset
    if d.limit_rows is None:
        infos = prepare(
            d.source,
            cfg.dataset_uri,
            endpoint_url=cfg.endpoint_url,
            root=download_root(cfg),
            skip_bad=d.skip_bad,
            encoding=d.encoding,
            block_size=d.block_size,
        )
    else:
        infos = prepare_subset(cfg)
    for split, i in sorted(infos.items()):
        log(
            f"[data] {split}: {i.num_rows} rows, {len(i.classes)} classes, {len(i.shards)} shards at {i.uri}"
        )
        if note := skipped_rows_note(split, i.manifest):
            log(f"[data] warning: {note}")
    return {
        "dataset": cfg.dataset_uri,
        "splits": {
            s: {
                "uri": i.uri,
                "rows": i.num_rows,
                "shape": list(i.shape),
                "classes": len(i.classes),
                "shards": len(i.shards),
            }
            for s, i in sorted(infos.items())
        },
    }


def download_root(cfg: PipelineConfig) -> str | None:
    """``dataset.root`` with ``~`` expanded (a torchvision download folder)."""
    return os.path.expanduser(cfg.dataset.root) if cfg.dataset.root else None


def prepare_subset(cfg: PipelineConfig) -> dict[str, Any]:
    """``dataset.limit_rows`` rows per split (seeded), written once per source and limit."""
    import numpy as np

    from lepton_ray import storage
    from lepton_ray.data import open_dataset, sources, write_dataset

    d = cfg.dataset
    tag = f"{sources.canonical(d.source)}[limit={d.limit_rows},{d.encoding}]"
    root = storage.resolve(cfg.dataset_uri, cfg.endpoint_url)
    existing = {}
    for split in root.listdir():
        if root.join(split, "manifest.json").exists():
            info = open_dataset(root.join(split).uri, cfg.endpoint_url)
            if info.manifest.get("source") == f"{tag}/{split}":
                existing[split] = info
    if existing:
        return existing
    src = sources.load(
        d.source,
        root=download_root(cfg),
        skip_bad=d.skip_bad,
        endpoint_url=cfg.endpoint_url,
        block_size=d.block_size,
    )
    infos = {}
    for split, part in src.splits.items():
        n = part.num_rows
        if isinstance(part, sources.StreamedSplit):
            # Made row by row from a seed (synthetic-ctr): its first rows are as random a subset
            # as any, and the rest is never made.
            images, labels, ids = part.make(0, min(n, d.limit_rows))
        else:
            rng = np.random.default_rng(0)
            keep = np.sort(rng.choice(n, size=min(n, d.limit_rows), replace=False))
            images, labels, ids = part.images[keep], part.labels[keep], part.ids[keep]
        infos[split] = write_dataset(
            images,
            labels,
            root.join(split),
            classes=src.classes,
            ids=ids,
            source=f"{tag}/{split}",
            skipped=part.skipped,
            encoding=d.encoding,
            manifest=src.manifest,
        )
    return infos


def main(argv: list[str] | None = None) -> int:
    return common.main("prepare_data", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
