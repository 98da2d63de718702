"""Operator-level checks: torch.library.opcheck on every op, torch.compile, registration."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, backend_device, backend_params

import resnet_fused
from resnet_fused import _extension

needs_ext = pytest.mark.skipif(not _extension.is_loaded(), reason="extension not built")


def _cpp_devices():
    return ["cpu", *(["cuda"] if HAS_CUDA and _extension.built_with_cuda() else [])]


def _add_relu_samples(device):
    x = torch.randn(2, 3, 5, 5, device=device)
    r = torch.randn(2, 3, 5, 5, device=device).to(memory_format=torch.channels_last)
    cl = torch.randn(2, 3, 5, 5, device=device).to(memory_format=torch.channels_last)
    return [(x, r), (cl, x), (x[:, :, ::2], r[:, :, ::2]), (x.half(), r.half())]


@needs_ext
@pytest.mark.parametrize("device", _cpp_devices())
def test_opcheck_cpp_ops(device):
    for x, r in _add_relu_samples(device):
        torch.library.opcheck(torch.ops.resnet_fused.add_relu.default, (x, r))
        torch.library.opcheck(torch.ops.resnet_fused.relu_backward.default, (r, x))
        torch.library.opcheck(torch.ops.resnet_fused.add_relu_.default, (x.clone(), r))


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_opcheck_triton_ops(backend):
    for x, r in _add_relu_samples(TRITON_DEVICE)[:2]:
        torch.library.opcheck(torch.ops.resnet_fused.add_relu_triton.default, (x, r))
        torch.library.opcheck(torch.ops.resnet_fused.relu_backward_triton.default, (r, x))
        torch.library.opcheck(torch.ops.resnet_fused.add_relu_triton_.default, (x.clone(), r))


@pytest.mark.parametrize("backend", backend_params())
def test_compile_fullgraph(backend):
    device = backend_device(backend)
    # Inductor compiles the surrounding graph with a C++ compiler on CPU; aot_eager checks
    # the same tracing (fake kernels, autograd Function) faster for the other backends.
    compiler = "inductor" if backend in ("cpu", "cuda") else "aot_eager"

    def block_tail(x, r):
        return resnet_fused.add_relu(x * 2.0, r, backend=backend) - 1.0

    compiled = torch.compile(block_tail, fullgraph=True, backend=compiler)
    x = torch.randn(2, 4, 6, 6, device=device, requires_grad=True)
    r = torch.randn(2, 4, 6, 6, device=device, requires_grad=True)
    out = compiled(x, r)
    gx, gr = torch.autograd.grad(out.sum(), (x, r))
    ex = block_tail(x, r)
    egx, egr = torch.autograd.grad(ex.sum(), (x, r))
    torch.testing.assert_close(out, ex)
    torch.testing.assert_close(gx, egx)
    torch.testing.assert_close(gr, egr)


@pytest.mark.parametrize("backend", backend_params(("cpu", "triton")))
def test_compile_fullgraph_inplace(backend):
    device = backend_device(backend)

    def f(x, r):
        y = x * 3.0
        return resnet_fused.add_relu_(y, r, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    r = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    out = compiled(x, r)
    gx, gr = torch.autograd.grad(out.sum(), (x, r))
    mask = (torch.relu(3.0 * x + r) > 0).float()
    torch.testing.assert_close(out, torch.relu(3.0 * x + r))
    torch.testing.assert_close(gx, 3.0 * mask)
    torch.testing.assert_close(gr, mask)


# ---------------------------------------------------------------------------------------
# Build and registration.
# ---------------------------------------------------------------------------------------
OPS = (
    "add_relu",
    "add_relu_",
    "relu_backward",
    "bn_stats",
    "bn_act_forward",
    "bn_act_backward_reduce",
    "bn_act_backward_elemt",
    "bias_act",
    "bias_act_",
)


@needs_ext
def test_cpu_kernels_registered():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{op}", "CPU"), op


@needs_ext
def test_cuda_kernels_registered_when_built_with_cuda():
    has_cuda_kernels = [
        torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{op}", "CUDA") for op in OPS
    ]
    assert all(has_cuda_kernels) == _extension.built_with_cuda()
    assert any(has_cuda_kernels) == _extension.built_with_cuda()


def test_cuda_was_built_where_the_toolkit_exists():
    """When torch has CUDA and nvcc is here, the build must have compiled the CUDA code
    (so CI proves it compiles and links), unless it was skipped on purpose."""
    if os.environ.get("RESNET_FUSED_SKIP_CUDA", "").lower() in {"1", "true", "yes", "on"}:
        pytest.skip("CUDA build skipped on purpose (RESNET_FUSED_SKIP_CUDA)")
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("no CUDA toolkit here")
    assert _extension.is_loaded(), _extension.IMPORT_ERROR
    info = _extension.build_info()
    assert info["with_cuda"], info
    assert info["cuda_arch_list"], info


def test_info_reports_backends():
    report = resnet_fused.info()
    assert report["torch"] == torch.__version__
    assert set(report["backends"]["cpu"]) == {"torch", "cpu", "cuda", "triton"}
    assert report["backends"]["cpu"]["torch"] is None
    assert "built without CUDA" in (report["backends"]["cpu"]["cuda"] or "") or (
        "needs CUDA tensors" in report["backends"]["cpu"]["cuda"]
    )


def test_info_command():
    from resnet_fused.__main__ import main
    from resnet_fused.info import format_info

    text = format_info()
    assert "backends for cpu tensors" in text and "torch" in text
    assert main(["info"]) == 0


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_ops_that_write_in_place_bump_version_counters():
    """bn_stats (running statistics), add_relu_ and bias_act_ write through data pointers;
    like aten's in-place ops they bump the written tensors' versions, which the modules'
    fold caches and autograd's saved-tensor check rely on."""
    lib = torch.ops.resnet_fused
    x = torch.randn(2, 4, 3, 3)
    rm, rv = torch.zeros(4), torch.ones(4)
    lib.bn_stats(x, rm, rv, 0.1)
    assert rm._version > 0 and rv._version > 0
    before = x._version
    lib.bn_stats(x, None, None, 0.1)
    assert x._version == before  # read only
    a, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    lib.add_relu_(a, r)
    assert a._version > 0 and r._version == 0
    y = torch.randn(2, 4, 3, 3)
    lib.bias_act_(y, torch.randn(4), None, 1, 0.0)
    assert y._version > 0
    # An in-place write to a tensor autograd saved is caught, as for aten's ops.
    w = torch.randn(2, 4, 3, 3, requires_grad=True)
    s = w * 1.0
    out = s.sigmoid()  # saves its output
    with torch.no_grad():
        lib.add_relu_(out, torch.zeros_like(out))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
