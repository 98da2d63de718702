"""bias_act / bias_act_ (per-channel bias + optional residual + optional ReLU, one pass: the
eval-mode epilogue of a conv with BatchNorm folded into it) on every backend against the
fp64 composition."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import HAS_CUDA, backend_device, backend_params, narrower_cpu_isas
from reference_check import assert_close_to_reference

from resnet_fused import _extension
from resnet_fused._layout import bn_memory_format

BACKENDS = ("cpu", "cuda", "triton")
# (input dtype, bias dtype): fp32 bias with fp16/bf16 input is what folding BN into a
# half conv under autocast gives; a bias in the input dtype is what model.half() gives.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float64),
]
DTYPE_IDS = ["fp32", "fp16-fp32bias", "bf16-fp32bias", "fp16", "bf16", "fp64"]
LAYOUTS = ["nchw", "channels_last", "strided"]
# Residual: none, in the input's layout, or in the other memory format.
RESIDUALS = ["none", "same", "other"]
# Odd sizes (C = 5, H = W = 7), C = 1, H*W = 1, and sizes that reach the vectorised loops
# and their scalar tails (C = 24 rows in channels_last, H*W = 35 planes in NCHW).
SHAPES = [(2, 5, 7, 7), (1, 3, 7, 7), (3, 24, 5, 7), (4, 8, 1, 1), (2, 1, 3, 3)]


def _raw_ops(backend):
    lib = torch.ops.resnet_fused
    if backend == "triton":
        return lib.bias_act_triton, lib.bias_act_triton_
    return lib.bias_act, lib.bias_act_


def _ops(backend):
    """The ops with ``relu`` (a bool) for their activation: ReLU or identity (every other
    activation: tests/test_activations.py)."""
    op, op_ = _raw_ops(backend)
    return (
        lambda x, b, r, relu: op(x, b, r, int(relu), 0.0),
        lambda x, b, r, relu: op_(x, b, r, int(relu), 0.0),
    )


def _tensor(shape, dtype, device, layout, scale=1.0):
    if layout == "strided":
        wide = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64)[..., ::2]
        return (wide * scale).to(device=device, dtype=dtype)
    t = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    if layout == "channels_last":
        t = t.to(memory_format=torch.channels_last)
    return t


def _residual(kind, shape, dtype, device, layout):
    if kind == "none":
        return None
    if kind == "same":
        return _tensor(shape, dtype, device, layout)
    other = "nchw" if layout == "channels_last" else "channels_last"
    return _tensor(shape, dtype, device, other)


def _compose(x, bias, residual, relu, dtype):
    """x + bias[c] (+ residual), then ReLU, every step in ``dtype``."""
    y = x.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)[None, :, None, None]
    if residual is not None:
        y = y + residual.to(dtype)
    return torch.relu(y) if relu else y


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rounds_bf16_by_truncation(backend, dtype):
    """Triton's interpreter converts fp32 to bf16 by truncation (compiled Triton rounds to
    nearest even), so there a bf16 result may be one ulp off the once-rounded value."""
    return backend == "triton" and not HAS_CUDA and dtype == torch.bfloat16


def _check_result(backend, out, x, bias, residual, relu):
    dtype = x.dtype
    ref64 = _compose(x, bias, residual, relu, torch.float64)
    eager = _compose(x, bias, residual, relu, dtype)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_to_reference(out, eager, ref64, name="out")
    # Computed in the accumulation type and rounded once: exactly the composition in it.
    once = _compose(x, bias, residual, relu, _acc_dtype(dtype)).to(dtype)
    if _rounds_bf16_by_truncation(backend, dtype):
        torch.testing.assert_close(out, once, rtol=2.0**-7, atol=0.0)
    else:
        assert torch.equal(out, once), (out.double() - once.double()).abs().max().item()


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize(("dtype", "bdtype"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_against_reference(backend, dtype, bdtype, layout, residual, relu, has_bias):
    device = backend_device(backend)
    key = (
        LAYOUTS.index(layout) + 3 * RESIDUALS.index(residual) + DTYPES.index((dtype, bdtype)) + relu
    )
    shape = SHAPES[key % len(SHAPES)]
    x = _tensor(shape, dtype, device, layout, scale=2.0)
    bias = torch.randn(shape[1], dtype=bdtype, device=device) if has_bias else None
    res = _residual(residual, shape, dtype, device, layout)
    op, op_ = _ops(backend)
    x_before = x.clone()
    out = op(x, bias, res, relu)
    assert torch.equal(x, x_before), "bias_act must not modify its input"
    _check_result(backend, out, x, bias, res, relu)
    # Output layout: the input's BN layout (channels_last stays channels_last).
    assert out.is_contiguous(memory_format=bn_memory_format(x))
    if layout == "channels_last" and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)

    if layout == "strided":
        return  # the in-place variant needs a dense input (test_bad_input)
    y = x.clone(memory_format=torch.preserve_format)
    ptr, strides = y.data_ptr(), y.stride()
    assert op_(y, bias, res, relu) is None
    assert y.data_ptr() == ptr and y.stride() == strides
    assert torch.equal(y, out)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_inplace_residual_is_input(backend):
    device = backend_device(backend)
    x = torch.randn(2, 5, 7, 7, device=device)
    bias = torch.randn(5, device=device)
    expected = torch.relu(x + bias[None, :, None, None] + x)
    _, op_ = _ops(backend)
    op_(x, bias, x, True)
    assert torch.equal(x, expected)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_empty_batch(backend):
    device = backend_device(backend)
    x = torch.randn(0, 3, 4, 4, device=device)
    op, op_ = _ops(backend)
    out = op(x, torch.randn(3, device=device), None, True)
    assert out.shape == x.shape
    assert op_(x, None, torch.empty_like(x), False) is None


def _op_samples(device):
    x = torch.randn(2, 5, 4, 3, device=device)
    xcl = torch.randn(2, 5, 4, 3, device=device).to(memory_format=torch.channels_last)
    b = torch.randn(5, device=device)
    return [
        (x, b, None, True),
        (xcl, b, x, True),
        (x, None, xcl, False),
        (x.half(), b, x.half(), True),
        (xcl.bfloat16(), b.bfloat16(), None, False),
        (x[:, :, :, :2], b, None, True),  # non-contiguous input (out of place only)
    ]


def _opcheck(op, op_, device):
    for x, b, r, relu in _op_samples(device):
        torch.library.opcheck(op, (x, b, r, int(relu), 0.0))
        if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
            torch.library.opcheck(op_, (x.clone(), b, r, int(relu), 0.0))


@pytest.mark.skipif(not _extension.is_loaded(), reason="extension not built")
def test_opcheck_cpp_ops():
    lib = torch.ops.resnet_fused
    _opcheck(lib.bias_act.default, lib.bias_act_.default, "cpu")
    if HAS_CUDA and _extension.built_with_cuda():
        _opcheck(lib.bias_act.default, lib.bias_act_.default, "cuda")


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_opcheck_triton_ops(backend):
    lib = torch.ops.resnet_fused
    _opcheck(lib.bias_act_triton.default, lib.bias_act_triton_.default, backend_device(backend))


@pytest.mark.parametrize("backend", backend_params(("cpu", "triton")))
def test_compile_fullgraph(backend):
    device = backend_device(backend)
    op, op_ = _ops(backend)

    def tail(x, b, r):
        y = op(x * 2.0, b, None, False)
        op_(y, None, r, True)
        return y - 1.0

    compiled = torch.compile(tail, fullgraph=True, backend="aot_eager")
    x, r = torch.randn(2, 3, 5, 5, device=device), torch.randn(2, 3, 5, 5, device=device)
    b = torch.randn(3, device=device)
    torch.testing.assert_close(compiled(x, b, r), tail(x, b, r))
    torch.testing.assert_close(
        compiled(x, b, r), torch.relu(2.0 * x + b[None, :, None, None] + r) - 1.0
    )


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_bad_input(backend):
    device = backend_device(backend)
    op, op_ = _ops(backend)
    x = torch.randn(2, 4, 3, 3, device=device)
    b = torch.randn(4, device=device)
    errors = (RuntimeError, ValueError, TypeError)
    with pytest.raises(errors, match=r"bias must have shape \(C,\) = \(4,\)"):
        op(x, torch.randn(3, device=device), None, True)
    with pytest.raises(errors, match=r"bias must have shape \(C,\) = \(4,\)"):
        op_(x, torch.randn(4, 1, device=device), None, True)
    with pytest.raises(errors, match="residual must have the shape of input"):
        op(x, b, x[:, :3], True)
    with pytest.raises(errors, match="residual must have the dtype of input"):
        op(x, b, x.double(), True)
    with pytest.raises(errors, match="residual must have the dtype of input"):
        op_(x, b, x.half(), True)
    with pytest.raises(errors, match="input must be a 4-D tensor"):
        op(x[0], b, None, True)
    with pytest.raises(errors, match="input must be a floating-point tensor"):
        op(torch.ones(2, 4, 3, 3, dtype=torch.int32, device=device), b, None, True)
    with pytest.raises(errors, match="bias must be a floating-point tensor"):
        op(x, torch.ones(4, dtype=torch.int64, device=device), None, True)
    strided = torch.randn(2, 4, 3, 6, device=device)[..., ::2]
    before = strided.clone()
    with pytest.raises(errors, match=r"input of bias_act_ \(in place\) must be dense"):
        op_(strided, b, None, True)
    assert torch.equal(strided, before)
    if device == "cuda":
        with pytest.raises(errors, match="bias must be on the device of input"):
            op(x, b.cpu(), None, True)


@pytest.mark.skipif(not _extension.is_loaded(), reason="extension not built")
@pytest.mark.parametrize(("cap", "isa"), narrower_cpu_isas())
def test_portable_cpu_kernels_in_subprocess(cap, isa):
    """The narrower CPU kernel tables (the portable one, and AVX2 on an AVX-512 CPU), chosen
    with ATEN_CPU_CAPABILITY in a subprocess."""
    code = (
        "import torch, resnet_fused\n"
        f"assert resnet_fused._extension.build_info()['cpu_isa'] == {isa!r}\n"
        "for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):\n"
        "    acc = torch.float64 if dt == torch.float64 else torch.float32\n"
        "    for fmt in (torch.contiguous_format, torch.channels_last):\n"
        "        x = torch.randn(3, 24, 5, 7, dtype=dt).to(memory_format=fmt)\n"
        "        r = torch.randn_like(x); b = torch.randn(24)\n"
        "        out = torch.ops.resnet_fused.bias_act(x, b, r, 1, 0.0)\n"
        "        exp = torch.relu(x.to(acc) + b.to(acc)[:, None, None] + r.to(acc)).to(dt)\n"
        "        assert torch.equal(out, exp), (dt, fmt)\n"
        "        x0 = x.clone(memory_format=torch.preserve_format)\n"
        "        torch.ops.resnet_fused.bias_act_(x, b, None, 0, 0.0)\n"
        "        assert torch.equal(x, (x0.to(acc) + b.to(acc)[:, None, None]).to(dt)), (dt, fmt)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
