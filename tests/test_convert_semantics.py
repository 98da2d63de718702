"""``convert`` (and ``unfuse``) never change what a model does (issue 20).

Each test compares a converted (or unfused) model with the unconverted one in fp64 on the
CPU: outputs, every gradient, running statistics and each module's ``training`` flag.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import resnet_fused
from resnet_fused.bench.tutorial import TutorialResNet

# --- comparison helpers ----------------------------------------------------------------------


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (fp64)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen, dtype=m.bias.dtype) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen, dtype=m.weight.dtype) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen, dtype=m.weight.dtype) + 0.5)
    return model


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b.detach().clone() for k, b in model.named_buffers()}


def _step(model: nn.Module, x: torch.Tensor, seed: int = 0):
    """One forward/backward (the RNG seeded first): output and every parameter's grad."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    if out.requires_grad:
        (out * weights).sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_same(model: nn.Module, other: nn.Module, x: torch.Tensor, *, steps: int = 2):
    """Flags before and after, outputs, gradients and buffers over ``steps`` steps."""
    assert _flags(other) == _flags(model)
    for step in range(steps):
        out_ref, grads_ref = _step(model, x, seed=step)
        out, grads = _step(other, x, seed=step)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-9)
        assert grads.keys() == grads_ref.keys()
        for k, g in grads_ref.items():
            scale = max(1.0, g.abs().max().item())
            torch.testing.assert_close(grads[k], g, rtol=0, atol=1e-9 * scale, msg=k)
        bufs, bufs_ref = _buffers(other), _buffers(model)
        assert bufs.keys() == bufs_ref.keys()
        for k, b in bufs_ref.items():
            torch.testing.assert_close(bufs[k], b, rtol=0, atol=1e-9, msg=k)
    assert _flags(other) == _flags(model)


