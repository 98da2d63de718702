"""Triton kernels for fused BatchNorm -> (residual add) -> ReLU (training and inference).

Per channel c over the m = N*H*W values x of an (N, C, H, W) input (reference.py):
  stats:    mean = sum(x)/m    var = sum((x - mean)^2)/m                   (biased)
            running_mean <- (1 - momentum)*running_mean + momentum*mean
            running_var  <- (1 - momentum)*running_var  + momentum*var*m/(m - 1)
  forward:  out = relu((x - mean)*invstd*w + b [+ residual]),  invstd = 1/sqrt(var + eps)
  backward: g = grad_out masked by the ReLU (from ``out``, or from y = BN(x) recomputed
            and rounded to x's dtype);  sum_dy = sum(g),  sum_dy_xhat = sum(g*xhat)
            grad_input = w*invstd*(g - sum_dy/m - xhat*sum_dy_xhat/m)   (batch stats)
                       = w*invstd*g                                     (running stats)
All arithmetic is in the accumulation dtype ``acc`` (fp32; fp64 for fp64 input) and each
full-size result is rounded once on store.

Memory traffic (full-size tensors; per-channel vectors and partials are negligible):
  bn_stats               reads x                               1 pass
  bn_act_forward         reads x (+ residual), writes out      2-3 passes
  bn_act_backward_reduce reads grad_out, x (+ out), writes g   2-4 passes
  bn_act_backward_elemt  reads grad, x, writes grad_input      3 passes
  bias_act               reads x (+ residual), writes out      2-3 passes
                         (out = relu(x + bias [+ residual]): eval with BN folded into the conv)

Layout ("bn layout", resnet_fused._layout.bn_memory_format): channels_last when the input
is channels_last-contiguous and not NCHW-contiguous, else NCHW-contiguous. Operands in any
other layout are copied into it first; outputs are allocated in it. Kernels index flat
buffers with int64 offsets and work on 3-D register tiles [BR, BC, BK]:
  NCHW  BR images n x BC channels x BK contiguous hw values of the (n, c) planes, offset
        (n*C + c)*HW + hw. BC = 1 (one channel per program) unless one channel's N*HW
        values do not fill a tile (small planes, and the interpreter).
  NHWC  BR rows (n, hw) x BC contiguous channels (256-byte runs on a GPU), BK = 1,
        offset row*C + c. (NCHW with H*W == 1 is NHWC memory and takes this path.)
One program per (block of BC channels, split): each channel block has n_tiles tiles,
enumerated in a fixed order and cut into `splits` contiguous runs of tiles_per_prog
tiles, one program each, so that a grid of about _TARGET_PROGRAMS programs fills the GPU
even for C = 64 with a huge m. The tiling depends only on shape, dtype and layout.

Reductions are deterministic (no atomics): each program writes its partial to a buffer
[k, splits, C] and a second small kernel merges the partials of each channel in split
order. Statistics are robust: values are taken relative to a per-channel pivot (the
channel's first value x[0, c, 0, 0], the same for every program); each tile is reduced
by a two-pass in registers (the tile mean, then sum(d) and sum(d^2) of d = x - mean,
M2 = sum(d^2) - sum(d)^2/n); tiles, then partials, are combined with Chan's formula for
(count, mean, M2). sum(x^2) - sum(x)^2/m is never formed. The pivot keeps the partial
means O(std), so rounding them to fp32 does not leak into M2 through the merges'
(delta mean)^2 terms when |mean| >> std. The mean is pivot + merged mean, or the plain
sum/m (a fourth partial) when that is the smaller number (finer fp32 grid: the mean is
closer to 0 than to the pivot). The backward sums are plain sums: per-lane accumulation
over a program's tiles, tree reduction, then the fixed-order sum of the partials.

Scalars that must be exact in fp64 (eps, the momentum factors) are passed as fp32 hi/lo
pairs, since Triton passes Python floats to compiled kernels as fp32.
"""

from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from .._layout import bn_memory_format, stats_dtype
from .._validation import check_bn_input, check_like, check_optional_per_channel
from ._common import INTERPRETED, compute_dtype

