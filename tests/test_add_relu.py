"""add_relu / add_relu_ on every backend against the fp64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, backend_device, backend_params, narrower_cpu_isas
from reference_check import assert_close_to_reference

import resnet_fused
from resnet_fused import reference
from resnet_fused.backends import BackendUnavailableError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(2, 3, 7, 7), (1, 5, 3, 3), (3, 16, 9, 11), (1, 1, 1, 1), (4099,), (2, 0, 3, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided", "mixed"]


def _make(shape, dtype, device, layout, role):
    """A random tensor of ``shape`` in the requested memory layout."""
    if layout == "channels_last" and len(shape) == 4:
        return torch.randn(shape, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    if layout == "strided":
        # Every other element of a wider tensor: not dense at all.
        wide = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
        return wide[..., ::2]
    if layout == "mixed" and role == "residual" and len(shape) == 4:
        return torch.randn(shape, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    return torch.randn(shape, dtype=dtype, device=device)


def _reference_grads(x, r, grad):
    out64 = reference.add_relu(x.double(), r.double())
    grad64 = reference.relu_backward(grad.double(), out64)
    return out64, grad64


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_against_reference(backend, dtype, layout, shape):
    device = backend_device(backend)
    x = _make(shape, dtype, device, layout, "x").requires_grad_()
    r = _make(shape, dtype, device, layout, "residual").requires_grad_()

    out = resnet_fused.add_relu(x, r, backend=backend)
    grad = _make(shape, dtype, device, "strided" if layout == "strided" else "contiguous", "g")
    gx, gr = torch.autograd.grad(out, (x, r), grad)

    eager = torch.relu(x + r)
    eager_gx, _ = torch.autograd.grad(eager, (x, r), grad)
    out64, grad64 = _reference_grads(x.detach(), r.detach(), grad)

    assert_close_to_reference(out, eager, out64, name="out")
    assert_close_to_reference(gx, eager_gx, grad64, name="grad x")
    assert_close_to_reference(gr, eager_gx, grad64, name="grad residual")
    if x.is_contiguous(memory_format=torch.channels_last) and len(shape) == 4 and shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), "layout of x not kept"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_auto_policies_against_reference(auto_policy, dtype, layout):
    """backend="auto" always eager, and timed per shape (whichever it picks here)."""
    for shape in SHAPES[:4]:
        test_forward_backward_against_reference("auto", dtype, layout, shape)
    x = _make(SHAPES[2], dtype, backend_device("auto"), layout, "x")
    r = _make(SHAPES[2], dtype, backend_device("auto"), layout, "residual")
    expected = torch.relu(x + r)
    assert resnet_fused.add_relu_(x, r, backend="auto") is x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_inplace_matches_out_of_place(backend, dtype, layout):
    device = backend_device(backend)
    x = _make((2, 6, 5, 5), dtype, device, layout, "x")
    r = _make((2, 6, 5, 5), dtype, device, "contiguous", "residual")
    expected = resnet_fused.add_relu(x, r, backend=backend)
    ptr = x.data_ptr()
    result = resnet_fused.add_relu_(x, r, backend=backend)
    assert result is x and x.data_ptr() == ptr
    assert torch.equal(x, expected)


@pytest.mark.parametrize("backend", backend_params())
def test_inplace_backward(backend):
    device = backend_device(backend)
    a = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
    r = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
    x = a * 1.5  # a non-leaf, so it may be overwritten
    out = resnet_fused.add_relu_(x, r, backend=backend)
    grad = torch.randn_like(out)
    ga, gr = torch.autograd.grad(out, (a, r), grad)
    out64 = torch.relu(a.detach().double() * 1.5 + r.detach().double())
    mask = (out64 > 0).double()
    torch.testing.assert_close(ga.double(), grad.double() * mask * 1.5)
    torch.testing.assert_close(gr.double(), grad.double() * mask)


@pytest.mark.parametrize("backend", backend_params())
def test_gradcheck_fp64(backend):
    device = backend_device(backend)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    r = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    # Keep x + r away from the kink at 0, where the derivative is not defined.
    with torch.no_grad():
        s = x + r
        x += torch.where(s.abs() < 0.05, 0.1 * torch.sign(s) + 0.1 * (s == 0), 0.0)
    assert torch.autograd.gradcheck(
        lambda a, b: resnet_fused.add_relu(a, b, backend=backend), (x, r)
    )


@pytest.mark.parametrize("backend", backend_params())
def test_nan_propagates_like_torch(backend):
    device = backend_device(backend)
    x = torch.tensor([float("nan"), -1.0, 2.0, -0.5], device=device)
    r = torch.tensor([1.0, float("nan"), -3.0, 1.0], device=device)
    out = resnet_fused.add_relu(x, r, backend=backend)
    torch.testing.assert_close(out, torch.relu(x + r), equal_nan=True)


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda", "triton")))
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_unaligned_and_tail(backend, offset):
    """Storage offsets that break 16-byte alignment and lengths that leave a tail."""
    device = backend_device(backend)
    n = 1037
    x = torch.randn(n + offset, device=device)[offset:]
    r = torch.randn(n + 2, device=device)[2:]
    out = resnet_fused.add_relu(x, r, backend=backend)
    assert torch.equal(out, torch.relu(x + r))
    g = torch.randn(n + 1, device=device)[1:]
    assert torch.equal(
        resnet_fused.functional.add_relu._add_relu_kernels(backend).backward(g, out),
        torch.where(out <= 0, 0.0, g),
    )


def test_auto_backend_choice():
    x = torch.randn(3)
    expected = "cpu" if resnet_fused.is_available("cpu", "cpu") else "torch"
    assert resnet_fused.resolve_backend("auto", x.device) == expected
    if HAS_CUDA:
        assert resnet_fused.resolve_backend("auto", torch.device("cuda")) in ("cuda", "triton")


# ---------------------------------------------------------------------------------------
# Bad input: clear errors that name the argument.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", *backend_params(("torch", "cpu", "triton"))])
def test_bad_input(backend):
    device = backend_device(backend) if backend != "auto" else "cpu"
    x = torch.randn(2, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match=r"residual must have the shape of x \(2, 3, 4, 4\)"):
        resnet_fused.add_relu(x, torch.randn(2, 3, 4, 5, device=device), backend=backend)
    with pytest.raises(ValueError, match="residual must be on the device of x"):
        resnet_fused.add_relu(x, torch.randn(2, 3, 4, 4, device="meta"), backend=backend)
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        resnet_fused.add_relu(x, torch.randn(2, 3, 4, 4, device=device).half(), backend=backend)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        resnet_fused.add_relu(x.long(), x.long(), backend=backend)
    with pytest.raises(TypeError, match="residual must be a floating-point tensor"):
        resnet_fused.add_relu(x, x > 0, backend=backend)
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        resnet_fused.add_relu(x, 1.0, backend=backend)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        resnet_fused.add_relu_(x.int(), x.int(), backend=backend)


def test_unknown_and_unavailable_backend():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="backend must be one of"):
        resnet_fused.add_relu(x, x, backend="cudnn")
    with pytest.raises(BackendUnavailableError, match="cuda backend"):
        resnet_fused.add_relu(x, x, backend="cuda")


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_cpp_op_checks_its_arguments():
    """Direct dispatcher calls are checked in C++ too: an error, never a crash."""
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="residual must have the shape of x"):
        torch.ops.resnet_fused.add_relu(x, torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        torch.ops.resnet_fused.add_relu(x.long(), x.long())
    f8 = x.to(torch.float8_e4m3fn)  # (floating point, but no kernel reads it)
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor .*float32"):
        torch.ops.resnet_fused.add_relu(f8, f8)
    y = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="weight must be a floating-point tensor .*float32"):
        torch.ops.resnet_fused.bn_act_forward(
            y, torch.zeros(3), torch.ones(3), torch.ones(3).to(torch.float8_e5m2), None, None,
            1e-5, 1, 0.0,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="grad_out must have the dtype of out"):
        torch.ops.resnet_fused.relu_backward(x.double(), x)
    with pytest.raises(RuntimeError, match="residual must have the dtype of x"):
        torch.ops.resnet_fused.add_relu_(x, x.half())


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
@pytest.mark.parametrize(("cap", "isa"), narrower_cpu_isas())
def test_portable_cpu_kernels_in_subprocess(cap, isa):
    """The narrower CPU kernel tables (the portable one, and AVX2 on an AVX-512 CPU), chosen
    with ATEN_CPU_CAPABILITY in a subprocess."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, resnet_fused\n"
        f"assert resnet_fused._extension.build_info()['cpu_isa'] == {isa!r}\n"
        "for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):\n"
        "    x = torch.randn(3, 5, 7, 11, dtype=dt); r = torch.randn_like(x); g = torch.randn_like(x)\n"
        "    out = resnet_fused.add_relu(x, r, backend='cpu')\n"
        "    assert torch.equal(out, torch.relu(x + r)), dt\n"
        "    gi = torch.ops.resnet_fused.relu_backward(g, out)\n"
        "    assert torch.equal(gi, torch.where(out <= 0, 0, g)), dt\n"
        "print('ok')\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
