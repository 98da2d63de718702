"""Memory-layout rules shared by fake kernels, Triton launchers and tests."""

from __future__ import annotations

import torch


def bn_memory_format(input: torch.Tensor) -> torch.memory_format:
    """The layout the BatchNorm kernels work in and return: channels_last when ``input``
    is channels_last-contiguous (and not also NCHW-contiguous), or strided in
    channels_last's order (a slice: eager's BatchNorm returns it channels_last, by
    ``suggest_memory_format``), else NCHW-contiguous."""
    if (
        input.dim() == 4
        and not input.is_contiguous()
        and (
            input.is_contiguous(memory_format=torch.channels_last)
            or strides_like_channels_last(input)
        )
    ):
        return torch.channels_last
    return torch.contiguous_format


def strides_like_channels_last(t: torch.Tensor) -> bool:
    """aten's ``is_channels_last_strides_2d`` (c10/core/MemoryFormat.h), the test behind
    ``suggest_memory_format`` for a 4-D tensor, ambiguous layouts (N111, a C of 1, ...)
    falling back to NCHW as there: 0.8 us where ``torch._prims_common``'s
    ``suggest_memory_format`` takes 20 us."""
    if t.dim() != 4:
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < least:
            return False
        if d == 0 and least == strides[1]:
            return False
        least = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def conv_output_channels_last(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether eager's convolution of ``x`` with ``w`` writes a channels_last output:
    oneDNN's and cuDNN's rule, the input's or the weight's strides look channels_last
    (``suggest_memory_format``; 4-D only). The fused paths whose kernels write
    channels_last whatever their input (oneDNN's fused convolution given a reordered
    weight, the Triton convolution) are taken only where this holds, so that a converted
    unit's output has eager's layout."""
    return x.dim() == 4 and (strides_like_channels_last(x) or strides_like_channels_last(w))


def stats_dtype(dtype: torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """Accumulation dtype of the BatchNorm statistics and backward sums, ATen's
    ``acc_type<T, is_cuda>`` as eager's BatchNorm on that device uses it: fp64 for fp64
    input, fp32 for fp16/bf16; fp32 input: fp64 on the CPU (``acc_type<float, false>`` is
    double), fp32 elsewhere. ``device=None`` gives the fp32 rule of CUDA, which the Triton
    kernels follow on every device (``csrc/common.h``'s ``acc_dtype`` is the C++ side)."""
    if dtype == torch.float64:
        return torch.float64
    if dtype == torch.float32 and device is not None and torch.device(device).type == "cpu":
        return torch.float64
    return torch.float32


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of elementwise ops (``at::opmath_type``): fp64 for fp64 input, else
    fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_bn_like(input: torch.Tensor) -> torch.Tensor:
    return torch.empty(
        input.shape, dtype=input.dtype, device=input.device, memory_format=bn_memory_format(input)
    )
