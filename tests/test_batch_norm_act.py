"""batch_norm_act / FusedBatchNormAct2d on every backend against the fp64 reference."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, backend_device, backend_params, narrower_cpu_isas
from reference_check import assert_close_to_reference
from torch import nn

import resnet_fused
from resnet_fused import reference
from resnet_fused._layout import bn_memory_format, stats_dtype

# (input dtype, parameter/statistics dtype): fp16/bf16 with fp32 parameters is what
# autocast produces; fp16 parameters is what model.half() produces.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float64, torch.float64),
]
DTYPE_IDS = ["fp32", "fp16-fp32params", "bf16-fp32params", "fp16", "fp64"]
# (residual, relu, affine): BN+ReLU, BN+add+ReLU, BN alone, BN+add without affine.
VARIANTS = {
    "bn_relu": (False, True, True),
    "bn_add_relu": (True, True, True),
    "bn": (False, False, True),
    "bn_add_noaffine": (True, False, False),
    "bn_relu_noaffine": (False, True, False),
}
MODES = ["train", "eval", "untracked"]  # untracked: running stats None, batch stats always
LAYOUTS = ["nchw", "channels_last", "strided"]
SHAPES = [(2, 5, 7, 7), (1, 3, 7, 7), (3, 16, 4, 5), (4, 8, 1, 1)]


def _tensor(shape, dtype, device, layout, scale=1.0, offset=0.0):
    if layout == "strided":
        wide = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64)[..., ::2]
        return (wide * scale + offset).to(device=device, dtype=dtype)
    t = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(device=device, dtype=dtype)
    if layout == "channels_last":
        t = t.to(memory_format=torch.channels_last)
    return t


def _eager(x, rm, rv, w, b, training, momentum, eps, residual, relu):
    """Eager PyTorch in the test's dtypes: its error sets the bound for the fused result."""
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _run_case(backend, dtype, pdtype, layout, mode, variant, shape, momentum=0.1, steps=1):
    device = backend_device(backend)
    has_res, relu, affine = VARIANTS[variant]
    c = shape[1]
    training = mode == "train"
    x = _tensor(shape, dtype, device, layout, scale=2.0, offset=0.5).requires_grad_()
    res = _tensor(shape, dtype, device, layout).requires_grad_() if has_res else None
    w = (torch.rand(c, dtype=pdtype, device=device) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=pdtype, device=device).requires_grad_() if affine else None
    if mode == "untracked":
        rm = rv = None
    else:
        rm = torch.randn(c, dtype=pdtype, device=device) * 0.1
        rv = torch.rand(c, dtype=pdtype, device=device) + 0.5
    rm_e, rv_e = (None, None) if rm is None else (rm.clone(), rv.clone())
    rm64, rv64 = (None, None) if rm is None else (rm.double(), rv.double())

    leaves = [t for t in (x, w, b, res) if t is not None]
    names = [
        n
        for n, t in zip(("input", "weight", "bias", "residual"), (x, w, b, res), strict=False)
        if t is not None
    ]
    for _ in range(steps):
        out = resnet_fused.batch_norm_act(
            x, rm, rv, w, b, training, momentum, 1e-5, residual=res, relu=relu, backend=backend
        )
        eager = _eager(x, rm_e, rv_e, w, b, training or rm is None, momentum, 1e-5, res, relu)
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        x64, w64, b64, r64 = (
            leaves64[0],
            leaves64[1] if affine else None,
            leaves64[2] if affine else None,
            leaves64[-1] if has_res else None,
        )
        ref = reference.batch_norm_act(
            x64, rm64, rv64, w64, b64, training, momentum, 1e-5, residual=r64, relu=relu
        )
    grad = _tensor(shape, dtype, device, "nchw")
    grads = torch.autograd.grad(out, leaves, grad)
    eager_grads = torch.autograd.grad(eager, leaves, grad)
    ref_grads = torch.autograd.grad(ref, leaves64, grad.double())

    assert out.dtype == dtype and out.shape == x.shape
    if layout == "channels_last" and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_reference(out, eager, ref, name="out")
    for name, g, ge, gr in zip(names, grads, eager_grads, ref_grads, strict=False):
        assert_close_to_reference(g, ge, gr, name=f"grad {name}")
    if rm is not None:
        assert_close_to_reference(rm, rm_e, rm64, name="running_mean")
        assert_close_to_reference(rv, rv_e, rv64, name="running_var")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(("dtype", "pdtype"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_against_reference(backend, dtype, pdtype, layout, mode, variant):
    # Rotate through the odd shapes so each shows up across the combinations.
    key = LAYOUTS.index(layout) + 3 * MODES.index(mode) + list(VARIANTS).index(variant)
    shape = SHAPES[key % len(SHAPES)]
    if pdtype == torch.float16 and mode != "train":
        pass  # fp16 running statistics in eval: covered like any other case
    _run_case(backend, dtype, pdtype, layout, mode, variant, shape)


@pytest.mark.parametrize(("dtype", "pdtype"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_auto_policies_against_reference(auto_policy, dtype, pdtype, layout, mode):
    """backend="auto" always eager, and timed per shape: every variant, two steps (the
    running statistics are updated once per call, never by a timing trial)."""
    for i, variant in enumerate(VARIANTS):
        shape = SHAPES[(i + LAYOUTS.index(layout)) % len(SHAPES)]
        _run_case("auto", dtype, pdtype, layout, mode, variant, shape, steps=2)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, 0.0])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_running_stats_after_several_steps(backend, momentum, layout):
    _run_case(
        backend,
        torch.float32,
        torch.float32,
        layout,
        "train",
        "bn_add_relu",
        (3, 6, 5, 5),
        momentum=momentum,
        steps=4,
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_mean_statistics(backend, layout):
    """1e4 + N(0, 1): the variance must come out to fp32 accuracy (a naive
    sum(x^2) - sum(x)^2/m in fp32 gets it wrong by orders of magnitude)."""
    device = backend_device(backend)
    x = _tensor((4, 8, 16, 16), torch.float32, device, layout, offset=1e4)
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    out = resnet_fused.batch_norm_act(
        x, rm, rv, training=True, momentum=1.0, relu=False, backend=backend
    )
    x64 = x.double()
    var64 = x64.var(dim=(0, 2, 3), unbiased=True)
    assert ((rv.double() - var64).abs() / var64).max().item() < 1e-5
    assert ((rm.double() - x64.mean(dim=(0, 2, 3))).abs()).max().item() < 1e-2
    ref = reference.batch_norm_act(x64, None, None, training=True, relu=False)
    assert (out.double() - ref).abs().max().item() < 2e-3  # |out| ~ 4: fp32 of 1e4-scale input


def _adversarial_fp32(kind: str, layout: str) -> torch.Tensor:
    """fp32 inputs whose statistics an fp32 accumulation gets visibly wrong: 1e4 + N(0, 1);
    two close values per channel (a mean that fp32 cannot hold, a tiny spread); a channel
    that is zero but for one value (a conv output over padding)."""
    gen = torch.Generator().manual_seed(7)
    if kind == "large_mean":
        x = torch.randn(4, 8, 16, 16, generator=gen, dtype=torch.float64) + 1e4
    elif kind == "two_values":
        a = torch.randn(1, 131, 1, 1, generator=gen, dtype=torch.float64) * 2 + 0.5
        d = torch.randn(1, 131, 1, 1, generator=gen, dtype=torch.float64) * 1e-2
        x = torch.cat([a, a + d])
    else:  # "mostly_padding"
        x = torch.zeros(2, 67, 5, 5, dtype=torch.float64)
        x[:, :, 2, 2] = torch.randn(2, 67, generator=gen, dtype=torch.float64) + 0.3
    x = x.float()
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kind", ["large_mean", "two_values", "mostly_padding"])
def test_cpu_fp32_statistics_accumulate_in_fp64(backend, layout, kind):
    """fp32 statistics and backward sums on the CPU accumulate in fp64, as eager's CPU
    BatchNorm (acc_type<float, /*is_cuda=*/false> is double), and come out in fp64: the
    mean rounded to fp32 is eager CPU's saved mean (the fp64 mean rounded once), the
    variance and the sums are fp64-accurate, and the output is within a few fp32 ulps of
    the fp64 result (an fp32 accumulation misses all of these on these inputs)."""
    x = _adversarial_fp32(kind, layout)
    c = x.shape[1]
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(c, generator=gen) + 0.5
    b = torch.randn(c, generator=gen) * 0.5
    g = torch.randn(x.shape, generator=gen).contiguous(memory_format=bn_memory_format(x))
    kernels = resnet_fused.functional.batch_norm_act._bn_kernels(backend)
    mean, var = kernels.stats(x, None, None, 0.1)
    assert mean.dtype == var.dtype == torch.float64
    x64 = x.double()
    mean64 = x64.mean(dim=(0, 2, 3))
    var64 = (x64 - mean64[None, :, None, None]).square().mean(dim=(0, 2, 3))
    assert ((mean - mean64).abs() <= 1e-12 * (1 + mean64.abs())).all()
    assert ((var - var64).abs() <= 1e-12 * var64).all()
    # Eager CPU's saved mean (NCHW: fp64 sum, rounded once to fp32).
    eager_mean = torch.ops.aten.native_batch_norm(
        x.contiguous(), None, None, None, None, True, 0.1, 1e-5
    )[1]
    assert torch.equal(mean.float(), eager_mean)
    # Backward sums: sum(g) and sum(g * xhat) to fp64 accuracy.
    sum_dy, sum_dy_xhat, _ = kernels.backward_reduce(
        g, x, mean, var, w, b, None, 1e-5, 0, 0.0, False
    )
    assert sum_dy.dtype == sum_dy_xhat.dtype == torch.float64
    xhat64 = (x64 - mean64[None, :, None, None]) * (var64 + 1e-5).rsqrt()[None, :, None, None]
    g64 = g.double()
    terms = (g64 * xhat64).abs().sum(dim=(0, 2, 3))
    assert ((sum_dy - g64.sum(dim=(0, 2, 3))).abs() <= 1e-12 * g64.abs().sum(dim=(0, 2, 3))).all()
    assert ((sum_dy_xhat - (g64 * xhat64).sum(dim=(0, 2, 3))).abs() <= 1e-10 * terms).all()
    # Output and input gradient within a few fp32 ulps of fp64.
    xr = x.clone().requires_grad_()
    out = resnet_fused.batch_norm_act(xr, None, None, w, b, True, relu=False, backend=backend)
    x64r = x64.clone().requires_grad_()
    ref = reference.batch_norm_act(x64r, None, None, w.double(), b.double(), True, relu=False)
    ulp = 2.0**-23
    assert (out.double() - ref).abs().max().item() <= 4 * ulp * ref.abs().max().item()
    (gi,) = torch.autograd.grad(out, xr, g)
    (gi64,) = torch.autograd.grad(ref, x64r, g64)
    # The gradient's terms (about |w * invstd * g|) cancel; fp32 sums leave it 1e-5 off.
    scale = ((w.double() * (var64 + 1e-5).rsqrt())[None, :, None, None] * g64).abs().max()
    assert (gi.double() - gi64).abs().max().item() <= 8 * ulp * scale.item()


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3, 13, 37, 41), (2, 40, 30, 30)], ids=str)
@pytest.mark.parametrize("act", ["identity", "relu_from_out", "silu_masked"])
def test_cpu_channels_last_backward_over_tiles_and_row_groups(dtype, shape, act, several_threads):
    """The CPU backward's channels_last loops: several tiles (about 32768 values each),
    each in groups of rows with a remainder, blocks of channels with a scalar tail (13 =
    8 + 5; 40 = 5 x 8, or 2 x 16 + 8 for the 16-value blocks of bf16 and fp64), and a
    prefetch stream running past the tensors' end. The sums match fp64 sums, g * act' and
    the input gradient match the NCHW loops', and the result is the same on one thread."""
    c = shape[1]
    gen = torch.Generator().manual_seed(11)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    g64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    x_cl = x64.to(dtype).contiguous(memory_format=torch.channels_last)
    g_cl = g64.to(dtype).contiguous(memory_format=torch.channels_last)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(pdtype)
    b = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(pdtype)
    kernels = resnet_fused.functional.batch_norm_act._bn_kernels("cpu")
    code, with_out, write_masked = {
        "identity": (0, False, False),
        "relu_from_out": (1, True, False),
        "silu_masked": (4, False, True),
    }[act]

    def backward(x, g):
        mean, var = kernels.stats(x, None, None, 0.1)
        out = kernels.forward(x, mean, var, w, b, None, 1e-5, code, 0.0) if with_out else None
        sums = kernels.backward_reduce(g, x, mean, var, w, b, out, 1e-5, code, 0.0, write_masked)
        return mean, var, sums

    mean, var, (sum_dy, sum_dy_xhat, masked) = backward(x_cl, g_cl)
    x_n, g_n = x_cl.contiguous(), g_cl.contiguous()
    masked_n = backward(x_n, g_n)[2][2]
    # g * act', elementwise from the same statistics' arithmetic: as the NCHW loops'.
    if write_masked:
        assert masked.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(
            masked, masked_n, rtol=0, atol=2e-6 if dtype == torch.float32 else 0.02
        )
    # The sums against fp64 sums of the same g * act' (acc type: fp64 for fp32 and fp64
    # input, fp32 for bf16, whose sums take g * act' before its rounding to bf16).
    xhat = (x_cl.double() - mean.double()[None, :, None, None]) * (var.double() + 1e-5).rsqrt()[
        None, :, None, None
    ]
    gm = (masked if write_masked else g_cl).double()
    if act == "relu_from_out":
        gm = torch.where(kernels.forward(x_cl, mean, var, w, b, None, 1e-5, 1, 0.0) > 0, gm, 0.0)
    if write_masked and dtype == torch.bfloat16:
        y = xhat * w.double()[None, :, None, None] + b.double()[None, :, None, None]
        sig = torch.sigmoid(y)
        gm = g_cl.double() * sig * (1 + y * (1 - sig))
    rel = 1e-12 if dtype != torch.bfloat16 else 1e-5
    scale = gm.abs().sum(dim=(0, 2, 3))
    assert ((sum_dy.double() - gm.sum(dim=(0, 2, 3))).abs() <= rel * scale).all()
    assert ((sum_dy_xhat.double() - (gm * xhat).sum(dim=(0, 2, 3))).abs() <= rel * 8 * scale).all()
    # The input gradient from the same sums: elementwise, as the NCHW loops compute it.
    gin = masked if write_masked else g_cl
    act_e = 0 if write_masked else code
    dx = kernels.backward_elemt(
        gin, x_cl, mean, var, w, b, sum_dy, sum_dy_xhat, 1e-5, act_e, 0.0, True
    )
    dx_n = kernels.backward_elemt(
        gin.contiguous(), x_n, mean, var, w, b, sum_dy, sum_dy_xhat, 1e-5, act_e, 0.0, True
    )
    assert dx.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(dx, dx_n)
    # Bit for bit on one thread (tiles, not threads, fix the order of the sums).
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, _, (sum_dy_1, sum_dy_xhat_1, masked_1) = backward(x_cl, g_cl)
        dx_1 = kernels.backward_elemt(
            gin, x_cl, mean, var, w, b, sum_dy, sum_dy_xhat, 1e-5, act_e, 0.0, True
        )
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(sum_dy_1, sum_dy) and torch.equal(sum_dy_xhat_1, sum_dy_xhat)
    assert torch.equal(masked_1, masked) and torch.equal(dx_1, dx)


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
@pytest.mark.parametrize(("cap", "isa"), narrower_cpu_isas())
def test_portable_cpu_bn_kernels_in_subprocess(cap, isa):
    """The narrower CPU kernel tables (the portable one, and AVX2 on an AVX-512 CPU), chosen
    with ATEN_CPU_CAPABILITY in a subprocess: the fp64 statistics and sums and the
    recomputed ReLU mask, as the widest table's kernels."""
    import os
    import subprocess
    import sys

    code = (
        "import itertools, sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import resnet_fused, test_batch_norm_act as t\n"
        f"assert resnet_fused._extension.build_info()['cpu_isa'] == {isa!r}\n"
        "layouts = ('nchw', 'channels_last')\n"
        "kinds = ('large_mean', 'two_values', 'mostly_padding')\n"
        "for layout, kind in itertools.product(layouts, kinds):\n"
        "    t.test_cpu_fp32_statistics_accumulate_in_fp64('cpu', layout, kind)\n"
        "for training, layout in itertools.product((True, False), layouts):\n"
        "    t.test_recomputed_relu_mask_matches_the_output('cpu', training, layout)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda", "triton")))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic(backend, layout, several_threads):
    device = backend_device(backend)
    # (on the CPU large enough that the kernels split their work between threads: more
    # than one channels_last tile of 32768 values, more N x C planes than one grain)
    shape = (4, 24, 40, 40) if device == "cpu" and backend != "triton" else (4, 24, 9, 9)
    x = _tensor(shape, torch.float32, device, layout).requires_grad_()
    res = _tensor(shape, torch.float32, device, layout).requires_grad_()
    w = torch.rand(24, device=device).requires_grad_()
    b = torch.randn(24, device=device).requires_grad_()
    g = _tensor(shape, torch.float32, device, layout)

    def run():
        rm, rv = torch.zeros(24, device=device), torch.ones(24, device=device)
        out = resnet_fused.batch_norm_act(x, rm, rv, w, b, True, residual=res, backend=backend)
        return (out, rm, rv, *torch.autograd.grad(out, (x, w, b, res), g))

    first = run()
    threads = torch.get_num_threads()
    try:
        if device == "cpu":
            torch.set_num_threads(1)  # the CPU tiling does not depend on the thread count
        second = run()
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(first, second, strict=False):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("backend", backend_params())
def test_single_value_per_channel_in_training_raises(backend):
    device = backend_device(backend)
    x = torch.randn(1, 4, 1, 1, device=device)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        resnet_fused.batch_norm_act(x, None, None, training=True, backend=backend)
    # In eval with running statistics a single value is fine, as in PyTorch.
    out = resnet_fused.batch_norm_act(
        x, torch.zeros(4, device=device), torch.ones(4, device=device), backend=backend
    )
    torch.testing.assert_close(out, torch.relu(x / (1 + 1e-5) ** 0.5))


