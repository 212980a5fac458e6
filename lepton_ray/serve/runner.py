"""The model side of a replica: load a checkpoint, run batches of decoded images.

Kept apart from the Serve deployment class so that the class (which Serve pickles by value when
it is decorated) references no torch state; this module is imported inside the replica. The
benchmark's plain uvicorn baseline calls the same runner.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from lepton_ray import checkpoint
from lepton_ray.config import ServeConfig
from lepton_ray.serve.codec import ClickSpec, InputSpec, click_answers, postprocess, to_model_input


class ModelRunner:
    """A model loaded from a verified checkpoint, with its input spec and version."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.num_cpus)))
        # The checkpoint is read once: manifest, metadata, weights, each checked against its
        # checksum; the version comes with it. A user's model class loads only from the modules
        # the operator trusts (ServeConfig.trusted_modules, $LEPTON_TRUSTED_MODULES).
        loaded = checkpoint.load_checkpoint(
            cfg.checkpoint,
            cfg.endpoint_url,
            map_location=str(self.device),
            trusted_modules=cfg.trusted_modules,
        )
        self.model, self.meta, self.version = loaded.model, loaded.meta, loaded.version
        self.dtype = compute_dtype(cfg.precision, self.device)
        self.model.to(self.dtype)  # generation's KV cache takes the weights' dtype too
        self.spec = InputSpec.from_meta(self.meta)
        self.clicks = ClickSpec.from_meta(self.meta)  # a click model's rows; None for images
        # On a GPU, cuDNN picks its kernels per input shape the first time it sees one: for
        # ResNet-18 on an H200, 33-68 ms for a batch size not seen before against 2.6 ms after.
        # Batches there are padded to a few sizes (batch_buckets), each run once here, so no
        # request pays that.
        # (On a CPU a new shape costs little and padding costs compute: exact sizes.)
        images = self.meta["data"].get("kind", "image") == "image"  # a language model generates
        self.batch_sizes = (
            batch_buckets(cfg.max_batch_size) if images and self.device.type == "cuda" else None
        )
        for size in self.batch_sizes or ():
            self.predict_many([np.zeros((size, *self.spec.shape), np.uint8)])
        self.loaded_at = time.time()

    def predict_many(self, requests: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        """Several requests' images -> one forward pass -> answers split back per request."""
        sizes = [len(r) for r in requests]
        for r in requests:
            if r.shape[1:] != self.spec.shape:
                raise ValueError(
                    f"model {self.version} takes images of shape {self.spec.shape}, got {r.shape[1:]}"
                )
        images = np.concatenate(requests)
        n = len(images)
        if self.batch_sizes and (size := padded_size(n, self.batch_sizes)) > n:
            images = np.concatenate([images, np.zeros((size - n, *images.shape[1:]), np.uint8)])
        if self.clicks is not None:  # packed click rows (codec.decode_features) -> Features
            from lepton_ray.data.ctr import unpack
            from lepton_ray.dlrm import Features

            dense, ids = unpack(images, self.clicks.dense)
            x = Features(torch.from_numpy(dense).to(self.dtype), torch.from_numpy(ids))
            x = x.to(self.device)
        else:
            x = torch.from_numpy(to_model_input(images, self.spec))  # pixels, or token ids
            dtype = self.dtype if x.is_floating_point() else x.dtype
            x = x.to(self.device, dtype, non_blocking=True)
        with torch.inference_mode():
            logits = self.model(x)[:n].float().cpu().numpy()
        if self.clicks is not None:
            results = click_answers(logits)
        else:
            results = postprocess(logits, self.spec.classes, self.cfg.top_k)
        out, start = [], 0
        for count in sizes:
            out.append(results[start : start + count])
            start += count
        return out

    def info(self) -> dict[str, Any]:
        return {
            "model_version": self.version,
            "checkpoint": self.cfg.checkpoint,
            "classes": self.spec.classes,
            "input_shape": list(self.spec.shape),
            "architecture": self.meta.get("model"),
            "metrics": self.meta.get("metrics", {}),
            "loaded_at": self.loaded_at,
        }


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``ServeConfig.precision`` on ``device``: ``auto`` is bfloat16 on a GPU, float32 elsewhere."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, precision)


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a GPU replica runs: 1, 2, 4, then multiples of 8, up to the first that
    holds ``max_batch_size`` (at most 7 padded images, 11 sizes for 64)."""
    candidates = [1, 2, 4, *range(8, max_batch_size + 8, 8)]
    return tuple(s for s in candidates if s < max_batch_size) + (
        next(s for s in candidates if s >= max_batch_size),
    )


def padded_size(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``n`` images; past the largest (requests carrying several
    images each), the next multiple of it."""
    for size in buckets:
        if n <= size:
            return size
    return -(-n // buckets[-1]) * buckets[-1]
