"""Triton BatchNorm statistics: per-channel batch mean and biased variance, with the
running statistics updated in place (resnet_fused.reference.bn_stats).

Per channel c over the m = N*H*W values x of an (N, C, H, W) input:
  mean = sum(x)/m    var = sum((x - mean)^2)/m                   (biased)
  running_mean <- (1 - momentum)*running_mean + momentum*mean
  running_var  <- (1 - momentum)*running_var  + momentum*var*m/(m - 1)
Arithmetic in fp32 (fp64 for fp64 input). Memory traffic: reads x once (eager's
batch_norm statistics pass does the same; the gain is in the fused apply that follows).

Two kernels on the tiles of resnet_fused.triton._bn_tiles: one program per (channel block,
split) writes its partial (count, mean - pivot, M2, sum); a second kernel merges the
partials of each channel in split order. Counts are int64, so they stay exact beyond 2^24
values per channel. Statistics are robust: values are taken relative to a per-channel
pivot (the channel's first value x[0, c, 0, 0], the same for every program); each tile is
reduced by a two-pass in registers (the tile mean, then sum(d) and sum(d^2) of
d = x - mean, M2 = sum(d^2) - sum(d)^2/n); tiles, then partials, are combined with Chan's
formula for (count, mean, M2). sum(x^2) - sum(x)^2/m is never formed. The pivot keeps the
partial means O(std), so rounding them to fp32 does not leak into M2 through the merges'
(delta mean)^2 terms when |mean| >> std. The mean is pivot + merged mean, or the plain
sum/m (a fourth partial) when that is the smaller number (finer fp32 grid: the mean is
closer to 0 than to the pivot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import bn_memory_format, stats_dtype
from .._validation import check_bn_input, check_optional_per_channel
from ._bn_tiles import (
    _acc_scalar,
    _bc,
    _chan_sum,
    _channels,
    _finalize_blocks,
    _in_fmt,
    _plan_for,
    _scalar,
    _tile,
)
from ._common import compute_dtype, on_input_device


@triton.jit
def _pivot(x_ptr, ch, cmask, pivot_stride, ACC: tl.constexpr):
    """x[0, c, 0, 0] (at c*pivot_stride: HW for NCHW, 1 for NHWC): the origin all of a
    channel's partial means are taken from, so that they are small numbers (O(std)) that
    fp32 holds finely even when |mean| >> std."""
    return tl.load(x_ptr + ch.to(tl.int64) * pivot_stride, mask=cmask, other=0.0).to(ACC)


@triton.jit
def _stats_partial_kernel(
    x_ptr, cnt_ptr, part_ptr, C, HW, R, n_col_tiles, n_tiles, tiles_per_prog, pivot_stride,
    BR: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, CL: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """count -> cnt[split, channel] (int64); (mean - pivot, M2, sum) of a run of tiles ->
    part[0..2, split, channel]."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    ch, cmask = _channels(pid_c, C, BC)
    piv = _bc(_pivot(x_ptr, ch, cmask, pivot_stride, ACC))
    cnt = tl.zeros([BC], tl.int64)  # exact beyond 2^24
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
        n = cnt + count
        delta = mean_b - mean
        frac = nb / n.to(ACC)
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta * delta * cnt.to(ACC) * frac
        cnt = n
    base = part_ptr + pid_s * C + ch
    plane = n_splits * C
    tl.store(cnt_ptr + pid_s * C + ch, cnt, mask=cmask)
    tl.store(base, mean, mask=cmask)
    tl.store(base + plane, m2, mask=cmask)
    tl.store(base + 2 * plane, _chan_sum(acc_x, BR, BC), mask=cmask)


