"""Pure-PyTorch reference: the single definition of the maths every backend implements.

Tests compare each backend against these functions evaluated in fp64. They are also the
``"torch"`` backend, which runs anywhere.
"""

from __future__ import annotations

import torch

from .activations import Act, as_act


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``relu(x + residual)``."""
    return torch.relu(x + residual)


def add_relu_(x: torch.Tensor, residual: torch.Tensor) -> None:
    """``x <- relu(x + residual)`` in place."""
    x.add_(residual).relu_()


def relu_backward(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Gradient through a ReLU given its output: ``grad_out`` where ``out > 0``, else 0
    (torch's ``threshold_backward(grad_out, out, 0)``, which lets NaN through)."""
    return torch.where(out <= 0, torch.zeros_like(grad_out), grad_out)


# ---------------------------------------------------------------------------------------
# BatchNorm -> (residual add) -> activation (resnet_fused.activations; ReLU below).
#
# Per channel c over m = N*H*W values y (training):
#   mean = sum(y)/m     var = sum((y - mean)^2)/m     invstd = 1/sqrt(var + eps)
#   out  = act((y - mean)*invstd*w + b [+ residual])
#   running_mean <- (1 - momentum)*running_mean + momentum*mean
#   running_var  <- (1 - momentum)*running_var  + momentum*var*m/(m - 1)
# Backward, with g = grad_out masked by (out > 0) (in general g = grad_out*act'(pre), pre
# the argument of act, read from out where act allows it, else recomputed from y, the
# statistics and, after an add, the residual) and xhat = (y - mean)*invstd:
#   d_bias = sum(g)   d_weight = sum(g*xhat)   d_residual = g
#   d_input = w*invstd*(g - d_bias/m - xhat*d_weight/m)      (batch statistics)
#   d_input = w*invstd*g                                      (running statistics)
#
# The four functions below are the kernel decomposition every backend implements
# (statistics, forward, backward reduction, backward elementwise); batch_norm_act is
# the same maths through torch.nn.functional, used as the fp64 oracle in tests.
# ---------------------------------------------------------------------------------------