@pytest.mark.parametrize("backend", backend_params())
def test_empty_batch(backend):
    device = backend_device(backend)
    x = torch.randn(0, 4, 3, 3, device=device)
    out = resnet_fused.batch_norm_act(
        x, torch.zeros(4, device=device), torch.ones(4, device=device), backend=backend
    )
    assert out.shape == x.shape


def _saved_bytes(fn, itemsize):
    """Bytes autograd saves, each tensor counted at ``itemsize`` bytes per element."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * itemsize
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("backend", backend_params(("cpu", "triton")))
@pytest.mark.parametrize("has_residual", [False, True])
def test_saves_no_more_than_eager(backend, has_residual):
    """The backward keeps what it needs and no more: never more than eager's saved bytes
    (BN + ReLU saves only the input, eager saves input and output). Every saved tensor is
    counted at the input's element size: the statistics are kept in the accumulation
    dtype (fp64 for fp32 on the CPU, 8 bytes per channel more than eager's fp32
    save_mean / save_invstd), which is not what this guards."""
    device = backend_device(backend)
    x = torch.randn(2, 8, 6, 6, device=device, requires_grad=True)
    r = torch.randn(2, 8, 6, 6, device=device, requires_grad=True) if has_residual else None
    w = torch.rand(8, device=device, requires_grad=True)
    b = torch.zeros(8, device=device, requires_grad=True)
    size = x.element_size()
    fused = _saved_bytes(
        lambda: resnet_fused.batch_norm_act(x, None, None, w, b, True, residual=r, backend=backend),
        size,
    )
    eager = _saved_bytes(lambda: _eager(x, None, None, w, b, True, 0.1, 1e-5, r, True), size)
    full = x.numel() * size
    assert fused <= eager
    assert fused < (2 if has_residual else 1) * full + full  # input (+ out) and small stats


# ---------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"momentum": None},
        {"affine": False},
        {"track_running_stats": False},
        {"momentum": 0.3, "eps": 1e-3},
    ],
    ids=["default", "cumulative", "no-affine", "untracked", "momentum-eps"],
)
def test_module_matches_batchnorm2d(backend, options):
    device = backend_device(backend)
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(6, **options).to(device)
    fused = resnet_fused.FusedBatchNormAct2d(6, **options, backend=backend).to(device)
    assert list(fused.state_dict()) == list(bn.state_dict())
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    fused.load_state_dict(bn.state_dict())
    for step in range(3):
        x = torch.randn(3, 6, 5, 5, device=device)
        res = torch.randn(3, 6, 5, 5, device=device)
        expected = torch.relu(bn(x) + res)
        got = fused(x, res)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, msg=key)
    bn.eval()
    fused.eval()
    x = torch.randn(2, 6, 4, 4, device=device)
    torch.testing.assert_close(fused(x), torch.relu(bn(x)), rtol=1e-5, atol=1e-5)
    # The state dict loads back into plain BatchNorm2d.
    nn.BatchNorm2d(6, **options).to(device).load_state_dict(fused.state_dict())


def test_module_relu_off_repr_copy_pickle():
    m = resnet_fused.FusedBatchNormAct2d(4, relu=False, backend="torch")
    assert "relu=False" in repr(m) and "backend='torch'" in repr(m)
    x = torch.randn(2, 4, 3, 3)
    m.eval()
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        torch.testing.assert_close(clone(x), m(x))
    assert (m(x) < 0).any()  # no ReLU
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 4, 3))


def test_from_batch_norm_shares_parameters():
    bn = nn.BatchNorm2d(5)
    fused = resnet_fused.FusedBatchNormAct2d.from_batch_norm(bn, relu=False)
    assert fused.weight is bn.weight and fused.running_mean is bn.running_mean
    fused(torch.randn(2, 5, 3, 3))
    assert bn.num_batches_tracked.item() == 1


# ---------------------------------------------------------------------------------------
# Operators, compile, bad input
# ---------------------------------------------------------------------------------------
def _bn_op_samples(device):
    x = torch.randn(2, 5, 4, 3, device=device)
    xcl = x.to(memory_format=torch.channels_last)
    w, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3)) + 0.1
    g = torch.randn(2, 5, 4, 3, device=device)
    return x, xcl, w, b, mean, var, g


def _opcheck_bn(names, device):
    x, xcl, w, b, mean, var, g = _bn_op_samples(device)
    lib = torch.ops.resnet_fused
    stats, fwd, red, elemt = (getattr(lib, n).default for n in names)
    for inp in (x, xcl, x.half()):
        torch.library.opcheck(
            stats, (inp, torch.zeros(5, device=device), torch.ones(5, device=device), 0.1)
        )
        torch.library.opcheck(stats, (inp, None, None, 0.1))
        torch.library.opcheck(fwd, (inp, mean, var, w, b, inp.clone(), 1e-5, 1, 0.0))
        torch.library.opcheck(fwd, (inp, mean, var, None, None, None, 1e-5, 0, 0.0))
        torch.library.opcheck(fwd, (inp, mean, var, w, b, None, 1e-5, 4, 0.0))  # SiLU
        gi = g.to(inp.dtype)
        torch.library.opcheck(red, (gi, inp, mean, var, w, b, inp.clone(), 1e-5, 1, 0.0, True))
        torch.library.opcheck(red, (gi, inp, mean, var, None, b, None, 1e-5, 1, 0.0, False))
        torch.library.opcheck(red, (gi, inp, mean, var, w, b, None, 1e-5, 3, 0.2, True))
        # SiLU after a residual add: the pre-activation recomputed with the residual
        res = inp.clone()
        torch.library.opcheck(red, (gi, inp, mean, var, w, b, None, 1e-5, 4, 0.0, True, res))
        torch.library.opcheck(elemt, (gi, inp, mean, var, w, b, mean, var, 1e-5, 1, 0.0, True))
        torch.library.opcheck(
            elemt, (gi, inp, mean, var, None, None, mean, var, 1e-5, 0, 0.0, False)
        )
        torch.library.opcheck(elemt, (gi, inp, mean, var, w, b, mean, var, 1e-5, 6, 0.0, True))


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_opcheck_cpp_bn_ops():
    names = ("bn_stats", "bn_act_forward", "bn_act_backward_reduce", "bn_act_backward_elemt")
    _opcheck_bn(names, "cpu")
    if HAS_CUDA and resnet_fused._extension.built_with_cuda():
        _opcheck_bn(names, "cuda")


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_opcheck_triton_bn_ops(backend):
    names = (
        "bn_stats_triton",
        "bn_act_forward_triton",
        "bn_act_backward_reduce_triton",
        "bn_act_backward_elemt_triton",
    )
    _opcheck_bn(names, backend_device(backend))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_compile_fullgraph(backend, training, act):
    """(SiLU after the add: the backward recomputes the pre-activation from the saved
    residual, whose checks must trace too.)"""
    device = backend_device(backend)
    compiler = "inductor" if backend in ("cpu", "cuda") else "aot_eager"

    def block_tail(x, res, rm, rv, w, b):
        y = resnet_fused.batch_norm_act(
            x * 1.5, rm, rv, w, b, training, residual=res, activation=act, backend=backend
        )
        return y * 2.0

    x = torch.randn(2, 4, 5, 5, device=device, requires_grad=True)
    res = torch.randn(2, 4, 5, 5, device=device, requires_grad=True)
    w = torch.rand(4, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    rm_c, rv_c = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm_e, rv_e = rm_c.clone(), rv_c.clone()
    compiled = torch.compile(block_tail, fullgraph=True, backend=compiler)
    out = compiled(x, res, rm_c, rv_c, w, b)
    grads = torch.autograd.grad(out.sum(), (x, res, w, b))
    expected = block_tail(x, res, rm_e, rv_e, w, b)
    expected_grads = torch.autograd.grad(expected.sum(), (x, res, w, b))
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads, strict=False):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(rm_c, rm_e)  # the in-place running-stats update survives
    torch.testing.assert_close(rv_c, rv_e)


@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_torch_backend_on_old_torch(training, monkeypatch):
    """The path torch < 2.14 takes under compile for the "torch" backend (the reference
    composition with plain autograd, since its autograd.Function compiled to zero
    gradients there) gives eager's outputs, gradients and running statistics."""
    monkeypatch.setattr(resnet_fused._compat, "OLD_COMPILED_AUTOGRAD", True)
    test_compile_fullgraph("torch", training, "silu")


