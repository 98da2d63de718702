"""The graph converter keeps what a traced graph would drop (issue 20, items 3 and 4).

A module whose forward holds what ``torch.fx`` cannot keep (grad-mode and autocast
regions, checkpointing, random numbers, tensors made from no input) runs its forward as
written, with its children converted alone, and ``conversion_report`` says why. Optional
arguments, Python attributes and the submodules' own flags read while tracing are
guarded: a call that does not match what was traced runs the module's own forward, and a
module replaced after conversion (surgery) makes the converted module trace again.
Each case compares the converted model with the unconverted one in fp64 on the CPU.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

import resnet_fused
from tests.test_convert_semantics import _assert_same, _convert, _randomise


def _unit(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


def _report(model: nn.Module) -> tuple[str, str]:
    report = resnet_fused.conversion_report(model)
    return "\n".join(report["fused"]), "\n".join(report["not_fused"])


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _pair(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    model = _randomise(model.double())
    return model, _convert(model)


# --- regions a traced graph would drop -------------------------------------------------------


class _NoGradStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = _unit(3, 4), _unit(4, 4)

    def forward(self, x):
        with torch.no_grad():
            x = self.stem(x)
        return self.body(x)


class _GradModeFunction(nn.Module):
    """``torch.set_grad_enabled`` called as a function, inside a helper method."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = _unit(3, 4), _unit(4, 4)

    def _frozen(self, x):
        prev = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            return self.stem(x)
        finally:
            torch.set_grad_enabled(prev)

    def forward(self, x):
        return self.body(self._frozen(x))


class _InnerNoGrad(nn.Module):
    """The region in a traced-through child: only that child keeps its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = _NoGradStem()
        self.head = _unit(4, 4)

    def forward(self, x):
        return self.head(self.frozen(x))


@pytest.mark.parametrize("cls", [_NoGradStem, _GradModeFunction, _InnerNoGrad])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_grad_mode_regions_are_kept(cls, mode):
    model, fused = _pair(cls())
    model.train(mode == "train")
    fused.train(mode == "train")
    _assert_same(model, fused, _x(2, 3, 6, 6))
    fused_text, left = _report(fused)
    assert "grad mode" in left, left
    assert "conv-bn-relu" in fused_text  # the children are still fused
    if cls is _InnerNoGrad:
        assert "head.0, head.1, head.2 (conv-bn-relu)" in fused_text, fused_text


class _AutocastOff(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = _unit(3, 4), _unit(4, 4)

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            y = self.stem(x.float())
        return y, self.body(y)


def test_autocast_disabled_region_runs_in_full_precision():
    model = _randomise(_AutocastOff())
    fused = _convert(model)
    x = _x(2, 3, 6, 6).float()
    for train in (True, False):
        model.train(train)
        fused.train(train)
        with torch.autocast("cpu", torch.bfloat16):
            y_ref, out_ref = model(x)
            y, out = fused(x)
        assert y.dtype == y_ref.dtype == torch.float32
        assert out.dtype == out_ref.dtype
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert "autocast" in _report(fused)[1]


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.stem, self.block = _unit(3, 4), _unit(4, 4)

    def forward(self, x):
        x = self.stem(x)
        return cp.checkpoint(self.block, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recomputes(reentrant):
    model, fused = _pair(_Checkpointed(reentrant))
    x = _x(2, 3, 6, 6).requires_grad_(reentrant)  # the reentrant form needs a grad input
    _assert_same(model, fused, x)
    assert fused.block[1].num_batches_tracked.item() == model.block[1].num_batches_tracked.item()
    assert model.block[1].num_batches_tracked.item() == 4  # 2 steps, recomputed
    fused_text, left = _report(fused)
    assert "<model>: forward left as written" in left, left
    assert "block.0, block.1, block.2 (conv-bn-relu)" in fused_text


# --- random numbers and tensors made from no input -------------------------------------------


class _Noise(nn.Module):
    """Noise made from the input's dtype (fx records the call) or from nothing (a tensor
    made while tracing: frozen, if it were traced)."""

    def __init__(self, from_input: bool = False) -> None:
        super().__init__()
        self.from_input = from_input
        self.a, self.b = _unit(3, 4), _unit(4, 4)

    def forward(self, x):
        x = self.a(x)
        if self.from_input:
            noise = torch.randn(1, 4, 1, 1, dtype=x.dtype)
        else:
            noise = torch.randn(1, 4, 1, 1).to(torch.float64)
        return self.b(x + noise)


class _LayerDrop(nn.Module):
    """Python's random module decides whether a block runs (layer drop)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _unit(3, 4), _unit(4, 4)

    def forward(self, x):
        x = self.a(x)
        if self.training and random.random() < 0.4:
            return x
        return self.b(x)


