"""Convolution ops of conv_bn_act: the Triton implicit-GEMM convolution custom ops (kernels:
resnet_fused.triton.conv) with fake kernels, and the BatchNorm fold.

``fold_conv_bn`` folds eval-mode BatchNorm into a convolution's weight and bias.

Two convolution ops, both on NHWC (channels_last) output:

* ``conv_bias_act_triton``: ``act(conv2d(x, W') + b' [+ residual])`` in one kernel, the
  eval-mode block tail with BatchNorm folded into ``W'`` and ``b'``;
* ``conv_bn_stats_triton``: ``y = conv2d(x, W)`` whose epilogue also writes per-tile
  BatchNorm partial statistics, merged into the batch mean and biased variance (and the
  running statistics updated in place), so training needs no separate statistics pass.

The weight is passed packed (:func:`resnet_fused.triton.conv.pack_weight`: ``[R*S*Cin,
Cout]``), with the kernel size given separately.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .._geometry import conv_output_hw
from .._layout import stats_dtype


def _triton_conv():
    from ..triton import conv

    return conv


def _conv_out_empty(x: Tensor, w_packed: Tensor, kernel_size, stride, padding, dilation) -> Tensor:
    p, q = conv_output_hw(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    return torch.empty(
        (x.shape[0], w_packed.shape[1], p, q),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last,
    )


@torch.library.custom_op("resnet_fused::conv_bias_act_triton", mutates_args=())
def conv_bias_act_triton(
    x: Tensor,
    w_packed: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    bias: Tensor | None,
    residual: Tensor | None,
    act: int,
    act_param: float,
) -> Tensor:
    out, _ = _triton_conv().conv2d(
        x,
        w_packed,
        tuple(kernel_size),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        bias=bias,
        residual=residual,
        act=act,
        act_param=act_param,
    )
    return out


@conv_bias_act_triton.register_fake
def _(x, w_packed, kernel_size, stride, padding, dilation, bias, residual, act, act_param):
    return _conv_out_empty(x, w_packed, kernel_size, stride, padding, dilation)


@torch.library.custom_op(
    "resnet_fused::conv_bn_stats_triton", mutates_args=("running_mean", "running_var")
)
def conv_bn_stats_triton(
    x: Tensor,
    w_packed: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
) -> tuple[Tensor, Tensor, Tensor]:
    conv = _triton_conv()
    y, partials = conv.conv2d(
        x,
        w_packed,
        tuple(kernel_size),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        stats=True,
    )
    mean, var = conv.finalize_stats(partials, running_mean, running_var, momentum)
    return y, mean, var


@conv_bn_stats_triton.register_fake
def _(x, w_packed, kernel_size, stride, padding, dilation, running_mean, running_var, momentum):
    y = _conv_out_empty(x, w_packed, kernel_size, stride, padding, dilation)
    c = w_packed.shape[1]
    acc = stats_dtype(x.dtype)
    return y, x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


# --- BatchNorm folded into the convolution ------------------------------------------------


def _fold_acc(conv_w: Tensor, dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(stats_dtype(dtype), stats_dtype(conv_w.dtype))


@torch.library.custom_op("resnet_fused::fold_conv_bn", mutates_args=())
def fold_conv_bn(
    conv_w: Tensor,
    conv_b: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    bn_w: Tensor | None,
    bn_b: Tensor | None,
    eps: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(W' in ``dtype``, b' in fp32/fp64) by torch.nn.utils.fusion.fuse_conv_bn_weights,
    evaluated in fp32 (fp64 for fp64) and rounded once."""
    acc = _fold_acc(conv_w, dtype)

    def up(t):
        return None if t is None else t.detach().to(acc)

    w, b = fuse_conv_bn_weights(
        up(conv_w), up(conv_b), up(running_mean), up(running_var), eps, up(bn_w), up(bn_b)
    )
    return w.detach().to(dtype).clone(), b.detach().clone()


@fold_conv_bn.register_fake
def _(conv_w, conv_b, running_mean, running_var, bn_w, bn_b, eps, dtype):
    acc = _fold_acc(conv_w, dtype)
    return torch.empty_like(conv_w, dtype=dtype), conv_w.new_empty((conv_w.shape[0],), dtype=acc)


def _fold_setup_context(ctx, inputs, output):
    conv_w, conv_b, running_mean, running_var, bn_w, bn_b, eps, dtype = inputs
    ctx.save_for_backward(conv_w, conv_b, running_mean, running_var, bn_w)
    ctx.eps, ctx.dtype = eps, dtype
    ctx.bn_b_dtype = None if bn_b is None else bn_b.dtype


def _fold_backward(ctx, g_w, g_b):
    """With a = 1/sqrt(var + eps), s = gamma*a, t = sum over (C_in, kH, kW) of dW'*W:
    dW = dW'*s, db_conv = db'*s, dmean = -db'*s, dgamma = a*(t + db'*(b_conv - mean)),
    dbeta = db', dvar = -gamma*a^3/2*(t + db'*(b_conv - mean))."""
    conv_w, conv_b, rm, rv, bn_w = ctx.saved_tensors
    acc = _fold_acc(conv_w, ctx.dtype)
    need = ctx.needs_input_grad
    a = torch.rsqrt(rv.to(acc) + ctx.eps)
    gamma = bn_w.to(acc) if bn_w is not None else torch.ones_like(a)
    s = gamma * a
    g_w = g_w.to(acc) if g_w is not None else torch.zeros_like(conv_w, dtype=acc)
    g_b = g_b.to(acc) if g_b is not None else torch.zeros_like(a)
    centred = (conv_b.to(acc) if conv_b is not None else 0.0) - rm.to(acc)
    common = (g_w * conv_w.to(acc)).sum(dim=(1, 2, 3)) + g_b * centred
    grads = [None] * 8
    if need[0]:
        grads[0] = (g_w * s.view(-1, 1, 1, 1)).to(conv_w.dtype)
    if need[1]:
        grads[1] = (g_b * s).to(conv_b.dtype)
    if need[2]:
        grads[2] = (-g_b * s).to(rm.dtype)
    if need[3]:
        grads[3] = (-0.5 * gamma * a**3 * common).to(rv.dtype)
    if need[4]:
        grads[4] = (a * common).to(bn_w.dtype)
    if need[5]:
        grads[5] = g_b.to(ctx.bn_b_dtype)
    return tuple(grads)


fold_conv_bn.register_autograd(_fold_backward, setup_context=_fold_setup_context)
