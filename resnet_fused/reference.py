"""Pure-PyTorch reference: the single definition of the maths every backend implements.

Tests compare each backend against these functions evaluated in fp64. They are also the
``"torch"`` backend, which runs anywhere.
"""

from __future__ import annotations

import torch


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``relu(x + residual)``."""
    return torch.relu(x + residual)


def add_relu_(x: torch.Tensor, residual: torch.Tensor) -> None:
    """``x <- relu(x + residual)`` in place."""
    x.add_(residual).relu_()


def relu_backward(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Gradient through a ReLU given its output: ``grad_out`` where ``out > 0``, else 0
    (torch's ``threshold_backward(grad_out, out, 0)``, which lets NaN through)."""
    return torch.where(out <= 0, torch.zeros_like(grad_out), grad_out)
