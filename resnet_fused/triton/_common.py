"""Helpers shared by the Triton kernel modules."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from .._validation import check_optional_per_channel, check_tensor

# Triton decides at kernel definition whether kernels run in its interpreter.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


def compute_dtype(dtype: torch.dtype):
    """Triton dtype for arithmetic: fp32 for fp16/bf16/fp32 (as eager), fp64 for fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t`` covers one gap-free block of memory (any dimension order)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def in_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` if it has ``ref``'s (dense) strides, else a copy of ``t`` in that layout,
    so that elementwise kernels can walk every operand as one flat buffer."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def elementwise_grid(n: int, block: int) -> tuple[int]:
    return (triton.cdiv(n, block),)


def elementwise_block() -> int:
    # The interpreter pays per program, so give it big blocks.
    return 16384 if INTERPRETED else 2048


# ---------------------------------------------------------------------------------------
# Device guard: a Triton launch goes to the current CUDA device's current stream, so every
# launcher runs with its input's device made current (a no-op for CPU tensors, which only
# the interpreter runs).
# ---------------------------------------------------------------------------------------
def device_guard(device: torch.device):
    """Context that makes ``device`` the current CUDA device (nothing for other devices)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_input_device(launcher):
    """Run ``launcher`` under :func:`device_guard` of its first argument's device (the
    input every other tensor argument must share a device with)."""

    @functools.wraps(launcher)
    def guarded(first, *args, **kwargs):
        if not isinstance(first, torch.Tensor):
            return launcher(first, *args, **kwargs)
        with device_guard(first.device):
            return launcher(first, *args, **kwargs)

    return guarded


# ---------------------------------------------------------------------------------------
# Argument checks beyond resnet_fused._validation, as csrc/common.h does them for the C++
# ops (a direct torch.ops.resnet_fused.*_triton call never reaches a kernel with bad input).
# ---------------------------------------------------------------------------------------
def check_per_channel(t: object, name: str, input: torch.Tensor) -> None:
    """A required per-channel tensor: shape (C,), on input's device, floating."""
    check_tensor(t, name)
    check_optional_per_channel(t, name, input)


def check_bn_affine_args(input, mean, var, weight, bias) -> None:
    """mean and var per channel; weight and bias per channel or None."""
    check_per_channel(mean, "mean", input)
    check_per_channel(var, "var", input)
    check_optional_per_channel(weight, "weight", input)
    check_optional_per_channel(bias, "bias", input)


def check_no_partial_overlap(t: torch.Tensor, name: str, written: torch.Tensor, w_name: str):
    """``t`` may be ``written`` itself (same elements) but may not share only some of its
    memory (as at::assert_no_partial_overlap, for dense tensors)."""
    if t.numel() == 0 or written.numel() == 0:
        return
    if t.untyped_storage().data_ptr() != written.untyped_storage().data_ptr():
        return
    if t.data_ptr() == written.data_ptr() and t.stride() == written.stride():
        return  # the same elements
    if not (is_dense(t) and is_dense(written)):
        return  # too hard to tell, as ATen's overlap check

    def span(a):
        size = sum((n - 1) * s for n, s in zip(a.shape, a.stride(), strict=True)) + 1
        return a.data_ptr(), a.data_ptr() + size * a.element_size()

    (a0, a1), (b0, b1) = span(t), span(written)
    if a0 < b1 and b0 < a1:
        raise ValueError(
            f"{name} must not partially overlap {w_name} in memory (it may be {w_name} itself)"
        )


# ---------------------------------------------------------------------------------------
# Activations (resnet_fused.activations, csrc/act.h): ACT is a tl.constexpr code, so each
# kernel specialises to one activation; param is LeakyReLU's negative slope (a runtime
# scalar in the arithmetic type, ignored by the others). Every helper computes in the
# dtype of its tensor argument (the kernels' accumulation type: fp32, fp64 for fp64).
# ---------------------------------------------------------------------------------------
ACT_COUNT = 9
ACT_IDENTITY = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_RELU6 = tl.constexpr(2)
ACT_LEAKY_RELU = tl.constexpr(3)
ACT_SILU = tl.constexpr(4)
ACT_HARDSWISH = tl.constexpr(5)
ACT_GELU = tl.constexpr(6)
ACT_GELU_TANH = tl.constexpr(7)
ACT_SIGMOID = tl.constexpr(8)
# Constants of csrc/act.h's act_math, made in the arithmetic type with tl.full (a float
# literal in a jit function is an fp32 constant, which would round them in fp64).
_SQRT1_2 = tl.constexpr(0.70710678118654752440)  # 1/sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.39894228040143267794)  # 1/sqrt(2*pi)
_SQRT_2_OVER_PI = tl.constexpr(0.79788456080286535588)  # sqrt(2/pi)
_GELU_TANH_K = tl.constexpr(0.044715)


def check_act(act: object, act_param: object) -> tuple[int, float]:
    """(act, act_param) as (int, float): act a code in [0, 9) (resnet_fused.activations),
    act_param a real number, finite for LeakyReLU (its negative slope)."""
    if isinstance(act, bool) or not isinstance(act, int) or not 0 <= act < ACT_COUNT:
        raise ValueError(
            "act must be an activation code in [0, 9) (identity, relu, relu6, leaky_relu, "
            "silu, hardswish, gelu, gelu_tanh, sigmoid; see resnet_fused.activations), got "
            f"{act!r}"
        )
    if isinstance(act_param, bool) or not isinstance(act_param, (int, float)):
        raise ValueError(f"act_param must be a float, got {type(act_param).__name__}")
    act_param = float(act_param)
    if act == ACT_LEAKY_RELU.value and not math.isfinite(act_param):
        raise ValueError(f"act_param (the LeakyReLU slope) must be finite, got {act_param!r}")
    return int(act), act_param


def act_from_output(act: int, act_param: float) -> bool:
    """Whether act's derivative is a function of its output (Act.from_output)."""
    return act in (0, 1, 2) or (act == ACT_LEAKY_RELU.value and act_param > 0)


@triton.jit
def _half_one_plus_tanh(z):
    """(s, s*(1 - s)) with s = (1 + tanh(z))/2 = sigmoid(2z), so that GELU-tanh needs no
    tanh (Triton has none outside libdevice, which the interpreter lacks): with
    e = exp(-2|z|) in [0, 1] (no overflow) and q = 1/(1 + e), s = q for z >= 0 and
    e*q = 1 - q for z < 0, and s*(1 - s) = e*q*q (= (1 - tanh^2)/4). No cancellation:
    accurate to a few ulp relative even where 1 + tanh(z) is tiny (eager's fp32
    1 + tanhf(z) loses digits there); s is 0 or 1 for large |z|; NaN propagates."""
    e = tl.exp(-2.0 * tl.abs(z))
    q = 1.0 / (1.0 + e)
    eq = e * q
    return tl.where(z < 0, eq, q), eq * q


@triton.jit
def _act_apply(y, ACT: tl.constexpr, param):
    """act(y) (csrc/act.h act_apply); NaN propagates through every activation."""
    if ACT == ACT_RELU:
        y = tl.where(y < 0, 0.0, y)  # NaN propagates, as torch.relu does
    elif ACT == ACT_RELU6:
        y = tl.where(y < 0, 0.0, tl.where(y > 6, 6.0, y))
    elif ACT == ACT_LEAKY_RELU:
        y = tl.where(y > 0, y, y * param)
    elif ACT == ACT_SILU:
        y = y / (1.0 + tl.exp(-y))
    elif ACT == ACT_HARDSWISH:
        t = y + 3.0
        t = tl.where(t < 0, 0.0, tl.where(t > 6, 6.0, t))
        y = y * t / 6.0
    elif ACT == ACT_GELU:
        c = tl.full([], _SQRT1_2, y.dtype)
        y = y * 0.5 * (1.0 + tl.erf(y * c))
    elif ACT == ACT_GELU_TANH:
        c = tl.full([], _SQRT_2_OVER_PI, y.dtype)
        k = tl.full([], _GELU_TANH_K, y.dtype)
        s, _ = _half_one_plus_tanh(c * (y + k * y * y * y))
        y = y * s  # 0.5*y*(1 + tanh(inner))
    elif ACT == ACT_SIGMOID:
        y = 1.0 / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _act_grad(g, pre, ACT: tl.constexpr, param):
    """g * act'(pre) (csrc/act.h act_grad_from_pre, torch's conventions at kinks); g and
    pre in the same arithmetic type."""
    if ACT == ACT_RELU:
        g = tl.where(pre <= 0, 0.0, g)
    elif ACT == ACT_RELU6:
        g = tl.where((pre <= 0) | (pre >= 6), 0.0, g)
    elif ACT == ACT_LEAKY_RELU:
        g = tl.where(pre > 0, g, g * param)
    elif ACT == ACT_SILU:
        s = 1.0 / (1.0 + tl.exp(-pre))
        g = g * s * (1.0 + pre * (1.0 - s))
    elif ACT == ACT_HARDSWISH:
        g = tl.where(pre <= -3, 0.0, tl.where(pre < 3, g * (pre / 3.0 + 0.5), g))
    elif ACT == ACT_GELU:
        c = tl.full([], _SQRT1_2, pre.dtype)
        a = tl.full([], _INV_SQRT_2PI, pre.dtype)
        cdf = 0.5 * (1.0 + tl.erf(pre * c))
        pdf = tl.exp(-0.5 * pre * pre) * a
        g = g * (cdf + pre * pdf)
    elif ACT == ACT_GELU_TANH:
        c = tl.full([], _SQRT_2_OVER_PI, pre.dtype)
        k = tl.full([], _GELU_TANH_K, pre.dtype)
        x2 = pre * pre
        s, s1s = _half_one_plus_tanh(c * (pre + k * x2 * pre))
        d_inner = c * (1.0 + 3.0 * k * x2)
        # 0.5*(1 + t) + 0.5*pre*(1 - t^2)*d_inner, t = tanh(inner)
        g = g * (s + 2.0 * pre * s1s * d_inner)
    elif ACT == ACT_SIGMOID:
        e = tl.exp(-pre)
        s = 1.0 / (1.0 + e)
        g = g * tl.where(s > 0.5, e * s, 1.0 - s) * s  # (1 - s without cancelling)
    return g


@triton.jit
def _act_grad_from_out(g, out, ACT: tl.constexpr, param):
    """g * act' read from the output (csrc/act.h act_grad_from_out): identity, ReLU,
    ReLU6 and LeakyReLU with a positive slope only (the launchers check)."""
    tl.static_assert(ACT <= ACT_LEAKY_RELU, "act' is not a function of the output")
    if ACT == ACT_RELU:
        g = tl.where(out <= 0, 0.0, g)
    elif ACT == ACT_RELU6:
        g = tl.where((out <= 0) | (out >= 6), 0.0, g)
    elif ACT == ACT_LEAKY_RELU:
        g = tl.where(out > 0, g, g * param)
    return g
