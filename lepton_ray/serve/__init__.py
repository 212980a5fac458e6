"""Serving: a checkpoint as an autoscaling, batched HTTP endpoint on Ray Serve."""

from lepton_ray.config import ServeConfig
from lepton_ray.serve.deploy import build_app, deploy

__all__ = ["ServeConfig", "build_app", "deploy"]
