"""Triton kernels for residual add + ReLU.

Forward:  out = relu(x + residual)                     (reads 2 tensors, writes 1)
Backward: grad_in = 0 where out <= 0 else grad_out     (reads 2 tensors, writes 1)

Eager PyTorch runs the forward as add then relu: 5 tensor passes instead of 3. All
operands are walked as flat buffers in the output's layout (NCHW, channels_last or any
dense layout); operands with other strides are first copied into it. Arithmetic is in
fp32 (fp64 for fp64 tensors), rounded once on store, as eager does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import check_floating, check_like
from ._common import (
    check_no_partial_overlap,
    compute_dtype,
    elementwise_block,
    elementwise_grid,
    in_layout_of,
    is_dense,
    on_input_device,
)


@triton.jit
def _add_relu_kernel(x_ptr, r_ptr, out_ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    r = tl.load(r_ptr + offs, mask=mask).to(ACC)
    s = x + r
    out = tl.where(s < 0, 0.0, s)  # NaN propagates, as torch.relu does
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_backward_kernel(g_ptr, o_ptr, gi_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask)
    o = tl.load(o_ptr + offs, mask=mask)
    gi = tl.where(o <= 0, tl.zeros_like(g), g)
    tl.store(gi_ptr + offs, gi, mask=mask)


def _launch_add_relu(x: torch.Tensor, r: torch.Tensor, out: torch.Tensor) -> None:
    n = out.numel()
    if n == 0:
        return
    block = elementwise_block()
    _add_relu_kernel[elementwise_grid(n, block)](
        x, r, out, n, BLOCK=block, ACC=compute_dtype(out.dtype)
    )


@on_input_device
def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    check_floating(x, "x")
    check_like(residual, "residual", x, "x")
    out = torch.empty_like(x)
    _launch_add_relu(in_layout_of(x, out), in_layout_of(residual, out), out)
    return out


@on_input_device
def add_relu_(x: torch.Tensor, residual: torch.Tensor) -> None:
    check_floating(x, "x")
    check_like(residual, "residual", x, "x")
    if torch._debug_has_internal_overlap(x) == 1:
        raise ValueError("x (written in place) must not have elements that share memory")
    check_no_partial_overlap(residual, "residual", x, "x")
    if not is_dense(x):  # compute out of place, then copy back
        x.copy_(add_relu(x, residual))
        return
    _launch_add_relu(x, in_layout_of(residual, x), x)


@on_input_device
def relu_backward(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    check_floating(out, "out")
    check_like(grad_out, "grad_out", out, "out")
    grad_in = torch.empty_like(out)
    n = grad_in.numel()
    if n:
        block = elementwise_block()
        _relu_backward_kernel[elementwise_grid(n, block)](
            in_layout_of(grad_out, grad_in), in_layout_of(out, grad_in), grad_in, n, BLOCK=block
        )
    return grad_in
