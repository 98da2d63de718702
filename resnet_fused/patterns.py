"""The one pattern table of both converters: which modules are the Conv2d, BatchNorm and
activation of a fused site, and why one is not.

:func:`resnet_fused.convert` has two mechanisms (:mod:`resnet_fused.resnet`: torchvision's
blocks as fused block classes; :mod:`resnet_fused.graph_convert`: every other module,
traced with ``torch.fx``). Both read what they may fuse from here:

* the BatchNorms the kernels compute: ``nn.BatchNorm2d`` and ``nn.SyncBatchNorm``
  (:data:`BN_TYPES`, exactly: a torchvision block's units); in traced graphs also a
  norm-act BatchNorm (:func:`is_norm_act`) and a frozen BatchNorm (:func:`is_frozen_bn`),
  recognised by structure (timm is never imported);
* the convolution: exactly ``nn.Conv2d`` with zeros padding (:func:`why_not_conv`);
* the spellings of ReLU and add that a traced graph may use, and the activations the
  report accounts for when they are not fused (those the kernels do not apply:
  :data:`KERNEL_ACTS` says which they apply; the fused ones are resnet_fused.activations');
* resnet_fused's own module classes (:func:`register`, :func:`own_classes`), which the
  graph pass never traces into.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import act_of_module
from .modules import FusedBatchNormAct2d, FusedConvBNReLU2d, _conv_padding

__all__ = [
    "BN_TYPES",
    "is_batch_norm",
    "is_frozen_bn",
    "is_norm_act",
    "own_classes",
    "register",
    "why_not_bn",
    "why_not_conv",
    "why_not_unit",
]

# --- BatchNorms ---------------------------------------------------------------------------

BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)  # what a torchvision block's units take, exactly


def is_norm_act(m: object) -> bool:
    """A BatchNorm that carries its activation, recognised by its structure (timm's
    ``BatchNormAct2d`` and ``SyncBatchNormAct``, without importing timm): a subclass of
    ``nn.BatchNorm2d`` or ``nn.SyncBatchNorm`` whose only children are ``drop`` and
    ``act``. Its forward is the BatchNorm's, then ``drop``, then ``act``."""
    return (
        isinstance(m, BN_TYPES)
        and type(m) not in BN_TYPES
        and set(m._modules) == {"drop", "act"}
        and all(isinstance(c, nn.Module) for c in m._modules.values())
    )


_FROZEN_BUFFERS = {"weight", "bias", "running_mean", "running_var"}


def is_frozen_bn(m: object) -> bool:
    """A frozen BatchNorm, recognised by its structure (torchvision's
    ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``): no parameters, exactly the
    buffers weight, bias, running_mean and running_var (1-d, one size), a float ``eps``,
    and no children or exactly ``drop`` and ``act``. It normalises with its fixed
    statistics and affine, as an ``nn.BatchNorm2d`` in eval mode does."""
    if not isinstance(m, nn.Module) or isinstance(m, nn.modules.batchnorm._BatchNorm):
        return False
    bufs = m._buffers
    if m._parameters or set(bufs) != _FROZEN_BUFFERS:
        return False
    if set(m._modules) not in (set(), {"drop", "act"}):
        return False
    if not isinstance(m.__dict__.get("eps"), float):
        return False
    sizes = {(b.dim(), b.numel()) if isinstance(b, Tensor) else None for b in bufs.values()}
    return len(sizes) == 1 and next(iter(sizes)) is not None and next(iter(sizes))[0] == 1


def is_batch_norm(m: object) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or is_frozen_bn(m)


def num_features(m: nn.Module) -> int:
    return m.num_features if hasattr(m, "num_features") else m._buffers["weight"].numel()


def inner_act(bn: nn.Module):
    """What a norm-act BatchNorm applies after normalising, read now: None (a plain
    BatchNorm, or identity ``drop`` and ``act``), an :class:`~resnet_fused.activations.Act`
    (an activation the fused kernels apply, after an identity ``drop``: fused) or "module"
    (anything else: its ``drop`` and ``act`` run as modules after the fused BatchNorm)."""
    if type(bn) in BN_TYPES or not bn._modules or not (is_norm_act(bn) or is_frozen_bn(bn)):
        return None
    drop, act = bn._modules["drop"], bn._modules["act"]
    if type(drop) is not nn.Identity:
        return "module"
    found = act_of_module(act)
    if found is None:
        return "module"
    return found if found else None


def bn_modules(bn: nn.Module) -> tuple[nn.Module, ...]:
    """``bn`` and, for a norm-act BatchNorm, its ``drop`` and ``act`` (whose hooks count
    as the site's)."""
    if type(bn) in BN_TYPES or not bn._modules or not (is_norm_act(bn) or is_frozen_bn(bn)):
        return (bn,)
    return (bn, bn._modules["drop"], bn._modules["act"])


# --- why a module is not fused -----------------------------------------------------------

MISSING = object()  # a submodule deleted (del block.relu, ...) after conversion


def kind(module: object) -> str:
    if module is MISSING:
        return "missing"
    if module is None:
        return "None"
    if type(module) is nn.Sequential:
        return f"an nn.Sequential of {len(module)}"
    return type(module).__name__


