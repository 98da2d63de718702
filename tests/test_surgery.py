"""Model surgery after ``convert`` (issue 20, item 4): a submodule replaced (or changed in
place) after conversion is used as the user put it, or its part runs unfused with a
warning; never a silent wrong answer, never a crash. Each case applies the same surgery
to the unconverted and to the converted model and compares them in fp64 on the CPU:
outputs, every gradient, running statistics and training flags (or the exception).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from test_convert_semantics import _assert_same, _randomise
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused
from resnet_fused.resnet import FoldedBatchNorm2d, FoldedReLU, FusedStemConv2d, _share_bn


@pytest.fixture(autouse=True)
def _fused_kernels(monkeypatch):
    """The fused kernels, not ``auto``'s eager pick."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", "fused")


def _resnet18():
    return _randomise(torchvision.models.resnet18(num_classes=5).double())


def _bottleneck_resnet():
    return _randomise(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5).double())


def _convert(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torchvision ResNet converts without a warning
        return resnet_fused.convert(model, backend="cpu")


def _new(module: nn.Module, seed: int = 1) -> nn.Module:
    """A new fp64 module with non-trivial state (BatchNorm statistics randomised)."""
    return _randomise(module.double(), seed)


def _frozen_bn(n: int) -> FrozenBatchNorm2d:
    bn = FrozenBatchNorm2d(n)
    gen = torch.Generator().manual_seed(3)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).copy_(torch.rand(n, generator=gen) + 0.5)
    return bn.double()


# --- the surgeries --------------------------------------------------------------------------
# Each takes a model and returns the model to compare (the same one unless the surgery
# returns a copy, as torch.ao.quantization.fuse_modules does). Modules are made under a
# fixed seed, so the unconverted and the converted model get the same ones.


def _stem_grayscale(m):
    torch.manual_seed(1)
    m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False).double()
    return m


def _stem_new_bn(m):
    m.bn1 = _new(nn.BatchNorm2d(64))
    return m


def _stem_relu_silu(m):
    m.relu = nn.SiLU()
    return m


def _stem_bn_identity(m):
    m.bn1 = nn.Identity()
    return m


def _stem_bn_frozen(m):
    m.bn1 = _frozen_bn(64)
    return m


def _stem_bn_groupnorm(m):
    m.bn1 = nn.GroupNorm(4, 64).double()
    return m


def _block_relu_silu(m):
    m.layer1[0].relu = nn.SiLU()
    m.layer3[0].relu = nn.Hardswish()
    return m


def _block_bn_identity(m):
    m.layer1[0].bn1 = nn.Identity()
    return m


def _block_bn_frozen(m):
    m.layer2[0].bn2 = _frozen_bn(m.layer2[0].bn2.num_features)
    return m


def _block_bn_groupnorm(m):
    m.layer1[1].bn2 = nn.GroupNorm(4, m.layer1[1].bn2.num_features).double()
    return m


def _block_bn_subclass(m):
    class MyBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 0.5

    bn = m.layer1[0].bn1
    new = MyBatchNorm(bn.num_features).double()
    new.load_state_dict(bn.state_dict())
    m.layer1[0].bn1 = new
    return m


def _block_conv_reshaped(m):
    torch.manual_seed(1)
    m.layer1[0].conv1 = nn.Conv2d(64, 64, 3, padding=1).double()  # with a bias
    return m


def _block_conv_narrower(m):
    torch.manual_seed(1)
    b = m.layer1[0]
    b.conv1 = nn.Conv2d(64, 32, 3, padding=1, bias=False).double()
    b.bn1 = _new(nn.BatchNorm2d(32))
    b.conv2 = nn.Conv2d(32, 64, 5, padding=2, bias=False).double()
    return m


def _block_conv_reflect(m):
    m.layer1[1].conv2.padding_mode = "reflect"  # changed in place
    torch.manual_seed(1)
    m.layer2[1].conv1 = nn.Conv2d(128, 128, 3, padding=1, bias=False, padding_mode="circular")
    m.layer2[1].conv1.double()
    return m


def _block_conv_same_even(m):
    torch.manual_seed(1)
    m.layer1[0].conv1 = nn.Conv2d(64, 64, 4, padding="same", bias=False).double()
    return m


def _block_conv_subclass(m):
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x).tanh()

    torch.manual_seed(1)
    m.layer2[0].conv1 = MyConv(64, 128, 3, 2, 1, bias=False).double()
    return m


