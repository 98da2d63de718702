"""Triton BatchNorm apply -> (residual add) -> activation, forward
(resnet_fused.reference.bn_act_forward):

  out = act((x - mean)*invstd*w + b [+ residual]),  invstd = 1/sqrt(var + eps)

with act one of resnet_fused.activations (code ``act``, LeakyReLU slope ``act_param``;
formulas: csrc/act.h), in fp32 (fp64 for fp64 input), rounded once on store. Memory
traffic: reads x (+ residual), writes out: 2-3 passes where eager's batch_norm, add and
activation take 4-6. Tiles and launch plan: resnet_fused.triton._bn_tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import bn_memory_format, stats_dtype
from .._validation import check_bn_input, check_like
from ._bn_tiles import (
    _acc_scalar,
    _affine,
    _affine_params,
    _chan,
    _channels,
    _empty_bn,
    _in_fmt,
    _plan_for,
    _scalar,
    _tile,
)
from ._common import _act_apply, check_act, check_bn_affine_args, compute_dtype, on_input_device


@triton.jit
def _forward_kernel(
    x_ptr, res_ptr, out_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, eps: tl.float64, act_param: tl.float64,
    C, HW, R, n_col_tiles, n_tiles, tiles_per_prog,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, CL: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    ch, cmask = _channels(tl.program_id(0), C, BC)
    mean, invstd, w, b = _affine_params(
        mean_ptr, var_ptr, w_ptr, b_ptr, ch, cmask, eps, HAS_W, HAS_B, ACC
    )
    param = _acc_scalar(act_param, ACC)
    t0 = tl.program_id(1) * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, n_tiles)
    for t in range(t0, t1):
        offs, mask, _ = _tile(t, ch, C, HW, R, n_col_tiles, BR, BC, BK, CL)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = _affine(x, mean, invstd, w, b, HAS_W, HAS_B)
        if HAS_RES:
            y = y + tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = _act_apply(y, ACT, param)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@on_input_device
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
    act, act_param = check_act(act, act_param)
    check_bn_input(input)
    check_bn_affine_args(input, mean, var, weight, bias)
    if residual is not None:
        check_like(residual, "residual", input, "input")
    fmt = bn_memory_format(input)
    out = _empty_bn(input, fmt)
    if out.numel() == 0:
        return out
    acc = stats_dtype(input.dtype)
    x = _in_fmt(input, fmt)
    res = _in_fmt(residual, fmt) if residual is not None else None
    mean_a, var_a = _chan(mean, acc), _chan(var, acc)
    w, b = _chan(weight, acc), _chan(bias, acc)
    p = _plan_for(x, fmt)
    _forward_kernel[p.grid](
        x, res if res is not None else x, out, mean_a, var_a,
        w if w is not None else mean_a, b if b is not None else mean_a,
        _scalar(eps), _scalar(act_param), *p.args(),
        HAS_W=w is not None, HAS_B=b is not None, HAS_RES=res is not None, ACT=act,
        ACC=compute_dtype(input.dtype), **p.meta(),
    )  # fmt: skip
    return out