def _convert(model: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resnet_fused.convert(model, **kwargs)


# --- 1. every module keeps its own training flag -----------------------------------------------


def _mixed_flags(model: nn.Module) -> nn.Module:
    """``model.train()``; every other BatchNorm in eval (frozen), and one container in eval
    whose children keep training (its own flag differs from theirs)."""
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns[::2]:
        bn.eval()
    containers = [
        m for m in model.modules() if len(m._modules) and not isinstance(m, nn.Sequential)
    ]
    containers[len(containers) // 2].training = False  # the flag alone, not its children's
    return model


def _frozen(model: nn.Module) -> nn.Module:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def _tv_resnet18():
    return torchvision.models.resnet18(num_classes=5)


def _timm_resnet18():
    return timm.create_model("resnet18", pretrained=False, num_classes=5)


def _tutorial():
    return TutorialResNet((1, 1, 1, 1), widths=(8, 16, 16, 32), num_classes=5)


_MODELS = {"torchvision": _tv_resnet18, "timm": _timm_resnet18, "tutorial": _tutorial}


@pytest.mark.parametrize("flags", ["frozen", "mixed"])
@pytest.mark.parametrize("how", ["convert", "convert-inplace", "unfuse"])
@pytest.mark.parametrize("arch", sorted(_MODELS))
def test_training_flags_survive_convert_and_unfuse(arch, how, flags):
    model = _randomise(_MODELS[arch]().double())
    (_frozen if flags == "frozen" else _mixed_flags)(model)
    reference = _randomise(_MODELS[arch]().double())
    reference.load_state_dict(model.state_dict())
    for (_, a), (_, b) in zip(reference.named_modules(), model.named_modules(), strict=True):
        a.training = b.training
    if how == "convert":
        other = _convert(model)
    elif how == "convert-inplace":
        other = _convert(model, inplace=True)
        assert other is model
    else:
        other = resnet_fused.unfuse(_convert(model))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _assert_same(reference, other, x)


def test_frozen_torchvision_blocks_stay_frozen():
    """The issue's report: all 20 BatchNorms of resnet18 stay in eval after convert."""
    model = _frozen(torchvision.models.resnet18().double())
    fused = _convert(model)
    bns = [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and not any(bn.training for bn in bns)
    assert not any(
        m.training for m in resnet_fused.unfuse(fused).modules() if isinstance(m, nn.BatchNorm2d)
    )


# --- 2. train and eval graphs that differ ------------------------------------------------------


class _TrainingBranch(nn.Module):
    """``if self.training:`` between two Conv+BN+ReLU sites ("add-relu": the branch holds a
    site of its own, so the two graphs call different fused functions)."""

    def __init__(self, branch: str) -> None:
        super().__init__()
        self.branch = branch
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        if self.training:
            x = x * 0.5
            if self.branch == "add-relu":
                x = torch.relu(x + x.flip(0))
        return self.relu(self.bn2(self.conv2(x)) + x)


@pytest.mark.parametrize("branch", ["scale", "add-relu"])
def test_training_branch_between_fused_sites(branch):
    model = _randomise(_TrainingBranch(branch).double())
    fused = _convert(model)
    report = resnet_fused.conversion_report(fused)["fused"]
    assert len(report) == (3 if branch == "add-relu" else 2)
    if branch == "add-relu":
        assert any("add-relu, training only" in s for s in report), report
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    for mode in (True, False, True):
        model.train(mode)
        fused.train(mode)
        _assert_same(model, fused, x)


class _LeafFlagBranch(nn.Module):
    """Reads a leaf's flag (``self.bn2.training``), not its own: the eval trace differs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.bn2.training:
            x = x.flip(0)
        return torch.relu(self.bn2(self.conv2(x)))


def _count_traces(monkeypatch) -> list[str]:
    from resnet_fused import graph_convert

    traced = []
    original = graph_convert._Tracer.trace

    def counting(self, root, concrete_args=None):
        traced.append(type(root).__name__)
        return original(self, root, concrete_args)

    monkeypatch.setattr(graph_convert._Tracer, "trace", counting)
    return traced


def test_a_forward_reading_no_training_flag_is_traced_once(monkeypatch):
    """Only a read of a training flag can make the eval trace differ: a model whose traced
    forwards read none is traced once, its eval graph a copy; one reading a leaf's flag is
    traced in both modes, and both behave as the original."""
    traced = _count_traces(monkeypatch)
    model = _randomise(torchvision.models.resnet18(num_classes=4).double())
    fused = _convert(model)
    assert traced == ["ResNet"]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for mode in (True, False):
        model.train(mode)
        fused.train(mode)
        _assert_same(model, fused, x)
    traced.clear()
    model = _randomise(_LeafFlagBranch().double())
    fused = _convert(model)
    assert traced == ["_LeafFlagBranch", "_LeafFlagBranch"]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for mode in (True, False, True):
        model.train(mode)
        fused.train(mode)
        _assert_same(model, fused, x)
    model.bn2.eval()
    fused.bn2.eval()  # the leaf's own flag, with the model in training
    _assert_same(model, fused, x)


def test_timm_drop_path_trains():
    model = _randomise(
        timm.create_model("resnet18", pretrained=False, num_classes=5, drop_path_rate=0.3)
    ).double()
    fused = _convert(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for mode in (True, False, True):
        model.train(mode)
        fused.train(mode)
        _assert_same(model, fused, x)  # the RNG seeded alike: the same paths dropped


def test_timm_drop_path_with_a_block_in_eval():
    """A traced-through block whose own flag differs from the model's (its drop_path off
    while the model trains): the graph traced in training mode would drop its path."""
    model = _randomise(
        timm.create_model("resnet18", pretrained=False, num_classes=5, drop_path_rate=0.3)
    ).double()
    fused = _convert(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for m in (model, fused):
        m.train()
        m.layer2[1].eval()
    _assert_same(model, fused, x)
    text = "\n".join(resnet_fused.conversion_report(fused)["not_fused"])
    assert "training flag" in text


# --- 3. smaller cases ---------------------------------------------------------------------------


class _IntAddReLU(nn.Module):
    def forward(self, a, b):
        return torch.relu(a + b)


def test_integer_add_relu_runs_as_eager():
    model = _IntAddReLU()
    fused = _convert(model)
    assert any("add-relu" in s for s in resnet_fused.conversion_report(fused)["fused"])
    a = torch.randint(-5, 5, (2, 3, 4, 4))
    b = torch.randint(-5, 5, (2, 3, 4, 4))
    out = fused(a, b)
    assert out.dtype == torch.int64
    assert torch.equal(out, model(a, b))
    text = "\n".join(resnet_fused.conversion_report(fused)["not_fused"])
    assert "ran as eager ops" in text, text
    with pytest.raises(TypeError, match="floating-point"):
        resnet_fused.add_relu(a, b)  # the public op keeps its clear error


class _ResidualUnit(nn.Module):
    """conv -> BN -> add -> ReLU, or (``conv=False``) BN -> add -> ReLU."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False) if conv else nn.Identity()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, residual):
        return torch.relu(self.bn(self.conv(x)) + residual)


@pytest.mark.parametrize("unit", ["conv-bn-add-relu", "bn-add-relu"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_autocast_residual_dtype_promotes_as_eager(mode, unit):
    """Under autocast (bf16, CPU) an fp32 residual promotes the sum to fp32, as eager."""
    conv = unit.startswith("conv")
    model = _randomise(_ResidualUnit(conv)).train(mode == "train")
    reference = _randomise(_ResidualUnit(conv)).double().train(mode == "train")
    reference.load_state_dict(model.state_dict())
    fused = _convert(model)
    assert resnet_fused.conversion_report(fused)["fused"][0].endswith(f"({unit})")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    residual = torch.randn(2, 4, 8, 8, generator=gen)
    exact = reference(x.double(), residual.double())
    with torch.autocast("cpu", torch.bfloat16):
        eager = model(x, residual)
        out = fused(x, residual)
        same = fused(x.bfloat16(), residual.bfloat16())  # same dtypes: fused
        eager_same = model(x.bfloat16(), residual.bfloat16())
    assert eager.dtype == torch.float32
    assert out.dtype == eager.dtype
    assert same.dtype == eager_same.dtype
    err_eager = (eager.double() - exact).abs().max().item()
    err = (out.double() - exact).abs().max().item()
    assert err <= 2 * err_eager + 1e-3


class _ViewOfInplaceTarget(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.bn2(self.conv2(x))
        idt = x.clone()
        v = idt[:, :2]
        idt += out
        return torch.relu(idt) + v.sum()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inplace_add_with_a_view_of_its_target(mode):
    model = _randomise(_ViewOfInplaceTarget().double()).train(mode == "train")
    fused = _convert(model)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    _assert_same(model, fused, x)
    report = resnet_fused.conversion_report(fused)
    assert not any("add" in s for s in report["fused"])
    assert any("in place" in s for s in report["not_fused"])


@pytest.mark.parametrize("flags", ["eval", "frozen"])
def test_feature_extractor_keeps_its_training_flags(flags):
    """``convert`` copies the model first; a GraphModule's ``__deepcopy__`` (torchvision's
    feature extractors) builds the copy in training mode throughout, so a converted eval
    extractor used to run its BatchNorms on batch statistics. Every module's own flag is
    kept, and the outputs are the extractor's."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = _randomise(_tv_resnet18().double())
    if flags == "eval":
        model.eval()
    else:
        _frozen(model)
    extractor = create_feature_extractor(model, {"layer3": "c", "layer4": "d"})
    fused = _convert(extractor)
    assert [m.training for m in fused.modules()] == [m.training for m in extractor.modules()]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        got, ref = fused(x), extractor(x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9)