class _ConstantScale(nn.Module):
    """A tensor made from no input: traced, it would be frozen (and not follow .to())."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _unit(3, 4), _unit(4, 4)

    def forward(self, x):
        return self.b(self.a(x) * torch.tensor([0.5], dtype=torch.float64))


@pytest.mark.parametrize("from_input", [False, True])
def test_random_tensor_differs_per_call(from_input):
    model, fused = _pair(_Noise(from_input))
    x = _x(2, 3, 6, 6)
    _assert_same(model, fused, x, steps=3)  # the RNG is seeded alike before each step
    with torch.no_grad():
        assert not torch.equal(fused(x), fused(x))
    fused_text, left = _report(fused)
    if from_input:  # recorded in the graph: random on every call, and fused around it
        assert "a.0, a.1, a.2 (conv-bn-relu)" in fused_text and not left
    else:
        assert "random" in left, left


def test_layer_drop_drops():
    model, fused = _pair(_LayerDrop())
    x = _x(2, 3, 6, 6)
    drops = {}
    for name, m in (("eager", model), ("fused", fused)):
        random.seed(5)
        outs = [m(x) for _ in range(40)]
        drops[name] = sum(bool((o == m.a(x)).all()) for o in outs)
    assert drops["fused"] == drops["eager"] > 0
    assert "random" in _report(fused)[1]


def test_conversion_leaves_the_random_streams_alone():
    """Tracing a forward that draws random numbers must not move the user's RNGs."""
    for cls in (_Noise, _LayerDrop):
        model = _randomise(cls().double())
        torch.manual_seed(3)
        random.seed(3)
        _convert(model)
        after = torch.rand(3), random.random()
        torch.manual_seed(3)
        random.seed(3)
        assert torch.equal(torch.rand(3), after[0]) and random.random() == after[1]


def test_tensor_made_from_no_input():
    model, fused = _pair(_ConstantScale())
    _assert_same(model, fused, _x(2, 3, 6, 6))
    assert "no input" in _report(fused)[1]
    assert not any(k.startswith("_tensor_constant") for k in vars(fused))


# --- optional arguments, Python attributes, submodule flags -----------------------------------


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _unit(3, 4), _unit(4, 4)
        self.scale = 1.0
        self.use_b = True

    def forward(self, x, mask=None, *, shift: float = 0.0):
        x = self.a(x)
        if mask is not None:
            x = x * mask
        x = x * self.scale + shift
        return self.b(x) if self.use_b else x


def test_optional_arguments():
    model, fused = _pair(_Masked())
    x = _x(2, 3, 6, 6)
    mask = (_x(2, 1, 6, 6) > 0).double()
    _assert_same(model, fused, x)
    with torch.no_grad():
        for kwargs in ({"mask": mask}, {"shift": 0.5}, {"mask": None}, {"mask": mask, "shift": 1}):
            torch.testing.assert_close(fused(x, **kwargs), model(x, **kwargs), rtol=0, atol=1e-9)
        torch.testing.assert_close(fused(x, mask), model(x, mask), rtol=0, atol=1e-9)
        torch.testing.assert_close(fused(x=x), model(x=x), rtol=0, atol=1e-9)
    assert "conv-bn-relu" in _report(fused)[0]


