"""Plan once, run many (modules.conv_bn_forward): the first call of a unit with a new
signature runs the checked path and keeps a plan; later calls with the same signature run
the plan. Everything a user can change between calls must either be read by the plan at
call time or change the signature."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import resnet_fused
from resnet_fused import modules
from resnet_fused.functional import conv_bn_act as conv_bn_act_module


def _pair(dtype=torch.float64, **bn_kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False).to(dtype)
    bn = nn.BatchNorm2d(5, **bn_kwargs).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
        if bn.running_mean is not None:
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return conv, bn


@pytest.fixture
def checked_calls(monkeypatch):
    """Counts the calls that take the checked path (conv_bn_act) instead of a plan."""
    calls = []
    real = conv_bn_act_module.conv_bn_act

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(conv_bn_act_module, "conv_bn_act", counting)
    return calls


def _eager(conv, bn, x):
    return torch.relu(bn(conv(x)))


@pytest.mark.parametrize("policy", ["fused", "eager", "time"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_second_call_runs_the_plan(checked_calls, monkeypatch, policy, mode):
    monkeypatch.setenv("RESNET_FUSED_AUTO", policy)
    conv, bn = _pair()
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn)
    unit.train(mode == "train")
    ref_conv.train(mode == "train")
    ref_bn.train(mode == "train")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for _ in range(3):
        with torch.no_grad():
            torch.testing.assert_close(unit(x), _eager(ref_conv, ref_bn, x))
    assert len(checked_calls) == 1
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked)


def _same_step(unit, conv, bn, ref_conv, ref_bn, x):
    """One call of ``unit`` and of eager's modules: output, gradients (where autograd
    records), running statistics and counter equal."""
    out, ref = unit(x), _eager(ref_conv, ref_bn, x)
    torch.testing.assert_close(out, ref)
    if out.requires_grad:
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, conv.weight, bn.weight), g)
        want = torch.autograd.grad(ref, (x, ref_conv.weight, ref_bn.weight), g)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked)


def test_flags_and_settings_are_read_at_call_time(checked_calls):
    """Each change of the BN's flags or settings (or of the policy) takes the checked
    path once, and the result is eager's after every change."""
    conv, bn = _pair(momentum=None)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn).train()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def both(change):
        change(bn)
        change(ref_bn)
        _same_step(unit, conv, bn, ref_conv, ref_bn, x)  # (x requires grad: gradients too)

    both(lambda m: None)
    both(lambda m: None)  # cumulative average: the factor changes per call, no replan
    assert len(checked_calls) == 1
    both(lambda m: setattr(m, "momentum", 0.3))
    both(lambda m: setattr(m, "eps", 1e-2))
    both(lambda m: m.eval())
    both(lambda m: m.eval())
    both(lambda m: m.train())
    assert len(checked_calls) == 5


def test_gradients_of_planned_training_calls():
    conv, bn = _pair()
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn).train()
    for _ in range(3):
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
        out, ref = unit(x), _eager(ref_conv, ref_bn, x)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, conv.weight, bn.weight, bn.bias), g)
        want = torch.autograd.grad(ref, (x, ref_conv.weight, ref_bn.weight, ref_bn.bias), g)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


def test_policy_change_replans(checked_calls, monkeypatch):
    conv, bn = _pair()
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn).eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        monkeypatch.setenv("RESNET_FUSED_AUTO", "fused")
        unit(x)
        unit(x)
        monkeypatch.setenv("RESNET_FUSED_AUTO", "eager")
        unit(x)
        unit(x)
    assert len(checked_calls) == 2
    assert unit._fold_cache.plan[1].impl == "eager"


def test_replaced_or_converted_parameters_replan(checked_calls):
    conv, bn = _pair()
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn).eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        unit(x)
        # An in-place edit (an optimizer step): same plan, the fold is refreshed.
        conv.weight.mul_(1.5)
        torch.testing.assert_close(unit(x), _eager(conv, bn, x))
        assert len(checked_calls) == 1
        # A new parameter of another shape: the signature changes, and the checks see it.
        conv.weight = nn.Parameter(torch.randn(5, 4, 3, 3, dtype=torch.float64))
        with pytest.raises(ValueError, match="input channels"):
            unit(x)
        x4 = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(unit(x4), _eager(conv, bn, x4))
        # .float() keeps the parameter objects and changes their dtype.
        unit.float()
        torch.testing.assert_close(unit(x4.float()), _eager(conv, bn, x4.float()))
        assert unit(x4.float()).dtype == torch.float32


