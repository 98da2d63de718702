"""Float scalars reach the Triton kernels at full precision.

On a GPU, Triton passes a plain Python float kernel argument as fp32, so an fp64 kernel
computing ``y * slope`` with an fp32-rounded LeakyReLU slope of 0.2 is off by 1.5e-8
relative; Triton's interpreter keeps the Python float, so no CPU run could show it. Every
float argument of resnet_fused's kernels is therefore declared ``tl.float64`` in the
kernel's signature (and converted to the kernel's arithmetic type inside). This test
records every kernel launch of the BatchNorm+activation ops and checks that rule for
each float argument; the fp64 results at the kinks are checked exactly in
tests/test_activations.py (test_kinks_and_non_finite_values), on a GPU too."""

from __future__ import annotations

import inspect
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

triton = pytest.importorskip("triton")

from triton.runtime import jit as triton_jit  # noqa: E402

from resnet_fused import ops  # noqa: E402
from resnet_fused.activations import LEAKY_RELU, SILU  # noqa: E402
from resnet_fused.triton import conv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _launch_classes():
    classes = [triton_jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every Triton this project supports has it
        pass
    return classes


@pytest.fixture
def launches(monkeypatch):
    """(python function, bound arguments) of every Triton kernel launched meanwhile."""
    seen = []
    for cls in _launch_classes():
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            fn = self.fn
            while hasattr(fn, "fn"):  # (autotuner/heuristics wrappers)
                fn = fn.fn
            sig = inspect.signature(fn)
            launch_kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
            seen.append((fn, sig.bind_partial(*args, **launch_kwargs).arguments))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return seen


def _float_args_not_fp64(fn, arguments) -> list[str]:
    annotations = inspect.get_annotations(fn)
    bad = []
    for name, value in arguments.items():
        if isinstance(value, float) and not isinstance(value, bool):
            ann = triton_jit._normalize_ty(annotations.get(name, ""))
            if ann != "fp64" and ann != "constexpr":
                bad.append(f"{fn.__name__}({name}: {ann or 'no annotation'})")
    return bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_float_kernel_arguments_are_declared_fp64(launches, dtype):
    x = torch.randn(2, 3, 4, 5, dtype=dtype, device=DEVICE)
    rm = torch.zeros(3, dtype=dtype, device=DEVICE)
    rv = torch.ones(3, dtype=dtype, device=DEVICE)
    w = torch.rand(3, dtype=dtype, device=DEVICE) + 0.5
    b = torch.randn(3, dtype=dtype, device=DEVICE)
    slope = 0.2  # not representable in fp32
    mean, var = ops.bn_stats_triton(x, rm, rv, 0.1)
    out = ops.bn_act_forward_triton(x, mean, var, w, b, None, 1e-5, LEAKY_RELU, slope)
    g = torch.randn_like(x)
    sdy, sdyx, masked = ops.bn_act_backward_reduce_triton(
        g, x, mean, var, w, b, None, 1e-5, LEAKY_RELU, slope, True
    )
    ops.bn_act_backward_elemt_triton(
        g, x, mean, var, w, b, sdy, sdyx, 1e-5, LEAKY_RELU, slope, True
    )
    ops.bias_act_triton(x, b, None, LEAKY_RELU, slope)
    expected = {"_stats_finalize_kernel", "_forward_kernel", "_backward_reduce_kernel",
                "_backward_elemt_kernel", "_bias_act_kernel"}  # fmt: skip
    if dtype == torch.float32:  # (the Triton convolution takes fp32/fp16/bf16)
        xc = x.contiguous(memory_format=torch.channels_last)
        wp = conv.pack_weight(torch.randn(4, 3, 3, 3, dtype=dtype, device=DEVICE))
        _, partials = conv.conv2d(xc, wp, (3, 3), (1, 1), (1, 1), (1, 1), stats=True)
        conv.conv2d(xc, wp, (3, 3), (1, 1), (1, 1), (1, 1), act=LEAKY_RELU, act_param=slope)
        conv.finalize_stats(
            partials, torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE), 0.1
        )
        expected |= {"_conv_kernel", "_stats_merge_kernel"}
    assert out.shape == x.shape and masked.shape == x.shape
    kernels = {fn.__name__ for fn, _ in launches}
    assert expected <= kernels, f"kernels not recorded: {expected - kernels}"
    floats = [(fn.__name__, n) for fn, a in launches for n, v in a.items() if isinstance(v, float)]
    assert floats, "no float argument was recorded: the recording missed the launches"
    bad = sorted({b for fn, a in launches for b in _float_args_not_fp64(fn, a)})
    assert not bad, f"float kernel arguments that a GPU would round to fp32: {bad}"


