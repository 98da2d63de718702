"""The torch.library operators of resnet_fused, each with a fake (meta) kernel.

C++/CUDA ops are defined in ``csrc/resnet_fused.cpp`` (``TORCH_LIBRARY``) and get their
fake kernels here. Triton ops are separate op names (one CUDA dispatch key holds one
kernel) defined here with ``torch.library.custom_op``; their kernels are imported on
first use. The autograd wiring lives in :mod:`resnet_fused.functional`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _extension
from ._layout import empty_bn_like, stats_dtype

# ---------------------------------------------------------------------------------------
# Fake kernels of the C++ ops (defined only when the extension loaded).
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# Triton ops.
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("resnet_fused::add_relu_triton", mutates_args=())
def add_relu_triton(x: Tensor, residual: Tensor) -> Tensor:
    from .triton import add_relu as kernels

    return kernels.add_relu(x, residual)


@add_relu_triton.register_fake
def _(x: Tensor, residual: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("resnet_fused::add_relu_triton_", mutates_args=("x",))
def add_relu_triton_(x: Tensor, residual: Tensor) -> None:
    from .triton import add_relu as kernels

    kernels.add_relu_(x, residual)


@add_relu_triton_.register_fake
def _(x: Tensor, residual: Tensor) -> None:
    return None


@torch.library.custom_op("resnet_fused::relu_backward_triton", mutates_args=())
def relu_backward_triton(grad_out: Tensor, out: Tensor) -> Tensor:
    from .triton import add_relu as kernels

    return kernels.relu_backward(grad_out, out)


@relu_backward_triton.register_fake
def _(grad_out: Tensor, out: Tensor) -> Tensor:
    return torch.empty_like(out)


# ---------------------------------------------------------------------------------------
# BatchNorm -> (residual add) -> ReLU: fakes of the C++ ops and the Triton ops.
# ---------------------------------------------------------------------------------------
def _stats_fake(input: Tensor) -> tuple[Tensor, Tensor]:
    c = input.shape[1]
    acc = stats_dtype(input.dtype)
    return input.new_empty((c,), dtype=acc), input.new_empty((c,), dtype=acc)


def _bn_stats_fake(input, running_mean, running_var, momentum):
    return _stats_fake(input)


def _bn_act_forward_fake(input, mean, var, weight, bias, residual, eps, relu):
    return empty_bn_like(input)


def _bn_act_backward_reduce_fake(
    grad_out, input, mean, var, weight, bias, out, eps, relu, write_masked_grad
):
    sum_dy, sum_dy_xhat = _stats_fake(input)
    masked = empty_bn_like(input) if write_masked_grad else input.new_empty((0,))
    return sum_dy, sum_dy_xhat, masked


def _bn_act_backward_elemt_fake(
    grad,
    input,
    mean,
    var,
    weight,
    bias,
    sum_dy,
    sum_dy_xhat,
    eps,
    relu_mask_from_input,
    batch_stats,
):
    return empty_bn_like(input)


if _extension.is_loaded():
    torch.library.register_fake("resnet_fused::bn_stats")(_bn_stats_fake)
    torch.library.register_fake("resnet_fused::bn_act_forward")(_bn_act_forward_fake)
    torch.library.register_fake("resnet_fused::bn_act_backward_reduce")(
        _bn_act_backward_reduce_fake
    )
    torch.library.register_fake("resnet_fused::bn_act_backward_elemt")(_bn_act_backward_elemt_fake)


def _triton_bn():
    from .triton import batch_norm_act

    return batch_norm_act


@torch.library.custom_op(
    "resnet_fused::bn_stats_triton", mutates_args=("running_mean", "running_var")
)
def bn_stats_triton(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float
) -> tuple[Tensor, Tensor]:
    return _triton_bn().bn_stats(input, running_mean, running_var, momentum)


bn_stats_triton.register_fake(_bn_stats_fake)


@torch.library.custom_op("resnet_fused::bn_act_forward_triton", mutates_args=())
def bn_act_forward_triton(
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    relu: bool,
) -> Tensor:
    return _triton_bn().bn_act_forward(input, mean, var, weight, bias, residual, eps, relu)


bn_act_forward_triton.register_fake(_bn_act_forward_fake)


@torch.library.custom_op("resnet_fused::bn_act_backward_reduce_triton", mutates_args=())
def bn_act_backward_reduce_triton(
    grad_out: Tensor,
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    out: Tensor | None,
    eps: float,
    relu: bool,
    write_masked_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _triton_bn().bn_act_backward_reduce(
        grad_out, input, mean, var, weight, bias, out, eps, relu, write_masked_grad
    )


bn_act_backward_reduce_triton.register_fake(_bn_act_backward_reduce_fake)


@torch.library.custom_op("resnet_fused::bn_act_backward_elemt_triton", mutates_args=())
def bn_act_backward_elemt_triton(
    grad: Tensor,
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    eps: float,
    relu_mask_from_input: bool,
    batch_stats: bool,
) -> Tensor:
    return _triton_bn().bn_act_backward_elemt(
        grad,
        input,
        mean,
        var,
        weight,
        bias,
        sum_dy,
        sum_dy_xhat,
        eps,
        relu_mask_from_input,
        batch_stats,
    )


bn_act_backward_elemt_triton.register_fake(_bn_act_backward_elemt_fake)


# ---------------------------------------------------------------------------------------
# bias_act (eval-mode conv epilogue with BN folded in): out = relu(input + bias [+ res]).
# ---------------------------------------------------------------------------------------
def _bias_act_fake(input, bias, residual, relu):
    return empty_bn_like(input)


def _bias_act_inplace_fake(input, bias, residual, relu):
    return None


if _extension.is_loaded():
    torch.library.register_fake("resnet_fused::bias_act")(_bias_act_fake)
    torch.library.register_fake("resnet_fused::bias_act_")(_bias_act_inplace_fake)


@torch.library.custom_op("resnet_fused::bias_act_triton", mutates_args=())
def bias_act_triton(
    input: Tensor, bias: Tensor | None, residual: Tensor | None, relu: bool
) -> Tensor:
    return _triton_bn().bias_act(input, bias, residual, relu)


bias_act_triton.register_fake(_bias_act_fake)


@torch.library.custom_op("resnet_fused::bias_act_triton_", mutates_args=("input",))
def bias_act_triton_(
    input: Tensor, bias: Tensor | None, residual: Tensor | None, relu: bool
) -> None:
    _triton_bn().bias_act_(input, bias, residual, relu)


bias_act_triton_.register_fake(_bias_act_inplace_fake)
