"""Every Triton launcher runs with its input's device made current (a Triton launch goes to
the current CUDA device's current stream: tensors on cuda:1 while cuda:0 is current must
not run on cuda:0)."""

from __future__ import annotations

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from resnet_fused import ops
from resnet_fused.triton import _common, conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_device_guard_enters_the_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with _common.device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _common.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]  # nothing entered for CPU tensors


def _op_calls():
    """(name, call) of every Triton custom op, on small valid inputs."""
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    r = torch.randn(2, 4, 5, 5, device=DEVICE)
    c = torch.rand(4, device=DEVICE) + 0.5
    w = torch.randn(3, 4, 3, 3, device=DEVICE)
    wp = conv.pack_weight(w)
    geo = ([3, 3], [1, 1], [1, 1], [1, 1])
    return [
        ("add_relu_triton", lambda: ops.add_relu_triton(x, r)),
        ("add_relu_triton_", lambda: ops.add_relu_triton_(x.clone(), r)),
        ("relu_backward_triton", lambda: ops.relu_backward_triton(r, x)),
        ("bn_stats_triton", lambda: ops.bn_stats_triton(x, c.clone(), c.clone(), 0.1)),
        (
            "bn_act_forward_triton",
            lambda: ops.bn_act_forward_triton(x, c, c, c, c, r, 1e-5, 1, 0.0),
        ),
        (
            "bn_act_backward_reduce_triton",
            lambda: ops.bn_act_backward_reduce_triton(r, x, c, c, c, c, None, 1e-5, 1, 0.0, True),
        ),
        (
            "bn_act_backward_elemt_triton",
            lambda: ops.bn_act_backward_elemt_triton(r, x, c, c, c, c, c, c, 1e-5, 1, 0.0, True),
        ),
        ("bias_act_triton", lambda: ops.bias_act_triton(x, c, r, 1, 0.0)),
        ("bias_act_triton_", lambda: ops.bias_act_triton_(x.clone(), c, r, 1, 0.0)),
        ("conv_bias_act_triton", lambda: ops.conv_bias_act_triton(x, wp, *geo, None, None, 1, 0.0)),
        (
            "conv_bn_stats_triton",
            lambda: ops.conv_bn_stats_triton(x, wp, *geo, c[:3].clone(), c[:3].clone(), 0.1),
        ),
    ]


@pytest.mark.parametrize("name", [name for name, _ in _op_calls()])
def test_every_triton_op_launches_under_the_input_device_guard(monkeypatch, name):
    call = dict(_op_calls())[name]
    guarded = []

    def spy(device):
        guarded.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(_common, "device_guard", spy)
    call()
    assert guarded, f"{name}: no launch entered the device guard"
    assert all(d == torch.device(DEVICE) for d in guarded), guarded


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_ops_on_the_second_gpu():
    """Inputs on cuda:1 while cuda:0 is current: results as eager's on cuda:1."""
    dev = torch.device("cuda", 1)
    with torch.cuda.device(0):
        x = torch.randn(2, 8, 6, 6, device=dev)
        r = torch.randn(2, 8, 6, 6, device=dev)
        out = ops.add_relu_triton(x, r)
        torch.testing.assert_close(out, torch.relu(x + r))
        mean, var = ops.bn_stats_triton(x, None, None, 0.1)
        torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)))
        torch.testing.assert_close(var, x.var(dim=(0, 2, 3), unbiased=False))
        w = torch.randn(4, 8, 3, 3, device=dev)
        y = ops.conv_bias_act_triton(
            x, conv.pack_weight(w), [3, 3], [1, 1], [1, 1], [1, 1], None, None, 0, 0.0
        )
        ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1).float()
        torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)  # TF32 by default
        assert torch.cuda.current_device() == 0