# Tiling knobs (module constants so that tests can shrink them to exercise the merges).
# The interpreter pays per program and per tile, so it gets big tiles and few programs.
# Elements per register tile (half for fp64): the statistics kernel keeps little in
# registers and amortises its three tile reductions over a bigger tile; the others hold
# 2-4 operands (and two accumulators) per element, so 8 elements per thread.
_TILE_STATS = 16384 if INTERPRETED else 4096
_TILE = 16384 if INTERPRETED else 2048
_TARGET_PROGRAMS = 4 if INTERPRETED else 1024  # programs per full-size kernel launch
_NHWC_ROW_BYTES = 1 << 30 if INTERPRETED else 256  # channels per NHWC tile row, in bytes
_MAX_BK_NCHW = 1024  # widest hw run of an NCHW tile
_MIN_BK_NCHW = 32  # narrowest hw run of an NCHW tile (when H*W >= 32)
_FINALIZE_BLOCK_S = 64 if INTERPRETED else 16  # partials merged per step
_FINALIZE_BLOCK_C = 1024 if INTERPRETED else 128  # channels per finalize program
_SHORT_CHAINS = tl.constexpr(INTERPRETED)  # see _chan_sum


# ---------------------------------------------------------------------------------------
# Device helpers.
# ---------------------------------------------------------------------------------------
@triton.jit
def _channels(pid_c, C, BC: tl.constexpr):
    """The channel indices of a program ([BC]) and their validity."""
    ch = pid_c * BC + tl.arange(0, BC)
    return ch, ch < C


@triton.jit
def _tile(
    t, ch, C, HW, R, n_col_tiles,
    BR: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, CL: tl.constexpr,
):  # fmt: skip
    """Flat int64 offsets [BR, BC, BK], mask, and element count per channel of tile t.

    CL (NHWC): rows are the R = N*HW positions, then the channels ``ch``; BK == 1.
    NCHW: rows are the R = N images, then the channels ``ch``, then BK hw positions."""
    if CL:
        r0 = tl.cast(t, tl.int64) * BR
        rows = r0 + tl.arange(0, BR)
        offs = rows[:, None, None] * C + ch[None, :, None] + tl.arange(0, BK)[None, None, :]
        mask = (rows < R)[:, None, None] & (ch < C)[None, :, None]
        count = tl.minimum(R - r0, BR)
    else:
        tr = t // n_col_tiles
        tk = t - tr * n_col_tiles
        r0 = tl.cast(tr, tl.int64) * BR
        k0 = tk * BK
        rows = r0 + tl.arange(0, BR)
        cols = k0 + tl.arange(0, BK)
        offs = (rows[:, None, None] * C + ch[None, :, None]) * HW + cols[None, None, :]
        mask = (rows < R)[:, None, None] & (ch < C)[None, :, None] & (cols < HW)[None, None, :]
        count = tl.minimum(R - r0, BR) * tl.minimum(HW - k0, BK)
    return offs, mask, count


