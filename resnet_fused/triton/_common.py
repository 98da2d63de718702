"""Helpers shared by the Triton kernel modules."""

from __future__ import annotations

import contextlib
import functools

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
