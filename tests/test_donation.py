"""Residuals given up by a converted model's forward (graph_convert._donations): the last
fused unit that adds a value as its residual writes its result into that value's memory
(oneDNN's in-place fused convolution) where nothing else can see the value. These tests
check the results against the fp64 reference, that the in-place path really runs, and
that no tensor a user can hold (the model's input, returned features, tensors a hook
kept, one-shot hooks included) is ever overwritten."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from reference_check import FLOOR
from test_resnet import _randomise_bn
from torch import nn

import resnet_fused
from resnet_fused.bench.tutorial import TutorialResNet
from resnet_fused.functional import conv_bn_act as cba

pytestmark = pytest.mark.skipif(
    cba._mkldnn_pointwise_ is None, reason="this torch build has no oneDNN fused convolution"
)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":  # torchvision's blocks: fused block classes, called by the graph
        model = torchvision.models.resnet18(num_classes=10)
    else:  # a user-written ResNet: fused sites inlined in the graph
        model = TutorialResNet(
            (2, 2, 1, 1), widths=(8, 16, 16, 32), num_classes=10, small_input=True
        )
    _randomise_bn(model)
    return model.eval()


class _InPlaceSpy:
    """Counts the calls of oneDNN's in-place fused convolution (the donated path)."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def binary(self, *args):
        self.calls += 1
        return self.op.binary(*args)


@pytest.fixture
def in_place_calls(monkeypatch):
    spy = _InPlaceSpy(cba._mkldnn_pointwise_)
    monkeypatch.setattr(cba, "_mkldnn_pointwise_", spy)
    return spy


def _fmt(layout: str):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["resnet18", "tutorial"])
def test_donated_residuals_match_the_reference(name, layout, in_place_calls):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    model = _model(name)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        eager = model(x)
    fmt = _fmt(layout)
    fused = resnet_fused.convert(model.to(memory_format=fmt), backend="cpu")
    xi = x.to(memory_format=fmt)
    kept = xi.clone()
    eager_err = (eager.double() - ref).abs().max().item()
    bound = 2 * eager_err + FLOOR[torch.float32] * max(ref.abs().max().item(), 1.0)
    with torch.no_grad():
        for _ in range(3):  # the first call plans; later ones give residuals up
            out = fused(xi)
            assert (out.double() - ref).abs().max().item() <= bound
    assert in_place_calls.calls > 0
    assert torch.equal(xi, kept)  # the model's input is never a donated value


def _donating_model(name):
    fused = resnet_fused.convert(_model(name).to(memory_format=torch.channels_last), backend="cpu")
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        fused(x)  # planned
    return fused, x


@pytest.mark.parametrize(
    "where",
    [
        "block output, one-shot hook",  # the producer block's own forward hook
        "block's relu, one-shot hook",  # a hook inside the producer block
        "next block's input, one-shot pre-hook",  # the consumer block's pre-hook
        "block output, kept hook",
    ],
)
def test_tensors_hooks_hold_are_never_overwritten(where, in_place_calls):
    fused, x = _donating_model("resnet18")
    kept = {}

    def keep(name, t, handle_box):
        kept[name] = (t, t.clone())
        if "one-shot" in where:
            handle_box[0].remove()

    box = [None]
    if where.startswith("block output"):
        box[0] = fused.layer1[1].register_forward_hook(lambda m, i, o: keep("out", o, box))
    elif where.startswith("block's relu"):
        box[0] = fused.layer2[0].relu.register_forward_hook(lambda m, i, o: keep("out", o, box))
    else:
        box[0] = fused.layer2[1].register_forward_pre_hook(lambda m, i: keep("in", i[0], box))
    with torch.no_grad():
        fused(x)
    ((held, at_the_time),) = kept.values()
    assert torch.equal(held, at_the_time)
    assert in_place_calls.calls > 0  # the other blocks still gave their residuals up


def test_fused_site_reader_with_hook_voids_the_donation(in_place_calls):
    """In a traced-through ResNet a block's input is read by its first fused site and
    added by its last one: a hook on the first site's convolution sees the input, which
    must then stay as it was."""
    fused, x = _donating_model("tutorial")
    kept = []
    handle = None

    def pre(m, inputs):
        kept.append((inputs[0], inputs[0].clone()))
        handle.remove()  # one-shot: gone before the residual's last use

    handle = fused.layer2[1].conv1.register_forward_pre_hook(pre)
    with torch.no_grad():
        fused(x)
    ((held, at_the_time),) = kept
    assert torch.equal(held, at_the_time)


class _Features(nn.Module):
    """Returns an intermediate value that is also a later block's residual."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        a = m.layer1[0](x)  # layer1[1] adds its input as its residual
        b = m.layer2(m.layer1[1](a))
        return a, b


def test_returned_features_are_never_overwritten(in_place_calls):
    torch.manual_seed(2)
    model = _Features(_model("resnet18")).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        a_ref, b_ref = model(x)
    fused = resnet_fused.convert(model, backend="cpu")
    with torch.no_grad():
        fused(x)
        a, b = fused(x)
    assert torch.allclose(a, a_ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(b, b_ref, atol=1e-4, rtol=1e-4)
    assert in_place_calls.calls > 0


def test_no_donation_with_autograd_or_in_training(in_place_calls):
    fused, x = _donating_model("resnet18")
    fused(x).sum().backward()  # eval with autograd: the differentiable fold
    fused.train()
    fused(x).sum().backward()
    assert in_place_calls.calls == 0
