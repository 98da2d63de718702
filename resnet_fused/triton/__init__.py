"""Triton kernels. Importing this package does not import triton: the kernel modules
are loaded on first use, so ``import resnet_fused`` stays fast and works without it."""

from __future__ import annotations

import sys

_KERNEL_MODULES = (
    "resnet_fused.triton.add_relu",
    "resnet_fused.triton.batch_norm_act",
    "resnet_fused.triton.conv",
)


def kernels_imported() -> bool:
    return any(name in sys.modules for name in _KERNEL_MODULES)


def kernels_interpreted() -> bool:
    """Whether the imported kernels were defined under Triton's interpreter."""
    from . import _common

    return _common.INTERPRETED
