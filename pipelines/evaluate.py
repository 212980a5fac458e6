"""Evaluate a run's checkpoint on a prepared split, exactly as the endpoint would see the rows.

    python -m pipelines.evaluate --config pipelines/configs/mnist.yaml               # best checkpoint
    python -m pipelines.evaluate --config pipelines/configs/mnist.yaml --set evaluate.checkpoint=last

Loads the verified checkpoint (a sharded one through its consolidated copy), reads the split shard
by shard (checksums verified) and scores it with the task the checkpoint's data chooses
(:func:`lepton_ray.train.task.for_data`): the loss and accuracy every task counts, and what its
main metric needs besides:

- a classifier (images, labelled text): accuracy, per-class accuracy and the confusion matrix;
  images normalised with the statistics the checkpoint recorded, as Serve does;
- a language model: perplexity (``exp`` of the mean token loss) and the tokens evaluated;
- a click model: AUC, beside the planted model's AUC from the dataset's manifest.

The result goes to ``<run>/eval/<checkpoint>-<split>.json`` (next to the checkpoint when it is
outside a run; :class:`lepton_ray.runs.RunLayout` says where).

A user's own model class loads only from a module listed in ``evaluate.trusted_modules``
(``--set evaluate.trusted_modules=mypkg.models``) or ``$LEPTON_TRUSTED_MODULES``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

from lepton_ray.config import PipelineConfig
from pipelines import common
from pipelines.common import find_checkpoint, loadable, log


def main_metric(task: Any) -> str:
    """``accuracy``, ``perplexity`` or ``auc``: what a checkpoint of this task is judged by. A
    task that names none is a classifier over the data's classes."""
    return getattr(task, "main_metric", "accuracy")


class Confusion:
    """A classifier's counts: (K, K), row the label, column the prediction."""

    def __init__(self, data: dict[str, Any], info: Any):
        import numpy as np

        self.classes = list(data["classes"])
        self.counts = np.zeros((len(self.classes),) * 2, np.int64)

    def add(self, logits: Any, y: Any) -> None:
        import numpy as np

        np.add.at(self.counts, (y.numpy(), logits.argmax(1).numpy()), 1)

    def result(self, loss: float) -> dict[str, Any]:
        import numpy as np

        per_class = self.counts.diagonal() / np.maximum(self.counts.sum(axis=1), 1)
        return {
            "per_class_accuracy": {
                c: round(float(a), 4) for c, a in zip(self.classes, per_class, strict=True)
            },
            "confusion": self.counts.tolist(),
        }


class Perplexity:
    """A language model's: ``exp`` of the mean token loss, over this many predicted tokens."""

    def __init__(self, data: dict[str, Any], info: Any):
        self.tokens = 0

    def add(self, logits: Any, y: Any) -> None:
        self.tokens += y.numel()

    def result(self, loss: float) -> dict[str, Any]:
        return {"perplexity": math.exp(min(loss, 700.0)), "tokens": self.tokens}


class Ranking:
    """A click model's AUC over the whole split (exact: every score kept), beside the planted
    model's on the held-out split (``planted_auc``, the ceiling; :mod:`lepton_ray.data.ctr`)."""

    def __init__(self, data: dict[str, Any], info: Any):
        self.planted = info.manifest.get("planted_auc")
        self.scores: list[Any] = []
        self.labels: list[Any] = []

    def add(self, logits: Any, y: Any) -> None:
        self.scores.append(logits.float().numpy())
        self.labels.append(y.numpy())

    def result(self, loss: float) -> dict[str, Any]:
        import numpy as np

        from lepton_ray.data.ctr import auc

        value = auc(np.concatenate(self.scores), np.concatenate(self.labels))
        return {"auc": value, "planted_auc": self.planted}


SCORES = {"accuracy": Confusion, "perplexity": Perplexity, "auc": Ranking}


class ServedPixels:
    """A classifier task's ``pixels``: uint8 (N, C, H, W) -> float, by Serve's own preprocessing
    (:func:`lepton_ray.serve.codec.to_model_input`), so the images are scored as the endpoint
    would see them."""

    def __init__(self, meta: dict[str, Any]):
        import torch

        from lepton_ray.serve.codec import InputSpec

        self.spec, self.device = InputSpec.from_meta(meta), torch.device("cpu")

    def __call__(self, images: Any, augment: Any = None, ids: Any = None) -> Any:
        import torch

        from lepton_ray.serve.codec import to_model_input

        return torch.from_numpy(to_model_input(images.permute(0, 2, 3, 1).numpy(), self.spec))