def _downsample_avgpool(m):
    torch.manual_seed(1)
    m.layer2[0].downsample = nn.Sequential(
        nn.AvgPool2d(2), nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128)
    ).double()
    _randomise(m.layer2[0].downsample, 2)
    return m


def _downsample_fresh(m):
    torch.manual_seed(1)
    m.layer3[0].downsample = nn.Sequential(
        nn.Conv2d(128, 256, 3, 2, 1, bias=False), nn.BatchNorm2d(256)
    ).double()
    _randomise(m.layer3[0].downsample, 2)
    return m


def _downsample_item(m):
    m.layer4[0].downsample[1] = _frozen_bn(512)
    return m


def _downsample_conv_only(m):
    torch.manual_seed(1)
    m.layer2[0].downsample = nn.Conv2d(64, 128, 1, 2).double()
    return m


def _fc_head(m):
    torch.manual_seed(1)
    width = m.fc.in_features
    m.fc = nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 5))
    m.fc.double()
    return m


def _appended_block(m):
    """A block added to a stage (the ResNet's converted forward traces through the stages)."""
    torch.manual_seed(1)
    m.layer1.append(_new(BasicBlock(64, 64)))
    return m


def _whole_block(m):
    torch.manual_seed(1)
    if isinstance(m.layer1[0], (BasicBlock, resnet_fused.FusedBasicBlock)):
        m.layer1[1] = _new(BasicBlock(64, 64))
    else:
        m.layer2[0] = _new(Bottleneck(256, 128, 2, nn.Sequential(
            nn.Conv2d(256, 512, 1, 2, bias=False), nn.BatchNorm2d(512))))  # fmt: skip
    return m


def _block_fuse_conv_bn_eval(m):
    b = m.layer1[0]
    b.conv1 = fuse_conv_bn_eval(b.conv1, b.bn1)
    b.bn1 = nn.Identity()
    return m


def _stem_fuse_conv_bn_eval(m):
    m.conv1 = fuse_conv_bn_eval(m.conv1, m.bn1)
    m.bn1 = nn.Identity()
    return m