from ._layout import bn_memory_format as _layout  # noqa: E402
from ._layout import opmath_dtype, stats_dtype  # noqa: E402


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def bn_stats(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance per channel (two-pass, in the stats dtype of input's
    dtype and device: fp64 for fp32 on the CPU, as eager's CPU BatchNorm accumulates), and
    the in-place running-statistics update with the unbiased variance."""
    acc = stats_dtype(input.dtype, input.device)
    dims = [d for d in range(input.dim()) if d != 1]
    x = input.to(acc)
    mean = x.mean(dim=dims)
    var = (x - _per_channel(mean, x.dim())).square().mean(dim=dims)
    update_running_stats(
        running_mean, running_var, mean, var, input.numel() // input.shape[1], momentum
    )
    return mean, var


@torch.no_grad()
def update_running_stats(running_mean, running_var, mean, var, count, momentum: float) -> None:
    """In place, as nn.BatchNorm2d: running_mean <- (1 - momentum)*running_mean +
    momentum*mean; running_var likewise with the unbiased variance var*count/(count - 1).
    ``count`` (values per channel) may be an int or a tensor."""
    if running_mean is not None:
        running_mean.copy_(running_mean.to(mean.dtype) * (1 - momentum) + mean * momentum)
    if running_var is not None:
        if isinstance(count, torch.Tensor):
            factor = momentum * count / (count - 1).clamp_min(1)
        else:
            factor = momentum * count / (count - 1)
        running_var.copy_(running_var.to(var.dtype) * (1 - momentum) + var * factor)


def _affine(input, mean, var, weight, bias, eps):
    """xhat and y = xhat*w + b in the stats dtype."""
    acc = stats_dtype(input.dtype, input.device)
    nd = input.dim()
    invstd = torch.rsqrt(var.to(acc) + eps)
    xhat = (input.to(acc) - _per_channel(mean.to(acc), nd)) * _per_channel(invstd, nd)
    y = xhat
    if weight is not None:
        y = y * _per_channel(weight.to(acc), nd)
    if bias is not None:
        y = y + _per_channel(bias.to(acc), nd)
    return xhat, y, invstd


def bn_act_forward(
    input: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    act: int,
    act_param: float,
) -> torch.Tensor:
    """out = act((x - mean)*invstd*w + b [+ residual]), rounded once to input's dtype."""
    _, y, _ = _affine(input, mean, var, weight, bias, eps)
    if residual is not None:
        y = y + residual.to(y.dtype)
    y = Act(act, act_param)(y)
    return y.to(input.dtype).contiguous(memory_format=_layout(input))


def _act_grad(grad, input, mean, var, weight, bias, out, eps, act, act_param, residual=None):
    """grad_out * act': from ``out`` when given (the activations whose derivative is a
    function of the output), else at the pre-activation recomputed from the input [+
    ``residual``]. ReLU's mask is that of the pre-activation rounded to input's dtype (the
    stored output's mask)."""
    a = Act(act, act_param)
    if not a.active:
        return grad
    if out is not None:
        if residual is not None:
            raise ValueError("out and residual were both given: one or neither")
        if not a.from_output:
            raise ValueError(f"out must be None for {a.name}: its derivative needs the input")
        return a.backward_from_output(grad, out)
    _, y, _ = _affine(input, mean, var, weight, bias, eps)
    if residual is not None:
        y = y + residual.to(y.dtype)
    if a.kind == 1:
        y = y.to(input.dtype)
    return a.backward(grad.to(y.dtype), y).to(grad.dtype)


def bn_act_backward_reduce(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    eps: float,
    act: int,
    act_param: float,
    write_masked_grad: bool,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum(g), sum(g*xhat), g or an empty tensor) with g = grad_out*act': from ``out``,
    or at the pre-activation recomputed from the input and ``residual`` (the forward's
    residual, for the activations that cannot take act' from their output); the sums in
    the stats dtype."""
    acc = stats_dtype(input.dtype, input.device)
    g = _act_grad(grad_out, input, mean, var, weight, bias, out, eps, act, act_param, residual)
    xhat, _, _ = _affine(input, mean, var, None, None, eps)
    dims = [d for d in range(input.dim()) if d != 1]
    g_acc = g.to(acc)
    sum_dy = g_acc.sum(dim=dims)
    sum_dy_xhat = (g_acc * xhat).sum(dim=dims)
    masked = (
        g.to(input.dtype).contiguous(memory_format=_layout(input))
        if write_masked_grad
        else input.new_empty(0)
    )
    return sum_dy, sum_dy_xhat, masked


def bn_act_backward_elemt(
    grad: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    sum_dy: torch.Tensor,
    sum_dy_xhat: torch.Tensor,
    eps: float,
    act: int,
    act_param: float,
    batch_stats: bool,
) -> torch.Tensor:
    """d_input. ``grad`` is multiplied by act' at the pre-activation recomputed from the
    input (identity: ``grad`` is already the gradient at the pre-activation)."""
    acc = stats_dtype(input.dtype, input.device)
    nd = input.dim()
    g = _act_grad(grad, input, mean, var, weight, bias, None, eps, act, act_param)
    xhat, _, invstd = _affine(input, mean, var, None, None, eps)
    scale = _per_channel(invstd, nd)
    if weight is not None:
        scale = scale * _per_channel(weight.to(acc), nd)
    g = g.to(acc)
    if batch_stats:
        m = input.numel() // input.shape[1]
        g = (
            g
            - _per_channel(sum_dy.to(acc), nd) / m
            - xhat * _per_channel(sum_dy_xhat.to(acc), nd) / m
        )
    return (g * scale).to(input.dtype).contiguous(memory_format=_layout(input))


def batch_norm_act(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    activation=None,
) -> torch.Tensor:
    """act(batch_norm(input) + residual) through torch.nn.functional: the test oracle.
    Batch statistics are used in training and whenever running_mean is None. The
    activation: ``activation`` when given (see resnet_fused.activations.as_act), else ReLU
    when ``relu``."""
    y = torch.nn.functional.batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training or running_mean is None,
        momentum,
        eps,
    )
    if residual is not None:
        y = y + residual
    return as_act(relu if activation is None else activation)(y)


# ---------------------------------------------------------------------------------------
# Convolution -> BatchNorm -> (residual add) -> activation.
#
#   y = conv2d(x, W, conv_bias);   out = batch_norm_act(y, ...)
# Eval mode folds BN into the convolution (torch.nn.utils.fusion.fuse_conv_bn_weights):
#   s = w*invstd (per output channel);  W' = W*s;  b' = (conv_bias - running_mean)*s + b
#   out = act(conv2d(x, W') + b' [+ residual])
# ---------------------------------------------------------------------------------------


def conv_bn_act(
    input: torch.Tensor,
    conv_weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    conv_bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    activation=None,
) -> torch.Tensor:
    """``act(batch_norm(conv2d(input)) + residual)`` through torch.nn.functional, unfused
    and unfolded: the test oracle (the activation as in :func:`batch_norm_act`)."""
    y = torch.nn.functional.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
    return batch_norm_act(
        y,
        running_mean,
        running_var,
        bn_weight,
        bn_bias,
        training,
        momentum,
        eps,
        residual=residual,
        relu=relu,
        activation=activation,
    )


def bias_act(
    input: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    act: int,
    act_param: float,
) -> torch.Tensor:
    """``act(input + bias[c] [+ residual])`` in the elementwise arithmetic dtype (fp32 for
    fp32, as eager's adds), rounded once: the eval-mode epilogue of a convolution with BN
    folded into its weight and bias."""
    acc = opmath_dtype(input.dtype)
    y = input.to(acc)
    if bias is not None:
        y = y + _per_channel(bias.to(acc), input.dim())
    if residual is not None:
        y = y + residual.to(acc)
    y = Act(act, act_param)(y)
    return y.to(input.dtype).contiguous(memory_format=_layout(input))
