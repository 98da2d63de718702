"""BatchNorm -> (residual add) -> activation: bn_stats, bn_act_forward, bn_act_backward_reduce
and bn_act_backward_elemt. Fake kernels of the C++ ops (csrc: cpu/batch_norm_act.cpp,
cuda/batch_norm_act.cu) and the Triton ops (kernels: resnet_fused.triton.bn_stats,
bn_act_forward, bn_act_backward)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension
from .._layout import empty_bn_like, stats_dtype


def _stats_fake(input: Tensor, device_rule: bool = True) -> tuple[Tensor, Tensor]:
    """Two per-channel tensors in the accumulation dtype: the C++ ops' rule for input's
    device (fp64 for fp32 on the CPU), or (``device_rule=False``) the Triton ops' fp32 on
    every device."""
    c = input.shape[1]
    acc = stats_dtype(input.dtype, input.device if device_rule else None)
    return input.new_empty((c,), dtype=acc), input.new_empty((c,), dtype=acc)


def _bn_stats_fake(input, running_mean, running_var, momentum):
    return _stats_fake(input)


def _bn_stats_triton_fake(input, running_mean, running_var, momentum):
    return _stats_fake(input, device_rule=False)


def _bn_act_forward_fake(input, mean, var, weight, bias, residual, eps, act, act_param):
    return empty_bn_like(input)


def _bn_act_backward_reduce_fake(
    grad_out,
    input,
    mean,
    var,
    weight,
    bias,
    out,
    eps,
    act,
    act_param,
    write_masked_grad,
    residual=None,
    device_rule=True,
):
    sum_dy, sum_dy_xhat = _stats_fake(input, device_rule)
    masked = empty_bn_like(input) if write_masked_grad else input.new_empty((0,))
    return sum_dy, sum_dy_xhat, masked


def _bn_act_backward_reduce_triton_fake(*args):
    return _bn_act_backward_reduce_fake(*args, device_rule=False)


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
    act,
    act_param,
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


def _kernels(name: str):
    import importlib

    return importlib.import_module(f"resnet_fused.triton.{name}")


@torch.library.custom_op(
    "resnet_fused::bn_stats_triton", mutates_args=("running_mean", "running_var")
)
def bn_stats_triton(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float
) -> tuple[Tensor, Tensor]:
    return _kernels("bn_stats").bn_stats(input, running_mean, running_var, momentum)


bn_stats_triton.register_fake(_bn_stats_triton_fake)


@torch.library.custom_op("resnet_fused::bn_act_forward_triton", mutates_args=())
def bn_act_forward_triton(
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    act: int,
    act_param: float,
) -> Tensor:
    return _kernels("bn_act_forward").bn_act_forward(
        input, mean, var, weight, bias, residual, eps, act, act_param
    )


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
    act: int,
    act_param: float,
    write_masked_grad: bool,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels("bn_act_backward").bn_act_backward_reduce(
        grad_out, input, mean, var, weight, bias, out, eps, act, act_param, write_masked_grad,
        residual,
    )  # fmt: skip


bn_act_backward_reduce_triton.register_fake(_bn_act_backward_reduce_triton_fake)


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
    act: int,
    act_param: float,
    batch_stats: bool,
) -> Tensor:
    return _kernels("bn_act_backward").bn_act_backward_elemt(
        grad,
        input,
        mean,
        var,
        weight,
        bias,
        sum_dy,
        sum_dy_xhat,
        eps,
        act,
        act_param,
        batch_stats,
    )


bn_act_backward_elemt_triton.register_fake(_bn_act_backward_elemt_fake)
