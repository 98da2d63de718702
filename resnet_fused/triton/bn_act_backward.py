"""Triton BatchNorm -> (residual add) -> activation, backward
(resnet_fused.reference.bn_act_backward_reduce / bn_act_backward_elemt):

  g = grad_out * act'(.) (act: resnet_fused.activations, formulas and conventions at
      kinks: csrc/act.h), read from ``out`` (identity, ReLU, ReLU6, LeakyReLU with a
      positive slope), or taken at y = BN(x) [+ residual] recomputed (ReLU: rounded to
      x's dtype)
  reduce:  sum_dy = sum(g),  sum_dy_xhat = sum(g*xhat)   (and g itself, when asked)
  elemt:   grad_input = w*invstd*(g - sum_dy/m - xhat*sum_dy_xhat/m)   (batch stats)
                      = w*invstd*g                                     (running stats)

in fp32 (fp64 for fp64 input), each full-size result rounded once. Memory traffic:
  bn_act_backward_reduce  reads grad_out, x (+ out or residual), writes g   2-4 passes
  bn_act_backward_elemt   reads grad, x, writes grad_input                  3 passes
The sums are plain sums: per-lane accumulation over a program's tiles, tree reduction,
then the fixed-order sum of the partials (deterministic, no atomics). Tiles and launch
plan: resnet_fused.triton._bn_tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import bn_memory_format, stats_dtype
from .._validation import check_bn_input, check_like
from ._bn_tiles import (
    _acc_scalar,
    _act_masked_grad,
    _affine_params,
    _bc,
    _chan,
    _chan_sum,
    _channels,
    _empty_bn,
    _finalize_blocks,
    _in_fmt,
    _load_chan,
    _plan_for,
    _scalar,
    _tile,
)
from ._common import (
    act_from_output,
    check_act,
    check_bn_affine_args,
    check_per_channel,
    compute_dtype,
    on_input_device,
)


@triton.jit
def _backward_reduce_kernel(
    g_ptr, x_ptr, o_ptr, mg_ptr, p0_ptr, p1_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, eps: tl.float64,
    act_param: tl.float64, C, HW, R, n_col_tiles, n_tiles, tiles_per_prog,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    FROM_OUT: tl.constexpr, ADD_RES: tl.constexpr, WRITE_MG: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, CL: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """Partial sum(g) and sum(g*xhat) of a run of tiles -> p0[split, c], p1[split, c];
    g (grad_out * act') stored when WRITE_MG. ``o_ptr``: the output (FROM_OUT) or the
    residual (ADD_RES), else unused."""
    pid_s = tl.program_id(1)
    ch, cmask = _channels(tl.program_id(0), C, BC)
    mean, invstd, w, b = _affine_params(
        mean_ptr, var_ptr, w_ptr, b_ptr, ch, cmask, eps, HAS_W, HAS_B, ACC
    )
    param = _acc_scalar(act_param, ACC)
    acc_dy = tl.zeros([BR, BC, BK], ACC)
    acc_dyx = tl.zeros([BR, BC, BK], ACC)
    t0 = pid_s * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, n_tiles)
    for t in range(t0, t1):
        offs, mask, _ = _tile(t, ch, C, HW, R, n_col_tiles, BR, BC, BK, CL)
        xr = tl.load(x_ptr + offs, mask=mask, other=0.0)
        x = xr.to(ACC)
        g = _act_masked_grad(
            g_ptr, x, o_ptr, offs, mask, mean, invstd, w, b, param, xr.dtype,
            HAS_W, HAS_B, ACT, FROM_OUT, ADD_RES,
        )  # fmt: skip
        if WRITE_MG:
            tl.store(mg_ptr + offs, g.to(mg_ptr.dtype.element_ty), mask=mask)
        acc_dy += g
        acc_dyx += g * tl.where(mask, x - mean, 0.0)
    tl.store(p0_ptr + pid_s * C + ch, _chan_sum(acc_dy, BR, BC), mask=cmask)
    sum_dyx = _chan_sum(acc_dyx, BR, BC) * tl.reshape(invstd, [BC])
    tl.store(p1_ptr + pid_s * C + ch, sum_dyx, mask=cmask)


@triton.jit
def _sum_finalize_kernel(
    p0_ptr, p1_ptr, o0_ptr, o1_ptr, C, S,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """o0[c] = sum over s of p0[s, c], o1 likewise, in a fixed order."""
    ch, cmask = _channels(tl.program_id(0), C, BLOCK_C)
    acc0 = tl.zeros([BLOCK_S, BLOCK_C], ACC)
    acc1 = tl.zeros([BLOCK_S, BLOCK_C], ACC)
    for s0 in range(0, S, BLOCK_S):
        srow = s0 + tl.arange(0, BLOCK_S)
        pm = (srow < S)[:, None] & cmask[None, :]
        offs = srow[:, None] * C + ch[None, :]
        acc0 += tl.load(p0_ptr + offs, mask=pm, other=0.0)
        acc1 += tl.load(p1_ptr + offs, mask=pm, other=0.0)
    tl.store(o0_ptr + ch, tl.sum(acc0, axis=0), mask=cmask)
    tl.store(o1_ptr + ch, tl.sum(acc1, axis=0), mask=cmask)


@triton.jit
def _backward_elemt_kernel(
    g_ptr, x_ptr, gi_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, sdy_ptr, sdyx_ptr, eps: tl.float64,
    act_param: tl.float64, m, C, HW, R, n_col_tiles, n_tiles, tiles_per_prog,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, CL: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    ch, cmask = _channels(tl.program_id(0), C, BC)
    mean, invstd, w, b = _affine_params(
        mean_ptr, var_ptr, w_ptr, b_ptr, ch, cmask, eps, HAS_W, HAS_B, ACC
    )
    param = _acc_scalar(act_param, ACC)
    scale = invstd * w
    if BATCH_STATS:
        mean_dy = _bc(_load_chan(sdy_ptr, ch, cmask, ACC)) / m
        k = _bc(_load_chan(sdyx_ptr, ch, cmask, ACC)) / m * invstd
    t0 = tl.program_id(1) * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, n_tiles)
    for t in range(t0, t1):
        offs, mask, _ = _tile(t, ch, C, HW, R, n_col_tiles, BR, BC, BK, CL)
        xr = tl.load(x_ptr + offs, mask=mask, other=0.0)
        x = xr.to(ACC)
        g = _act_masked_grad(
            g_ptr, x, g_ptr, offs, mask, mean, invstd, w, b, param, xr.dtype,
            HAS_W, HAS_B, ACT, False,
        )  # fmt: skip
        if BATCH_STATS:
            g = g - mean_dy - (x - mean) * k
        tl.store(gi_ptr + offs, (g * scale).to(gi_ptr.dtype.element_ty), mask=mask)


@on_input_device
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
    """(sum g, sum g*xhat, g if write_masked_grad else empty), g = grad_out * act'(.): from
    ``out`` when given (act must allow it: Act.from_output), else at the pre-activation
    recomputed from the input [+ ``residual``, the forward's]."""
    act, act_param = check_act(act, act_param)
    check_bn_input(input)
    check_like(grad_out, "grad_out", input, "input")
    check_bn_affine_args(input, mean, var, weight, bias)
    if out is not None and residual is not None:
        raise ValueError(
            "out and residual were both given: act' comes from out, or from the "
            "pre-activation recomputed with the residual, not both"
        )
    if residual is not None:
        check_like(residual, "residual", input, "input")
    if out is not None:
        check_like(out, "out", input, "input")
        if not act_from_output(act, act_param):
            raise ValueError(
                f"out must be None for act={act} (act_param={act_param}): its derivative is "
                "not a function of the output (only identity, relu, relu6 and leaky_relu with "
                "a positive slope); pass out=None to recompute it from the input"
            )
    acc = stats_dtype(input.dtype)
    C = input.shape[1]
    fmt = bn_memory_format(input)
    masked = _empty_bn(input, fmt) if write_masked_grad else input.new_empty(0)
    if input.numel() == 0:
        zeros = torch.zeros(C, dtype=acc, device=input.device)
        return zeros, zeros.clone(), masked
    x = _in_fmt(input, fmt)
    g = _in_fmt(grad_out, fmt)
    from_out = act != 0 and out is not None
    add_res = act != 0 and residual is not None
    o = _in_fmt(out, fmt) if from_out else _in_fmt(residual, fmt) if add_res else x
    mean_a, var_a = _chan(mean, acc), _chan(var, acc)
    w, b = _chan(weight, acc), _chan(bias, acc)
    p = _plan_for(x, fmt)
    # Partials [splits, C] each; with one split they are the results themselves.
    p_dy = torch.empty(p.splits * C, dtype=acc, device=input.device)
    p_dyx = torch.empty(p.splits * C, dtype=acc, device=input.device)
    _backward_reduce_kernel[p.grid](
        g, x, o, masked if write_masked_grad else x, p_dy, p_dyx, mean_a, var_a,
        w if w is not None else mean_a, b if b is not None else mean_a,
        _scalar(eps), _scalar(act_param), *p.args(),
        HAS_W=w is not None, HAS_B=b is not None, ACT=act,
        FROM_OUT=from_out, ADD_RES=add_res, WRITE_MG=bool(write_masked_grad),
        ACC=compute_dtype(input.dtype), **p.meta(),
    )  # fmt: skip
    if p.splits == 1:
        return p_dy, p_dyx, masked
    sum_dy = torch.empty(C, dtype=acc, device=input.device)
    sum_dy_xhat = torch.empty(C, dtype=acc, device=input.device)
    block_s, block_c = _finalize_blocks(p.splits, C)
    _sum_finalize_kernel[(triton.cdiv(C, block_c),)](
        p_dy, p_dyx, sum_dy, sum_dy_xhat, C, p.splits,
        BLOCK_S=block_s, BLOCK_C=block_c, ACC=compute_dtype(input.dtype), num_warps=4,
    )  # fmt: skip
    return sum_dy, sum_dy_xhat, masked


@on_input_device
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
    """grad_input from ``grad`` and the two sums; ``grad`` is multiplied by act' at the
    pre-activation recomputed from the input first (act=0: it already is the gradient at
    the pre-activation)."""
    act, act_param = check_act(act, act_param)
    check_bn_input(input)
    check_like(grad, "grad", input, "input")
    check_bn_affine_args(input, mean, var, weight, bias)
    check_per_channel(sum_dy, "sum_dy", input)
    check_per_channel(sum_dy_xhat, "sum_dy_xhat", input)
    acc = stats_dtype(input.dtype)
    fmt = bn_memory_format(input)
    grad_input = _empty_bn(input, fmt)
    if grad_input.numel() == 0:
        return grad_input
    x = _in_fmt(input, fmt)
    g = _in_fmt(grad, fmt)
    mean_a, var_a = _chan(mean, acc), _chan(var, acc)
    w, b = _chan(weight, acc), _chan(bias, acc)
    sdy, sdyx = (_chan(sum_dy, acc), _chan(sum_dy_xhat, acc)) if batch_stats else (mean_a, mean_a)
    p = _plan_for(x, fmt)
    _backward_elemt_kernel[p.grid](
        g, x, grad_input, mean_a, var_a,
        w if w is not None else mean_a, b if b is not None else mean_a, sdy, sdyx,
        _scalar(eps), _scalar(act_param), p.m, *p.args(),
        HAS_W=w is not None, HAS_B=b is not None, ACT=act, BATCH_STATS=bool(batch_stats),
        ACC=compute_dtype(input.dtype), **p.meta(),
    )  # fmt: skip
    return grad_input
