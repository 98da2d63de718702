"""What the fused functions share."""

from __future__ import annotations

import torch
from torch import Tensor


def needs_autograd(*tensors: Tensor) -> bool:
    """True when autograd must record the op: grad mode on and an input requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def check_batch_size(y_or_shape) -> None:
    """nn.BatchNorm2d's error for one value per channel in training."""
    shape = y_or_shape.shape if isinstance(y_or_shape, Tensor) else y_or_shape
    if shape[0] * shape[2] * shape[3] == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{torch.Size(shape)}"
        )
