"""resnet_fused.triton.conv: implicit-GEMM conv2d with fused epilogues and BN statistics,
against fp64 references (F.conv2d, F.batch_norm). Runs on the GPU when there is one, else
in Triton's interpreter on CPU tensors (tiny shapes)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

from resnet_fused._geometry import conv_output_hw
from resnet_fused.triton import conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (id, N, Cin, H, W, Cout, kernel, stride, padding, dilation)
CASES = [
    ("1x1_s1", 2, 16, 6, 6, 8, (1, 1), (1, 1), (0, 0), (1, 1)),
    ("1x1_s2_downsample", 2, 8, 7, 7, 16, (1, 1), (2, 2), (0, 0), (1, 1)),
    ("3x3_s1_p1", 2, 8, 6, 6, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
    ("3x3_s2_p1", 2, 16, 9, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1)),
    ("3x3_s1_p1_cin20", 1, 20, 5, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1)),
    ("7x7_s2_p3_stem", 2, 3, 9, 9, 8, (7, 7), (2, 2), (3, 3), (1, 1)),
    ("3x3_dil2", 1, 8, 9, 9, 8, (3, 3), (1, 1), (2, 2), (2, 2)),
    ("odd_cout5_h7_n3", 3, 5, 7, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    ("rect_1x3_s21", 2, 6, 7, 8, 4, (1, 3), (2, 1), (0, 1), (1, 1)),
]
CASE_IDS = [c[0] for c in CASES]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _inputs(case, dtype, layout="channels_last"):
    _, n, cin, h, w, cout, k, *_ = case
    x = _layout(torch.randn(n, cin, h, w, device=DEVICE).to(dtype), layout)
    weight = (torch.randn(cout, cin, *k, device=DEVICE) / (cin * k[0] * k[1]) ** 0.5).to(dtype)
    return x, weight


def _run(case, x, weight, **kw):
    _, _, _, _, _, _, k, s, p, d = case
    return conv.conv2d(x, conv.pack_weight(weight), k, s, p, d, **kw)


def _reference(case, x, weight, bias=None, residual=None, relu=False):
    _, _, _, _, _, _, _, s, p, d = case
    ref = F.conv2d(x.double(), weight.double(), stride=s, padding=p, dilation=d)
    if bias is not None:
        ref = ref + bias.double()[None, :, None, None]
    if residual is not None:
        ref = ref + residual.double()
    if relu:
        ref = torch.relu(ref)
    return ref


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check_out(out, ref, dtype):
    assert out.shape == ref.shape
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last), "out must be channels_last"
    err = _rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.3g} >= {TOL[dtype]}"


# ---------------------------------------------------------------------------------------
# Convolution.
# ---------------------------------------------------------------------------------------
def test_pack_weight_layout():
    w = torch.randn(5, 3, 2, 4, device=DEVICE)
    wp = conv.pack_weight(w)
    assert wp.shape == (2 * 4 * 3, 5) and wp.is_contiguous()
    for r in range(2):
        for s in range(4):
            for c in range(3):
                assert torch.equal(wp[(r * 4 + s) * 3 + c], w[:, c, r, s])


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conv_against_fp64(case, dtype, layout):
    x, weight = _inputs(case, dtype, layout)
    out, partials = _run(case, x, weight)
    assert partials is None
    _check_out(out, _reference(case, x, weight), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_conv_strided_input(dtype):
    case = CASES[3]
    x, weight = _inputs(case, dtype, "strided")
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    out, _ = _run(case, x, weight)
    _check_out(out, _reference(case, x, weight), dtype)


@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("residual", [None, "nchw", "channels_last"], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[3], CASES[7]], ids=[CASES[3][0], CASES[7][0]])
def test_conv_epilogue(case, dtype, with_bias, residual, relu):
    x, weight = _inputs(case, dtype)
    n, cout = x.shape[0], weight.shape[0]
    p, q = conv_output_hw(x.shape[2], x.shape[3], *case[6:])
    bias = torch.randn(cout, device=DEVICE) if with_bias else None
    res = None
    if residual is not None:
        res = _layout(torch.randn(n, cout, p, q, device=DEVICE).to(dtype), residual)
    out, partials = _run(case, x, weight, bias=bias, residual=res, act=int(relu))
    assert partials is None
    ref = _reference(case, x, weight, bias, res, relu)
    _check_out(out, ref, dtype)
    if relu:
        assert (out >= 0).all()


def test_conv_pinned_config(monkeypatch):
    """RESNET_FUSED_CONV_CONFIG pins one config (here with non-square blocks)."""
    # Stats tiles are 128 rows on a GPU (16 under the interpreter): BM must be a multiple.
    bm = 128 if DEVICE == "cuda" else 32
    monkeypatch.setenv("RESNET_FUSED_CONV_CONFIG", f"{bm},16,32,4,2")
    for case in (CASES[3], CASES[5], CASES[7]):
        x, weight = _inputs(case, torch.float32)
        out, partials = _run(case, x, weight, stats=True)
        _check_out(out, _reference(case, x, weight), torch.float32)
        mean, var = conv.finalize_stats(partials, None, None, 0.1)
        o = out.double()
        torch.testing.assert_close(mean.double(), o.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            var.double(), o.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-7
        )


def test_conv_pinned_config_errors(monkeypatch):
    case = CASES[0]
    x, weight = _inputs(case, torch.float32)
    monkeypatch.setenv("RESNET_FUSED_CONV_CONFIG", "32,32")
    with pytest.raises(ValueError, match="RESNET_FUSED_CONV_CONFIG"):
        _run(case, x, weight)
    monkeypatch.setenv("RESNET_FUSED_CONV_CONFIG", "24,32,32,4,2")
    with pytest.raises(ValueError, match="BM must be a power of two"):
        _run(case, x, weight)


def test_fp32_tf32_flag_read_at_call_time():
    """allow_tf32=True still gives a valid (TF32-accurate) result."""
    case = CASES[2]
    x, weight = _inputs(case, torch.float32)
    torch.backends.cudnn.allow_tf32 = True
    out, _ = _run(case, x, weight)
    assert _rel_err(out, _reference(case, x, weight)) < 2e-3


# ---------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", [CASES[1], CASES[3], CASES[5], CASES[7]], ids=[CASES[i][0] for i in (1, 3, 5, 7)]
)
def test_stats_against_batch_norm(case, dtype):
    x, weight = _inputs(case, dtype)
    out, partials = _run(case, x, weight, stats=True)
    _check_out(out, _reference(case, x, weight), dtype)
    n, cout, p, q = out.shape
    assert partials.shape == (3, conv.num_stats_tiles(n * p * q), cout)
    assert partials.dtype == torch.float32

    rm = torch.randn(cout, device=DEVICE)
    rv = torch.rand(cout, device=DEVICE) + 0.5
    rm64, rv64 = rm.double(), rv.double()
    mean, var = conv.finalize_stats(partials, rm, rv, 0.1)

    # Statistics of the stored (rounded) values, in fp64.
    o = out.double()
    ref_mean = o.mean((0, 2, 3))
    ref_var = o.var((0, 2, 3), unbiased=False)
    assert mean.dtype == var.dtype == torch.float32
    scale = ref_mean.abs() + ref_var.sqrt()
    assert ((mean.double() - ref_mean).abs() <= 1e-5 * scale).all()
    assert ((var.double() - ref_var).abs() <= 1e-5 * ref_var).all()

    F.batch_norm(o, rm64, rv64, training=True, momentum=0.1)
    torch.testing.assert_close(rm.double(), rm64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), rv64, rtol=1e-5, atol=1e-6)


def test_stats_counts_and_determinism():
    case = CASES[7]  # M = 3*7*7 = 147: the last stats tile is partial
    x, weight = _inputs(case, torch.float32)
    out1, part1 = _run(case, x, weight, stats=True)
    out2, part2 = _run(case, x, weight, stats=True)
    assert torch.equal(out1, out2)
    assert torch.equal(part1, part2), "partials are not bitwise reproducible"
    m = out1.numel() // out1.shape[1]
    counts = part1[0, :, 0]
    assert counts.sum().item() == m
    rows = conv.STATS_ROWS
    assert (counts[:-1] == rows).all() and counts[-1].item() == m - rows * (len(counts) - 1)
    mean1, var1 = conv.finalize_stats(part1, None, None, 0.1)
    mean2, var2 = conv.finalize_stats(part2, None, None, 0.1)
    assert torch.equal(mean1, mean2) and torch.equal(var1, var2)


def test_finalize_two_level_merge(monkeypatch):
    """Many tiles: first merged in parallel splits, then the splits (means kept around
    the pivot in between); same statistics as one sequential merge."""
    case = CASES[3]  # M = 2*5*5 = 50 rows
    x, weight = _inputs(case, torch.float32)
    x = x + 3.0  # a mean well away from 0
    out, partials = _run(case, x, weight, stats=True)
    rm1, rv1 = torch.zeros(out.shape[1], device=DEVICE), torch.ones(out.shape[1], device=DEVICE)
    rm2, rv2 = rm1.clone(), rv1.clone()
    mean1, var1 = conv.finalize_stats(partials, rm1, rv1, 0.25)
    monkeypatch.setattr(conv, "_MERGE_TILES_PER_PROG", 2)
    mean2, var2 = conv.finalize_stats(partials, rm2, rv2, 0.25)
    torch.testing.assert_close(mean2, mean1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var2, var1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rm2, rm1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv2, rv1, rtol=1e-6, atol=1e-7)
    o = out.double()
    torch.testing.assert_close(
        var2.double(), o.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-7
    )


def _tile_partials(y: torch.Tensor, rows: int) -> torch.Tensor:
    """Exact (fp64) per-tile (count, mean, M2) of y [m, C], rounded to fp32."""
    m = y.shape[0]
    parts = []
    for t0 in range(0, m, rows):
        blk = y[t0 : t0 + rows].double()
        mu = blk.mean(0)
        parts.append(torch.stack([torch.full_like(mu, blk.shape[0]), mu, ((blk - mu) ** 2).sum(0)]))
    return torch.stack(parts, 1).float()


def _assert_var_close(var, ref_var, m):
    """The partial means are fp32 numbers near |mean| = 1e4 (spacing 2^-10), off by up to
    half a spacing each; through the merge that bounds the variance's relative accuracy
    to about 2^-10/(std*sqrt(m)) (measured: <= 1.6x that over 20 seeds). 4x allowed."""
    tol = 4 * 2.0**-10 / (ref_var.sqrt() * m**0.5)
    rel = (var.double() - ref_var).abs() / ref_var
    assert (rel <= tol).all(), f"variance relative error {rel.tolist()} > {tol.tolist()}"


@pytest.mark.parametrize("tiles_per_prog", [256, 8], ids=["one_level", "two_level"])
def test_finalize_large_mean_constructed(monkeypatch, tiles_per_prog):
    """y = 1e4 + N(0, 1): the variance keeps fp32 accuracy (the naive fp32
    sum(y^2)/m - mean^2 is off by about 20 here, i.e. 2000%)."""
    monkeypatch.setattr(conv, "_MERGE_TILES_PER_PROG", tiles_per_prog)
    y = (1e4 + torch.randn(128 * 100, 3, dtype=torch.float64)).float()
    partials = _tile_partials(y, 128).to(DEVICE)
    mean, var = conv.finalize_stats(partials, None, None, 0.1)
    y64 = y.double().to(DEVICE)
    ref_var = y64.var(0, unbiased=False)
    assert ((mean.double() - y64.mean(0)).abs() <= 1e-7 * 1e4).all()
    _assert_var_close(var, ref_var, y.shape[0])


def test_stats_large_mean_end_to_end():
    """Conv outputs 1e4 + O(1) (a constant input channel with weight 1e4): the statistics
    of the stored fp32 values stay accurate (see _assert_var_close)."""
    case = ("big_mean", 3, 8, 9, 9, 6, (1, 1), (1, 1), (0, 0), (1, 1))
    x, weight = _inputs(case, torch.float32)
    x[:, 0] = 1.0
    weight[:, 0] = 1e4
    out, partials = _run(case, x, weight, stats=True)
    mean, var = conv.finalize_stats(partials, None, None, 0.1)
    o = out.double()
    ref_var = o.var((0, 2, 3), unbiased=False)
    assert ((mean.double() - o.mean((0, 2, 3))).abs() <= 1e-7 * 1e4).all()
    _assert_var_close(var, ref_var, o.numel() // o.shape[1])


def test_finalize_running_stats_dtypes():
    """Running stats in another dtype (and non-contiguous) are updated in their dtype."""
    y = torch.randn(64, 4, dtype=torch.float64)
    partials = _tile_partials(y, 16).to(DEVICE)
    rm = torch.zeros(8, dtype=torch.float64, device=DEVICE)[::2]
    rv = torch.ones(4, dtype=torch.float16, device=DEVICE)
    mean, var = conv.finalize_stats(partials, rm, rv, 0.1)
    rm64, rv64 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    F.batch_norm(y.t()[None, :, :, None], rm64, rv64, training=True, momentum=0.1)
    torch.testing.assert_close(mean.cpu().double(), y.mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var.cpu().double(), y.var(0, unbiased=False), rtol=1e-5, atol=0)
    torch.testing.assert_close(rm.cpu(), rm64, rtol=1e-5, atol=1e-7)
    assert rv.dtype == torch.float16
    torch.testing.assert_close(rv.cpu().double(), rv64, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------
# Argument errors.
# ---------------------------------------------------------------------------------------
def test_bad_arguments():
    case = CASES[2]
    x, weight = _inputs(case, torch.float32)
    wp = conv.pack_weight(weight)
    k, s, p, d = case[6:]
    with pytest.raises(ValueError, match="x must be a 4-D"):
        conv.conv2d(x[0], wp, k, s, p, d)
    with pytest.raises(TypeError, match="float64"):
        conv.conv2d(x.double(), wp.double(), k, s, p, d)
    with pytest.raises(ValueError, match="w_packed must be"):
        conv.conv2d(x, wp[1:], k, s, p, d)
    with pytest.raises(ValueError, match="w_packed must be"):
        conv.conv2d(x, wp, (1, 1), s, p, d)
    with pytest.raises(TypeError, match="w_packed dtype"):
        conv.conv2d(x, wp.half(), k, s, p, d)
    with pytest.raises(ValueError, match="output size"):
        conv.conv2d(x[:, :, :2, :2], wp, k, s, (0, 0), d)
    with pytest.raises(ValueError, match="stride"):
        conv.conv2d(x, wp, k, (0, 1), p, d)
    with pytest.raises(ValueError, match="padding"):
        conv.conv2d(x, wp, k, s, (-1, 0), d)
    with pytest.raises(ValueError, match="dilation"):
        conv.conv2d(x, wp, k, s, p, (0, 1))
    out_shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    with pytest.raises(ValueError, match="residual must be"):
        conv.conv2d(x, wp, k, s, p, d, residual=torch.zeros((*out_shape[:3], 1)))
    with pytest.raises(TypeError, match="residual dtype"):
        conv.conv2d(x, wp, k, s, p, d, residual=torch.zeros(out_shape, dtype=torch.float16))
    with pytest.raises(ValueError, match="bias must be"):
        conv.conv2d(x, wp, k, s, p, d, bias=torch.zeros(weight.shape[0] + 1))
    with pytest.raises(TypeError, match="bias must be float32"):
        conv.conv2d(x, wp, k, s, p, d, bias=torch.zeros(weight.shape[0], dtype=torch.float16))
    with pytest.raises(ValueError, match="stats=True requires"):
        conv.conv2d(x, wp, k, s, p, d, act=1, stats=True)
    with pytest.raises(ValueError, match="partials must be"):
        conv.finalize_stats(torch.zeros(2, 3, 4), None, None, 0.1)
    with pytest.raises(ValueError, match="running_mean must be"):
        conv.finalize_stats(torch.zeros(3, 3, 4), torch.zeros(5), None, 0.1)
    with pytest.raises(ValueError, match="4-D"):
        conv.pack_weight(weight[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    case = CASES[2]
    x, weight = _inputs(case, torch.float32)
    with pytest.raises(ValueError, match="w_packed is on"):
        conv.conv2d(x, conv.pack_weight(weight).cpu(), *case[6:])
