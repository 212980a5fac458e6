"""Typed configuration: one small frozen dataclass per component, every field checked on construction.

One system for the library, the pipelines and the CLI. The classes live by concern
(:mod:`~lepton_ray.config.train`, :mod:`~lepton_ray.config.serve`,
:mod:`~lepton_ray.config.pipeline`); :mod:`~lepton_ray.config.schema` checks types and ranges from
their annotations; :mod:`~lepton_ray.config.load` reads YAML and ``key=value`` overrides;
``python -m lepton_ray.config.docs`` writes ``docs/configuration.md`` from the field docstrings.
Importing this package costs neither torch nor Ray (a :class:`ModelSpec` imports the model registry,
and so torch, when one is built).
"""

from lepton_ray.config.load import apply_overrides, load_config, parse_override, read_yaml
from lepton_ray.config.pipeline import (
    SMOKE_ROWS,
    DatasetSpec,
    EvalSpec,
    ModelSpec,
    PipelineConfig,
    PromoteSpec,
    smoke,
)
from lepton_ray.config.schema import FieldError, from_dict, secret_fields, to_dict
from lepton_ray.config.serve import ServeConfig
from lepton_ray.config.train import (
    DataConfig,
    OptimConfig,
    ScalingConfig,
    TrainConfig,
    build_train_config,
    parse_fault,
)

__all__ = [
    "SMOKE_ROWS",
    "DataConfig",
    "DatasetSpec",
    "EvalSpec",
    "FieldError",
    "ModelSpec",
    "OptimConfig",
    "PipelineConfig",
    "PromoteSpec",
    "ScalingConfig",
    "ServeConfig",
    "TrainConfig",
    "apply_overrides",
    "build_train_config",
    "from_dict",
    "load_config",
    "parse_fault",
    "parse_override",
    "read_yaml",
    "secret_fields",
    "smoke",
    "to_dict",
]
