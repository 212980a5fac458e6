"""Model registry: architectures that a checkpoint can name and Serve can rebuild.

A checkpoint stores a *spec*, never pickled code: ``{"name": "cnn", "kwargs": {...}}`` for a
registered architecture, or ``{"class": "pkg.module:Class", "kwargs": {...}}`` for a user's own
``nn.Module`` that is importable where the model is served. Weights travel as safetensors.

A spec is data written by whoever wrote the checkpoint: :func:`from_spec` builds only registered
architectures, or ``nn.Module`` classes from modules the operator trusts, with JSON kwargs; see
:mod:`lepton_ray.trust` for the rule, checked before anything is imported.
"""

from __future__ import annotations

import copy
import functools
import importlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lepton_ray.bert import BERT
from lepton_ray.dlrm import DLRM
from lepton_ray.errors import CheckpointError, ConfigError
from lepton_ray.gpt import GPT
from lepton_ray.trust import check_spec, is_trusted
from lepton_ray.trust import trusted_modules as trusted_modules_of

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make an architecture buildable by name from a checkpoint's spec."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        return factory

    return deco


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


@register("cnn")
class ConvNet(nn.Module):
    """A small VGG-style CNN for 28x28 / 32x32 images: conv blocks, global pooling, linear head.

    Two convs at full resolution, two at 1/2, one at 1/4; ~140k parameters at ``width=32``.
    Trained 15 epochs on the built-in 4,000 MNIST digits it scores ~98.5% on the 1,000 held out.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 32, dropout: float = 0.1
    ):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w),
            _conv_bn(w, w),
            nn.MaxPool2d(2),  # (B, w, H/2, W/2)
            _conv_bn(w, 2 * w),
            _conv_bn(2 * w, 2 * w),
            nn.MaxPool2d(2),  # (B, 2w, H/4, W/4)
            _conv_bn(2 * w, 4 * w),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(4 * w, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("resnet18")
def resnet18(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stem and no max-pool, the usual form for 32x32 inputs."""
    import torchvision

    m = torchvision.models.resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


@register("resnet50")
def resnet50(in_channels: int = 3, num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 as for ImageNet (7x7 stride-2 stem, max-pool; 224x224 inputs), no
    pretrained weights: for JPEG folders (:mod:`lepton_ray.data.jpeg`).

    Each residual block's last BatchNorm starts at zero (``zero_init_residual``, Goyal et al.
    2017), so every block starts as the identity: on the H200, trained from scratch with SGD at lr
    0.1 (the default) and batch 256 on the synthetic JPEGs, torchvision's default initialisation
    reached a NaN loss within 4 steps, this one trained (loss 4.6 -> 3.0 in 3 epochs)."""
    import torchvision

    m = torchvision.models.resnet50(num_classes=num_classes, zero_init_residual=True)
    if in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return m


# A nanoGPT-style language model (lepton_ray/gpt.py), registered as the class itself so that a
# pipeline's model.kwargs are checked against its constructor.
register("gpt")(GPT)
# A DLRM-style click model (lepton_ray/dlrm.py), registered the same way.
register("dlrm")(DLRM)
# A BERT-style text classifier (lepton_ray/bert.py), registered the same way.
register("bert")(BERT)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture and remember its spec on the module."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model '{name}' (registered: {', '.join(sorted(_REGISTRY))})")
    model = _REGISTRY[name](**kwargs)
    model.lepton_spec = {"name": name, "kwargs": dict(kwargs)}  # type: ignore[attr-defined]
    return model


def spec_of(model: nn.Module) -> dict[str, Any]:
    """The spec that rebuilds ``model``'s architecture (see the module docstring)."""
    spec = getattr(model, "lepton_spec", None)
    if spec is not None:
        return dict(spec)
    cls = type(model)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "kwargs": {}}


def from_spec(spec: dict[str, Any], trusted_modules: Iterable[str] | str | None = ()) -> nn.Module:
    """Rebuild an architecture (random weights) from a spec written by :func:`spec_of`.

    Refuses, in one line and before any import, a spec that is neither a registered name nor a
    class from a trusted module (``trusted_modules``, ``$LEPTON_TRUSTED_MODULES``; see
    :mod:`lepton_ray.trust`), or whose kwargs are not JSON scalars and lists; after the import,
    a class that is not an ``nn.Module`` subclass is refused before it is called.
    """
    module_name, qualname = check_spec(spec, trusted_modules)
    kwargs = spec.get("kwargs", {})
    if qualname is None:
        factory: Callable[..., nn.Module] = functools.partial(build_model, spec["name"])
        what = f"model '{spec['name']}'"
    else:
        try:
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise CheckpointError(f"cannot import model class {spec['class']!r}: {exc}") from None
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise CheckpointError(
                f"refusing model class {spec['class']!r}: it is not an nn.Module subclass"
            )
        # Where the class is defined counts, not only where it was found: a trusted module that
        # imports another one does not make that one's classes trusted.
        if not is_trusted(obj.__module__, trusted_modules_of(trusted_modules)):
            raise CheckpointError(
                f"refusing model class {spec['class']!r}: it is defined in module "
                f"'{obj.__module__}', which is not trusted"
            )
        factory, what = obj, f"model class {spec['class']!r}"
    try:
        return factory(**kwargs)
    except TypeError as exc:  # kwargs the constructor does not take: the spec is wrong
        raise CheckpointError(f"{what} cannot be built from kwargs {kwargs}: {exc}") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers (so state dicts carry no ``module.``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# Memory layout a model runs in, recorded in its checkpoints (``lepton.json``: "memory_format").
# Channels-last (NHWC memory) is the faster layout for convnets on both CPUs (oneDNN: the ``cnn``
# trains ~1.3x and serves batches ~1.7x faster here than in NCHW) and GPUs (tensor cores).
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def preferred_memory_format(model: nn.Module, shape: tuple[int, int, int]) -> str:
    """ "channels_last" for a model with conv weights that runs on channels-last images of
    ``shape`` (H, W, C), else "contiguous" (a model that ``.view()``s its feature maps cannot)."""
    if not any(p.ndim == 4 for p in model.parameters()):
        return "contiguous"
    h, w, c = shape
    probe = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
    try:
        with torch.no_grad():
            probe(torch.zeros(2, c, h, w).contiguous(memory_format=torch.channels_last))
    except Exception as exc:  # noqa: BLE001 - any failure means: keep NCHW
        reason = " ".join(str(exc).split())[:200]
        warnings.warn(
            f"{type(model).__name__} trains in NCHW memory: its forward fails on channels-last input "
            f"({reason}); with .reshape() or torch.flatten() in place of .view() it could run "
            "channels-last, ~1.3x faster for convnets on CPU",
            stacklevel=2,
        )
        return "contiguous"
    return "channels_last"


def memory_format(meta: dict[str, Any]) -> torch.memory_format:
    """The layout a checkpoint's model runs in (NCHW for checkpoints that do not say)."""
    return MEMORY_FORMATS[meta.get("memory_format", "contiguous")]
