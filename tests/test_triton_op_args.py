"""Triton custom ops called directly check their arguments as the C++ ops do
(csrc/common.h): dims, dtypes, devices, per-channel shapes, layouts, each error naming the
argument. Where a C++ twin exists (and the extension is built) it rejects the same input
naming the same argument."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from resnet_fused import _extension, ops
from resnet_fused.triton import conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_C = torch.ops.resnet_fused


def _cases():
    """(id, Triton op, C++ op name or None, args, argument named in the error)."""
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    r = torch.randn(2, 3, 4, 4, device=DEVICE)
    c = torch.rand(3, device=DEVICE) + 0.5
    c4 = torch.rand(4, device=DEVICE)
    xi = torch.ones(2, 3, 4, 4, dtype=torch.int32, device=DEVICE)
    x16 = x.half()
    x3 = x[0]
    flat = torch.randn(2 * 3 * 4 * 4 + 4, device=DEVICE)
    shifted = (flat[4:].view(2, 3, 4, 4), flat[:-4].view(2, 3, 4, 4))  # dense, overlapping
    eps = 1e-5
    wp = conv.pack_weight(torch.randn(4, 3, 3, 3, device=DEVICE))
    geo = ([3, 3], [1, 1], [1, 1], [1, 1])
    return [
        ("add_relu:x", ops.add_relu_triton, "add_relu", (xi, xi), "x"),
        ("add_relu:shape", ops.add_relu_triton, "add_relu", (x, r[:, :2]), "residual"),
        ("add_relu:dtype", ops.add_relu_triton, "add_relu", (x, x16), "residual"),
        ("add_relu_:shape", ops.add_relu_triton_, "add_relu_", (x.clone(), r[:1]), "residual"),
        (
            "add_relu_:overlap",
            ops.add_relu_triton_,
            "add_relu_",
            shifted,
            "memory",  # ATen: "... refer to a single memory location"
        ),
        ("relu_backward:out", ops.relu_backward_triton, "relu_backward", (xi, xi), "out"),
        ("relu_backward:grad", ops.relu_backward_triton, "relu_backward", (x16, x), "grad_out"),
        ("bn_stats:input", ops.bn_stats_triton, "bn_stats", (x3, None, None, 0.1), "input"),
        ("bn_stats:rm", ops.bn_stats_triton, "bn_stats", (x, c4, c.clone(), 0.1), "running_mean"),
        (
            "bn_stats:rv",
            ops.bn_stats_triton,
            "bn_stats",
            (x, c.clone(), xi[0, 0, 0, :3], 0.1),
            "running_var",
        ),
        (
            "forward:input",
            ops.bn_act_forward_triton,
            "bn_act_forward",
            (x3, c, c, None, None, None, eps, 1, 0.0),
            "input",
        ),
        (
            "forward:mean",
            ops.bn_act_forward_triton,
            "bn_act_forward",
            (x, c4, c, None, None, None, eps, 1, 0.0),
            "mean",
        ),
        (
            "forward:var",
            ops.bn_act_forward_triton,
            "bn_act_forward",
            (x, c, c[:2], None, None, None, eps, 1, 0.0),
            "var",
        ),
        (
            "forward:weight",
            ops.bn_act_forward_triton,
            "bn_act_forward",
            (x, c, c, c4, None, None, eps, 1, 0.0),
            "weight",
        ),
        (
            "forward:bias",
            ops.bn_act_forward_triton,
            "bn_act_forward",
            (x, c, c, None, c.view(3, 1), None, eps, 1, 0.0),
            "bias",
        ),
        (
            "forward:residual",
            ops.bn_act_forward_triton,
            "bn_act_forward",
            (x, c, c, None, None, x16, eps, 1, 0.0),
            "residual",
        ),
        (
            "reduce:grad_out",
            ops.bn_act_backward_reduce_triton,
            "bn_act_backward_reduce",
            (r[:1], x, c, c, None, None, None, eps, 1, 0.0, False),
            "grad_out",
        ),
        (
            "reduce:out",
            ops.bn_act_backward_reduce_triton,
            "bn_act_backward_reduce",
            (r, x, c, c, None, None, x16, eps, 1, 0.0, False),
            "out",
        ),
        (
            "reduce:mean",
            ops.bn_act_backward_reduce_triton,
            "bn_act_backward_reduce",
            (r, x, c4, c, None, None, None, eps, 1, 0.0, False),
            "mean",
        ),
        (
            "elemt:grad",
            ops.bn_act_backward_elemt_triton,
            "bn_act_backward_elemt",
            (x16, x, c, c, None, None, c, c, eps, 1, 0.0, True),
            "grad",
        ),
        (
            "elemt:sum_dy",
            ops.bn_act_backward_elemt_triton,
            "bn_act_backward_elemt",
            (r, x, c, c, None, None, c4, c, eps, 1, 0.0, True),
            "sum_dy",
        ),
        (
            "elemt:sum_dy_xhat",
            ops.bn_act_backward_elemt_triton,
            "bn_act_backward_elemt",
            (r, x, c, c, None, None, c, c4, eps, 1, 0.0, True),
            "sum_dy_xhat",
        ),
        (
            "elemt:weight",
            ops.bn_act_backward_elemt_triton,
            "bn_act_backward_elemt",
            (r, x, c, c, c4, None, c, c, eps, 1, 0.0, True),
            "weight",
        ),
        ("bias_act:bias", ops.bias_act_triton, "bias_act", (x, c4, None, 1, 0.0), "bias"),
        ("bias_act:residual", ops.bias_act_triton, "bias_act", (x, c, r[:1], 1, 0.0), "residual"),
        (
            "bias_act_:layout",
            ops.bias_act_triton_,
            "bias_act_",
            (x[:, :, ::2], c, None, 1, 0.0),
            "input",
        ),
        ("conv:x", ops.conv_bias_act_triton, None, (x3, wp, *geo, None, None, 1, 0.0), "x"),
        (
            "conv:residual",
            ops.conv_bias_act_triton,
            None,
            (x, wp, *geo, None, r, 1, 0.0),
            "residual",
        ),
        (
            "conv_stats:running_mean",
            ops.conv_bn_stats_triton,
            None,
            (x, wp, *geo, c, c4, 0.1),
            "running_mean",
        ),
    ]


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_op_rejects_bad_argument(case):
    _, op, cpp_name, args, name = case
    with pytest.raises((TypeError, ValueError), match=name):
        op(*args)
    if cpp_name is not None and _extension.is_loaded() and DEVICE == "cpu":
        cpp_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        if cpp_name.endswith("_"):
            cpp_args = list(args)  # in place: the views themselves (layout, overlap)
        with pytest.raises(RuntimeError, match=name):
            getattr(_C, cpp_name)(*cpp_args)