@triton.jit
def _chan_sum(x, BR: tl.constexpr, BC: tl.constexpr):
    """Per-channel sum of a [BR, BC, BK] tile -> [BC]. On a GPU tl.sum is a tree. The
    interpreter's (numpy's) sum over a non-innermost axis is one sequential chain, so there
    the rows are summed in groups of 8, level by level, to keep fp32 sums accurate."""
    y = tl.sum(x, axis=2)
    if _SHORT_CHAINS:  # BR is a power of two <= 16384
        if BR > 8:
            y = tl.sum(tl.reshape(y, [BR // 8, 8, BC]), axis=1)
        if BR > 64:
            y = tl.sum(tl.reshape(y, [BR // 64, 8, BC]), axis=1)
        if BR > 512:
            y = tl.sum(tl.reshape(y, [BR // 512, 8, BC]), axis=1)
        if BR > 4096:
            y = tl.sum(tl.reshape(y, [BR // 4096, 8, BC]), axis=1)
    return tl.sum(y, axis=0)


@triton.jit
def _bc(v):
    """A per-channel vector [BC] shaped [1, BC, 1] to broadcast over tiles."""
    return v[None, :, None]


@triton.jit
def _acc_scalar(hi, lo, ACC: tl.constexpr):
    """hi + lo in ACC: exact fp64 scalars through fp32 kernel arguments."""
    return tl.full([], hi, ACC) + tl.full([], lo, ACC)


@triton.jit
def _load_chan(ptr, ch, cmask, ACC: tl.constexpr):
    return tl.load(ptr + ch, mask=cmask, other=0.0).to(ACC)


@triton.jit
def _invstd(var, eps, ACC: tl.constexpr):
    """1/sqrt(var + eps), IEEE-rounded (per channel, so the cost does not matter)."""
    if tl.float64 == ACC:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return tl.div_rn(tl.full(var.shape, 1.0, ACC), tl.sqrt_rn(var + eps))


@triton.jit
def _affine_params(
    mean_ptr, var_ptr, w_ptr, b_ptr, ch, cmask, eps_hi, eps_lo,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Per-channel mean, invstd, weight and bias in ACC, shaped [1, BC, 1] for tiles."""
    mean = _load_chan(mean_ptr, ch, cmask, ACC)
    var = _load_chan(var_ptr, ch, cmask, ACC)
    invstd = _invstd(var, _acc_scalar(eps_hi, eps_lo, ACC), ACC)
    w = _load_chan(w_ptr, ch, cmask, ACC) if HAS_W else tl.full(mean.shape, 1.0, ACC)
    b = _load_chan(b_ptr, ch, cmask, ACC) if HAS_B else tl.zeros(mean.shape, ACC)
    return _bc(mean), _bc(invstd), _bc(w), _bc(b)


@triton.jit
def _affine(x, mean, invstd, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """y = (x - mean)*invstd*w + b, in the order of reference._affine."""
    y = (x - mean) * invstd
    if HAS_W:
        y = y * w
    if HAS_B:
        y = y + b
    return y


@triton.jit
def _relu_masked_grad(
    g_ptr, x, o_ptr, offs, mask, mean, invstd, w, b, x_dtype: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr, MASK_FROM_OUT: tl.constexpr,
):  # fmt: skip
    """Load grad and apply the ReLU mask: from ``out`` (MASK_FROM_OUT) or from
    y = BN(x) rounded to x's dtype. 0 where the activation is <= 0 (NaN passes)."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    if RELU:
        if MASK_FROM_OUT:
            o = tl.load(o_ptr + offs, mask=mask, other=0.0)
            g = tl.where(o <= 0, tl.zeros_like(g), g)
        else:
            y = _affine(x, mean, invstd, w, b, HAS_W, HAS_B).to(x_dtype)
            g = tl.where(y <= 0, tl.zeros_like(g), g)
    return g


# ---------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------
@triton.jit
def _pivot(x_ptr, ch, cmask, pivot_stride, ACC: tl.constexpr):
    """x[0, c, 0, 0] (at c*pivot_stride: HW for NCHW, 1 for NHWC): the origin all of a
    channel's partial means are taken from, so that they are small numbers (O(std)) that
    fp32 holds finely even when |mean| >> std."""
    return tl.load(x_ptr + ch.to(tl.int64) * pivot_stride, mask=cmask, other=0.0).to(ACC)


@triton.jit
def _stats_partial_kernel(
    x_ptr, part_ptr, C, HW, R, n_col_tiles, n_tiles, tiles_per_prog, pivot_stride,
    BR: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, CL: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """(count, mean - pivot, M2, sum) of a run of tiles -> part[0..3, split, channel]."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    ch, cmask = _channels(pid_c, C, BC)
    piv = _bc(_pivot(x_ptr, ch, cmask, pivot_stride, ACC))
    cnt = tl.zeros([BC], ACC)
    mean = tl.zeros([BC], ACC)
    m2 = tl.zeros([BC], ACC)
    acc_x = tl.zeros([BR, BC, BK], ACC)  # plain per-lane sums, for the mean of small |mean|
    t0 = pid_s * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, n_tiles)
    for t in range(t0, t1):
        offs, mask, count = _tile(t, ch, C, HW, R, n_col_tiles, BR, BC, BK, CL)
        nb = count.to(ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        acc_x += x
        x = tl.where(mask, x - piv, 0.0)
        # Two-pass over the registers: tile mean, then M2 = sum(d^2) - sum(d)^2/n around
        # it (d = x - mean_b; the sum(d) correction cancels the mean's rounding). sum(d)
        # does not correct mean_b itself: x - mean_b rounds alike for all x of a binade.
        mean_b = _chan_sum(x, BR, BC) / nb
        d = tl.where(mask, x - _bc(mean_b), 0.0)
        s1 = _chan_sum(d, BR, BC)
        s2 = _chan_sum(d * d, BR, BC)
        m2_b = tl.maximum(s2 - s1 * (s1 / nb), 0.0)
        # Chan merge of (cnt, mean, m2) with (nb, mean_b, m2_b); nb > 0.
        n = cnt + nb
        delta = mean_b - mean
        frac = nb / n
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta * delta * cnt * frac
        cnt = n
    base = part_ptr + pid_s * C + ch
    plane = n_splits * C
    tl.store(base, cnt, mask=cmask)
    tl.store(base + plane, mean, mask=cmask)
    tl.store(base + 2 * plane, m2, mask=cmask)
    tl.store(base + 3 * plane, _chan_sum(acc_x, BR, BC), mask=cmask)


@triton.jit
def _stats_finalize_kernel(
    part_ptr, x_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr, C, S, pivot_stride, rm_stride,
    rv_stride, keep_hi, keep_lo, mom_hi, mom_lo, momv_hi, momv_lo,
    HAS_RM: tl.constexpr, HAS_RV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Merge the S partials of each channel in split order (blocks of BLOCK_S partials
    combined exactly around their first mean, then Chan-merged), write mean and biased
    var, update the running statistics in place in their own dtype."""
    ch, cmask = _channels(tl.program_id(0), C, BLOCK_C)
    piv = _pivot(x_ptr, ch, cmask, pivot_stride, ACC)
    cnt = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    acc_x = tl.zeros([BLOCK_S, BLOCK_C], ACC)
    plane = S * C
    for s0 in range(0, S, BLOCK_S):
        srow = s0 + tl.arange(0, BLOCK_S)
        pm = (srow < S)[:, None] & cmask[None, :]
        offs = srow[:, None] * C + ch[None, :]
        n_t = tl.load(part_ptr + offs, mask=pm, other=0.0)
        mean_t = tl.load(part_ptr + plane + offs, mask=pm, other=0.0)
        m2_t = tl.load(part_ptr + 2 * plane + offs, mask=pm, other=0.0)
        acc_x += tl.load(part_ptr + 3 * plane + offs, mask=pm, other=0.0)
        shift = tl.load(part_ptr + plane + s0 * C + ch, mask=cmask, other=0.0)
        nb = tl.sum(n_t, axis=0)
        nb_safe = tl.where(nb > 0, nb, 1.0)
        dm = tl.where(pm, mean_t - shift[None, :], 0.0)
        mean_b = shift + tl.sum(n_t * dm, axis=0) / nb_safe
        dev = tl.where(pm, mean_t - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2_t, axis=0) + tl.sum(n_t * dev * dev, axis=0)
        n = cnt + nb
        n_safe = tl.where(n > 0, n, 1.0)
        delta = mean_b - mean
        frac = nb / n_safe
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta * delta * cnt * frac
        cnt = n
    cnt_safe = tl.where(cnt > 0, cnt, 1.0)
    var = m2 / cnt_safe
    # The mean from whichever of (pivot + mean - pivot) and the plain sum has the smaller
    # magnitude, i.e. the finer fp32 grid: the pivot wins when |mean| >> std, the plain
    # sum when the mean is closer to 0 than to the pivot. NaN falls to the plain sum.
    mean_plain = tl.sum(acc_x, axis=0) / cnt_safe
    mean = tl.where(tl.abs(mean) < tl.abs(mean_plain), piv + mean, mean_plain)
    tl.store(mean_ptr + ch, mean, mask=cmask)
    tl.store(var_ptr + ch, var, mask=cmask)
    keep = _acc_scalar(keep_hi, keep_lo, ACC)
    if HAS_RM:
        p = rm_ptr + ch.to(tl.int64) * rm_stride
        rm = tl.load(p, mask=cmask, other=0.0).to(ACC)
        new = rm * keep + mean * _acc_scalar(mom_hi, mom_lo, ACC)
        tl.store(p, new.to(rm_ptr.dtype.element_ty), mask=cmask)
    if HAS_RV:
        p = rv_ptr + ch.to(tl.int64) * rv_stride
        rv = tl.load(p, mask=cmask, other=0.0).to(ACC)
        new = rv * keep + var * _acc_scalar(momv_hi, momv_lo, ACC)
        tl.store(p, new.to(rv_ptr.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------------------
@triton.jit
def _forward_kernel(
    x_ptr, res_ptr, out_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, eps_hi, eps_lo,
    C, HW, R, n_col_tiles, n_tiles, tiles_per_prog,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, CL: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    ch, cmask = _channels(tl.program_id(0), C, BC)
    mean, invstd, w, b = _affine_params(
        mean_ptr, var_ptr, w_ptr, b_ptr, ch, cmask, eps_hi, eps_lo, HAS_W, HAS_B, ACC
    )
    t0 = tl.program_id(1) * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, n_tiles)
    for t in range(t0, t1):
        offs, mask, _ = _tile(t, ch, C, HW, R, n_col_tiles, BR, BC, BK, CL)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = _affine(x, mean, invstd, w, b, HAS_W, HAS_B)
        if HAS_RES:
            y = y + tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            y = tl.where(y < 0, 0.0, y)  # NaN propagates, as torch.relu does
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_kernel(
    x_ptr, b_ptr, res_ptr, out_ptr,
    C, HW, R, n_col_tiles, n_tiles, tiles_per_prog,
    HAS_B: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, CL: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """out = relu(x + bias[c] [+ residual]): the forward with BN folded into the conv
    (mean 0, invstd 1, weight 1), on the same tiles as _forward_kernel."""
    ch, cmask = _channels(tl.program_id(0), C, BC)
    b = _bc(_load_chan(b_ptr, ch, cmask, ACC)) if HAS_B else _bc(tl.zeros([BC], ACC))
    t0 = tl.program_id(1) * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, n_tiles)
    for t in range(t0, t1):
        offs, mask, _ = _tile(t, ch, C, HW, R, n_col_tiles, BR, BC, BK, CL)
        y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if HAS_B:
            y = y + b
        if HAS_RES:
            y = y + tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
        if RELU:
            y = tl.where(y < 0, 0.0, y)  # NaN propagates, as torch.relu does
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Backward.
# ---------------------------------------------------------------------------------------
@triton.jit
def _backward_reduce_kernel(
    g_ptr, x_ptr, o_ptr, mg_ptr, p0_ptr, p1_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, eps_hi, eps_lo,
    C, HW, R, n_col_tiles, n_tiles, tiles_per_prog,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr,
    MASK_FROM_OUT: tl.constexpr, WRITE_MG: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, CL: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """Partial sum(g) and sum(g*xhat) of a run of tiles -> p0[split, c], p1[split, c];
    g (the masked grad) stored when WRITE_MG."""
    pid_s = tl.program_id(1)
    ch, cmask = _channels(tl.program_id(0), C, BC)
    mean, invstd, w, b = _affine_params(
        mean_ptr, var_ptr, w_ptr, b_ptr, ch, cmask, eps_hi, eps_lo, HAS_W, HAS_B, ACC
    )
    acc_dy = tl.zeros([BR, BC, BK], ACC)
    acc_dyx = tl.zeros([BR, BC, BK], ACC)
    t0 = pid_s * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, n_tiles)
    for t in range(t0, t1):
        offs, mask, _ = _tile(t, ch, C, HW, R, n_col_tiles, BR, BC, BK, CL)
        xr = tl.load(x_ptr + offs, mask=mask, other=0.0)
        x = xr.to(ACC)
        g = _relu_masked_grad(
            g_ptr, x, o_ptr, offs, mask, mean, invstd, w, b, xr.dtype,
            HAS_W, HAS_B, RELU, MASK_FROM_OUT,
        )  # fmt: skip
        if WRITE_MG:
            tl.store(mg_ptr + offs, g.to(mg_ptr.dtype.element_ty), mask=mask)
        ga = g.to(ACC)
        acc_dy += ga
        acc_dyx += ga * tl.where(mask, x - mean, 0.0)
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
    g_ptr, x_ptr, gi_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, sdy_ptr, sdyx_ptr, eps_hi, eps_lo,
    m, C, HW, R, n_col_tiles, n_tiles, tiles_per_prog,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU_FROM_INPUT: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, CL: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    ch, cmask = _channels(tl.program_id(0), C, BC)
    mean, invstd, w, b = _affine_params(
        mean_ptr, var_ptr, w_ptr, b_ptr, ch, cmask, eps_hi, eps_lo, HAS_W, HAS_B, ACC
    )
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
        g = _relu_masked_grad(
            g_ptr, x, g_ptr, offs, mask, mean, invstd, w, b, xr.dtype,
            HAS_W, HAS_B, RELU_FROM_INPUT, False,
        ).to(ACC)  # fmt: skip
        if BATCH_STATS:
            g = g - mean_dy - (x - mean) * k
        tl.store(gi_ptr + offs, (g * scale).to(gi_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Launch planning.
# ---------------------------------------------------------------------------------------
class _Plan:
    """Tiling of one (shape, layout, dtype): see the module docstring."""

    __slots__ = (
        "BC", "BK", "BR", "C", "HW", "R", "cl", "m", "n_cblocks", "n_col_tiles", "n_tiles",
        "num_warps", "splits", "tiles_per_prog",
    )  # fmt: skip

    def __init__(self, N: int, C: int, HW: int, cl: bool, itemsize: int, tile: int):
        tile = tile // 2 if itemsize >= 8 else tile
        self.C, self.HW, self.m = C, HW, N * HW
        self.cl = cl = cl or HW == 1  # NCHW with H*W == 1 is NHWC memory
        if cl:
            self.R = N * HW
            self.BK = 1
            # Rows of BC contiguous channels: 256-byte runs (64 fp32 / 128 fp16 channels).
            cap = max(1, _NHWC_ROW_BYTES // itemsize)
            self.BC = bc = min(triton.next_power_of_2(C), cap)
            self.BR = min(triton.next_power_of_2(self.R), max(1, tile // bc))
            self.n_col_tiles = 1
            self.n_tiles = triton.cdiv(self.R, self.BR)
        else:
            self.R = N
            self.BK = bk = _nchw_block_hw(HW)
            self.BR = br = min(triton.next_power_of_2(N), max(1, tile // bk))
            # Several channels per program only when a channel's planes do not fill a tile.
            self.BC = min(triton.next_power_of_2(C), max(1, tile // (br * bk)))
            self.n_col_tiles = triton.cdiv(HW, bk)
            self.n_tiles = triton.cdiv(N, br) * self.n_col_tiles
        self.n_cblocks = triton.cdiv(C, self.BC)
        want = max(1, triton.cdiv(_TARGET_PROGRAMS, self.n_cblocks))
        splits = min(self.n_tiles, want)
        self.tiles_per_prog = triton.cdiv(self.n_tiles, splits)
        self.splits = triton.cdiv(self.n_tiles, self.tiles_per_prog)  # no empty program
        self.num_warps = max(1, min(8, self.BR * self.BC * self.BK // 256))

    @property
    def grid(self) -> tuple[int, int]:
        return (self.n_cblocks, self.splits)

    def args(self) -> tuple[int, ...]:
        return (self.C, self.HW, self.R, self.n_col_tiles, self.n_tiles, self.tiles_per_prog)

    def meta(self) -> dict:
        return {"BR": self.BR, "BK": self.BK, "BC": self.BC, "CL": self.cl,
                "num_warps": self.num_warps}  # fmt: skip


def _nchw_block_hw(hw: int) -> int:
    """Width of an NCHW tile (hw values of one plane): the widest power of two in
    [_MIN_BK_NCHW, _MAX_BK_NCHW] whose padding of a row is <= 10%, else the one with the
    least padding (H*W of ResNet is 49*4^k, never a multiple of 64)."""
    top = min(triton.next_power_of_2(hw), _MAX_BK_NCHW)
    if top <= _MIN_BK_NCHW:
        return top
    cands = []
    bk = top
    while bk >= _MIN_BK_NCHW:
        padded = triton.cdiv(hw, bk) * bk
        if (padded - hw) * 10 <= padded:
            return bk
        cands.append((padded, -bk))
        bk //= 2
    return -min(cands)[1]


@functools.lru_cache(maxsize=512)
def _plan(N: int, C: int, HW: int, cl: bool, itemsize: int, tile: int, _knobs: tuple) -> _Plan:
    return _Plan(N, C, HW, cl, itemsize, tile)


def _plan_for(x: torch.Tensor, fmt: torch.memory_format, stats: bool = False) -> _Plan:
    n, c, h, w = x.shape
    tile = _TILE_STATS if stats else _TILE
    knobs = (_TARGET_PROGRAMS, _NHWC_ROW_BYTES, _MAX_BK_NCHW, _MIN_BK_NCHW)
    return _plan(n, c, h * w, fmt == torch.channels_last, x.element_size(), tile, knobs)


def _finalize_blocks(splits: int, C: int) -> tuple[int, int]:
    block_s = min(triton.next_power_of_2(splits), _FINALIZE_BLOCK_S)
    block_c = min(triton.next_power_of_2(C), _FINALIZE_BLOCK_C)
    return block_s, block_c


# ---------------------------------------------------------------------------------------
# Host helpers.
# ---------------------------------------------------------------------------------------
def _split_float(v: float) -> tuple[float, float]:
    """(hi, lo) with hi = fp32(v) and hi + lo == v to ~2^-48 relative (see _acc_scalar)."""
    v = float(v)
    if not math.isfinite(v):
        return v, 0.0
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


def _check_4d(input: torch.Tensor) -> None:
    if input.dim() != 4:
        raise ValueError(f"expected a 4-D (N, C, H, W) input, got shape {tuple(input.shape)}")


def _in_fmt(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return t.contiguous(memory_format=fmt)


def _chan(t: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    """A per-channel vector as a contiguous acc tensor (no copy when it already is)."""
    if t is None:
        return None
    return t.reshape(-1).to(dtype=acc).contiguous()


def _empty_bn(input: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=fmt)


# ---------------------------------------------------------------------------------------
# Launchers (same names and semantics as in reference.py).
# ---------------------------------------------------------------------------------------
def bn_stats(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_4d(input)
    acc = stats_dtype(input.dtype)
    C = input.shape[1]
    m = input.numel() // C if C else 0
    mean = torch.empty(C, dtype=acc, device=input.device)
    var = torch.empty(C, dtype=acc, device=input.device)
    if C == 0:
        return mean, var
    if m == 0:  # empty channels: NaN statistics; running stats updated as reference does
        mean.fill_(float("nan"))
        var.fill_(float("nan"))
        with torch.no_grad():
            if running_mean is not None:
                running_mean.copy_(running_mean.to(acc) * (1 - momentum) + mean * momentum)
            if running_var is not None:
                running_var.copy_(running_var.to(acc) * (1 - momentum) + var * -0.0)
        return mean, var
    fmt = bn_memory_format(input)
    x = _in_fmt(input, fmt)
    p = _plan_for(x, fmt, stats=True)
    part = torch.empty((4, p.splits, C), dtype=acc, device=input.device)
    pivot_stride = 1 if p.cl else p.HW
    _stats_partial_kernel[p.grid](
        x, part, *p.args(), pivot_stride, ACC=compute_dtype(input.dtype), **p.meta()
    )

    var_factor = momentum * m / (m - 1) if m > 1 else float("nan")
    keep, mom, momv = (_split_float(v) for v in (1 - momentum, momentum, var_factor))
    block_s, block_c = _finalize_blocks(p.splits, C)
    _stats_finalize_kernel[(triton.cdiv(C, block_c),)](
        part, x, mean, var,
        running_mean if running_mean is not None else mean,
        running_var if running_var is not None else var,
        C, p.splits, pivot_stride,
        running_mean.stride(0) if running_mean is not None else 1,
        running_var.stride(0) if running_var is not None else 1,
        *keep, *mom, *momv,
        HAS_RM=running_mean is not None, HAS_RV=running_var is not None,
        BLOCK_S=block_s, BLOCK_C=block_c, ACC=compute_dtype(input.dtype), num_warps=4,
    )  # fmt: skip
    return mean, var


def bn_act_forward(
    input: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    relu: bool,
) -> torch.Tensor:
    _check_4d(input)
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
        *_split_float(eps), *p.args(),
        HAS_W=w is not None, HAS_B=b is not None, HAS_RES=res is not None, RELU=bool(relu),
        ACC=compute_dtype(input.dtype), **p.meta(),
    )  # fmt: skip
    return out


def bn_act_backward_reduce(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    eps: float,
    relu: bool,
    write_masked_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_4d(input)
    acc = stats_dtype(input.dtype)
    C = input.shape[1]
    fmt = bn_memory_format(input)
    masked = _empty_bn(input, fmt) if write_masked_grad else input.new_empty(0)
    if input.numel() == 0:
        zeros = torch.zeros(C, dtype=acc, device=input.device)
        return zeros, zeros.clone(), masked
    x = _in_fmt(input, fmt)
    g = _in_fmt(grad_out, fmt)
    mask_from_out = bool(relu) and out is not None
    o = _in_fmt(out, fmt) if mask_from_out else x
    mean_a, var_a = _chan(mean, acc), _chan(var, acc)
    w, b = _chan(weight, acc), _chan(bias, acc)
    p = _plan_for(x, fmt)
    # Partials [splits, C] each; with one split they are the results themselves.
    p_dy = torch.empty(p.splits * C, dtype=acc, device=input.device)
    p_dyx = torch.empty(p.splits * C, dtype=acc, device=input.device)
    _backward_reduce_kernel[p.grid](
        g, x, o, masked if write_masked_grad else x, p_dy, p_dyx, mean_a, var_a,
        w if w is not None else mean_a, b if b is not None else mean_a,
        *_split_float(eps), *p.args(),
        HAS_W=w is not None, HAS_B=b is not None, RELU=bool(relu),
        MASK_FROM_OUT=mask_from_out, WRITE_MG=bool(write_masked_grad),
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
    relu_mask_from_input: bool,
    batch_stats: bool,
) -> torch.Tensor:
    _check_4d(input)
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
        *_split_float(eps), p.m, *p.args(),
        HAS_W=w is not None, HAS_B=b is not None,
        RELU_FROM_INPUT=bool(relu_mask_from_input), BATCH_STATS=bool(batch_stats),
        ACC=compute_dtype(input.dtype), **p.meta(),
    )  # fmt: skip
    return grad_input


# ---------------------------------------------------------------------------------------
# bias_act: the eval-mode epilogue of a conv with BN folded into its weight and bias.
# out = relu(input + bias[c] [+ residual]) in acc, rounded once; reads input (+ residual)
# and writes out (or input itself, in place) in one pass.
# ---------------------------------------------------------------------------------------
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
    relu: bool,
    out: torch.Tensor,
    fmt: torch.memory_format,
) -> None:
    """x and out (which may be x) are in layout ``fmt``; residual is copied into it if needed."""
    acc = stats_dtype(x.dtype)
    res = _in_fmt(residual, fmt) if residual is not None else None
    b = _chan(bias, acc)
    p = _plan_for(x, fmt)
    _bias_act_kernel[p.grid](
        x, b if b is not None else x, res if res is not None else x, out, *p.args(),
        HAS_B=b is not None, HAS_RES=res is not None, RELU=bool(relu),
        ACC=compute_dtype(x.dtype), **p.meta(),
    )  # fmt: skip


def bias_act(
    input: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    _check_bias_act(input, bias, residual)
    fmt = bn_memory_format(input)
    out = _empty_bn(input, fmt)
    if out.numel():
        _launch_bias_act(_in_fmt(input, fmt), bias, residual, relu, out, fmt)
    return out


def bias_act_(
    input: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, relu: bool
) -> None:
    _check_bias_act(input, bias, residual)
    if not (input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(
            "input of bias_act_ (in place) must be dense in NCHW (contiguous) or channels_last "
            f"layout, got shape {tuple(input.shape)} with strides {input.stride()}"
        )
    if input.numel():
        # Each element is loaded before it is stored, by the same program: x may be out.
        _launch_bias_act(input, bias, residual, relu, input, bn_memory_format(input))
