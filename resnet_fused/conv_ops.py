"""Former home of the convolution ops, kept so that existing imports work: the ops live in
:mod:`resnet_fused.ops.conv_bn_act` (also as ``resnet_fused.ops.<name>``) and the
output-size formula in :mod:`resnet_fused._geometry`."""

from __future__ import annotations

from ._geometry import conv_output_hw
from .ops.conv_bn_act import conv_bias_act_triton, conv_bn_stats_triton, fold_conv_bn

__all__ = ["conv_bias_act_triton", "conv_bn_stats_triton", "conv_output_hw", "fold_conv_bn"]
