"""bias_act (eval-mode conv epilogue with BN folded in): out = act(input + bias [+ res]),
and its in-place form. Fake kernels of the C++ ops (csrc: cpu/batch_norm_act.cpp,
cuda/batch_norm_act.cu) and the Triton ops (kernels: resnet_fused.triton.bias_act)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension
from .._layout import empty_bn_like


def _kernels():
    from ..triton import bias_act

    return bias_act


def _bias_act_fake(input, bias, residual, act, act_param):
    return empty_bn_like(input)


def _bias_act_inplace_fake(input, bias, residual, act, act_param):
    return None


if _extension.is_loaded():
    torch.library.register_fake("resnet_fused::bias_act")(_bias_act_fake)
    torch.library.register_fake("resnet_fused::bias_act_")(_bias_act_inplace_fake)


@torch.library.custom_op("resnet_fused::bias_act_triton", mutates_args=())
def bias_act_triton(
    input: Tensor, bias: Tensor | None, residual: Tensor | None, act: int, act_param: float
) -> Tensor:
    return _kernels().bias_act(input, bias, residual, act, act_param)


bias_act_triton.register_fake(_bias_act_fake)


@torch.library.custom_op("resnet_fused::bias_act_triton_", mutates_args=("input",))
def bias_act_triton_(
    input: Tensor, bias: Tensor | None, residual: Tensor | None, act: int, act_param: float
) -> None:
    _kernels().bias_act_(input, bias, residual, act, act_param)


bias_act_triton_.register_fake(_bias_act_inplace_fake)