def why_not_unit(conv: object, bn: object, conv_name: str, bn_name: str) -> str | None:
    """Why (conv, bn) cannot run as one fused unit; None when it can."""
    if type(conv) is not nn.Conv2d:
        return f"{conv_name}: {kind(conv)} is not a plain nn.Conv2d"
    if type(bn) not in BN_TYPES:
        return f"{bn_name}: {kind(bn)} is not a plain nn.BatchNorm2d or nn.SyncBatchNorm"
    if conv.padding_mode != "zeros":
        return f"{conv_name}: padding_mode={conv.padding_mode!r}"
    if conv.out_channels != bn.num_features:
        return (
            f"{conv_name} has {conv.out_channels} output channels, {bn_name} "
            f"{bn.num_features} features"
        )
    try:
        _conv_padding(conv)
    except NotImplementedError as exc:
        return f"{conv_name}: {exc}"
    return None


def why_not_conv(conv: nn.Module) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is fused)"
    try:
        _conv_padding(conv)
    except NotImplementedError as exc:
        return str(exc)
    return None


def why_not_bn(bn: nn.Module) -> str | None:
    if type(bn) in BN_TYPES or is_norm_act(bn) or is_frozen_bn(bn):
        return None
    if not isinstance(bn, BN_TYPES):
        return f"{type(bn).__name__}: only 2-d BatchNorm is fused"
    return (f"{type(bn).__name__} subclasses {BN_TYPES[isinstance(bn, nn.SyncBatchNorm)].__name__}"
            " with other children than drop and act (not a norm-act layer)")  # fmt: skip


KERNEL_ACTS = (
    "the fused kernels apply ReLU, ReLU6, LeakyReLU, SiLU, Hardswish, GELU and Sigmoid, "
    "as torch's own modules and functions"
)

# Activations other than ReLU a BatchNorm's output commonly feeds (for the report: each
# one that reads a fused BatchNorm's output is listed, as not fused with it).
ACT_MODULES = (
    nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.GELU, nn.ELU, nn.SELU,
    nn.CELU, nn.Mish, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.PReLU, nn.Softplus,
)  # fmt: skip
ACT_FUNCTIONS = {
    F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.leaky_relu_, F.silu, F.hardswish,
    F.gelu, F.elu, F.selu, F.celu, F.mish, F.sigmoid, torch.sigmoid, F.hardsigmoid,
    torch.tanh, F.tanh, F.softplus, F.prelu,
}  # fmt: skip
ACT_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_"}  # (ReLU: see _find_sites)


def act_text(act: nn.Module) -> str:
    """The module's class for the report: its name for torch.nn's own classes, else its
    full path (timm's ``Sigmoid`` or ``GELU`` is not torch.nn's, which the kernels apply:
    recognised by exact class only, as a look-alike may compute something else)."""
    t = type(act)
    if t.__module__.startswith("torch.nn."):
        return t.__name__
    return f"{t.__module__}.{t.__qualname__}"


# --- spellings ---------------------------------------------------------------------------

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


SYNC_HOOKS_ERROR = (
    "{what} carries hooks, so it runs unfused (so that the hooks fire), which cannot "
    "synchronise a plain nn.BatchNorm2d over a process group: convert the model with "
    "nn.SyncBatchNorm.convert_sync_batchnorm before resnet_fused.convert(sync_bn=True), or "
    "remove the hooks"
)
SYNC_EAGER_ERROR = (
    "{what} runs as eager's ops under a torch.func transform, make_fx or torch.jit.trace, "
    "which cannot synchronise a plain nn.BatchNorm2d over a process group: convert the "
    "model with nn.SyncBatchNorm.convert_sync_batchnorm before "
    "resnet_fused.convert(sync_bn=True), or call it outside the transform"
)


def sync_hooks_error(what: str) -> str:
    """The error of a synchronised part that must run through its modules: because of
    hooks, or because the fused path cannot run here (``runs_eagerly``)."""
    from .functional._common import runs_eagerly

    return (SYNC_EAGER_ERROR if runs_eagerly() else SYNC_HOOKS_ERROR).format(what=what)


SYNC_UNFUSED_ERROR = (
    "{what} runs unfused ({why}), which cannot synchronise its plain nn.BatchNorm2d "
    "statistics over the process group of resnet_fused.convert(sync_bn=True): use "
    "nn.SyncBatchNorm layers (nn.SyncBatchNorm.convert_sync_batchnorm) or modules the "
    "block fuses"
)


# --- resnet_fused's own modules ---------------------------------------------------------------

_OWN: list[type] = []


def register(cls: type) -> type:
    """Class decorator: a resnet_fused module class the graph pass never traces into
    (the fused blocks, modules and their helpers)."""
    _OWN.append(cls)
    return cls


def own_classes() -> tuple[type, ...]:
    """resnet_fused's own module classes and torchvision's block classes (which
    :mod:`resnet_fused.resnet` converts to its fused blocks)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return (*_OWN, FusedBatchNormAct2d, FusedConvBNReLU2d, BasicBlock, Bottleneck)
