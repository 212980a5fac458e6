"""lepton_ray: elastic PyTorch training and serving on Ray.

The public surface, imported lazily so that ``import lepton_ray`` (and ``lepton-ray --help``)
costs neither torch nor Ray.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Trainer": "lepton_ray.train.trainer",
    "fit": "lepton_ray.train.trainer",
    "TrainConfig": "lepton_ray.config",
    "OptimConfig": "lepton_ray.config",
    "DataConfig": "lepton_ray.config",
    "ScalingConfig": "lepton_ray.config",
    "ServeConfig": "lepton_ray.config",
    "PipelineConfig": "lepton_ray.config",
    "load_config": "lepton_ray.config",
    "prepare": "lepton_ray.data",
    "open_dataset": "lepton_ray.data",
    "read_ray": "lepton_ray.data",
    "DatasetInfo": "lepton_ray.data",
    "build_model": "lepton_ray.models",
    "load_model": "lepton_ray.checkpoint",
    "load_checkpoint": "lepton_ray.checkpoint",
    "deploy": "lepton_ray.serve.deploy",
    "build_app": "lepton_ray.serve.deploy",
    "LeptonError": "lepton_ray.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lepton_ray' has no attribute {name!r}")