def _fuse_modules_stem_and_block(m):
    return torch.ao.quantization.fuse_modules(
        m.eval(), [["conv1", "bn1", "relu"], ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu"]]
    )


def _fuse_modules_in_place(m):
    torch.ao.quantization.fuse_modules(
        m.eval(),
        [["conv1", "bn1", "relu"], ["layer2.0.conv1", "layer2.0.bn1", "layer2.0.relu"]],
        inplace=True,
    )
    return m


def _fuse_modules_blocks(m):
    return torch.ao.quantization.fuse_modules(
        m.eval(),
        [["layer1.0.conv1", "layer1.0.bn1"], ["layer2.1.conv2", "layer2.1.bn2"],
         ["layer2.0.downsample.0", "layer2.0.downsample.1"]],
    )  # fmt: skip


def _fuse_modules_qat_block(m):
    return torch.ao.quantization.fuse_modules_qat(
        m.train(), [["layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu"]]
    )


def _bottleneck_surgery(m):
    torch.manual_seed(1)
    b = m.layer1[0]
    b.relu = nn.SiLU()
    m.layer2[0].bn2 = nn.GroupNorm(4, m.layer2[0].bn2.num_features).double()
    c = m.layer3[0].conv2
    m.layer3[0].conv2 = nn.Conv2d(c.in_channels, c.out_channels, 3, 2, 1, groups=2, bias=False)
    m.layer3[0].conv2.double()  # a grouped conv: still fused
    m.layer4[0].downsample[1] = nn.Identity()
    return m


# (surgery, model, modes, input channels). Blocks and the stem are checked separately: a
# fused block checks its modules' types at call time (resnet.py); the stem is a fused site
# of the ResNet's converted forward (graph_convert.py).
_BLOCK_CASES = {
    "block_relu_silu": (_block_relu_silu, _resnet18),
    "block_bn_identity": (_block_bn_identity, _resnet18),
    "block_bn_frozen": (_block_bn_frozen, _resnet18),
    "block_bn_groupnorm": (_block_bn_groupnorm, _resnet18),
    "block_bn_subclass": (_block_bn_subclass, _resnet18),
    "block_conv_reshaped": (_block_conv_reshaped, _resnet18),
    "block_conv_narrower": (_block_conv_narrower, _resnet18),
    "block_conv_reflect": (_block_conv_reflect, _resnet18),
    "block_conv_same_even": (_block_conv_same_even, _resnet18),
    "block_conv_subclass": (_block_conv_subclass, _resnet18),
    "downsample_avgpool": (_downsample_avgpool, _resnet18),
    "downsample_fresh": (_downsample_fresh, _resnet18),
    "downsample_item": (_downsample_item, _resnet18),
    "downsample_conv_only": (_downsample_conv_only, _resnet18),
    "fc_head": (_fc_head, _resnet18),
    "whole_block": (_whole_block, _resnet18),
    "appended_block": (_appended_block, _resnet18),
    "bottleneck": (_bottleneck_surgery, _bottleneck_resnet),
    "bottleneck_fc_head": (_fc_head, _bottleneck_resnet),
    "bottleneck_whole_block": (_whole_block, _bottleneck_resnet),
    "bottleneck_relu_silu": (_block_relu_silu, _bottleneck_resnet),
}
_STEM_CASES = {
    "stem_grayscale": (_stem_grayscale, _resnet18),
    "stem_new_bn": (_stem_new_bn, _resnet18),
    "stem_relu_silu": (_stem_relu_silu, _resnet18),
    "stem_bn_identity": (_stem_bn_identity, _resnet18),
    "stem_bn_frozen": (_stem_bn_frozen, _resnet18),
    "stem_bn_groupnorm": (_stem_bn_groupnorm, _resnet18),
    "bottleneck_stem_grayscale": (_stem_grayscale, _bottleneck_resnet),
    "bottleneck_stem_bn_frozen": (_stem_bn_frozen, _bottleneck_resnet),
}
_EVAL_CASES = {  # torch's eval-mode fusion utilities
    "block_fuse_conv_bn_eval": (_block_fuse_conv_bn_eval, _resnet18),
    "stem_fuse_conv_bn_eval": (_stem_fuse_conv_bn_eval, _resnet18),
    "fuse_modules_stem_and_block": (_fuse_modules_stem_and_block, _resnet18),
    "fuse_modules_blocks": (_fuse_modules_blocks, _resnet18),
    "fuse_modules_in_place": (_fuse_modules_in_place, _resnet18),
}


def _x(channels: int = 3) -> torch.Tensor:
    """2 x channels x 48 x 48: at 32 x 32, layer4's BatchNorms in training see two values
    per channel, whose gradients are so ill-conditioned that two fp64 summation orders
    differ by ~1e-9 of their scale (the unconverted model against itself reordered); at 48,
    eight values, ~1e-14."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, channels, 48, 48, dtype=torch.float64, generator=gen)


def _input(model: nn.Module) -> torch.Tensor:
    """An input for the model's stem (3 or, after a grayscale stem, 1 channel)."""
    conv = next(c for c in model.conv1.modules() if isinstance(c, nn.Conv2d))
    return _x(conv.in_channels)


def _check(surgery, build, training: bool) -> nn.Module:
    """Converts, runs once (fold caches and plans filled), applies the surgery to both
    models, compares them; returns the converted model after surgery."""
    model = build().train(training)
    fused = _convert(model)
    x = _x()
    with torch.no_grad():
        model(x)
        fused(x)
    model = surgery(model).train(training)
    fused = surgery(fused).train(training)
    _assert_same(model, fused, _input(model))
    return fused


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(_BLOCK_CASES))
def test_block_surgery(case, training):
    surgery, build = _BLOCK_CASES[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = _check(surgery, build, training)
    report = resnet_fused.conversion_report(fused)
    unfused = [m for m in fused.modules() if isinstance(m, resnet_fused.resnet._FusedBlock)
               and m.why_unfused()]  # fmt: skip
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    # one warning per block running unfused (not one per call), naming the block
    assert len(runtime) == len(unfused), [str(w.message) for w in runtime]
    for block in unfused:
        assert any(block._name in str(w.message) for w in runtime), block._name
        assert any(e.startswith(f"{block._name}: ") and block.why_unfused() in e
                   for e in report["not_fused"]), report  # fmt: skip
    if case in ("block_conv_reshaped", "block_conv_narrower", "downsample_fresh", "fc_head"):
        assert not unfused and not [e for e in report["not_fused"] if "layer" in e], report
    if not case.startswith("bottleneck"):
        assert "conv1, bn1, relu (conv-bn-relu)" in report["fused"], report


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(_STEM_CASES))
def test_stem_surgery(case, training):
    """The stem's modules are read by the ResNet's converted forward at call time.
    (Replacing them by other types needs graph_convert's call-time type checks.)"""
    surgery, build = _STEM_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(surgery, build, training)