@pytest.mark.parametrize("slope", [0.2, -0.3, 1e-3])
def test_fp64_leaky_relu_slope_is_exact(slope):
    """The fp64 forward and backward of BN+LeakyReLU with var + eps = 1 (the
    pre-activation is the input) equal torch's fp64 CPU ops bit for bit."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mean = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    var = torch.full((3,), 1.0 - 1e-5, dtype=torch.float64, device=DEVICE)
    out = ops.bn_act_forward_triton(
        x.to(DEVICE), mean, var, None, None, None, 1e-5, LEAKY_RELU, slope
    )
    torch.testing.assert_close(out.cpu(), torch.nn.functional.leaky_relu(x, slope), rtol=0, atol=0)
    g = torch.ones_like(x)
    _, _, masked = ops.bn_act_backward_reduce_triton(
        g.to(DEVICE), x.to(DEVICE), mean, var, None, None, None, 1e-5, LEAKY_RELU, slope, True
    )
    want = torch.where(x > 0, g, g * slope)
    torch.testing.assert_close(masked.cpu(), want, rtol=0, atol=0)


_COMPILE_FOR_GPU = r"""
import importlib, json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

failures, done = [], 0
for r in json.load(sys.stdin):
    fn = getattr(importlib.import_module(r["module"]), r["name"])
    consts = {k: tl.str_to_ty(v[3:], None) if isinstance(v, str) and v.startswith("tl.") else v
              for k, v in r["consts"].items()}
    try:
        triton.compile(ASTSource(fn=fn, signature=r["sig"], constexprs=consts),
                       target=GPUTarget("cuda", 90, 32))
        done += 1
    except Exception as exc:
        failures.append(f"{r['name']} {r['consts']}: {str(exc)[:500]}")
print(json.dumps({"compiled": done, "failures": failures}))
"""

_TRITON_TYPES = {
    torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1",
}  # fmt: skip


def _launch_record(fn, arguments) -> dict:
    """A launch as (module, kernel, Triton signature, constexpr values) for triton.compile."""
    annotations = inspect.get_annotations(fn)
    sig, consts = {}, {}
    for name, value in arguments.items():
        ann = triton_jit._normalize_ty(annotations.get(name, ""))
        if ann == "constexpr" or value is None:
            sig[name] = "constexpr"
            consts[name] = f"tl.{value.name}" if hasattr(value, "primitive_bitwidth") else value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = ann or "fp32"
    return {"module": fn.__module__, "name": fn.__name__, "sig": sig, "consts": consts}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every kernel runs compiled")
def test_kernels_compile_for_a_gpu(launches):
    """Without a GPU the kernels run in Triton's interpreter, which accepts code that the
    GPU compiler would reject (types, scalar arguments). Every kernel variant the
    BatchNorm, bias_act and convolution ops launch here is also compiled for an sm_90 GPU
    (triton.compile with an explicit target needs no device), in a process without the
    interpreter."""
    import json
    import subprocess
    import sys

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(2, 3, 4, 5, dtype=dtype)
        pd = torch.float64 if dtype == torch.float64 else torch.float32
        rm, rv = torch.zeros(3, dtype=pd), torch.ones(3, dtype=pd)
        w, b = torch.rand(3, dtype=pd) + 0.5, torch.randn(3, dtype=pd)
        mean, var = ops.bn_stats_triton(x, rm, rv, 0.1)
        for act, p in ((LEAKY_RELU, 0.2), (SILU, 0.0)):
            ops.bn_act_forward_triton(x, mean, var, w, b, None, 1e-5, act, p)
            g = torch.randn_like(x)
            sdy, sdyx, _ = ops.bn_act_backward_reduce_triton(
                g, x, mean, var, w, b, None, 1e-5, act, p, True
            )
            ops.bn_act_backward_elemt_triton(g, x, mean, var, w, b, sdy, sdyx, 1e-5, act, p, True)
            ops.bias_act_triton(x, b.to(dtype), None, act, p)
        if dtype != torch.float64:
            xc = x.contiguous(memory_format=torch.channels_last)
            wp = conv.pack_weight(torch.randn(4, 3, 3, 3, dtype=dtype))
            _, partials = conv.conv2d(xc, wp, (3, 3), (1, 1), (1, 1), (1, 1), stats=True)
            conv.finalize_stats(partials, torch.zeros(4), torch.ones(4), 0.1)
            conv.conv2d(xc, wp, (3, 3), (1, 1), (1, 1), (1, 1), act=SILU)
    records = {json.dumps(r, sort_keys=True) for r in (_launch_record(f, a) for f, a in launches)}
    assert len(records) >= 20, len(records)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_GPU], input="[" + ",".join(records) + "]",
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0 and "ptxas" in proc.stderr:
        pytest.skip(f"this Triton cannot compile for a GPU here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["failures"], "\n".join(result["failures"])
    assert result["compiled"] == len(records)
