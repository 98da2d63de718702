"""Triton bias_act: the eval-mode epilogue of a convolution with BatchNorm folded into
its weight and bias (resnet_fused.reference.bias_act):

  out = act(input + bias[c] [+ residual])

(act: resnet_fused.activations, code ``act`` and LeakyReLU slope ``act_param``) in fp32 (fp64 for fp64 input), rounded once. Memory traffic: reads input (+ residual),
writes out (or input itself, in place): 2-3 passes. Same tiles as bn_act_forward (mean 0,
invstd 1, weight 1): resnet_fused.triton._bn_tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import bn_memory_format, stats_dtype
from .._validation import check_bn_input, check_like, check_optional_per_channel
from ._bn_tiles import (
    _acc_scalar,
    _bc,
    _chan,
    _channels,
    _empty_bn,
    _in_fmt,
    _load_chan,
    _plan_for,
    _scalar,
    _tile,
)
from ._common import _act_apply, check_act, check_no_partial_overlap, compute_dtype, on_input_device


@triton.jit
def _bias_act_kernel(
    x_ptr, b_ptr, res_ptr, out_ptr, act_param: tl.float64,
    C, HW, R, n_col_tiles, n_tiles, tiles_per_prog,
    HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, CL: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """out = act(x + bias[c] [+ residual]): the forward with BN folded into the conv
    (mean 0, invstd 1, weight 1), on the same tiles as _forward_kernel."""
    ch, cmask = _channels(tl.program_id(0), C, BC)
    b = _bc(_load_chan(b_ptr, ch, cmask, ACC)) if HAS_B else _bc(tl.zeros([BC], ACC))
    param = _acc_scalar(act_param, ACC)
    t0 = tl.program_id(1) * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, n_tiles)
    for t in range(t0, t1):
        offs, mask, _ = _tile(t, ch, C, HW, R, n_col_tiles, BR, BC, BK, CL)
        y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if HAS_B:
            y = y + b
        if HAS_RES:
            y = y + tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = _act_apply(y, ACT, param)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_bias_act(
    input: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
) -> None:
    check_bn_input(input)
    check_optional_per_channel(bias, "bias", input)
    if residual is not None:
        check_like(residual, "residual", input, "input")


def _launch_bias_act(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    act: int,
    act_param: float,
    out: torch.Tensor,
    fmt: torch.memory_format,
) -> None:
    """x and out (which may be x) are in layout ``fmt``; residual is copied into it if needed."""
    acc = stats_dtype(x.dtype)
    res = _in_fmt(residual, fmt) if residual is not None else None
    b = _chan(bias, acc)
    p = _plan_for(x, fmt)
    _bias_act_kernel[p.grid](
        x, b if b is not None else x, res if res is not None else x, out,
        _scalar(act_param), *p.args(),
        HAS_B=b is not None, HAS_RES=res is not None, ACT=act,
        ACC=compute_dtype(x.dtype), **p.meta(),
    )  # fmt: skip


@on_input_device
def bias_act(
    input: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    act: int,
    act_param: float,
) -> torch.Tensor:
    act, act_param = check_act(act, act_param)
    _check_bias_act(input, bias, residual)
    fmt = bn_memory_format(input)
    out = _empty_bn(input, fmt)
    if out.numel():
        _launch_bias_act(_in_fmt(input, fmt), bias, residual, act, act_param, out, fmt)
    return out


@on_input_device
def bias_act_(
    input: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    act: int,
    act_param: float,
) -> None:
    act, act_param = check_act(act, act_param)
    _check_bias_act(input, bias, residual)
    if not (input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(
            "input of bias_act_ (in place) must be dense in NCHW (contiguous) or channels_last "
            f"layout, got shape {tuple(input.shape)} with strides {input.stride()}"
        )
    if residual is not None:
        check_no_partial_overlap(residual, "residual", input, "input")
    if input.numel():
        # Each element is loaded before it is stored, by the same program: x may be out.
        _launch_bias_act(input, bias, residual, act, act_param, input, bn_memory_format(input))
