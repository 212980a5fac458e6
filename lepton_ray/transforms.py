"""Temporary: moved to :mod:`lepton_ray.data.transforms` (the lead deletes this at integration)."""

from lepton_ray.data.transforms import *  # noqa: F403
from lepton_ray.data.transforms import AUGMENTATIONS, Preprocessor, check_augment  # noqa: F401
