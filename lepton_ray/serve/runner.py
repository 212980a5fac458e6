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

from lepton_ray import checkpoint, storage
from lepton_ray.serve.codec import InputSpec, postprocess, to_model_input
from lepton_ray.serve.config import ServeConfig


class ModelRunner:
    """A model loaded from a verified checkpoint, with its input spec and version."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.num_cpus)))
        loc = storage.resolve(cfg.checkpoint, cfg.endpoint_url)
        self.model, self.meta = checkpoint.load_model(loc, map_location=str(self.device))
        self.spec = InputSpec.from_meta(self.meta)
        self.version = loc.join(checkpoint.MANIFEST).read_json()["files"][checkpoint.WEIGHTS][:12]
        self.loaded_at = time.time()

    def predict_many(self, requests: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        """Several requests' images -> one forward pass -> answers split back per request."""
        sizes = [len(r) for r in requests]
        for r in requests:
            if r.shape[1:] != self.spec.shape:
                raise ValueError(
                    f"model {self.version} takes images of shape {self.spec.shape}, got {r.shape[1:]}"
                )
        x = torch.from_numpy(to_model_input(np.concatenate(requests), self.spec)).to(self.device)
        with torch.inference_mode():
            logits = self.model(x).float().cpu().numpy()
        results = postprocess(logits, self.spec.classes, self.cfg.top_k)
        out, start = [], 0
        for n in sizes:
            out.append(results[start : start + n])
            start += n
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
