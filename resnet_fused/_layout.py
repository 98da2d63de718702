"""Memory-layout rules shared by fake kernels, Triton launchers and tests."""

from __future__ import annotations

import torch


def bn_memory_format(input: torch.Tensor) -> torch.memory_format:
    """The layout the BatchNorm kernels work in and return: channels_last when ``input``
    is channels_last-contiguous (and not also NCHW-contiguous), else NCHW-contiguous."""
    if (
        input.dim() == 4
        and not input.is_contiguous()
        and input.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of BatchNorm statistics: fp64 for fp64 input, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_bn_like(input: torch.Tensor) -> torch.Tensor:
    return torch.empty(
        input.shape, dtype=input.dtype, device=input.device, memory_format=bn_memory_format(input)
    )
