"""What is learned from a batch: image or text classification, next-token prediction or
click-through.

A task says how a batch from the feed becomes ``(x, y)`` on the device, the loss the step
minimises, and how many rows it predicted right; :class:`~lepton_ray.train.step.TrainStep`,
:func:`~lepton_ray.train.step.evaluate` and the loop use it, so both kinds of data go through the
same step, arithmetic and feeds. The dataset's kind chooses it (:func:`for_data`).

Counts are per row, so the loop's sums (loss * rows, correct, rows) and the global-batch
arithmetic are the same for both: a row's loss is the mean over its positions, and its "correct"
is the share of its positions predicted right (1 or 0 for an image or a click row). Every text block has the
same length, so the mean of row means is the mean over tokens: ``train_accuracy`` is token
accuracy. E.g. 2 blocks of 4 targets, 3 and 1 right: correct = 3/4 + 1/4 = 1.0 row, accuracy 0.5.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


class Classification:
    """Images (uint8 N, C, H, W) -> normalised float on the device (``pixels``, augmented there
    when ``augment`` is given); labels (N,) int64; logits (N, classes)."""

    kind = "image"
    main_metric = "accuracy"  # what pipelines.evaluate/promote judge a checkpoint by
    val_metrics: tuple[str, ...] = ()  # reported beside val_loss and val_accuracy

    def __init__(self, pixels: Any = None, augment: Any = None):
        self.pixels, self.augment = pixels, augment

    def inputs(self, batch: dict[str, torch.Tensor], train: bool = True) -> tuple[Any, Any]:
        augment = self.augment if train else None
        x = self.pixels(batch["image"], augment, batch.get("id"))
        return x, batch["label"].to(self.pixels.device, non_blocking=True)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(1) == y).sum()

    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, reduction="sum")

    def metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {}


class TextClassification(Classification):
    """Labelled texts (uint8 N, 1, 1, T byte tokens, 0 = padding, as the feeds hand them) ->
    int64 (N, T) on the device, never normalised or augmented; labels (N,) int64; logits (N,
    classes): the loss, counts and metrics are image classification's."""

    kind = "text-label"

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.move = {"non_blocking": device.type == "cuda"}

    def inputs(self, batch: dict[str, torch.Tensor], train: bool = True) -> tuple[Any, Any]:
        tokens = batch["image"].to(self.device, **self.move)
        x = tokens.view(len(tokens), -1).long()  # (N, T)
        return x, batch["label"].to(self.device, **self.move)


class NextToken:
    """Token blocks (uint8 N, 1, 1, T + 1, as the feeds hand them) -> ``x = tokens[:, :-1]``,
    ``y = tokens[:, 1:]``, int64 on the device; logits (N, T, vocab); cross-entropy over every
    position."""

    kind = "text"
    main_metric = "perplexity"  # lower is better
    val_metrics = ("val_perplexity",)

    def __init__(self, device: torch.device, block_size: int):
        self.device, self.block_size = device, block_size
        self.move = {"non_blocking": device.type == "cuda"}

    def inputs(self, batch: dict[str, torch.Tensor], train: bool = True) -> tuple[Any, Any]:
        tokens = batch["image"].to(self.device, **self.move)
        tokens = tokens.view(len(tokens), -1).long()  # (N, T + 1)
        return tokens[:, :-1], tokens[:, 1:]

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())  # mean over N * T tokens

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(-1) == y).sum() / y.shape[1]

    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (
            F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]
        )

    def metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Perplexity (exp of the mean token loss) and tokens/s (T targets per block)."""
        out = {
            "perplexity": _exp(metrics["train_loss"]),
            "tokens_per_second": metrics["samples_per_second"] * self.block_size,
        }
        if "val_loss" in metrics:
            out["val_perplexity"] = _exp(metrics["val_loss"])
        return out


class ClickThrough:
    """Click rows (uint8 N, 1, 1, 4 * (D + T), as the feeds hand them: D float32 then T int32,
    :mod:`lepton_ray.data.ctr`) -> :class:`~lepton_ray.dlrm.Features` on the device; labels 0/1;
    logits (N,); binary cross-entropy; "correct" is a logit on the right side of 0 (p = 0.5).

    Validation also reports ``val_auc``, exact over the whole validation set: ``loss_sum`` (the
    validation path's call; training steps use ``loss``) keeps each batch's logits and labels, and
    :meth:`metrics` ranks them once and forgets them."""

    kind = "ctr"
    main_metric = "auc"
    val_metrics = ("val_auc",)

    def __init__(self, device: torch.device, dense: int):
        self.device, self.dense = device, dense
        self.move = {"non_blocking": device.type == "cuda"}
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def inputs(self, batch: dict[str, torch.Tensor], train: bool = True) -> tuple[Any, Any]:
        from lepton_ray.dlrm import Features

        rows = batch["image"].to(self.device, **self.move)
        rows = rows.reshape(len(rows), -1)  # (N, 4 * (D + T)) bytes, little-endian
        dense = rows[:, : 4 * self.dense].contiguous().view(torch.float32)  # (N, D)
        sparse = rows[:, 4 * self.dense :].contiguous().view(torch.int32).long()  # (N, T)
        return Features(dense, sparse), batch["label"].to(self.device, **self.move)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), y.float())

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((logits > 0).long() == y).sum()

    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.scores.append(logits.detach().float().cpu())
        self.labels.append(y.detach().cpu())
        return F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="sum")

    def metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``val_auc`` once a validation pass has run (the same on every rank: each sees it all)."""
        if not self.scores:
            return {}
        from lepton_ray.data.ctr import auc

        scores, labels = torch.cat(self.scores).numpy(), torch.cat(self.labels).numpy()
        self.scores, self.labels = [], []
        return {"val_auc": auc(scores, labels)}


TASKS = {t.kind: t for t in (Classification, TextClassification, NextToken, ClickThrough)}


def monitorable(kind: str) -> tuple[str, ...]:
    """The per-epoch metrics of a run on data of ``kind`` that ``TrainConfig.monitor`` may name
    (the ``val_*`` ones once there is a validation set)."""
    common = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    return common + TASKS[kind].val_metrics


def lower_is_better(metric: str) -> bool:
    """Losses and perplexities are minimised; accuracies and AUCs maximised."""
    return metric.endswith(("loss", "perplexity"))


def _exp(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # a diverged loss reports a huge perplexity, not an error


def for_data(
    data: dict[str, Any], device: torch.device, pixels: Any = None, augment: Any = None
) -> Classification | NextToken | ClickThrough:
    """The task of a run from its checkpoint's ``data`` section (``kind``, ``block_size``,
    ``dense``)."""
    if data.get("kind", "image") == "text":
        return NextToken(device, int(data["block_size"]))
    if data.get("kind") == "text-label":
        return TextClassification(device)
    if data.get("kind") == "ctr":
        return ClickThrough(device, int(data["dense"]))
    return Classification(pixels, augment)
