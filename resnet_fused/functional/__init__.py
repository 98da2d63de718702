"""The functional layer: public fused functions with their argument checks, backend
choice and ``torch.autograd.Function`` wiring, one module per fused op:

  add_relu.py        add_relu, add_relu_
  batch_norm_act.py  batch_norm_act (and the BatchNorm autograd.Function the conv unit reuses)
  conv_bn_act.py     conv_bn_act, fold_conv_bn
  auto_choice.py     how backend="auto" picks fused or eager per shape (auto_choices)
  _common.py         what they share

The public names are re-exported by :mod:`resnet_fused` (``resnet_fused.conv_bn_act``,
...). Below this layer: the ops (:mod:`resnet_fused.ops`), above it: the modules.
"""

from __future__ import annotations

from . import add_relu, auto_choice, batch_norm_act, conv_bn_act

__all__ = ["add_relu", "auto_choice", "batch_norm_act", "conv_bn_act"]
