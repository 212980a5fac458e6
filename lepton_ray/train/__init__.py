"""Training: the :class:`Trainer` API, the per-worker loop and checkpoints."""

from lepton_ray.train.trainer import Trainer, fit

__all__ = ["Trainer", "fit"]
