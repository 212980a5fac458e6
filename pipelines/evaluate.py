"""Evaluate a run's checkpoint on a prepared split, exactly as the endpoint would see the images.

    python -m pipelines.evaluate --config pipelines/configs/mnist.yaml               # best checkpoint
    python -m pipelines.evaluate --config pipelines/configs/mnist.yaml --set evaluate.checkpoint=last

Loads the verified checkpoint, reads the split shard by shard (checksums verified), normalises
with the statistics the checkpoint recorded (what Serve does) and writes loss, accuracy,
per-class accuracy and the confusion matrix to ``<run>/eval/<checkpoint>-<split>.json`` (next to
the checkpoint when it is outside a run; :class:`lepton_ray.runs.RunLayout` says where).

A user's own model class loads only from a module listed in ``evaluate.trusted_modules``
(``--set evaluate.trusted_modules=mypkg.models``) or ``$LEPTON_TRUSTED_MODULES``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

from lepton_ray.config import PipelineConfig
from pipelines import common
from pipelines.common import find_checkpoint, log


def evaluate(cfg: PipelineConfig, which: str | None = None, loaded: Any = None) -> dict[str, Any]:
    """Metrics of checkpoint ``which`` (default ``evaluate.checkpoint``) on ``evaluate.split``.

    ``loaded``: that checkpoint already loaded (a :class:`lepton_ray.checkpoint.Loaded`), so a
    caller that has read it (``promote``) does not read it again."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lepton_ray import checkpoint, open_dataset, storage
    from lepton_ray.data import read_arrays
    from lepton_ray.errors import ConfigError, DataError
    from lepton_ray.runs import RunLayout, validate_name
    from lepton_ray.serve.codec import InputSpec, to_model_input

    uri = find_checkpoint(cfg, which or cfg.evaluate.checkpoint)
    split = cfg.evaluate.split or cfg.dataset.val_split
    if not split:
        raise ConfigError("nothing to evaluate on: set evaluate.split (or dataset.val_split)")
    validate_name("split", split)
    run, name = RunLayout.of_checkpoint(storage.resolve(uri, cfg.endpoint_url))
    out = run.eval_result(name, split)
    trusted = cfg.evaluate.trusted_modules
    loaded = loaded or checkpoint.load_checkpoint(uri, cfg.endpoint_url, trusted_modules=trusted)
    model, meta = loaded.model, loaded.meta
    info = open_dataset(f"{cfg.dataset_uri}/{split}", cfg.endpoint_url)
    data = meta["data"]
    if data.get("kind") == "text":  # its val_loss and perplexity are in the run's metrics
        raise ConfigError("evaluate scores image classifiers; this checkpoint is a language model")
    if list(info.shape) != list(data["shape"]) or list(info.classes) != list(data["classes"]):
        raise DataError(
            f"{info.uri} ({info.shape}, {info.num_classes} classes) does not match the checkpoint's "
            f"data ({tuple(data['shape'])}, {len(data['classes'])} classes)"
        )
    spec = InputSpec.from_meta(meta)
    k = len(spec.classes)
    confusion = np.zeros((k, k), np.int64)
    loss_sum, started = 0.0, time.perf_counter()
    for shard in info.shards:  # one shard in memory at a time
        images, labels, _ = read_arrays(dataclasses.replace(info, shards=(shard,)))
        for i in range(0, len(labels), cfg.evaluate.batch_size):
            x = torch.from_numpy(to_model_input(images[i : i + cfg.evaluate.batch_size], spec))
            y = torch.tensor(labels[i : i + cfg.evaluate.batch_size], dtype=torch.int64)
            with torch.inference_mode():
                logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            np.add.at(confusion, (y.numpy(), logits.argmax(1).numpy()), 1)
    n = int(confusion.sum())
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    result = {
        "checkpoint": uri,
        "split": split,
        "dataset": info.uri,
        "rows": n,
        "loss": loss_sum / max(n, 1),
        "accuracy": float(confusion.diagonal().sum() / max(n, 1)),
        "per_class_accuracy": {
            c: round(float(a), 4) for c, a in zip(spec.classes, per_class, strict=True)
        },
        "confusion": confusion.tolist(),
        "seconds": round(time.perf_counter() - started, 2),
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.write_json(result)
    result["written_to"] = out.uri
    log(
        f"[eval] {name} on {split}: accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} over {n} images"
    )
    return result


def run(cfg: PipelineConfig) -> dict[str, Any]:
    return {k: v for k, v in evaluate(cfg).items() if k != "confusion"}


def main(argv: list[str] | None = None) -> int:
    return common.main("evaluate", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
