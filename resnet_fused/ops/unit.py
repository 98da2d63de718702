"""conv_bn_act_eager: the eager Conv -> BatchNorm -> (add) -> activation unit as one C++ op and
one autograd node (csrc/unit.cpp), and its fake kernel.

``EAGER_UNIT`` is its Python entry point (``resnet_fused._C.conv_bn_act_eager``: the same
op through the dispatcher, with less argument parsing than ``torch.ops``), or None when the
compiled extension (or this op in it) is missing; callers then run eager's ops one by one.
It returns ``NotImplemented``, having done nothing, for tensors whose type defines
``__torch_function__`` and under a ``TorchFunctionMode``: eager's ops one by one honour
those. Arguments, as the schema (``csrc/resnet_fused.cpp``)::

    EAGER_UNIT(input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
               running_var, num_batches_tracked, stride, padding, dilation, groups,
               training, momentum, eps, residual, act, act_param)

``training`` is F.batch_norm's flag (batch statistics; running statistics updated in place
when given); ``num_batches_tracked``, when given, is nn.BatchNorm2d's counter (incremented;
``momentum=None`` is then the cumulative average).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension

EAGER_UNIT = None
if _extension.is_loaded() and hasattr(torch.ops.resnet_fused, "conv_bn_act_eager"):
    EAGER_UNIT = getattr(_extension._C, "conv_bn_act_eager", None)

    @torch.library.register_fake("resnet_fused::conv_bn_act_eager")
    def _conv_bn_act_eager_fake(
        input: Tensor, conv_weight: Tensor, conv_bias, bn_weight, bn_bias, running_mean,
        running_var, num_batches_tracked, stride, padding, dilation, groups, training,
        momentum, eps, residual, act, act_param,
    ) -> Tensor:  # fmt: skip
        y = torch.ops.aten.convolution(
            input, conv_weight, conv_bias, stride, padding, dilation, False, [0, 0], groups
        )
        return torch.empty_like(y)  # (BatchNorm's output keeps its input's layout)
