"""BatchNorms that carry their activation (timm's ``BatchNormAct2d`` / ``SyncBatchNormAct``,
recognised by structure), BatchNorms fused alone, and a report that accounts for every
BatchNorm and every activation reading one (issue 21, items 2-3).

Each model is compared in fp64 with its unconverted self: outputs, every gradient,
running statistics through SGD steps, then eval (tests/test_graph_convert.py's
``_assert_parity``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from resnet_fused.graph_convert import is_norm_act
from tests.test_graph_convert import _assert_parity, _batch_norm_ops


class BNAct(nn.BatchNorm2d):
    """A norm-act layer written as timm writes its own: nn.BatchNorm2d's forward, then
    ``drop``, then ``act`` (no timm import: the converter goes by structure)."""

    def __init__(self, c, act=nn.ReLU, drop=None):
        super().__init__(c)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if isinstance(act, nn.Module) else act()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def _randomise(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


class ConvNormAct(nn.Module):
    def __init__(self, cin, cout, act=nn.ReLU, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = BNAct(cout, act)

    def forward(self, x):
        return self.bn(self.conv(x))


class PreActBlock(nn.Module):
    """ResNetV2 order: BN->act->conv, the residual added after the convolutions."""

    def __init__(self, c, act=nn.ReLU):
        super().__init__()
        self.norm1 = BNAct(c, act)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.norm2 = BNAct(c, act)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)

    def forward(self, x):
        return self.conv2(self.norm2(self.conv1(self.norm1(x)))) + x


class PostActBlock(nn.Module):
    """timm's ResNet-style block built from norm-act layers: the last one without its
    activation (apply_act=False), then add, then ReLU."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = ConvNormAct(c, c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = BNAct(c, nn.Identity)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.conv1(x))) + x)


def _net(act=nn.ReLU):
    torch.manual_seed(0)
    return _randomise(
        nn.Sequential(
            ConvNormAct(3, 6, act, stride=2),
            PostActBlock(6),
            PreActBlock(6, act),
            BNAct(6, act),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 3),
        )
    ).double()


