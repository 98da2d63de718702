"""add_relu (out = relu(x + residual)), its in-place form and relu_backward: fake
kernels of the C++ ops (csrc: cpu/add_relu.cpp, cuda/add_relu.cu) and the Triton ops
(kernels: resnet_fused.triton.add_relu)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension

# Fake kernels of the C++ ops (defined only when the extension loaded).
if _extension.is_loaded():

    @torch.library.register_fake("resnet_fused::add_relu")
    def _add_relu_fake(x: Tensor, residual: Tensor) -> Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("resnet_fused::add_relu_")
    def _add_relu_inplace_fake(x: Tensor, residual: Tensor) -> None:
        return None

    @torch.library.register_fake("resnet_fused::relu_backward")
    def _relu_backward_fake(grad_out: Tensor, out: Tensor) -> Tensor:
        return torch.empty_like(out)


# Triton ops.
@torch.library.custom_op("resnet_fused::add_relu_triton", mutates_args=())
def add_relu_triton(x: Tensor, residual: Tensor) -> Tensor:
    from ..triton import add_relu as kernels

    return kernels.add_relu(x, residual)


@add_relu_triton.register_fake
def _(x: Tensor, residual: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("resnet_fused::add_relu_triton_", mutates_args=("x",))
def add_relu_triton_(x: Tensor, residual: Tensor) -> None:
    from ..triton import add_relu as kernels

    kernels.add_relu_(x, residual)


@add_relu_triton_.register_fake
def _(x: Tensor, residual: Tensor) -> None:
    return None


@torch.library.custom_op("resnet_fused::relu_backward_triton", mutates_args=())
def relu_backward_triton(grad_out: Tensor, out: Tensor) -> Tensor:
    from ..triton import add_relu as kernels

    return kernels.relu_backward(grad_out, out)


@relu_backward_triton.register_fake
def _(grad_out: Tensor, out: Tensor) -> Tensor:
    return torch.empty_like(out)