def test_python_attributes_read_at_call_time():
    model, fused = _pair(_Masked())
    x = _x(2, 3, 6, 6)
    for name, value in (("scale", 0.0), ("scale", 2.5), ("use_b", False), ("use_b", True)):
        setattr(model, name, value)
        setattr(fused, name, value)
        for train in (True, False):
            model.train(train)
            fused.train(train)
            _assert_same(model, fused, x, steps=1)
    assert "conv-bn-relu" in _report(fused)[0]


class _Config:
    def __init__(self) -> None:
        self.scale = 1.0


class _ReadsContainers(nn.Module):
    """Settings read from a dict, a list and a plain config object."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _unit(3, 4), _unit(4, 4)
        self.opts = {"shift": 0.0}
        self.scales = [1.0]
        self.cfg = _Config()

    def forward(self, x):
        x = self.a(x) * self.scales[0] * self.cfg.scale + self.opts["shift"]
        return self.b(x)


def test_contents_of_attributes_read_at_call_time():
    model, fused = _pair(_ReadsContainers())
    x = _x(2, 3, 6, 6)
    _assert_same(model, fused, x, steps=1)
    for edit in (
        lambda m: m.opts.__setitem__("shift", 0.5),
        lambda m: m.scales.__setitem__(0, 3.0),
        lambda m: setattr(m.cfg, "scale", -1.0),
    ):
        edit(model)
        edit(fused)
        _assert_same(model, fused, x, steps=1)
    assert "a.0, a.1, a.2 (conv-bn-relu)" in _report(fused)[0]


class _ReadsChildFlag(nn.Module):
    """The forward reads a leaf child's own ``training`` flag."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _unit(3, 4), _unit(4, 4)
        self.aux = nn.Dropout(0.0)

    def forward(self, x):
        x = self.a(x)
        if self.aux.training:
            x = x * 2
        return self.b(x)


class _Counts(nn.Module):
    """The forward counts its calls in a Python attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _unit(3, 4), _unit(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.b(self.a(x))


def test_attribute_written_by_forward():
    model, fused = _pair(_Counts())
    assert fused.calls == 0  # conversion did not run the forward's side effect
    _assert_same(model, fused, _x(2, 3, 6, 6))
    assert fused.calls == model.calls == 2
    fused_text, left = _report(fused)
    assert "'calls'" in left and "a.0, a.1, a.2 (conv-bn-relu)" in fused_text


class _Decorated(nn.Module):
    """Grad-mode and autocast changes as decorators and through torch.cpu.amp."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = _unit(3, 4), _unit(4, 4)

    @torch.no_grad()
    def _frozen(self, x):
        return self.a(x)

    def forward(self, x):
        if self.how == "decorator":
            x = self._frozen(x)
        elif self.how == "inference_mode":
            with torch.inference_mode():
                x = self.a(x)
            x = x.clone()
        else:
            with torch.cpu.amp.autocast(enabled=False):
                x = self.a(x)
        return self.b(x)


@pytest.mark.parametrize("how", ["decorator", "inference_mode", "cpu-amp"])
def test_other_spellings_of_regions(how):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.cpu.amp.autocast is deprecated)
        model, fused = _pair(_Decorated(how))
        if how != "inference_mode":  # (its output cannot take part in autograd)
            _assert_same(model, fused, _x(2, 3, 6, 6))
        with torch.no_grad():
            torch.testing.assert_close(fused(_x(2, 3, 6, 6)), model(_x(2, 3, 6, 6)))
    assert "forward left as written" in _report(fused)[1]


