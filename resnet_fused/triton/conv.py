"""Implicit-GEMM 2-D convolution (groups=1) with fused epilogues, and BatchNorm statistics
from per-tile partials written by that epilogue.

GEMM view of out[n, co, p, q] = sum over (r, s, ci) of x[n, ci, h, w] * weight[co, ci, r, s]
with h = p*stride_h - pad_h + r*dil_h, w = q*stride_w - pad_w + s*dil_w (0 outside x):
  rows    M = N*P*Q output pixels, m = (n*P + p)*Q + q (the channels_last order of out)
  columns Cout
  K       R*S*Cin, k = (r*S + s)*Cin + ci: the row of the packed weight [K, Cout]
          (pack_weight), so that for NHWC input one BLOCK_K slice of a tap is a run of
          contiguous channels.
Each program computes a BLOCK_M x BLOCK_N tile of out (GROUP_M-swizzled over the grid for
L2 reuse of the x rows). The K loop is one flat loop over (tap, channel block) pairs, tap
outer: the scalar tap (r, s) and channel offset of an iteration are derived with scalar
div/mod, the input coordinates of the tile's rows per tap, and padding/image borders are
load masks. One loop (not nested tap/channel loops) so that Triton software-pipelines it
even when Cin fits one block. When Cin < SMALL_CIN (the 3-channel stem), K is walked flat
instead (k -> (r, s, ci) per BLOCK_K vector), so a 7x7x3 stem runs 147/BLOCK_K iterations
instead of 49 mostly masked ones. Accumulation is fp32 (tl.dot; fp32 operands use TF32
when torch.backends.cudnn.allow_tf32 is set, like torch's convolutions).

Epilogue, on the fp32 accumulator: + bias[co], + residual (any strides), the activation
(resnet_fused.activations: constexpr code ACT, runtime LeakyReLU slope), one rounding
to x's dtype, store into a channels_last out. With stats=True it also writes BatchNorm
partial statistics of the stored (rounded) values: partials[3, T, Cout] float32 =
(count, mean, M2) of each run of STATS_ROWS output rows ("stats tile"; T =
num_stats_tiles(M), independent of the tuned tile sizes so that the shape is known before
the launch). Each tile is reduced two-pass in registers: mean_b = sum(y)/n, d = y - mean_b,
M2 = sum(d^2) - sum(d)^2/n, and the stored mean is mean_b + sum(d)/n (the correction
cancels the rounding of the sum). Every (stats tile, channel) is written by one program:
no atomics, deterministic for a given tile configuration.

finalize_stats merges the partials of each channel in tile order with Chan's formula
around a per-channel pivot (the mean of tile 0), so that the merged means stay O(std)
when |mean| >> std: blocks of BLOCK_T tiles are combined exactly in registers, then
Chan-merged into the running (count, mean, M2). Many tiles are first merged in parallel
into splits of _MERGE_TILES_PER_PROG tiles (means kept relative to the pivot), then the
splits in a second launch of the same kernel. The last launch writes mean, the biased var
and updates the running statistics like nn.BatchNorm2d. Merged counts are int64 (exact
beyond 2^24 values per channel; the per-tile counts, <= STATS_ROWS, are exact in fp32).

The autotuner (no RESNET_FUSED_CONV_CONFIG, not interpreted) keys on the whole geometry
(M, P, Q, channels, kernel, stride, padding, dilation), the epilogue flags, the precision
(TF32 or IEEE for fp32), the layout class of x and residual and every tensor's dtype.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._geometry import conv_output_hw, pair
from ._common import INTERPRETED, _act_apply, check_act, on_input_device

# Rows per stats tile of the partial statistics (tuned BLOCK_M must be a multiple in stats
# mode). 128 rows: the partials add 3*4 bytes per 128 values written (under 5% of an fp16
# output's bytes).
STATS_ROWS = 16 if INTERPRETED else 128
SMALL_CIN = 16  # Cin below this walks K flat (see module docstring)
GROUP_M = 8
_INTERPRET_CONFIG = (16, 16, 16, 4, 1)  # BM, BN, BK, warps, stages
_MERGE_TILES_PER_PROG = 256  # tiles merged per program in the first finalize pass
_MERGE_BLOCK_T = 64 if INTERPRETED else 32
_MERGE_BLOCK_C = 128 if INTERPRETED else 32
_CONFIG_ENV = "RESNET_FUSED_CONV_CONFIG"
_INT32_MAX = 2**31 - 1


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages
    )


# fp16/bf16 operands (tensor cores), for A100 and H100/H200. 64-row tiles for small layers
# (not used in stats mode). No 128x256 tile: with pointer-based loads its 8 warps spill
# registers on sm_90 (ptxas), while 256x128 does not.
HALF_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(256, 128, 64, 8, 3),
    _cfg(128, 128, 64, 4, 4),
    _cfg(128, 128, 32, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
]
# fp32 operands (TF32 or IEEE): twice the bytes per element, so BLOCK_K = 32.
FP32_CONFIGS = [
    _cfg(128, 128, 32, 8, 3),
    _cfg(128, 64, 32, 4, 4),
    _cfg(128, 128, 16, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 32, 4, 4),
]
# Everything the best tile configuration may depend on. The autotuner also appends the
# dtype of every tensor argument. X_CL/RES_CL: the layout class of x and residual.
_TUNE_KEY = [
    "M", "P", "Q", "Cout", "Cin", "R", "S", "stride_h", "stride_w", "pad_h", "pad_w",
    "dil_h", "dil_w", "HAS_BIAS", "HAS_RES", "ACT", "STATS", "PRECISION", "X_CL", "RES_CL",
]  # fmt: skip


# ---------------------------------------------------------------------------------------
# Convolution kernel.
# ---------------------------------------------------------------------------------------
@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, part_ptr,
    M, Cout, Cin, H, W, P, Q, T,
    sxn, sxc, sxh, sxw, srn, src, srh, srw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, act_param: tl.float64,
    R: tl.constexpr, S: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr,
    FLAT_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    X_CL: tl.constexpr, RES_CL: tl.constexpr,
    UPCAST: tl.constexpr, SROWS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # GROUP-swizzled program order: GROUP row tiles share the columns' weights in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(Cout, BLOCK_N)
    in_group = GROUP * num_pid_n
    first_m = (pid // in_group) * GROUP
    group_m = tl.minimum(num_pid_m - first_m, GROUP)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # M < 2^31 (host check)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < Cout
    PQ = P * Q
    img = offs_m // PQ
    pq = offs_m - img * PQ
    p = pq // Q
    q = pq - p * Q
    h0 = p * stride_h - pad_h
    w0 = q * stride_w - pad_w
    x_row = img.to(tl.int64) * sxn  # int64: N*Cin*H*W may exceed 2^31

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FLAT_K:
        K = R * S * Cin
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            rs = k // Cin
            c = k - rs * Cin
            r = rs // S
            s = rs - r * S
            h = h0[:, None] + (r * dil_h)[None, :]
            w = w0[:, None] + (s * dil_w)[None, :]
            a_ok = m_ok[:, None] & k_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a_off = x_row[:, None] + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
            a_off += (c.to(tl.int64) * sxc)[None, :]
            a = tl.load(x_ptr + a_off, mask=a_ok, other=0.0)
            b_off = k[:, None] * Cout + offs_n[None, :]
            b = tl.load(w_ptr + b_off, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's dot cannot take bf16 (exact in fp32)
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        n_cblk = tl.cdiv(Cin, BLOCK_K)
        for it in range(0, R * S * n_cblk):
            rs = it // n_cblk
            c0 = (it - rs * n_cblk) * BLOCK_K
            r = rs // S
            s = rs - r * S
            h = h0 + r * dil_h
            w = w0 + s * dil_w
            row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            row_off = x_row + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
            c = c0 + tl.arange(0, BLOCK_K)
            a_off = row_off[:, None] + (c.to(tl.int64) * sxc)[None, :]
            b_off = (rs * Cin + c)[:, None] * Cout + offs_n[None, :]
            if EVEN_K:
                a = tl.load(x_ptr + a_off, mask=row_ok[:, None], other=0.0)
                b = tl.load(w_ptr + b_off, mask=n_ok[None, :], other=0.0)
            else:
                c_ok = c < Cin
                a = tl.load(x_ptr + a_off, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(w_ptr + b_off, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # Epilogue in fp32.
    y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        r_row = img.to(tl.int64) * srn + p.to(tl.int64) * srh + q.to(tl.int64) * srw
        r_off = r_row[:, None] + (offs_n.to(tl.int64) * src)[None, :]
        y += tl.load(res_ptr + r_off, mask=out_ok, other=0.0).to(tl.float32)
    y = _act_apply(y, ACT, tl.full([], act_param, tl.float32))
    yo = y.to(out_ptr.dtype.element_ty)
    o_off = offs_m.to(tl.int64)[:, None] * Cout + offs_n[None, :]
    tl.store(out_ptr + o_off, yo, mask=out_ok)

    if STATS:
        # (count, mean, M2) of the stored values, per stats tile of SROWS rows x channel.
        tl.static_assert(BLOCK_M % SROWS == 0, "stats mode needs BLOCK_M % STATS_ROWS == 0")
        G: tl.constexpr = BLOCK_M // SROWS
        row0 = pid_m * BLOCK_M + tl.arange(0, G) * SROWS  # first row of each stats tile
        cnt = tl.minimum(tl.maximum(M - row0, 0), SROWS).to(tl.float32)  # [G]
        cnt_safe = tl.maximum(cnt, 1.0)[:, None]
        yf = yo.to(tl.float32)
        if G == 1:  # one stats tile per program: plain 2-D reductions
            mean_b = tl.sum(tl.where(m_ok[:, None], yf, 0.0), axis=0)[None, :] / cnt_safe
            d = tl.where(m_ok[:, None], yf - mean_b, 0.0)
            s1 = tl.sum(d, axis=0)[None, :]
            s2 = tl.sum(d * d, axis=0)[None, :]
        else:
            rows = row0[:, None, None] + tl.arange(0, SROWS)[None, :, None]
            ok3 = rows < M  # [G, SROWS, 1]
            y3 = tl.where(ok3, tl.reshape(yf, [G, SROWS, BLOCK_N]), 0.0)
            mean_b = tl.sum(y3, axis=1) / cnt_safe
            d = tl.where(ok3, y3 - mean_b[:, None, :], 0.0)
            s1 = tl.sum(d, axis=1)
            s2 = tl.sum(d * d, axis=1)
        m2 = tl.maximum(s2 - s1 * (s1 / cnt_safe), 0.0)
        mean = mean_b + s1 / cnt_safe
        tile = pid_m * G + tl.arange(0, G)
        p_ok = (tile < T)[:, None] & n_ok[None, :]
        p_off = tile.to(tl.int64)[:, None] * Cout + offs_n[None, :]
        plane = (T + tl.zeros([], tl.int64)) * Cout  # int64 (T may be the constexpr 1)
        tl.store(part_ptr + p_off, tl.broadcast_to(cnt[:, None], [G, BLOCK_N]), mask=p_ok)
        tl.store(part_ptr + plane + p_off, mean, mask=p_ok)
        tl.store(part_ptr + 2 * plane + p_off, m2, mask=p_ok)


_conv_heur = triton.heuristics({"EVEN_K": lambda a: a["Cin"] % a["BLOCK_K"] == 0})(_conv_kernel)


def _prune(configs, named_args, **kwargs):
    """Stats mode needs BLOCK_M to be a multiple of STATS_ROWS."""
    if not kwargs.get("STATS", False):
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_M"] % STATS_ROWS == 0]
    return kept or configs[:1]


_conv_tuned_half = triton.autotune(
    configs=HALF_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune}
)(_conv_heur)
_conv_tuned_fp32 = triton.autotune(
    configs=FP32_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune}
)(_conv_heur)


# ---------------------------------------------------------------------------------------
# Statistics merge kernel.
# ---------------------------------------------------------------------------------------
@triton.jit
def _stats_merge_kernel(
    in_ptr, cnt_in_ptr, piv_ptr, out_ptr, cnt_out_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr,
    T, C, tiles_per_prog, momentum: tl.float64, rm_stride, rv_stride,
    IN_REL: tl.constexpr, FINAL: tl.constexpr, HAS_RM: tl.constexpr, HAS_RV: tl.constexpr,
    RACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Merge tiles [t0, t1) of in[3, T, C] (count, mean, M2) per channel, in tile order.
    Means are taken relative to piv[c] (IN_REL: they already are, and the counts come from
    cnt_in[T, C] int64 instead of in's count plane). Counts are summed as int64, exact
    beyond 2^24. FINAL: write mean, biased var, update running stats; else write
    (count, mean - piv, M2) to cnt_out[S, C] (int64) and out[1:3, S, C] at split
    program_id(1)."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    pid_s = tl.program_id(1)
    piv = tl.load(piv_ptr + ch, mask=cmask, other=0.0)
    cnt = tl.zeros([BLOCK_C], tl.int64)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    plane = (T + tl.zeros([], tl.int64)) * C  # int64 (T may be the constexpr 1)
    t0 = pid_s * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, T)
    for tb in range(t0, t1, BLOCK_T):
        t = tb + tl.arange(0, BLOCK_T)
        pm = (t < t1)[:, None] & cmask[None, :]
        offs = t.to(tl.int64)[:, None] * C + ch[None, :]
        if IN_REL:
            n_i = tl.load(cnt_in_ptr + offs, mask=pm, other=0)
        else:  # per-tile counts (<= STATS_ROWS) are exact in fp32
            n_i = tl.load(in_ptr + offs, mask=pm, other=0.0).to(tl.int64)
        n_t = n_i.to(tl.float32)
        mu = tl.load(in_ptr + plane + offs, mask=pm, other=0.0)
        m2_t = tl.load(in_ptr + 2 * plane + offs, mask=pm, other=0.0)
        if not IN_REL:
            mu = mu - piv[None, :]
        mu = tl.where(pm, mu, 0.0)
        # The block, exactly in registers: mean, deviations, corrected mean and M2.
        nb_i = tl.sum(n_i, axis=0)
        nb_safe = tl.where(nb_i > 0, nb_i.to(tl.float32), 1.0)
        mb = tl.sum(n_t * mu, axis=0) / nb_safe
        e = tl.where(pm, mu - mb[None, :], 0.0)
        corr = tl.sum(n_t * e, axis=0)
        between = tl.maximum(tl.sum(n_t * e * e, axis=0) - corr * (corr / nb_safe), 0.0)
        m2b = tl.sum(m2_t, axis=0) + between
        mb = mb + corr / nb_safe
        # Chan merge of (cnt, mean, m2) with (nb, mb, m2b).
        n = cnt + nb_i
        frac = nb_i.to(tl.float32) / tl.where(n > 0, n.to(tl.float32), 1.0)
        delta = mb - mean
        mean = mean + delta * frac
        m2 = m2 + m2b + delta * delta * cnt.to(tl.float32) * frac
        cnt = n
    if FINAL:
        cnt_safe = tl.where(cnt > 0, cnt.to(tl.float32), 1.0)
        var = m2 / cnt_safe
        mean_abs = piv + mean
        tl.store(mean_ptr + ch, mean_abs, mask=cmask)
        tl.store(var_ptr + ch, var, mask=cmask)
        mom = tl.full([], momentum, tl.float32).to(RACC)
        keep = 1.0 - mom
        if HAS_RM:
            pr = rm_ptr + ch.to(tl.int64) * rm_stride
            rm = tl.load(pr, mask=cmask, other=0.0).to(RACC)
            new = keep * rm + mom * mean_abs.to(RACC)
            tl.store(pr, new.to(rm_ptr.dtype.element_ty), mask=cmask)
        if HAS_RV:
            pr = rv_ptr + ch.to(tl.int64) * rv_stride
            rv = tl.load(pr, mask=cmask, other=0.0).to(RACC)
            n64 = cnt.to(tl.float64)  # exact: m/(m - 1) is 1 in fp32 beyond 2^24
            unbiased = var.to(RACC) * (n64 / (n64 - 1.0)).to(RACC)
            new = keep * rv + mom * unbiased
            tl.store(pr, new.to(rv_ptr.dtype.element_ty), mask=cmask)
    else:
        base = out_ptr + pid_s * C + ch
        S = tl.num_programs(1)
        tl.store(cnt_out_ptr + pid_s * C + ch, cnt, mask=cmask)
        tl.store(base + S * C, mean, mask=cmask)
        tl.store(base + 2 * S * C, m2, mask=cmask)


# ---------------------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------------------
def num_stats_tiles(M: int) -> int:
    """Number of stats tiles T of the partials [3, T, Cout] for M = N*P*Q output rows."""
    return triton.cdiv(M, STATS_ROWS) if M > 0 else 0


@functools.lru_cache(maxsize=8)
def _parse_config(spec: str) -> tuple[int, int, int, int, int]:
    try:
        bm, bn, bk, warps, stages = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(
            f"{_CONFIG_ENV} must be 'BM,BN,BK,WARPS,STAGES' (five integers), got {spec!r}"
        ) from None
    for name, v in (("BM", bm), ("BN", bn), ("BK", bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{_CONFIG_ENV}: {name} must be a power of two >= 16, got {v}")
    if warps < 1 or warps & (warps - 1) or stages < 1:
        raise ValueError(f"{_CONFIG_ENV}: bad WARPS={warps} or STAGES={stages}")
    return bm, bn, bk, warps, stages


def _pinned_config() -> tuple[int, int, int, int, int] | None:
    spec = os.environ.get(_CONFIG_ENV, "").strip()
    if spec:
        return _parse_config(spec)
    return _INTERPRET_CONFIG if INTERPRETED else None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin, R, S] -> [R*S*Cin, Cout] contiguous, K ordered (r, s, cin)."""
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [Cout, Cin, R, S], got shape {tuple(weight.shape)}")
    cout, cin, r, s = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(r * s * cin, cout).contiguous()


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@on_input_device
def conv2d(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    act: int = 0,
    act_param: float = 0.0,
    stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out = act(conv2d(x, weight) + bias + residual), channels_last, x's dtype (act:
    resnet_fused.activations code, act_param LeakyReLU's slope); with stats=True also the
    partials [3, num_stats_tiles(N*P*Q), Cout] float32 of out."""
    act, act_param = check_act(act, act_param)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D [N, Cin, H, W] tensor, got {shape}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: dtype {x.dtype} not supported (float16, bfloat16, float32)")
    R, S = pair(kernel_size, "kernel_size", 1)
    sh, sw = pair(stride, "stride", 1)
    ph, pw = pair(padding, "padding", 0)
    dh, dw = pair(dilation, "dilation", 1)
    N, Cin, H, W = x.shape
    if w_packed.dim() != 2 or w_packed.shape[0] != R * S * Cin:
        raise ValueError(
            f"w_packed must be [R*S*Cin, Cout] = [{R * S * Cin}, Cout] for kernel_size "
            f"{(R, S)} and Cin={Cin}, got shape {tuple(w_packed.shape)}"
        )
    if w_packed.dtype != x.dtype:
        raise TypeError(f"w_packed dtype {w_packed.dtype} does not match x dtype {x.dtype}")
    if w_packed.device != x.device:
        raise ValueError(f"w_packed is on {w_packed.device}, x on {x.device}")
    Cout = w_packed.shape[1]
    P, Q = conv_output_hw(H, W, (R, S), (sh, sw), (ph, pw), (dh, dw))
    if P < 1 or Q < 1:
        raise ValueError(
            f"output size {(P, Q)} is not positive for input {(H, W)}, kernel_size {(R, S)}, "
            f"stride {(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}"
        )
    if bias is not None:
        if bias.shape != (Cout,):
            raise ValueError(f"bias must be [Cout] = [{Cout}], got shape {tuple(bias.shape)}")
        if bias.dtype != torch.float32:
            raise TypeError(f"bias must be float32, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device}, x on {x.device}")
    if residual is not None:
        if tuple(residual.shape) != (N, Cout, P, Q):
            raise ValueError(
                f"residual must be [N, Cout, P, Q] = {[N, Cout, P, Q]}, got shape "
                f"{tuple(residual.shape)}"
            )
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} does not match x dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device}, x on {x.device}")
    if stats and (bias is not None or residual is not None or act != 0):
        raise ValueError("stats=True requires bias=None, residual=None and act=0 (identity)")
    M = N * P * Q
    if M > _INT32_MAX or w_packed.numel() > _INT32_MAX:
        raise ValueError(f"too large: N*P*Q = {M} and R*S*Cin*Cout must be < 2^31")

    out = torch.empty(
        (N, Cout, P, Q), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
    )
    T = num_stats_tiles(M)
    partials = torch.empty((3, T, Cout), dtype=torch.float32, device=x.device) if stats else None
    if M == 0 or Cout == 0:
        return out, partials
    w = w_packed.contiguous()
    res = residual if residual is not None else out
    precision = "tf32"
    if x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        precision = "ieee"
    args = (
        x, w, out, bias if bias is not None else out, res,
        partials if partials is not None else out,
        M, Cout, Cin, H, W, P, Q, T, *x.stride(), *res.stride(),
        sh, sw, ph, pw, dh, dw, act_param,
    )  # fmt: skip
    meta = dict(
        R=R, S=S, HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=act,
        STATS=bool(stats), FLAT_K=Cin < SMALL_CIN, PRECISION=precision,
        X_CL=x.stride(1) == 1, RES_CL=res.stride(1) == 1,
        UPCAST=INTERPRETED and x.dtype == torch.bfloat16, SROWS=STATS_ROWS, GROUP=GROUP_M,
    )  # fmt: skip
    pinned = _pinned_config()
    if pinned is not None:
        bm, bn, bk, warps, stages = pinned
        if stats and bm % STATS_ROWS:
            raise ValueError(
                f"{_CONFIG_ENV}: BM={bm} must be a multiple of STATS_ROWS={STATS_ROWS} "
                "for stats=True"
            )
        grid = (triton.cdiv(M, bm) * triton.cdiv(Cout, bn),)
        _conv_heur[grid](
            *args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages
        )
    else:
        kernel = _conv_tuned_fp32 if x.dtype == torch.float32 else _conv_tuned_half

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(Cout, meta["BLOCK_N"]),)

        kernel[grid](*args, **meta)
    return out, partials


@on_input_device
def finalize_stats(
    partials: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased var (float32 [C]) from partials [3, T, C] (count, mean, M2),
    merged in tile order; running_mean/running_var (if given) updated in place like
    nn.BatchNorm2d (unbiased var with factor m/(m-1), m the total count)."""
    if partials.dim() != 3 or partials.shape[0] != 3:
        raise ValueError(f"partials must be [3, T, C], got shape {tuple(partials.shape)}")
    if partials.dtype != torch.float32:
        raise TypeError(f"partials must be float32, got {partials.dtype}")
    _, T, C = partials.shape
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if t.shape != (C,):
            raise ValueError(f"{name} must be [C] = [{C}], got shape {tuple(t.shape)}")
        if t.device != partials.device:
            raise ValueError(f"{name} is on {t.device}, partials on {partials.device}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    dev = partials.device
    mean = torch.empty(C, dtype=torch.float32, device=dev)
    var = torch.empty(C, dtype=torch.float32, device=dev)
    if C == 0:
        return mean, var
    if T == 0:
        raise ValueError("partials hold no tiles (T == 0): no statistics to merge")
    part = partials.contiguous()
    piv = part[1, 0]  # contiguous [C] view: the per-channel pivot
    block_c = min(triton.next_power_of_2(C), _MERGE_BLOCK_C)
    n_cblk = triton.cdiv(C, block_c)
    racc = tl.float32
    for t in (running_mean, running_var):
        if t is not None and t.dtype == torch.float64:
            racc = tl.float64
    common = dict(BLOCK_C=block_c, num_warps=4)
    src, src_T, in_rel = part, T, False
    src_cnt = torch.empty((1, C), dtype=torch.int64, device=dev)  # unused unless IN_REL
    if T > _MERGE_TILES_PER_PROG:
        splits = triton.cdiv(T, _MERGE_TILES_PER_PROG)
        inter = torch.empty((3, splits, C), dtype=torch.float32, device=dev)
        inter_cnt = torch.empty((splits, C), dtype=torch.int64, device=dev)
        _stats_merge_kernel[(n_cblk, splits)](
            part, inter_cnt, piv, inter, inter_cnt, mean, var, mean, var, T, C, _MERGE_TILES_PER_PROG, 0.0, 1, 1,
            IN_REL=False, FINAL=False, HAS_RM=False, HAS_RV=False, RACC=tl.float32,
            BLOCK_T=min(triton.next_power_of_2(_MERGE_TILES_PER_PROG), _MERGE_BLOCK_T),
            **common,
        )  # fmt: skip
        src, src_cnt, src_T, in_rel = inter, inter_cnt, splits, True
    rm = running_mean if running_mean is not None else mean
    rv = running_var if running_var is not None else var
    _stats_merge_kernel[(n_cblk, 1)](
        src, src_cnt, piv, src, src_cnt, mean, var, rm, rv, src_T, C, src_T, float(momentum),
        rm.stride(0), rv.stride(0),
        IN_REL=in_rel, FINAL=True, HAS_RM=running_mean is not None,
        HAS_RV=running_var is not None, RACC=racc,
        BLOCK_T=min(triton.next_power_of_2(src_T), _MERGE_BLOCK_T), **common,
    )  # fmt: skip
    return mean, var
