"""Triton kernels, one module per op (its kernels and launcher):

  add_relu.py         add_relu, add_relu_ (in place), relu_backward
  bn_stats.py         BatchNorm batch statistics (+ running statistics update)
  bn_act_forward.py   BatchNorm apply -> (residual add) -> activation
  bn_act_backward.py  its backward: the reduction and the elementwise pass
  bias_act.py         act(input + bias [+ residual]) (eval epilogue, BN folded)
  conv.py             implicit-GEMM conv2d with fused epilogues and BN statistics
  _bn_tiles.py        the tiling planner and device helpers of the BatchNorm-family kernels
  _common.py          helpers of every module (dtypes, layouts, the device guard, the
                      activations' jit helpers: resnet_fused.activations, csrc/act.h)

Importing this package does not import triton: the kernel modules are loaded on first
use, so ``import resnet_fused`` stays fast and works without it."""

from __future__ import annotations

import sys

_KERNEL_MODULES = (
    "resnet_fused.triton.add_relu",
    "resnet_fused.triton.bias_act",
    "resnet_fused.triton.bn_act_backward",
    "resnet_fused.triton.bn_act_forward",
    "resnet_fused.triton.bn_stats",
    "resnet_fused.triton.conv",
)


def kernels_imported() -> bool:
    return any(name in sys.modules for name in _KERNEL_MODULES)


def kernels_interpreted() -> bool:
    """Whether the imported kernels were defined under Triton's interpreter."""
    from . import _common

    return _common.INTERPRETED
