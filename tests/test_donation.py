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
from resnet_fused.graph_convert import fused_conv_bn

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


CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.fixture(params=sorted(CONTEXTS))
def context(request):
    """Both inference contexts: under inference_mode the values have no version counter,
    and the marks hold for values private to the generated forward only."""
    return CONTEXTS[request.param]


def _fmt(layout: str):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["resnet18", "tutorial"])
def test_donated_residuals_match_the_reference(name, layout, dtype, context, in_place_calls):
    """fp32, and bf16 where this CPU runs oneDNN bf16 (elsewhere bf16 takes aten's
    convolution and nothing is given up: the results are still checked). bf16 NCHW
    gives nothing up either: its add+ReLU units do not take oneDNN's fused convolution
    (_mkldnn_ok: its binary post-op falls back to an aten add_relu without bf16), and an
    NCHW model's activations stay NCHW (the reordered weight, which makes oneDNN write
    channels_last, is kept for channels_last inputs only)."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    model = _model(name)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        model = model.to(dtype)
        eager = model(x.to(dtype))
    fmt = _fmt(layout)
    fused = resnet_fused.convert(model.to(memory_format=fmt), backend="cpu")
    xi = x.to(dtype=dtype, memory_format=fmt)
    kept = xi.clone()
    eager_err = (eager.double() - ref).abs().max().item()
    bound = 2 * eager_err + FLOOR[dtype] * max(ref.abs().max().item(), 1.0)
    with context():
        for _ in range(3):  # the first call plans; later ones give residuals up
            out = fused(xi)
            assert (out.double() - ref).abs().max().item() <= bound
    bf16_nchw = dtype == torch.bfloat16 and layout == "nchw"
    assert (in_place_calls.calls > 0) == (cba._onednn_supports(dtype) and not bf16_nchw)
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
def test_tensors_hooks_hold_are_never_overwritten(where, context, in_place_calls):
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
    with context():
        fused(x)
    ((held, at_the_time),) = kept.values()
    assert torch.equal(held, at_the_time)
    assert in_place_calls.calls > 0  # the other blocks still gave their residuals up


def test_fused_site_reader_with_hook_voids_the_donation(context, in_place_calls):
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
    with context():
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


class _FourUnits(nn.Module):
    """A residual added with no activation after it (as MobileNetV2's), whose sum the
    next unit reads: the value given up is read again through the sum."""

    def __init__(self) -> None:
        super().__init__()
        for i, c_in in enumerate((3, 8, 8, 8)):
            setattr(self, f"c{i}", nn.Conv2d(c_in, 8, 3, padding=1, bias=False))
            setattr(self, f"b{i}", nn.BatchNorm2d(8))

    def forward(self, x):
        a = torch.relu(self.b0(self.c0(x)))
        h = torch.relu(self.b1(self.c1(a)))
        c = self.b2(self.c2(h)) + a  # a given up here
        return torch.relu(self.b3(self.c3(c)))


def test_nan_written_into_a_donated_residual_reaches_the_output(context, in_place_calls):
    """The in-place convolution leaves the residual's version counter as it was: unless
    the counter is bumped, the residual's "known finite" mark survives the NaN written
    into it, and the next unit's ReLU post-op turns the NaN into 0."""
    torch.manual_seed(0)
    model = _FourUnits()
    _randomise_bn(model)
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 8, 8).to(memory_format=torch.channels_last)
    fused = resnet_fused.convert(copy.deepcopy(model), backend="cpu")
    with torch.no_grad():
        for m in (model, fused):
            m.c1.weight[0, 0, 0, 0] = float("nan")
    with context():
        fused(x), fused(x)
        ref, out = model(x), fused(x)
    assert in_place_calls.calls > 0
    assert ref.isnan().any()
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-4, atol=1e-4)