class _ReadsGradMode(nn.Module):
    """A forward that branches on the grad mode or autocast state."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.a, self.b = _unit(3, 4), _unit(4, 4)

    def forward(self, x):
        x = self.a(x)
        if self.what == "grad" and torch.is_grad_enabled():
            x = x * 2
        if self.what == "autocast" and torch.is_autocast_enabled("cpu"):
            x = x.float() * 3
        return self.b(x)


@pytest.mark.parametrize("what", ["grad", "autocast"])
def test_state_read_by_forward(what):
    model, fused = _pair(_ReadsGradMode(what))
    x = _x(2, 3, 6, 6)
    _assert_same(model, fused, x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=1e-9)
    assert "reads the" in _report(fused)[1]


def test_submodule_flag_read_at_call_time():
    model, fused = _pair(_ReadsChildFlag())
    x = _x(2, 3, 6, 6)
    for m in (model, fused):
        m.train()
        m.aux.eval()
    _assert_same(model, fused, x)
    for m in (model, fused):
        m.eval()
        m.aux.train()
    _assert_same(model, fused, x)


# --- surgery after conversion ------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _unit(3, 4)
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4, 5))

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(self.bn(self.conv(x)) + x)
        return self.head(self.pool(x))


def _frozen_bn(n):
    from torchvision.ops import FrozenBatchNorm2d

    bn = FrozenBatchNorm2d(n)
    bn.running_var.fill_(1.5)
    bn.bias.fill_(0.1)
    return bn


_SURGERY = {
    "conv-other-shape": lambda m: setattr(m, "conv", nn.Conv2d(4, 4, 1)),
    "bn-identity": lambda m: setattr(m, "bn", nn.Identity()),
    "bn-frozen": lambda m: setattr(m, "bn", _frozen_bn(4)),
    "bn-groupnorm": lambda m: setattr(m, "bn", nn.GroupNorm(2, 4)),
    "bn-new": lambda m: setattr(m, "bn", nn.BatchNorm2d(4)),
    "relu-silu": lambda m: setattr(m, "relu", nn.SiLU()),
    "stem-relu-silu": lambda m: m.stem.__setitem__(2, nn.SiLU()),
    "stem-grayscale": lambda m: m.stem.__setitem__(0, nn.Conv2d(1, 4, 3, padding=1)),
    "head-sequential": lambda m: setattr(
        m, "head", nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    ),
    "head-linear": lambda m: setattr(m, "head", nn.Sequential(nn.Flatten(), nn.Linear(4, 2))),
    "stem-sequential": lambda m: setattr(m, "stem", _unit(3, 4)),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("surgery", sorted(_SURGERY))
def test_surgery_after_convert(surgery, mode):
    model, fused = _pair(_Net())
    cin = 1 if surgery == "stem-grayscale" else 3
    x3 = _x(2, 3, 6, 6)
    for m in (model, fused):
        m.train(mode == "train")
    with torch.no_grad():
        fused(x3)  # converted and run once before the surgery (plans, folds cached)
        model(x3)
    torch.manual_seed(0)
    _SURGERY[surgery](model)
    torch.manual_seed(0)
    _SURGERY[surgery](fused)
    model.double()
    fused.double()
    _randomise(model, seed=2)
    _randomise(fused, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same(model, fused, _x(2, cin, 6, 6))


def test_retraced_after_surgery_fuses_the_new_modules():
    _, fused = _pair(_Net())
    x = _x(2, 3, 6, 6)
    fused(x)
    fused.bn = nn.BatchNorm2d(4).double()
    fused(x)
    fused_text, _ = _report(fused)
    assert "conv, bn, relu (conv-bn-add-relu)" in fused_text, fused_text


def test_site_modules_of_another_type_run_unfused():
    """A fused function called with modules of other types (a graph made before the
    surgery, run by hand) runs them as modules."""
    from resnet_fused.graph_convert import fused_conv_bn

    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    gn = nn.GroupNorm(2, 4).double()
    silu = nn.SiLU()
    x = _x(2, 3, 6, 6)
    out = fused_conv_bn(conv, gn, x, relu=True, relu_module=silu)
    torch.testing.assert_close(out, silu(gn(conv(x))), rtol=0, atol=1e-12)
    out = fused_conv_bn(conv, nn.BatchNorm2d(4).double(), x, relu=True, relu_module=silu)
    ref = silu(F.batch_norm(conv(x), None, None, training=True))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
