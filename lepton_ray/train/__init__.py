"""Training: the :class:`Trainer` API, the per-worker loop and checkpoints.

``Trainer`` and ``fit`` are imported lazily so that the pure helpers (``lepton_ray.train.batching``)
can be imported without pulling in the trainer and Ray.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Trainer", "fit"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lepton_ray.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'lepton_ray.train' has no attribute {name!r}")
