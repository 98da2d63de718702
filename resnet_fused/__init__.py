"""resnet_fused: fused BatchNorm / ReLU / residual-add kernels for ResNet-style networks.

Public API::

    resnet_fused.add_relu(x, residual, *, backend="auto")    # relu(x + residual)
    resnet_fused.add_relu_(x, residual, *, backend="auto")   # in place
    resnet_fused.info()                                      # build and backend report

Backends: ``"auto"``, ``"torch"`` (reference), ``"cpu"`` (C++), ``"cuda"`` (C++/CUDA),
``"triton"``; see :mod:`resnet_fused.backends`.
"""

from __future__ import annotations

from . import _extension, ops  # noqa: F401  (registers the ops and their fake kernels)
from .backends import BACKENDS, BackendUnavailableError, is_available, resolve_backend
from .functional import add_relu, add_relu_, batch_norm_act
from .info import info
from .modules import FusedBatchNormAct2d

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "FusedBatchNormAct2d",
    "__version__",
    "add_relu",
    "add_relu_",
    "batch_norm_act",
    "info",
    "is_available",
    "resolve_backend",
]
