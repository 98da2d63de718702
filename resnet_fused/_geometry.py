"""Convolution geometry shared by every layer (functional API, ops, Triton kernels): the
argument normalisation of stride/padding/dilation/kernel_size and the output-size formula,
each written once."""

from __future__ import annotations


def pair(value, name: str, minimum: int) -> tuple[int, int]:
    """``value`` (an int or a pair of ints, bools excluded) as a pair of ints, each
    ``>= minimum``; TypeError/ValueError naming ``name`` otherwise."""
    if type(value) is tuple and len(value) == 2:  # the common case, checked cheaply
        a, b = value
        if type(a) is int and type(b) is int and a >= minimum and b >= minimum:
            return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def conv_output_hw(h: int, w: int, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of a 2-D convolution (as torch.nn.functional.conv2d):
    (size + 2*padding - dilation*(kernel - 1) - 1) // stride + 1 per dimension."""
    out = []
    for size, k, s, p, d in zip((h, w), kernel_size, stride, padding, dilation, strict=True):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]