@triton.jit
def _stats_finalize_kernel(
    cnt_ptr, part_ptr, x_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr, C, S, pivot_stride, rm_stride,
    rv_stride, keep: tl.float64, mom: tl.float64, momv: tl.float64,
    HAS_RM: tl.constexpr, HAS_RV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Merge the S partials of each channel in split order (blocks of BLOCK_S partials
    combined exactly around their first mean, then Chan-merged), write mean and biased
    var, update the running statistics in place in their own dtype. Counts are int64
    (cnt[S, C]); part[3, S, C] holds (mean - pivot, M2, sum)."""
    ch, cmask = _channels(tl.program_id(0), C, BLOCK_C)
    piv = _pivot(x_ptr, ch, cmask, pivot_stride, ACC)
    cnt = tl.zeros([BLOCK_C], tl.int64)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    acc_x = tl.zeros([BLOCK_S, BLOCK_C], ACC)
    plane = S * C
    for s0 in range(0, S, BLOCK_S):
        srow = s0 + tl.arange(0, BLOCK_S)
        pm = (srow < S)[:, None] & cmask[None, :]
        offs = srow[:, None] * C + ch[None, :]
        n_i = tl.load(cnt_ptr + offs, mask=pm, other=0)
        n_t = n_i.to(ACC)
        mean_t = tl.load(part_ptr + offs, mask=pm, other=0.0)
        m2_t = tl.load(part_ptr + plane + offs, mask=pm, other=0.0)
        acc_x += tl.load(part_ptr + 2 * plane + offs, mask=pm, other=0.0)
        shift = tl.load(part_ptr + s0 * C + ch, mask=cmask, other=0.0)
        nb_i = tl.sum(n_i, axis=0)
        nb = nb_i.to(ACC)
        nb_safe = tl.where(nb_i > 0, nb, 1.0)
        dm = tl.where(pm, mean_t - shift[None, :], 0.0)
        mean_b = shift + tl.sum(n_t * dm, axis=0) / nb_safe
        dev = tl.where(pm, mean_t - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2_t, axis=0) + tl.sum(n_t * dev * dev, axis=0)
        n = cnt + nb_i
        n_safe = tl.where(n > 0, n.to(ACC), 1.0)
        delta = mean_b - mean
        frac = nb / n_safe
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta * delta * cnt.to(ACC) * frac
        cnt = n
    cnt_safe = tl.where(cnt > 0, cnt.to(ACC), 1.0)
    var = m2 / cnt_safe
    # The mean from whichever of (pivot + mean - pivot) and the plain sum has the smaller
    # magnitude, i.e. the finer fp32 grid: the pivot wins when |mean| >> std, the plain
    # sum when the mean is closer to 0 than to the pivot. NaN falls to the plain sum.
    mean_plain = tl.sum(acc_x, axis=0) / cnt_safe
    mean = tl.where(tl.abs(mean) < tl.abs(mean_plain), piv + mean, mean_plain)
    tl.store(mean_ptr + ch, mean, mask=cmask)
    tl.store(var_ptr + ch, var, mask=cmask)
    keep = _acc_scalar(keep, ACC)
    if HAS_RM:
        p = rm_ptr + ch.to(tl.int64) * rm_stride
        rm = tl.load(p, mask=cmask, other=0.0).to(ACC)
        new = rm * keep + mean * _acc_scalar(mom, ACC)
        tl.store(p, new.to(rm_ptr.dtype.element_ty), mask=cmask)
    if HAS_RV:
        p = rv_ptr + ch.to(tl.int64) * rv_stride
        rv = tl.load(p, mask=cmask, other=0.0).to(ACC)
        new = rv * keep + var * _acc_scalar(momv, ACC)
        tl.store(p, new.to(rv_ptr.dtype.element_ty), mask=cmask)


@on_input_device
def bn_stats(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_bn_input(input)
    check_optional_per_channel(running_mean, "running_mean", input)
    check_optional_per_channel(running_var, "running_var", input)
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
    counts = torch.empty((p.splits, C), dtype=torch.int64, device=input.device)
    part = torch.empty((3, p.splits, C), dtype=acc, device=input.device)
    pivot_stride = 1 if p.cl else p.HW
    _stats_partial_kernel[p.grid](
        x, counts, part, *p.args(), pivot_stride, ACC=compute_dtype(input.dtype), **p.meta()
    )

    return merge_partials(counts, part, x, pivot_stride, m, running_mean, running_var, momentum)


@on_input_device
def merge_partials(
    counts: torch.Tensor,
    part: torch.Tensor,
    x: torch.Tensor,
    pivot_stride: int,
    m: int,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased var [C] from the per-split partials: counts [S, C] int64 and
    part [3, S, C] (mean - pivot, M2, sum) in the accumulation dtype; the pivot of channel
    c is x.flatten()[c*pivot_stride]; m = counts.sum(0). Updates the running statistics."""
    acc = part.dtype
    S, C = counts.shape
    dev = part.device
    mean = torch.empty(C, dtype=acc, device=dev)
    var = torch.empty(C, dtype=acc, device=dev)
    var_factor = momentum * m / (m - 1) if m > 1 else float("nan")
    keep, mom, momv = (_scalar(v) for v in (1 - momentum, momentum, var_factor))
    block_s, block_c = _finalize_blocks(S, C)
    _stats_finalize_kernel[(triton.cdiv(C, block_c),)](
        counts, part, x, mean, var,
        running_mean if running_mean is not None else mean,
        running_var if running_var is not None else var,
        C, S, pivot_stride,
        running_mean.stride(0) if running_mean is not None else 1,
        running_var.stride(0) if running_var is not None else 1,
        keep, mom, momv,
        HAS_RM=running_mean is not None, HAS_RV=running_var is not None,
        BLOCK_S=block_s, BLOCK_C=block_c, ACC=tl.float64 if acc == torch.float64 else tl.float32,
        num_warps=4,
    )  # fmt: skip
    return mean, var
