"""Shared pieces of the Triton BatchNorm-family kernels (bn_stats, bn_act_forward,
bn_act_backward, bias_act): the tiling planner, the tile/channel device helpers and the
host helpers. Each op's kernels and launcher live in that op's module.

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
order.

Scalars that must be exact in fp64 (eps, the momentum factors) are passed as fp32 hi/lo
pairs, since Triton passes Python floats to compiled kernels as fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import ACT_IDENTITY, ACT_RELU, INTERPRETED, _act_grad, _act_grad_from_out

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
def _acc_scalar(v, ACC: tl.constexpr):
    """The scalar kernel argument ``v`` in ACC. Scalars such as eps, momentum and the
    LeakyReLU slope are declared ``tl.float64`` in the kernels' signatures: a plain Python
    float argument is passed as fp32 on a GPU, so fp64 data would get an fp32-rounded
    slope (the interpreter keeps the Python float, which hid it)."""
    return tl.full([], v, ACC)


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
    mean_ptr, var_ptr, w_ptr, b_ptr, ch, cmask, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Per-channel mean, invstd, weight and bias in ACC, shaped [1, BC, 1] for tiles."""
    mean = _load_chan(mean_ptr, ch, cmask, ACC)
    var = _load_chan(var_ptr, ch, cmask, ACC)
    invstd = _invstd(var, _acc_scalar(eps, ACC), ACC)
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
def _act_masked_grad(
    g_ptr, x, o_ptr, offs, mask, mean, invstd, w, b, param, x_dtype: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, FROM_OUT: tl.constexpr,
    ADD_RES: tl.constexpr = False,
):  # fmt: skip
    """Load grad and multiply it by the activation's derivative, in x's (ACC) type: read
    from ``out`` at ``o_ptr`` (FROM_OUT; identity, ReLU, ReLU6, LeakyReLU with a positive
    slope) or taken at the pre-activation y = BN(x) [+ the residual at ``o_ptr``
    (ADD_RES)] recomputed as the forward computes it. ReLU: 0 where y rounded to x's dtype
    (the stored output's mask) is <= 0 (NaN passes); the others at y itself (the forward
    applied them to it, unrounded)."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(x.dtype)
    if ACT != ACT_IDENTITY:
        if FROM_OUT:
            o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(x.dtype)
            g = _act_grad_from_out(g, o, ACT, param)
        else:
            y = _affine(x, mean, invstd, w, b, HAS_W, HAS_B)
            if ADD_RES:
                y += tl.load(o_ptr + offs, mask=mask, other=0.0).to(x.dtype)
            if ACT == ACT_RELU:
                y = y.to(x_dtype).to(x.dtype)
            g = _act_grad(g, y, ACT, param)
    return g


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
def _scalar(v: float) -> float:
    """A scalar for a kernel argument declared ``tl.float64`` (see _acc_scalar)."""
    return float(v)


def _in_fmt(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return t.contiguous(memory_format=fmt)


def _chan(t: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    """A per-channel vector as a contiguous acc tensor (no copy when it already is)."""
    if t is None:
        return None
    return t.reshape(-1).to(dtype=acc).contiguous()


def _empty_bn(input: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=fmt)