def test_grad_enabled_eval_never_overwrites_what_autograd_saved(in_place_calls):
    """Eval with autograd on and the model partly frozen: a trainable site saves its input
    ``a`` for its backward; a frozen unit adding ``a`` last as its residual records
    nothing itself, but must not overwrite it."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

        def forward(self, x):
            a = torch.relu(self.b0(self.c0(x)))
            h = torch.relu(self.b1(self.c1(a)))
            return h, torch.relu(self.b2(self.c2(x)) + a)

    torch.manual_seed(0)
    model = Model()
    _randomise_bn(model)
    model = model.eval().to(memory_format=torch.channels_last)
    model.requires_grad_(False)
    model.c1.weight.requires_grad_(True)
    x = torch.randn(1, 3, 8, 8).to(memory_format=torch.channels_last)
    fused = resnet_fused.convert(copy.deepcopy(model), backend="cpu")
    for _ in range(3):
        fused.c1.weight.grad = None
        h, c = fused(x)
        (h.sum() + c.sum()).backward()
    h0, c0 = model(x)
    (h0.sum() + c0.sum()).backward()
    torch.testing.assert_close(fused.c1.weight.grad, model.c1.weight.grad, rtol=1e-4, atol=1e-4)
    assert in_place_calls.calls == 0


def test_graph_module_edited_after_conversion(in_place_calls, monkeypatch):
    """A converted GraphModule's graph is the user's to edit: a pass that also returns a
    value a unit adds as its residual must get that value as it was."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = _model("resnet18").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    gm = resnet_fused.convert(create_feature_extractor(model, {"layer4": "d"}), backend="cpu")
    gm.eval()
    site = next(  # a unit adding the output of another fused unit: one that gives it up
        n
        for n in gm.graph.nodes
        if n.target is fused_conv_bn and getattr(n.args[3], "target", None) is fused_conv_bn
    )
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ({**output.args[0], "extra": site.args[3]},)
    gm.recompile()
    with torch.no_grad():
        gm(x)
        got = gm(x)
        monkeypatch.setattr(cba, "_can_overwrite", lambda residual, x: False)
        ref = gm(x)  # the same graph, nothing overwritten
    torch.testing.assert_close(got["extra"], ref["extra"], rtol=0, atol=0)


def test_a_block_subclass_forward_is_called():
    """A subclass of a fused block with its own forward (or a patched class) runs that
    forward from a converted model, as nn.Module.__call__ would."""
    from resnet_fused.resnet import FusedBasicBlock

    class Scaled(FusedBasicBlock):
        def forward(self, x):
            return super().forward(x) * 0.5

    resnet = _model("resnet18").to(memory_format=torch.channels_last)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = resnet.layer1[0].conv1, resnet.layer1[0].bn1
            self.b1 = Scaled.from_block(resnet.layer1[0], backend="cpu")
            self.b2 = Scaled.from_block(resnet.layer1[1], backend="cpu")

        def forward(self, x):
            return self.b2(self.b1(torch.relu(self.bn(self.conv(x)))))

    model = Model().eval()
    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        fused = resnet_fused.convert(copy.deepcopy(model), backend="cpu")
        fused(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-4)


def test_nan_a_hook_writes_into_a_private_value_reaches_the_output(context):
    """A hook on a fused site's convolution writes a NaN into the site's input (after the
    convolution read it), a value private to the generated forward that a later unit
    adds as its residual: the site runs through its modules, which voids the value's
    marks, so the later unit reads it again and keeps the NaN (oneDNN's ReLU post-op
    would make it 0)."""
    model = _model("tutorial").to(memory_format=torch.channels_last)
    fused = resnet_fused.convert(copy.deepcopy(model), backend="cpu")
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with context():
        fused(x), fused(x)

    def poison(m, inputs, output):
        inputs[0][0, :, 1, 1] = float("nan")

    for m in (model, fused):
        m.layer2[1].conv1.register_forward_hook(poison)
    with context():
        ref, out = model(x), fused(x)
    assert ref.isnan().any()
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-4, atol=1e-4)


def test_inference_mode_reads_no_more_inputs_than_no_grad(monkeypatch):
    """The units prove their inputs finite by marks, reading a tensor (a sum) only where
    no mark holds: under inference_mode the marks of values private to the forward (the
    graph's and those inside a fused block) count, so a converted ResNet-50 reads as few
    tensors as under no_grad (the network's input and the pooling's output)."""
    model = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    fused = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last)
    reads = []
    real = cba._non_finite
    monkeypatch.setattr(cba, "_non_finite", lambda *ts: reads.append(len(ts)) or real(*ts))
    counts = {}
    for name, context in CONTEXTS.items():
        with context():
            fused(x), fused(x)
            reads.clear()
            fused(x)
        counts[name] = len(reads)
    assert counts["inference_mode"] == counts["no_grad"] <= 3, counts
