"""Temporary: moved to :mod:`lepton_ray.data.device_transforms` (the lead deletes this at
integration, once lepton_ray/train/ calls ``Augmenter(names, device, seed)`` and ``augment(x, ids)``)."""

from lepton_ray.data.device_transforms import *  # noqa: F403
from lepton_ray.data.device_transforms import Augmenter as _Augmenter


class Augmenter(_Augmenter):
    """Accepts the old ``rank`` argument, which no longer matters."""

    def __init__(self, names, device, seed, rank=0):  # noqa: ARG002
        super().__init__(names, device, seed)