@pytest.mark.parametrize("case", list(_EVAL_CASES))
def test_torch_fusion_utilities(case):
    surgery, build = _EVAL_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(surgery, build, False)


def test_fuse_modules_qat_in_training():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(_fuse_modules_qat_block, _resnet18, True)


def test_fuse_modules_qat_stem_in_training():
    def surgery(m):
        return torch.ao.quantization.fuse_modules_qat(m.train(), [["conv1", "bn1", "relu"]])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(surgery, _resnet18, True)


# --- the stem's modules stay what they are ----------------------------------------------------


def test_stem_modules_stay_plain_and_fuse_as_a_site():
    model = _resnet18()
    fused = _convert(model)
    assert type(fused.conv1) is nn.Conv2d
    assert type(fused.bn1) is nn.BatchNorm2d and type(fused.relu) is nn.ReLU
    assert "conv1, bn1, relu (conv-bn-relu)" in resnet_fused.conversion_report(fused)["fused"]
    assert not resnet_fused.conversion_report(fused)["not_fused"]
    x = _x()
    for training in (True, False):
        model.train(training), fused.train(training)
        # conv1 alone is a convolution; torch's fusion of conv1 and bn1 is the plain one
        torch.testing.assert_close(fused.conv1(x), model.conv1(x), rtol=0, atol=0)
        if not training:
            ref = fuse_conv_bn_eval(model.conv1, model.bn1)(x)
            torch.testing.assert_close(
                fuse_conv_bn_eval(fused.conv1, fused.bn1)(x), ref, rtol=0, atol=1e-12
            )
        _assert_same(model, fused, x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_stem_conv_replaced_by_another_nn_conv2d(training):
    """The new conv (other input channels, stride, a bias) is what runs; the fold and the
    plan of the stem's site follow it."""
    model = _resnet18().train(training)
    fused = _convert(model)
    x = _x()
    for m in (model, fused):
        with torch.no_grad():
            m(x)
        torch.manual_seed(1)
        m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=True).double()
    _assert_same(model, fused, x)
    assert "conv1, bn1, relu (conv-bn-relu)" in resnet_fused.conversion_report(fused)["fused"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_conv_replaced_refolds_and_replans(training):
    """A conv replaced after the block's fold and plan were made (same shape and geometry,
    other weights; then another geometry): the block runs the new conv."""
    model = _resnet18().train(training)
    fused = _convert(model)
    x = _x()
    for new in (
        lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False),
        lambda: nn.Conv2d(64, 64, 3, padding=2, dilation=2, bias=True),
    ):
        for m in (model, fused):
            with torch.no_grad():
                m(x)
            torch.manual_seed(1)
            m.layer1[0].conv1 = new().double()
        _assert_same(model, fused, x)
    assert "layer1.0" in resnet_fused.conversion_report(fused)["fused"]


