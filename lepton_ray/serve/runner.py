"""The model side of a replica: load a checkpoint, decode requests, run batches.

Kept apart from the Serve deployment class so that the class (which Serve pickles by value when
it is decorated) references no torch state; this module is imported inside the replica.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from lepton_ray import checkpoint, storage
from lepton_ray.serve.codec import (
    InputSpec,
    RequestError,
    decode_image_bytes,
    decode_json,
    postprocess,
    to_model_input,
)
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
        data = self.meta["data"]
        self.spec = InputSpec(data["shape"], data["mean"], data["std"], data["classes"])
        self.version = loc.join(checkpoint.MANIFEST).read_json()["files"][checkpoint.WEIGHTS][:12]
        self.loaded_at = time.time()

    def decode(self, body: bytes, content_type: str) -> np.ndarray:
        """A request body -> (N, H, W, C) uint8, or :class:`RequestError`."""
        if len(body) > self.cfg.max_request_bytes:
            raise RequestError(413, f"request body of {len(body)} bytes exceeds the {self.cfg.max_request_bytes}-byte limit")
        if not body:
            raise RequestError(400, "empty request body")
        if content_type.startswith(("image/", "application/octet-stream")):
            return decode_image_bytes(body, self.spec)[None]
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "body is not valid JSON") from None
        return decode_json(payload, self.spec, self.cfg.max_images_per_request)

    def predict_many(self, requests: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        """Several requests' images -> one forward pass -> answers split back per request."""
        sizes = [len(r) for r in requests]
        x = torch.from_numpy(to_model_input(np.concatenate(requests), self.spec)).to(self.device)
        with torch.inference_mode():
            logits = self.model(x).float().cpu().numpy()
        results = postprocess(logits, self.spec.classes, self.cfg.top_k)
        out, start = [], 0
        for n in sizes:
            out.append(results[start:start + n])
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
