"""resnet_fused: fused BatchNorm / ReLU / residual-add kernels for ResNet-style networks.

Public API::

    resnet_fused.add_relu(x, residual, *, backend="auto")    # relu(x + residual)
    resnet_fused.add_relu_(x, residual, *, backend="auto")   # in place
    resnet_fused.batch_norm_act(x, running_mean, running_var, weight, bias, training, ...)
    resnet_fused.conv_bn_act(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, ...)
    resnet_fused.FusedBatchNormAct2d, resnet_fused.FusedConvBNReLU2d  # drop-in modules
    resnet_fused.info()                                      # build and backend report

Backends: ``"auto"``, ``"torch"`` (reference), ``"cpu"`` (C++), ``"cuda"`` (C++/CUDA),
``"triton"``; see :mod:`resnet_fused.backends`.
"""

from __future__ import annotations

import torch as _torch

from ._compat import check_torch_version as _check_torch_version

_check_torch_version(_torch.__version__)

from . import _extension, ops  # noqa: E402, F401  (registers the ops and their fake kernels)
from .backends import BACKENDS, BackendUnavailableError, is_available, resolve_backend  # noqa: E402
from .functional.add_relu import add_relu, add_relu_  # noqa: E402
from .functional.auto_choice import auto_choice_sources, auto_choices, auto_timings  # noqa: E402
from .functional.batch_norm_act import batch_norm_act  # noqa: E402
from .functional.conv_bn_act import conv_bn_act, fold_conv_bn  # noqa: E402
from .functional.tuning_cache import TuningCacheWarning  # noqa: E402
from .info import info  # noqa: E402
from .modules import FusedBatchNormAct2d, FusedConvBNReLU2d  # noqa: E402

__version__ = "0.1.0"

# The ResNet parts import torchvision: loaded on first use, so `import resnet_fused` stays
# light.
_LAZY = {
    "FusedBasicBlock": "resnet",
    "FusedBottleneck": "resnet",
    "convert": "resnet",
    "unfuse": "resnet",
    "conversion_report": "resnet",
    "models": None,
    "resnet": None,
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
        return module if _LAZY[name] is None else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "FusedBasicBlock",
    "FusedBatchNormAct2d",
    "FusedBottleneck",
    "FusedConvBNReLU2d",
    "TuningCacheWarning",
    "__version__",
    "add_relu",
    "add_relu_",
    "auto_choice_sources",
    "auto_choices",
    "auto_timings",
    "batch_norm_act",
    "conv_bn_act",
    "conversion_report",
    "convert",
    "fold_conv_bn",
    "info",
    "is_available",
    "models",
    "resolve_backend",
    "unfuse",
]