def test_block_surgery_warns_once_and_reports():
    model = _resnet18()
    fused = _convert(model)
    fused.layer1[0].relu = nn.SiLU()
    x = _x()
    with pytest.warns(RuntimeWarning, match=r"layer1\.0.*relu.*SiLU") as record:
        fused(x)
        fused(x)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    report = resnet_fused.conversion_report(fused)
    assert any(e.startswith("layer1.0: ") and "relu" in e and "SiLU" in e
               for e in report["not_fused"]), report  # fmt: skip
    assert "layer1.0" not in report["fused"] and "layer1.1" in report["fused"]
    fused.layer1[0].relu = nn.ReLU(inplace=True)  # fused again
    report = resnet_fused.conversion_report(fused)
    assert "layer1.0" in report["fused"] and not report["not_fused"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_unfuse_after_surgery(training):
    model = _resnet18()
    fused = _convert(model)
    model = _block_bn_groupnorm(_block_relu_silu(model)).train(training)
    fused = _block_bn_groupnorm(_block_relu_silu(fused)).train(training)
    plain = resnet_fused.unfuse(fused)
    assert not any(type(m).__module__.startswith("resnet_fused") for m in plain.modules())
    assert type(plain.layer1[0].relu) is nn.SiLU
    _assert_same(model, plain, _x())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "surgery",
    [
        lambda m: setattr(m.layer1[0], "bn2", nn.BatchNorm2d(32).double()),
        lambda m: setattr(m.layer1[0], "conv2", nn.Conv2d(64, 32, 3, padding=1).double()),
        lambda m: setattr(m.layer1[0], "conv2", nn.Conv2d(64, 64, 3, 2, 1).double()),
        lambda m: setattr(m.layer2[0].downsample[0], "stride", (1, 1)),
        lambda m: setattr(m.layer1[0], "conv1", nn.Conv2d(32, 64, 3, padding=1).double()),
        lambda m: setattr(m.layer2[0], "bn2", nn.BatchNorm2d(64).double()),
        lambda m: setattr(m.layer2[0], "downsample", None),
        lambda m: delattr(m.layer2[0], "downsample"),
        lambda m: delattr(m.layer1[0], "downsample"),
        lambda m: delattr(m.layer1[0], "relu"),
        lambda m: setattr(m.layer1[0].conv2, "weight", nn.Parameter(torch.randn(64, 64, 3, 3))),
    ],
    ids=[
        "bn_features", "residual_channels", "residual_stride", "downsample_stride", "conv_in",
        "last_bn_features_with_downsample", "downsample_none", "downsample_deleted",
        "no_downsample_deleted", "relu_deleted", "fp32_weight",
    ],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_surgery_that_no_longer_fits_raises_as_eager(surgery, training):
    """Channel counts or shapes that no longer fit: eager's exception, eager's state."""
    model = _resnet18().train(training)
    fused = _convert(model)
    x = _x()
    errors = []
    for m in (model, fused):
        torch.manual_seed(1)
        surgery(m)
        with pytest.raises(Exception) as info:  # (the same as eager's: below)
            m(x)
        errors.append(info.value)
    assert type(errors[1]) is type(errors[0])
    # (an AttributeError names the object's class: FusedBasicBlock for BasicBlock)
    assert str(errors[1]).replace("Fused", "") == str(errors[0])
    bufs = dict(fused.named_buffers())
    for k, b in model.named_buffers():
        torch.testing.assert_close(bufs[k], b, rtol=0, atol=1e-12, msg=k)


# --- old-style stems (converted by resnet_fused before the stem became a graph site) ------


def _old_style_stem(model: ResNet, backend: str = "cpu") -> ResNet:
    """What ``convert`` did to a ResNet's stem before: FusedStemConv2d + FoldedBatchNorm2d
    + FoldedReLU (models pickled then still hold these)."""
    bn = _share_bn(model.bn1, FoldedBatchNorm2d)
    relu = FoldedReLU()
    relu.inplace, relu.training = True, model.relu.training
    model.conv1 = FusedStemConv2d.from_modules(model.conv1, bn, relu, backend=backend)
    model.bn1, model.relu = bn, relu
    return model


def test_unfuse_undoes_an_old_style_stem():
    model = _resnet18().eval()
    old = _old_style_stem(copy.deepcopy(model))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(old(x), model(x), rtol=0, atol=1e-9)
    assert "conv1" in resnet_fused.conversion_report(old)["fused"]
    plain = resnet_fused.unfuse(old)
    assert type(plain.conv1) is nn.Conv2d and type(plain.bn1) is nn.BatchNorm2d
    assert type(plain.relu) is nn.ReLU and plain.relu.inplace
    _assert_same(model, plain, x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_that_broadcasts_runs_eager_ops(training):
    """A downsample giving a 1x1 residual, which eager broadcasts over the block's output
    (the fused unit takes only a residual of its output's shape): eager's operations run
    for that unit, with one warning, and conversion_report counts the calls."""
    model = _resnet18().train(training)
    fused = _convert(model)
    for m in (model, fused):
        torch.manual_seed(1)
        m.layer2[0].downsample[0] = nn.Conv2d(64, 128, 12, bias=False).double()  # 12x12 -> 1x1
    with pytest.warns(RuntimeWarning, match=r"layer2\.0.*residual") as record:
        _assert_same(model, fused, _x())
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    report = resnet_fused.conversion_report(fused)
    assert any(e.startswith("layer2.0: a fused unit ran as eager ops on 2 call(s)")
               for e in report["not_fused"]), report  # fmt: skip
