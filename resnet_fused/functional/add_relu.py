"""``add_relu`` / ``add_relu_``: fused residual add + ReLU (argument checks, backend
choice, autograd wiring). The ops are in :mod:`resnet_fused.ops.add_relu`, the maths in
:func:`resnet_fused.reference.add_relu`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops, reference
from .._validation import check_floating, check_like
from ..backends import resolve_backend
from ._common import cached_kernels, distinct, needs_autograd, runs_eagerly
from .auto_choice import EAGER, batch_bucket, choose, layout_class, make_trial

__all__ = ["add_relu", "add_relu_"]


@dataclass(frozen=True)
class _AddReLUKernels:
    forward: Callable[[Tensor, Tensor], Tensor]
    forward_inplace: Callable[[Tensor, Tensor], None]
    backward: Callable[[Tensor, Tensor], Tensor]


_KERNELS: dict[str, _AddReLUKernels] = {}


def _add_relu_kernels(backend: str) -> _AddReLUKernels:
    return cached_kernels(_KERNELS, backend, _make_add_relu_kernels)


def _make_add_relu_kernels(backend: str) -> _AddReLUKernels:
    if backend == "torch":
        return _AddReLUKernels(reference.add_relu, reference.add_relu_, reference.relu_backward)
    if backend == "triton":
        return _AddReLUKernels(ops.add_relu_triton, ops.add_relu_triton_, ops.relu_backward_triton)
    # "cpu" and "cuda": the same C++ op names, dispatched on the tensors' device.
    lib = torch.ops.resnet_fused
    return _AddReLUKernels(lib.add_relu.default, lib.add_relu_.default, lib.relu_backward.default)


class _AddReLU(torch.autograd.Function):
    """out = relu(x + residual); saves only ``out`` (the ReLU mask is ``out > 0``)."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor, backend: str) -> Tensor:
        out = _add_relu_kernels(backend).forward(x, residual)
        ctx.save_for_backward(out)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (out,) = ctx.saved_tensors
        grad = _add_relu_kernels(ctx.backend).backward(grad_out, out)
        need_x, need_residual, _ = ctx.needs_input_grad
        return (grad if need_x else None), (grad if need_residual else None), None


class _AddReLUInplace(torch.autograd.Function):
    """x <- relu(x + residual) in place; saves only the result."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor, backend: str) -> Tensor:
        _add_relu_kernels(backend).forward_inplace(x, residual)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        ctx.backend = backend
        return x

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (out,) = ctx.saved_tensors
        grad = _add_relu_kernels(ctx.backend).backward(grad_out, out)
        need_x, need_residual, _ = ctx.needs_input_grad
        return (grad if need_x else None), (grad if need_residual else None), None


def _eager_add_relu(x: Tensor, residual: Tensor) -> Tensor:
    return torch.add(x, residual).relu_()


def _resolve(backend: str, x: Tensor, residual: Tensor) -> str:
    """The backend, or for ``"auto"`` the faster of the fused kernels and eager at this
    shape (timed once per key, forward and backward when autograd records the call)."""
    impl = resolve_backend(backend, x.device)
    if backend != "auto" or impl == "torch":
        return impl
    grad = needs_autograd(x, residual)
    shape = (batch_bucket(x.shape[0]), *x.shape[1:]) if x.dim() else ()

    def key():
        return ("add_relu", shape, x.dtype, layout_class(x), layout_class(residual), grad,
                x.device)  # fmt: skip

    def forward(c, a, b):
        return _eager_add_relu(a, b) if c == EAGER else add_relu(a, b, backend=c)

    return choose(key, [impl, EAGER], make_trial(forward, (x, residual), grad), x.device)


def add_relu(x: Tensor, residual: Tensor, *, backend: str = "auto") -> Tensor:
    """Fused residual add + ReLU: ``relu(x + residual)``.

    Args:
        x: Tensor[N, C, H, W] (any shape, any layout), float32/float16/bfloat16/float64.
        residual: tensor of the same shape, dtype and device as ``x``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        A new tensor in the memory layout of ``x`` (e.g. channels_last stays so).
        Differentiable in ``x`` and ``residual``.
    """
    check_floating(x, "x")
    check_like(residual, "residual", x, "x")
    if runs_eagerly():  # torch.func transforms, make_fx, jit.trace: eager's ops
        return _eager_add_relu(x, residual)
    impl = _resolve(backend, x, residual)
    if impl == EAGER:
        return _eager_add_relu(x, residual)
    if not needs_autograd(x, residual):
        return _add_relu_kernels(impl).forward(x, residual)
    return _AddReLU.apply(x, distinct(residual, x), impl)


def add_relu_(x: Tensor, residual: Tensor, *, backend: str = "auto") -> Tensor:
    """In-place :func:`add_relu`: ``x <- relu(x + residual)``; returns ``x``.

    Saves no extra activation: the backward needs only the result, which is ``x``.
    As for any in-place op, ``x`` must not be a leaf that requires grad.
    """
    check_floating(x, "x")
    check_like(residual, "residual", x, "x")
    # "auto": the pick of the out-of-place op at this shape (a trial must not write x).
    if runs_eagerly():  # torch.func transforms, make_fx, jit.trace: eager's ops
        return x.add_(residual).relu_()
    impl = _resolve(backend, x, residual)
    if impl == EAGER:
        return x.add_(residual).relu_()
    if not needs_autograd(x, residual):
        _add_relu_kernels(impl).forward_inplace(x, residual)
        return x
    return _AddReLUInplace.apply(x, residual, impl)