def test_compile_module_fullgraph():
    m = resnet_fused.FusedBatchNormAct2d(
        4, backend="cpu" if resnet_fused.is_available("cpu", "cpu") else "torch"
    )
    ref = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(compiled(x), ref(x))
    torch.testing.assert_close(m.running_var, ref.running_var)
    assert m.num_batches_tracked.item() == 1


@pytest.mark.parametrize("backend", ["auto", *backend_params(("torch", "cpu", "triton"))])
def test_bad_input(backend):
    device = backend_device(backend) if backend != "auto" else "cpu"
    x = torch.randn(2, 4, 3, 3, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    bna = resnet_fused.batch_norm_act
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(4,\)"):
        bna(x, rm, rv, torch.ones(5, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"running_var must have shape \(C,\) = \(4,\)"):
        bna(x, rm, torch.ones(3, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \(C,\)"):
        bna(x, rm, rv, None, torch.ones(4, 1, device=device), backend=backend)
    with pytest.raises(ValueError, match="input must be a 4-D tensor"):
        bna(torch.randn(2, 4, 3, device=device), rm, rv, backend=backend)
    with pytest.raises(ValueError, match="weight must be on the device of input"):
        bna(x, rm, rv, torch.ones(4, device="meta"), backend=backend)
    with pytest.raises(ValueError, match="residual must be on the device of input"):
        bna(x, rm, rv, residual=torch.randn(2, 4, 3, 3, device="meta"), backend=backend)
    with pytest.raises(TypeError, match="residual must have the dtype of input"):
        bna(x, rm, rv, residual=x.double(), backend=backend)
    with pytest.raises(ValueError, match="residual must have the shape of input"):
        bna(x, rm, rv, residual=x[:, :, :2], backend=backend)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        bna(x.long(), rm, rv, backend=backend)
    with pytest.raises(TypeError, match="running_mean must be a floating-point tensor"):
        bna(x, rm.long(), rv, backend=backend)
    with pytest.raises(ValueError, match="running_mean and running_var must both"):
        bna(x, rm, None, backend=backend)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        bna(x, rm, rv, eps=-1.0, backend=backend)
    with pytest.raises(TypeError, match="momentum must be a float"):
        bna(x, rm, rv, momentum=None, backend=backend)


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_cpp_bn_ops_check_their_arguments():
    x = torch.randn(2, 4, 3, 3)
    mean, var = torch.zeros(4), torch.ones(4)
    lib = torch.ops.resnet_fused
    with pytest.raises(RuntimeError, match=r"weight must have shape \(C,\)"):
        lib.bn_act_forward(x, mean, var, torch.ones(3), None, None, 1e-5, 1, 0.0)
    with pytest.raises(RuntimeError, match="input must be a 4-D tensor"):
        lib.bn_stats(x[0], None, None, 0.1)
    with pytest.raises(RuntimeError, match="residual must have the dtype of input"):
        lib.bn_act_forward(x, mean, var, None, None, x.half(), 1e-5, 1, 0.0)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of input"):
        lib.bn_act_backward_reduce(x[:1], x, mean, var, None, None, None, 1e-5, 1, 0.0, False)
    with pytest.raises(RuntimeError, match="sum_dy must have shape"):
        lib.bn_act_backward_elemt(x, x, mean, var, None, None, mean[:2], var, 1e-5, 1, 0.0, True)
    with pytest.raises(RuntimeError, match="act must be an activation code"):
        lib.bn_act_forward(x, mean, var, None, None, None, 1e-5, -1, 0.0)
    with pytest.raises(RuntimeError, match="out must be None for silu"):
        lib.bn_act_backward_reduce(x, x, mean, var, None, None, x, 1e-5, 4, 0.0, False)


@pytest.mark.parametrize("backend", backend_params(("cpu", "triton", "cuda")))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_recomputed_relu_mask_matches_the_output(backend, training, layout):
    """BN + ReLU recomputes its ReLU mask from the input in the backward: it must agree
    with the forward's output element for element, also for pre-activations within
    rounding of zero and in scalar tails (odd sizes). d(bias) = sum of the gradient over
    the elements where out > 0, so one disagreeing element moves it by about |g| ~ 1."""
    device = backend_device(backend)
    n, c, h, w = 3, 37, 5, 3  # no vector-width multiple anywhere: scalar tails
    x = torch.randn(n, c, h, w, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.rand(c, device=device) + 0.5).requires_grad_()
    rm, rv = torch.randn(c, device=device) * 0.1, torch.rand(c, device=device) + 0.5
    with torch.no_grad():  # a bias putting many pre-activations within rounding of zero
        if training:
            mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        else:
            mean, var = rm, rv
        scale = weight / torch.sqrt(var + 1e-5)
        pick = x.detach()[0, :, 0, 0]
        bias = (-(pick - mean) * scale).requires_grad_()
    out = resnet_fused.batch_norm_act(
        x, rm.clone(), rv.clone(), weight, bias, training, 0.1, 1e-5, backend=backend
    )
    g = torch.randn(out.shape, device=device)
    _, _, gb = torch.autograd.grad(out, (x, weight, bias), g)
    expected = (g.double() * (out.detach() > 0)).sum(dim=(0, 2, 3))
    torch.testing.assert_close(gb.double(), expected, rtol=0, atol=1e-4)


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(
    "rdtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str
)
def test_cpu_running_statistics_update_is_the_aten_arithmetic(dtype, rdtype):
    """The C++ running-statistics update (a per-channel loop) gives exactly what
    ``running.to(acc) * (1 - momentum) + stat * factor`` and a copy back give, for every
    dtype pair and strided running tensors."""
    x = torch.randn(3, 7, 5, 4, dtype=dtype) * 3 + 1
    acc = stats_dtype(dtype, x.device)  # fp64 for fp32 on the CPU, as eager's CPU BatchNorm
    storage = torch.randn(7, 2, dtype=rdtype)
    rm, rv = storage[:, 0], (storage[:, 1].abs() + 0.5).to(rdtype)  # rm strided
    rm0, rv0 = rm.clone(), rv.clone()
    momentum = 0.37
    mean, var = torch.ops.resnet_fused.bn_stats(x, rm, rv, momentum)
    assert mean.dtype == var.dtype == acc
    m = x.numel() // 7
    expect_rm = (rm0.to(acc) * (1 - momentum) + mean * momentum).to(rdtype)
    expect_rv = (rv0.to(acc) * (1 - momentum) + var * (momentum * (m / (m - 1)))).to(rdtype)
    assert torch.equal(rm, expect_rm) and torch.equal(rv, expect_rv)
    assert rm.stride() == (2,)