def evaluate(cfg: PipelineConfig, which: str | None = None, loaded: Any = None) -> dict[str, Any]:
    """Metrics of checkpoint ``which`` (default ``evaluate.checkpoint``) on ``evaluate.split``.

    ``loaded``: that checkpoint already loaded (a :class:`lepton_ray.checkpoint.Loaded`), so a
    caller that has read it (``promote``) does not read it again."""
    import torch

    from lepton_ray import checkpoint, open_dataset, storage
    from lepton_ray.data import read_arrays
    from lepton_ray.errors import ConfigError
    from lepton_ray.runs import RunLayout, validate_name
    from lepton_ray.train.task import for_data

    uri = find_checkpoint(cfg, which or cfg.evaluate.checkpoint)
    split = cfg.evaluate.split or cfg.dataset.val_split
    if not split:
        raise ConfigError("nothing to evaluate on: set evaluate.split (or dataset.val_split)")
    validate_name("split", split)
    run, name = RunLayout.of_checkpoint(storage.resolve(uri, cfg.endpoint_url))
    out = run.eval_result(name, split)
    source = loadable(cfg, uri)  # a sharded checkpoint's copy in one file
    if loaded is None:
        trusted = cfg.evaluate.trusted_modules
        loaded = checkpoint.load_checkpoint(source, cfg.endpoint_url, trusted_modules=trusted)
    model, meta = loaded.model, loaded.meta
    info = open_dataset(f"{cfg.dataset_uri}/{split}", cfg.endpoint_url)
    data = meta["data"]
    check_data_matches(info, data)
    task = for_data(data, torch.device("cpu"), ServedPixels(meta))
    metric = main_metric(task)
    scores = SCORES[metric](data, info)
    loss_sum, correct, n, started = 0.0, 0.0, 0, time.perf_counter()
    size = cfg.evaluate.batch_size
    for shard in info.shards:  # one shard in memory at a time
        rows, labels, _ = read_arrays(dataclasses.replace(info, shards=(shard,)))
        for i in range(0, len(labels), size):
            # (N, H, W, C) as stored -> (N, C, H, W), as the feeds hand a task its rows
            x = torch.from_numpy(rows[i : i + size]).permute(0, 3, 1, 2).contiguous()
            batch = {"image": x, "label": torch.tensor(labels[i : i + size])}
            x, y = task.inputs(batch, train=False)
            with torch.inference_mode():
                logits = model(x)
                loss_sum += float(task.loss_sum(logits, y))
                correct += float(task.correct(logits, y))
            n += len(y)
            scores.add(logits, y)
    loss = loss_sum / max(n, 1)
    result = {
        "checkpoint": uri,
        **({"evaluated": source} if source != uri else {}),
        "split": split,
        "dataset": info.uri,
        "kind": data.get("kind", "image"),
        "rows": n,
        "loss": loss,
        "accuracy": correct / max(n, 1),
        **scores.result(loss),
        "main_metric": metric,
        "seconds": round(time.perf_counter() - started, 2),
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.write_json(result)
    result["written_to"] = out.uri
    log(f"[eval] {name} on {split}: {metric} {result[metric]:.4f}, loss {loss:.4f} over {n} rows")
    return result


def check_data_matches(info: Any, data: dict[str, Any]) -> None:
    """One line when the split is not the kind of data the checkpoint was trained on: its kind,
    row shape, classes, and what the data fixes in the model (``DatasetInfo.model_kwargs``: a
    text set's block and vocabulary sizes, a click set's tables), where the checkpoint says."""
    from lepton_ray.errors import DataError

    ours = {"kind": info.kind, "shape": list(info.shape), "classes": list(info.classes)}
    theirs = {"kind": data.get("kind", "image"), "shape": data["shape"], "classes": data["classes"]}
    ours |= {k: v for k, v in info.model_kwargs().items() if k in data}
    theirs |= {k: data[k] for k in ours if k not in theirs}
    wrong = [k for k in ours if ours[k] != theirs[k]]
    if wrong:
        raise DataError(
            f"{info.uri} does not match the checkpoint's data: "
            + "; ".join(f"{k} {_short(ours[k])} here, {_short(theirs[k])} there" for k in wrong)
        )


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def run(cfg: PipelineConfig) -> dict[str, Any]:
    return {k: v for k, v in evaluate(cfg).items() if k != "confusion"}


def main(argv: list[str] | None = None) -> int:
    return common.main("evaluate", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
