"""What the fused functions share."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

K = TypeVar("K")


def cached_kernels(cache: dict[str, K], backend: str, make: Callable[[str], K]) -> K:
    """``make(backend)``, looked up once per backend (the op objects are needed per call);
    under torch.compile made directly (no cache for dynamo to guard)."""
    if torch.compiler.is_compiling():
        return make(backend)
    kernels = cache.get(backend)
    if kernels is None:
        kernels = cache[backend] = make(backend)
    return kernels


def needs_autograd(*tensors: Tensor) -> bool:
    """True when autograd must record the op: grad mode on and an input requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def distinct(residual: Tensor | None, input: Tensor) -> Tensor | None:
    """``residual``, or an alias of it (a view: no copy) where it is the very tensor
    passed as ``input`` to the same autograd.Function (``relu(bn(x) + x)``): Dynamo
    cannot trace a Function given one tensor twice (torch.compile with fullgraph=True
    and strict torch.export failed there). Autograd sums the gradients of the two uses
    through the view as it did through the one tensor."""
    if residual is input and residual is not None:
        return residual.view_as(residual)
    return residual


def check_batch_size(y_or_shape) -> None:
    """nn.BatchNorm2d's error for one value per channel in training."""
    shape = y_or_shape.shape if isinstance(y_or_shape, Tensor) else y_or_shape
    if shape[0] * shape[2] * shape[3] == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{torch.Size(shape)}"
        )
