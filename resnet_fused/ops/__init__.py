"""The torch.library operators of resnet_fused, one module per fused op:

  add_relu.py        add_relu, add_relu_, relu_backward (+ their _triton ops)
  batch_norm_act.py  bn_stats, bn_act_forward, bn_act_backward_reduce/_elemt (+ _triton)
  bias_act.py        bias_act, bias_act_ (+ _triton)
  conv_bn_act.py     conv_bias_act_triton, conv_bn_stats_triton, fold_conv_bn
  fingerprint.py     fingerprint (a hash of CPU tensors' bytes for the eval fold cache;
                     imported by its users: it registers nothing)

C++/CUDA ops are defined in ``csrc/resnet_fused.cpp`` (``TORCH_LIBRARY``) and get their
fake kernels in the op's module. Triton ops are separate op names (one CUDA dispatch key
holds one kernel) defined there with ``torch.library.custom_op``; their kernels
(``resnet_fused.triton.<op>``) are imported on first use. Importing this package registers
every op. The autograd wiring lives in :mod:`resnet_fused.functional`.

unit.py holds the fake kernel of ``conv_bn_act_eager`` (the eager Conv+BN+ReLU unit as one
C++ op with its own autograd node, csrc/unit.cpp) and its Python entry point.
"""

from __future__ import annotations

from .add_relu import add_relu_triton, add_relu_triton_, relu_backward_triton
from .batch_norm_act import (
    bn_act_backward_elemt_triton,
    bn_act_backward_reduce_triton,
    bn_act_forward_triton,
    bn_stats_triton,
)
from .bias_act import bias_act_triton, bias_act_triton_
from .conv_bn_act import conv_bias_act_triton, conv_bn_stats_triton, fold_conv_bn
from .unit import EAGER_UNIT

__all__ = [
    "EAGER_UNIT",
    "add_relu_triton",
    "add_relu_triton_",
    "bias_act_triton",
    "bias_act_triton_",
    "bn_act_backward_elemt_triton",
    "bn_act_backward_reduce_triton",
    "bn_act_forward_triton",
    "bn_stats_triton",
    "conv_bias_act_triton",
    "conv_bn_stats_triton",
    "fold_conv_bn",
    "relu_backward_triton",
]