def _convert(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resnet_fused.convert(model, backend="cpu", **kwargs)


def _bn_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _accounted_once(model, report):
    """Each BatchNorm of ``model`` named in exactly one report entry (as a module of a
    fused site, or as a module left alone)."""
    for name in _bn_names(model):
        fused = [e for e in report["fused"] if name in e.split(" (")[0].split(", ")]
        left = [e for e in report["not_fused"] if e.startswith(f"{name}: ")]
        assert len(fused) + len(left) == 1, (name, fused, left)


def test_norm_act_is_recognised_by_structure():
    assert is_norm_act(BNAct(4)) and is_norm_act(BNAct(4, nn.SiLU))
    assert not is_norm_act(nn.BatchNorm2d(4))

    class Other(nn.BatchNorm2d):  # a subclass with other children: not a norm-act layer
        def __init__(self):
            super().__init__(4)
            self.scale = nn.Identity()

    assert not is_norm_act(Other())
    assert is_norm_act(timm.layers.BatchNormAct2d(4))
    synced = timm.layers.convert_sync_batchnorm(nn.Sequential(timm.layers.BatchNormAct2d(4)))
    assert type(synced[0]).__name__ == "SyncBatchNormAct" and is_norm_act(synced[0])


@pytest.mark.parametrize(
    "act", [nn.ReLU, nn.SiLU, nn.Hardswish, nn.Identity, lambda: nn.LeakyReLU(0.1), nn.Mish],
    ids=["relu", "silu", "hardswish", "identity", "leaky", "mish"],
)  # fmt: skip
def test_norm_act_models_fuse_every_batchnorm_with_parity(act):
    model = _net(act)
    converted = _convert(model)
    x = torch.randn(3, 3, 10, 10, dtype=torch.float64)
    assert _batch_norm_ops(model.train(), x) > 0
    for training in (True, False):
        assert _batch_norm_ops(converted.train(training), x) == 0
    report = resnet_fused.conversion_report(converted)
    _accounted_once(model, report)
    fused = " ".join(report["fused"])
    assert "0.conv, 0.bn" in fused and "1.conv2, 1.bn2, 1.act (conv-bn-add-relu)" in fused
    acts = [e for e in report["not_fused"] if ".act:" in e]
    if act is not nn.Mish:  # fused with their BatchNorm
        assert acts == []
    else:  # every activation a norm-act layer applies that the kernels do not, accounted
        assert len(acts) == 4 and all("runs as its own pass" in e for e in acts)
    _assert_parity(model, converted, x)


def test_frozen_norm_act_layers_and_fine_tuning():
    model = _net(nn.SiLU)
    converted = _convert(model)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    _assert_parity(model, converted, x, frozen_bn=True)


def test_norm_act_read_at_call_time():
    """The norm-act layer's drop and act are read at every call: replaced, hooked or
    put in training mode on their own, the converted model does what the module does."""
    model = _net()
    converted = _convert(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    def same():
        for m in (model, converted):
            m.eval()
        with torch.no_grad():
            torch.testing.assert_close(converted(x), model(x), rtol=1e-12, atol=1e-12)

    same()
    for m in (model, converted):  # surgery on the act of a fused conv-bn-relu site
        m[0].bn.act = nn.SiLU()
        m[1].bn2.act = nn.Tanh()  # an act inside a conv-bn-add-relu site
        m[2].norm2.drop = nn.Dropout(0.0)
    same()
    calls = []
    converted[3].act.register_forward_hook(lambda *a: calls.append(1))
    same()
    assert calls == [1]
    assert any("hooks" in e for e in resnet_fused.conversion_report(converted)["not_fused"])


def test_activation_after_a_plain_batchnorm_is_reported():
    """torchvision's Conv2dNormActivation (Conv2d, BatchNorm2d, activation): the
    convolution, BatchNorm and activation fused when the kernels apply the activation;
    otherwise the activation listed as not fused with it, with the reason (one the
    kernels do not apply; a BatchNorm output with two users)."""
    from torchvision.ops.misc import Conv2dNormActivation

    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dNormActivation(3, 4, activation_layer=nn.Hardswish),
        Conv2dNormActivation(4, 4, activation_layer=nn.ReLU6),
        Conv2dNormActivation(4, 4, activation_layer=nn.ReLU),
        Conv2dNormActivation(4, 4, activation_layer=nn.Mish),
    ).double()

    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _randomise(model)
            self.bn = nn.BatchNorm2d(4).double()
            self.bn2 = nn.BatchNorm2d(4).double()

        def forward(self, x):
            y = self.bn2(F.elu(self.bn(self.body(x))))
            return F.silu(y) + y

    full = _randomise(Fn()).double()
    converted = _convert(full)
    report = resnet_fused.conversion_report(converted)
    assert sorted(report["fused"]) == [
        "bn (bn)",
        "bn2 (bn)",
        "body.0.0, body.0.1, body.0.2 (conv-bn-hardswish)",
        "body.1.0, body.1.1, body.1.2 (conv-bn-relu6)",
        "body.2.0, body.2.1, body.2.2 (conv-bn-relu)",
        "body.3.0, body.3.1 (conv-bn)",
    ]
    kernels = (
        "the fused kernels apply ReLU, ReLU6, LeakyReLU, SiLU, Hardswish, GELU and Sigmoid, "
        "as torch's own modules and functions"
    )
    assert sorted(report["not_fused"]) == [
        f"body.3.2: left alone: body.3.2 (Mish) after body.3.1 runs as its own pass ({kernels})",
        f"elu: left alone: elu (elu) after bn runs as its own pass ({kernels})",
        "silu: left alone: not fused with bn2: its output has 2 users",
    ]
    _accounted_once(full, report)
    _assert_parity(full, converted, torch.randn(2, 3, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("name", ["resnetv2_50", "efficientnet_b0", "regnety_002"])
def test_timm_norm_act_models_have_no_eager_batchnorm(name):
    """timm models built from BatchNormAct2d: every BatchNorm fused (none left as an
    eager batch_norm op, training or eval), each accounted once, outputs as eager's."""
    torch.manual_seed(0)
    model = _randomise(timm.create_model(name, pretrained=False, num_classes=4))
    converted = _convert(copy.deepcopy(model))
    report = resnet_fused.conversion_report(converted)
    _accounted_once(model, report)
    x = torch.randn(2, 3, 32, 32)
    for training in (True, False):
        assert _batch_norm_ops(converted.train(training), x) == 0
    model.eval(), converted.eval()
    with torch.no_grad():
        ref = model.double()(x.double())
        out = converted.double()(x.double())
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


class FrozenNet(nn.Module):
    """A detection-style backbone piece: frozen BatchNorms (torchvision's, and timm's
    with its activation), the convolutions trained."""

    def __init__(self, act=nn.SiLU):
        super().__init__()
        from torchvision.ops.misc import FrozenBatchNorm2d

        self.conv1 = nn.Conv2d(3, 5, 3, 1, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(5)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(5, 5, 3, 1, 1, bias=False)
        self.bn2 = timm.layers.FrozenBatchNormAct2d(5, act_layer=act)
        self.bn3 = timm.layers.FrozenBatchNormAct2d(5, act_layer=nn.ReLU)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2, self.bn3):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.bn3(self.bn2(self.conv2(y)) + y)


@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU], ids=["silu", "relu"])
def test_frozen_batchnorms_fused_as_eval_batchnorms(act):
    torch.manual_seed(0)
    model = FrozenNet(act).double()
    converted = _convert(model)
    report = resnet_fused.conversion_report(converted)
    silu = act is nn.SiLU
    assert report["fused"] == [
        "conv1, bn1, relu (conv-bn-relu)",
        "conv2, bn2, bn2.act (conv-bn-silu)" if silu else "conv2, bn2, bn2.act (conv-bn-relu)",
        "bn3, bn3.act (bn-relu)",
    ]
    assert report["not_fused"] == []
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    out, ref = converted(x), model(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, *converted.parameters()], g)
    want = torch.autograd.grad(ref, [x, *model.parameters()], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert _batch_norm_ops(converted, x.detach()) == 0
    for m in (model, converted):  # a non-tensor input: eager's own error in both
        with pytest.raises(TypeError, match="invalid combination of arguments"):
            m([[1.0]])
    # under autocast eager promotes to the frozen buffers' fp32: so does the converted model
    model, converted = model.float(), converted.float()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        a, b = converted(x.float()), model(x.float())
    assert a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