def test_bad_input_after_a_plan_is_still_refused():
    conv, bn = _pair(dtype=torch.float32)
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn).train()
    unit(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        unit(torch.randn(1, 3, 1, 1))
    with pytest.raises(TypeError, match="conv_weight must have the dtype of input"):
        unit(torch.randn(2, 3, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("policy", ["fused", "eager"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
def test_planned_calls_equal_checked_calls(monkeypatch, policy, residual, layout, amp, mode):
    """A planned unit and the same unit forced through the checked path on every call:
    bit-identical outputs, gradients and running statistics over three steps."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", policy)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    conv, bn = _pair(dtype=torch.float32)
    if mode == "eval" and amp is not None:
        # Frozen-BN fine-tuning: the BN's affine frozen too. (With BN parameters that need
        # gradients in half precision the unit runs BN on the convolution's output, not
        # the fold, on the checked path every call.)
        bn.weight.requires_grad_(False)
        bn.bias.requires_grad_(False)
    planned = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn)
    checked = copy.deepcopy(planned)
    for m in (planned, checked):
        m.train(mode == "train").to(memory_format=fmt)
    ctx = torch.no_grad if mode == "eval-no-grad" else torch.enable_grad
    torch.manual_seed(2)
    for _ in range(3):
        x = torch.randn(2, 3, 6, 6).to(memory_format=fmt).requires_grad_()
        res = torch.randn(2, 5, 6, 6).to(memory_format=fmt) if residual else None
        outs, grads = [], []
        for m in (planned, checked):
            if m is checked:
                m._fold_cache.plan = None
            xi = x.detach().requires_grad_()
            amp_ctx = torch.autocast("cpu", dtype=amp, enabled=amp is not None)
            with ctx(), amp_ctx:
                out = m(xi, res)
            outs.append(out)
            if out.requires_grad:
                wrt = [t for t in (xi, m.conv.weight, m.bn.weight) if t.requires_grad]
                grads.append(torch.autograd.grad(out, wrt, torch.ones_like(out)))
        assert planned._fold_cache.plan is not None
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        for a, b in zip(*grads, strict=True) if grads else ():
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(
                getattr(planned.bn, name), getattr(checked.bn, name), rtol=0, atol=0
            )


def test_planned_autocast_call_leaves_autocast_as_it_was(monkeypatch):
    """A planned unit under autocast turns autocast off for its ops and back on after
    them, also when an op raises, and never touches another device's flag."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", "fused")
    conv, bn = _pair(dtype=torch.float32)
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn).train()
    x = torch.randn(2, 3, 6, 6)
    cuda_flag = torch.is_autocast_enabled("cuda")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unit(x)
        out = unit(x)  # planned
        assert unit._fold_cache.plan is not None and out.dtype == torch.bfloat16
        assert torch.is_autocast_enabled("cpu")
        seen = []

        def failing_run(self, *args, **kwargs):
            seen.append(torch.is_autocast_enabled("cpu"))
            raise RuntimeError("planned op failed")

        monkeypatch.setattr(type(unit._fold_cache.plan[1]), "run", failing_run)
        with pytest.raises(RuntimeError, match="planned op failed"):
            unit(x)
        assert seen == [False]  # the ops ran with autocast off
        assert torch.is_autocast_enabled("cpu")  # and it is on again after the error
    assert not torch.is_autocast_enabled("cpu")
    assert torch.is_autocast_enabled("cuda") == cuda_flag


@pytest.mark.parametrize("policy", ["fused", "eager"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("settings", [{}, {"momentum": None}, {"track_running_stats": False}])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
def test_planned_batch_norm_act_equals_checked(monkeypatch, policy, residual, settings, mode):
    """FusedBatchNormAct2d's plans: bit-identical to the checked path over three steps,
    and a flag changed between calls is read."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", policy)
    torch.manual_seed(0)
    planned = resnet_fused.FusedBatchNormAct2d(5, dtype=torch.float64, **settings)
    with torch.no_grad():
        planned.weight.uniform_(0.5, 1.5)
        planned.bias.normal_(0, 0.2)
    checked = copy.deepcopy(planned)
    for m in (planned, checked):
        m.train(mode == "train")
    ctx = torch.no_grad if mode == "eval-no-grad" else torch.enable_grad
    for step in range(4):
        if step == 3:  # a flag changed between calls: a new signature
            planned.eval()
            checked.eval()
        x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
        res = torch.randn(2, 5, 3, 3, dtype=torch.float64) if residual else None
        outs, grads = [], []
        for m in (planned, checked):
            if m is checked:
                m.__dict__.pop("_plan_cache", None)
            xi = x.clone().requires_grad_()
            with ctx():
                out = m(xi, res)
            outs.append(out)
            if out.requires_grad:
                grads.append(torch.autograd.grad(out, (xi, m.weight), torch.ones_like(out)))
        assert planned._plan_cache.bn_plan is not None
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        for a, b in zip(*grads, strict=True) if grads else ():
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            a, b = getattr(planned, name), getattr(checked, name)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_batch_norm_act_plan_is_not_copied():
    bn = resnet_fused.FusedBatchNormAct2d(3).eval()
    bn(torch.randn(2, 3, 4, 4))
    assert bn._plan_cache.bn_plan is not None
    assert copy.deepcopy(bn).__dict__.get("_plan_cache") is None or (
        copy.deepcopy(bn)._plan_cache.bn_plan is None
    )


def test_from_modules_keeps_each_modules_flag():
    """FusedConvBNReLU2d.from_modules once ran .train(conv.training), which set the BN's
    flag too: a frozen (eval) BN under a training conv was unfrozen."""
    conv, bn = _pair()
    conv.train()
    bn.eval()
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn)
    assert unit.training and conv.training and not bn.training
    before = bn.running_mean.clone()
    unit(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)


@pytest.mark.skipif(
    not conv_bn_act_module._MKLDNN_POINTWISE or conv_bn_act_module._REORDER is None,
    reason="this torch has no oneDNN fused convolution",
)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_planned_eval_unit_keeps_the_onednn_weight(monkeypatch, residual, layout):
    """A planned fp32 CPU eval unit hands oneDNN's convolution its weight reordered once
    (an mkldnn tensor, kept by the plan), not the dense fold it would reorder at every
    call; an EMA-style write to the conv weight (``.data``: no version bump) makes a new
    fold, and the plan reorders that one. Outputs match eager's modules throughout. An
    NCHW input keeps the dense fold: with the reordered weight oneDNN writes a
    channels_last output, where eager's is NCHW (tests/test_output_layout.py)."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", "fused")
    calls = []
    real = conv_bn_act_module._mkldnn_pointwise

    class Spy:
        def __call__(self, x, w, *args):
            calls.append(w.is_mkldnn)
            return real(x, w, *args)

        def binary(self, x, other, w, *args):
            calls.append(w.is_mkldnn)
            return real.binary(x, other, w, *args)

    monkeypatch.setattr(conv_bn_act_module, "_mkldnn_pointwise", Spy())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    conv, bn = _pair(dtype=torch.float32)
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn).eval().to(memory_format=fmt)
    torch.manual_seed(3)
    res = torch.randn(2, 5, 7, 7).to(memory_format=fmt) if residual else None
    for step in range(4):
        if step == 2:
            conv.weight.data.mul_(1.5)
        x = torch.randn(2, 3, 7, 7).to(memory_format=fmt)
        with torch.no_grad():
            out = unit(x, res)
            y = bn(conv(x))
            expected = torch.relu(y + res if residual else y)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert out.stride() == expected.stride()
        assert unit._fold_cache.plan is not None
        if layout == "nchw":
            assert calls and not calls[-1], f"step {step}: oneDNN got a reordered weight"
            continue
        assert calls and calls[-1], f"step {step}: oneDNN got a dense weight"
        packed_for = unit._fold_cache.plan[1].onednn[0]
        assert packed_for is unit._fold_cache.entry[1][0]  # made from the current fold


class _PaddingProperty(nn.Conv2d):
    """A convolution whose ``padding`` is a property (a data descriptor of its class,
    which attribute access prefers to the instance's __dict__)."""

    @property
    def padding(self):
        return (self.__dict__["_p"],) * 2

    @padding.setter
    def padding(self, value):
        self.__dict__["_p"] = value[0] if isinstance(value, tuple) else value


class _ClassMomentum(nn.BatchNorm2d):
    """A BatchNorm whose momentum is a class attribute (absent from its __dict__)."""

    momentum = 0.25

    def __init__(self, c):
        super().__init__(c)
        del self.__dict__["momentum"]


class _OwnGetattribute(nn.BatchNorm2d):
    """A BatchNorm whose class defines __getattribute__ (eps read through it, doubled)."""

    def __getattribute__(self, name):
        value = super().__getattribute__(name)
        return value * 2 if name == "eps" else value


def _signature_cases():
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    yield "plain", conv, bn
    yield "no conv bias, no affine, no running stats", nn.Conv2d(3, 4, 1, bias=False), \
        nn.BatchNorm2d(4, affine=False, track_running_stats=False)  # fmt: skip
    yield "padding property", _PaddingProperty(3, 4, 3, padding=2), nn.BatchNorm2d(4)
    yield "class momentum", nn.Conv2d(3, 4, 3, stride=2, padding="valid"), _ClassMomentum(4)
    yield "own __getattribute__", nn.Conv2d(3, 4, 3), _OwnGetattribute(4)


@pytest.mark.skipif(modules._PLAN_SIGNATURE is None, reason="extension not built")
def test_plan_signature_is_the_python_signature(monkeypatch):
    """The extension's plan_signature builds the tuple that _unit_signature_py and
    _bn_signature_py build, in every context a signature reads: grad mode, autocast (and
    float64 input under it: None for a unit), the modules' flags and settings (also a
    property and a class attribute), the tensors present or not, the environment
    variables, oneDNN's switch; None where an argument is not a tensor. Each change moves
    the signature."""
    from resnet_fused.functional.auto_choice import CONV_BACKEND_ENV, POLICY_ENV

    relu = resnet_fused.activations.as_act("relu")
    x = torch.randn(2, 3, 6, 6)
    seen = set()

    def check(conv, bn, inp, residual, act=relu, backend="auto"):
        unit = modules._unit_signature(conv, bn, inp, residual, act, backend)
        assert unit == modules._unit_signature_py(conv, bn, inp, residual, act, backend)
        site = modules._bn_signature(bn, inp, residual, act, backend)
        assert site == modules._bn_signature_py(bn, inp, residual, act, backend)
        if unit is not None:
            seen.add(unit)
        return unit

    for _, conv, bn in _signature_cases():
        y = conv(x).detach()
        contexts = [
            ("grad", torch.enable_grad),
            ("no_grad", torch.no_grad),
            ("autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
            ("no oneDNN", lambda: torch.backends.mkldnn.flags(enabled=False)),
        ]
        for _, ctx in contexts:
            for training in (True, False):
                conv.train(training), bn.train(training)
                with ctx():
                    before = len(seen)
                    assert check(conv, bn, x, None) is not None
                    check(conv, bn, x, y)  # (a residual)
                    check(conv, bn, x.requires_grad_(), None)
                    x.requires_grad_(False)
                    check(conv, bn, x, None, resnet_fused.activations.as_act("silu"), "cpu")
                    assert len(seen) == before + 4
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert check(conv, bn, x.double(), None) is None
            assert modules._bn_signature(bn, x.double(), None, relu, "auto") is not None
        assert check(conv, bn, "not a tensor", None) is None
        assert check(conv, bn, x, 3.0) is None
        for name in (POLICY_ENV, CONV_BACKEND_ENV):
            monkeypatch.delenv(name, raising=False)
            check(conv, bn, x, None)
            before = len(seen)
            monkeypatch.setenv(name, "eager")
            check(conv, bn, x, None)
            monkeypatch.delenv(name)
            check(conv, bn, x, None)
            assert len(seen) == before + 1
        bn.eps, before = bn.eps * 2, len(seen)
        check(conv, bn, x, None)
        assert len(seen) == before + 1
    prop = _PaddingProperty(3, 4, 3, padding=2)
    assert check(prop, nn.BatchNorm2d(4), x, None)[12] == (2, 2)
    prop.__dict__["padding"] = "shadowed"  # (the property wins, as attribute access says)
    assert check(prop, nn.BatchNorm2d(4), x, None)[12] == (2, 2)
    assert check(nn.Conv2d(3, 4, 1), _ClassMomentum(4), x, None)[4] == 0.25
    assert check(nn.Conv2d(3, 4, 1), _OwnGetattribute(4), x, None)[5] == 2e-5


@pytest.mark.parametrize("policy", ["eager", "fused"])
def test_planned_calls_follow_the_flags(checked_calls, monkeypatch, policy):
    """Every change of the BatchNorm's flags and settings, then a planned call (the
    second after the change), equals eager: running statistics dropped in training when
    ``track_running_stats`` is turned off on a BN that has them (nn.BatchNorm2d then
    neither uses nor updates them, nor counts the call), kept in eval, the counter and
    a cumulative average with ``momentum=None``. With ``eager`` the planned calls are the
    extension's planned_unit; with ``fused`` the fused kernels' plans."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", policy)
    if policy == "eager" and modules._PLANNED_UNIT is not None:

        def declined(*args, **kwargs):
            raise AssertionError("planned_unit left a planned eager unit to _run_plan")

        monkeypatch.setattr(modules, "_run_plan", declined)
    conv, bn = _pair()
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn).train()
    ref_conv.train(), ref_bn.train()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def twice(change):
        change(bn)
        change(ref_bn)
        for _ in range(2):
            _same_step(unit, conv, bn, ref_conv, ref_bn, x)

    twice(lambda m: None)
    twice(lambda m: setattr(m, "momentum", None))
    twice(lambda m: setattr(m, "track_running_stats", False))
    assert int(bn.num_batches_tracked) == 4  # (not counted while off)
    twice(lambda m: m.eval())
    twice(lambda m: setattr(m, "track_running_stats", True))
    twice(lambda m: m.train())
    twice(lambda m: setattr(m, "momentum", 0.3))
    assert int(bn.num_batches_tracked) == 8
    assert len(checked_calls) == 7
