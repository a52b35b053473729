"""Model zoo of the SRigL paper: a registry of FX-traceable networks.

>>> from sparse_compile.models import create_model, list_models
>>> model = create_model("resnet18_cifar", num_classes=10)

Every model is built from torchvision where it has the network (ResNet-18/-50, ViT-B/16,
MobileNet-V3), with the paper's changes (Appendix D): CIFAR stems, no dropout. The rest is here
(Wide ResNet-22-2, the LeNet-300-100 style MLP). All trace with ``sparse_compile.fx.trace``.

Adding a family: a small module with a builder decorated by :func:`register_model`, imported below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

__all__ = ["ModelSpec", "register_model", "create_model", "list_models", "model_spec", "input_shape"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its builder and the defaults a caller needs to feed it."""

    name: str
    builder: Callable[..., nn.Module]
    num_classes: int
    input_shape: tuple  # one example, no batch dimension
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, num_classes: int, input_shape: tuple, description: str = ""):
    """Decorator registering ``builder(num_classes=..., **kw) -> nn.Module`` under ``name``."""

    def deco(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].builder.__module__})")
        doc = description or (builder.__doc__ or "").strip().splitlines()[0]
        _REGISTRY[name] = ModelSpec(name, builder, num_classes, tuple(input_shape), doc)
        return builder

    return deco


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name`` (ValueError listing the known names if unknown)."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return spec


def create_model(name: str, num_classes: Optional[int] = None, **kw) -> nn.Module:
    """Build the registered model ``name`` with randomly initialised weights.

    ``num_classes`` defaults to the model's data set (10 for CIFAR-10 / digits, 1000 for ImageNet);
    other keyword arguments go to the builder (e.g. ``image_size=32`` for ``vit_b_16``,
    ``in_features=784`` for ``mlp``, ``widen_factor=4`` for ``wide_resnet22_cifar``).
    """
    spec = model_spec(name)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return spec.builder(num_classes=spec.num_classes if num_classes is None else num_classes, **kw)


def input_shape(name: str, **kw) -> tuple:
    """Shape of one input example (no batch dimension) for ``create_model(name, **kw)``.

    Follows the builder arguments that change it: ``image_size`` (square images) and ``in_features``.
    """
    shape = model_spec(name).input_shape
    if kw.get("image_size") is not None and len(shape) == 3:
        return (shape[0], int(kw["image_size"]), int(kw["image_size"]))
    if kw.get("in_features") is not None and len(shape) == 1:
        return (int(kw["in_features"]),)
    return shape


def remove_dropout(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Dropout`` by ``nn.Identity`` in place (Appendix D.3/D.4: no dropout, so a
    sparse layer can never lose all its live inputs to it). Parameter names are unchanged."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(parent, child_name, nn.Identity())
    return model


# Importing the family modules registers their models.
from . import mlp, resnet_cifar, wide_resnet, imagenet, small_cnn  # noqa: E402,F401
