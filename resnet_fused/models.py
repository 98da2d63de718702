"""Fused ResNet constructors: torchvision's, converted.

Each takes torchvision's keyword arguments (``weights=`` included: a torchvision weights
enum or its name loads through torchvision's own mechanism) plus ``backend=``, builds
the torchvision model and converts it in place with :func:`resnet_fused.convert`.
"""

from __future__ import annotations

import torchvision
from torch import nn

from .resnet import convert

__all__ = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]


def _build(name: str, weights, progress: bool, backend: str, kwargs: dict) -> nn.Module:
    model = getattr(torchvision.models, name)(weights=weights, progress=progress, **kwargs)
    return convert(model, backend=backend, inplace=True)


def resnet18(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs):
    """Fused ``torchvision.models.resnet18``."""
    return _build("resnet18", weights, progress, backend, kwargs)


def resnet34(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs):
    """Fused ``torchvision.models.resnet34``."""
    return _build("resnet34", weights, progress, backend, kwargs)


def resnet50(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs):
    """Fused ``torchvision.models.resnet50``."""
    return _build("resnet50", weights, progress, backend, kwargs)


def resnet101(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs):
    """Fused ``torchvision.models.resnet101``."""
    return _build("resnet101", weights, progress, backend, kwargs)


def resnet152(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs):
    """Fused ``torchvision.models.resnet152``."""
    return _build("resnet152", weights, progress, backend, kwargs)


def resnext50_32x4d(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs):
    """Fused ``torchvision.models.resnext50_32x4d``."""
    return _build("resnext50_32x4d", weights, progress, backend, kwargs)


def resnext101_32x8d(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs):
    """Fused ``torchvision.models.resnext101_32x8d``."""
    return _build("resnext101_32x8d", weights, progress, backend, kwargs)


def resnext101_64x4d(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs):
    """Fused ``torchvision.models.resnext101_64x4d``."""
    return _build("resnext101_64x4d", weights, progress, backend, kwargs)


def wide_resnet50_2(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs):
    """Fused ``torchvision.models.wide_resnet50_2``."""
    return _build("wide_resnet50_2", weights, progress, backend, kwargs)


def wide_resnet101_2(*, weights=None, progress: bool = True, backend: str = "auto", **kwargs):
    """Fused ``torchvision.models.wide_resnet101_2``."""
    return _build("wide_resnet101_2", weights, progress, backend, kwargs)
