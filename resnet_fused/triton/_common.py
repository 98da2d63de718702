"""Helpers shared by the Triton kernel modules."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

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
