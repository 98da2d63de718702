"""resnet_fused::conv_bn_act_eager (csrc/unit.cpp): the eager Conv -> BatchNorm -> (add) ->
ReLU unit as one C++ op and one autograd node. It must be eager's modules bit for bit:
outputs, every gradient, running statistics and num_batches_tracked, through its Python
entry point (ops.EAGER_UNIT), through torch.ops and through the modules' plans."""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
from typing import ClassVar

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.overrides import TorchFunctionMode

import resnet_fused
from resnet_fused import _extension, ops
from resnet_fused.activations import LEAKY_RELU, NAMES, Act, as_act

pytestmark = pytest.mark.skipif(ops.EAGER_UNIT is None, reason="the compiled extension is needed")

OP = torch.ops.resnet_fused.conv_bn_act_eager.default if ops.EAGER_UNIT is not None else None
ENTRIES = {"python": lambda *a: ops.EAGER_UNIT(*a), "torch.ops": lambda *a: OP(*a)}


def _modules(dtype, conv_bias, affine, track, momentum, channels_last, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 5, 3, padding=1, stride=1, bias=conv_bias).to(dtype)
    bn = nn.BatchNorm2d(5, momentum=momentum, affine=affine, track_running_stats=track).to(dtype)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
        if track:
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    return conv, bn


def _inputs(dtype, residual, channels_last, seed=1):
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, 5, 6, dtype=dtype).to(memory_format=fmt).requires_grad_()
    r = None
    if residual:
        r = torch.randn(2, 5, 5, 6, dtype=dtype).to(memory_format=fmt).requires_grad_()
    return x, r


def _eager(conv, bn, x, residual, relu):
    """What eager's modules compute (torchvision's spelling: in-place add and ReLU; ``relu``
    an Act: that activation's torch function)."""
    out = bn(conv(x))
    if residual is not None:
        out += residual
    if isinstance(relu, Act):
        return relu(out)
    return out.relu_() if relu else out


def _unit(entry, conv, bn, x, residual, relu):
    """The op with nn.BatchNorm2d.forward's reading of the module (as modules._run_plan)."""
    training = bn.training
    rm, rv = bn.running_mean, bn.running_var
    if training and not bn.track_running_stats:
        rm = rv = None
    tracked = bn.num_batches_tracked if training and bn.track_running_stats else None
    return ENTRIES[entry](
        x, conv.weight, conv.bias, bn.weight, bn.bias, rm, rv, tracked, conv.stride,
        conv.padding, conv.dilation, conv.groups, training or rm is None, bn.momentum, bn.eps,
        residual, *(relu.args if isinstance(relu, Act) else (int(relu), 0.0)),
    )  # fmt: skip


def _grads(conv, bn, x, residual):
    ts = [x, conv.weight, conv.bias, bn.weight, bn.bias, residual]
    return [None if t is None or t.grad is None else t.grad.clone() for t in ts]


def _assert_identical(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: max diff {(a - b).abs().max().item()}"


def _state(bn):
    return [bn.running_mean, bn.running_var, bn.num_batches_tracked]


def _check(entry, dtype, residual, relu, conv_bias, affine, track, momentum, channels_last,
           training, steps=2):  # fmt: skip
    conv, bn = _modules(dtype, conv_bias, affine, track, momentum, channels_last)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    for m in (conv, bn, ref_conv, ref_bn):
        m.train(training)
    x, r = _inputs(dtype, residual, channels_last)
    rx, rr = (None if t is None else t.detach().clone().requires_grad_() for t in (x, r))
    for step in range(steps):
        out = _unit(entry, conv, bn, x, r, relu)
        ref = _eager(ref_conv, ref_bn, rx, rr, relu)
        _assert_identical(out, ref, f"output, step {step}")
        assert out.stride() == ref.stride()
        g = torch.randn_like(ref)
        out.backward(g)
        ref.backward(g)
        names = ["input", "conv weight", "conv bias", "bn weight", "bn bias", "residual"]
        for name, a, b in zip(names, _grads(conv, bn, x, r), _grads(ref_conv, ref_bn, rx, rr),
                              strict=True):  # fmt: skip
            _assert_identical(a, b, f"grad of {name}, step {step}")
        for name, a, b in zip(("running_mean", "running_var", "num_batches_tracked"),
                              _state(bn), _state(ref_bn), strict=True):  # fmt: skip
            _assert_identical(a, b, f"{name}, step {step}")


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bit_identical_to_eager_modules(entry, dtype, training, channels_last):
    """Every combination of residual, ReLU, conv bias, affine, track_running_stats and
    momentum (0.1, None: the cumulative average through num_batches_tracked)."""
    for residual, relu, conv_bias, affine, track, momentum in itertools.product(
        [False, True], [True, False], [False, True], [True, False], [True, False], [0.1, None]
    ):
        if not training and not track:
            continue  # (eval without running statistics is batch statistics: covered above)
        _check(entry, dtype, residual, relu, conv_bias, affine, track, momentum, channels_last,
               training)  # fmt: skip


@pytest.mark.parametrize(
    "act", [as_act(n) for n in NAMES] + [Act(LEAKY_RELU, -0.2)], ids=[*NAMES, "leaky-negative"]
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_activation_bit_identical_to_eager_modules(act, training):
    """Each activation (those whose derivative eager reads from the output, and the others,
    whose pre-activation the op keeps as eager's does), with and without a residual."""
    for residual in (False, True):
        _check("torch.ops", torch.float32, residual, act, False, True, True, 0.1, True, training)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_requires_grad"])
def test_forward_only_calls(mode):
    """Calls autograd does not record (the forward-only kernels) update the running
    statistics and the counter as eager's modules do, and record no graph."""
    conv, bn = _modules(torch.float32, True, True, True, None, False)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    x, r = _inputs(torch.float32, True, False)
    x, r = x.detach(), r.detach()
    if mode == "no_requires_grad":
        for p in [*conv.parameters(), *bn.parameters(), *ref_conv.parameters(),
                  *ref_bn.parameters()]:  # fmt: skip
            p.requires_grad_(False)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(
        mode, torch.enable_grad
    )
    for _ in range(3):
        with ctx():
            out = _unit("python", conv, bn, x, r, True)
            ref = _eager(ref_conv, ref_bn, x, r, True)
        assert out.grad_fn is None and not out.requires_grad
        _assert_identical(out, ref, "output")
        for a, b in zip(_state(bn), _state(ref_bn), strict=True):
            _assert_identical(a, b, "running statistics")


def test_one_autograd_node_and_version_counters():
    conv, bn = _modules(torch.float32, False, True, True, 0.1, False)
    x, _ = _inputs(torch.float32, False, False)
    versions = [t._version for t in _state(bn)]
    out = _unit("python", conv, bn, x, None, True)
    assert out.grad_fn.name() == "ConvBnActEagerBackward"
    assert {e[0].name() for e in out.grad_fn.next_functions if e[0] is not None} == {
        "torch::autograd::AccumulateGrad"
    }
    # The running statistics and the counter were written: their versions moved (a fold
    # cached on versions sees the change).
    assert all(t._version > v for t, v in zip(_state(bn), versions, strict=True))


def test_grad_of_selected_inputs_only():
    """torch.autograd.grad for some inputs computes those only, equal to eager's."""
    conv, bn = _modules(torch.float64, True, True, True, 0.1, False)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    x, r = _inputs(torch.float64, True, False)
    out = _unit("python", conv, bn, x, r, True)
    ref = _eager(ref_conv, ref_bn, x, r, True)
    for inputs, ref_inputs in (([bn.weight], [ref_bn.weight]), ([x, r], [x, r]),
                               ([conv.bias], [ref_conv.bias])):  # fmt: skip
        got = torch.autograd.grad(out.sum(), inputs, retain_graph=True)
        want = torch.autograd.grad(ref.sum(), ref_inputs, retain_graph=True)
        for a, b in zip(got, want, strict=True):
            _assert_identical(a, b, "grad")
    assert conv.weight.grad is None and x.grad is None


def test_double_backward_is_refused_with_a_clear_error():
    conv, bn = _modules(torch.float64, False, True, True, 0.1, False)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    x, _ = _inputs(torch.float64, False, False)
    out = _unit("python", conv, bn, x, None, True)
    ref = _eager(ref_conv, ref_bn, x, None, True)
    # create_graph=True itself works and gives eager's first derivatives...
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    (rgx,) = torch.autograd.grad(ref.square().sum(), x, create_graph=True)
    _assert_identical(gx, rgx, "first derivative")
    # ...but differentiating through this unit's backward is refused.
    with pytest.raises(RuntimeError, match="conv_bn_act_eager: double backward is not supported"):
        gx.sum().backward()


def test_forward_mode_ad_runs_eagers_ops():
    conv, bn = _modules(torch.float64, True, True, True, 0.1, False)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    x, _ = _inputs(torch.float64, False, False)
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        out = _unit("python", conv, bn, fwAD.make_dual(x.detach(), tangent), None, True)
        ref = _eager(ref_conv, ref_bn, fwAD.make_dual(x.detach(), tangent), None, True)
        (o, t), (ro, rt) = fwAD.unpack_dual(out), fwAD.unpack_dual(ref)
        _assert_identical(o, ro, "output")
        _assert_identical(t, rt, "tangent")


class _Logged(torch.Tensor):
    calls: ClassVar[list] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


class _Mode(TorchFunctionMode):
    calls: ClassVar[list] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_torch_function_subclasses_and_modes_run_eagers_ops(monkeypatch):
    """Tensors whose type defines __torch_function__, or a TorchFunctionMode, get
    NotImplemented from the entry point (nothing done, the counter untouched), and the
    modules then run eager's ops one by one, which they see."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", "eager")
    conv, bn = _modules(torch.float32, False, True, True, 0.1, False)
    x, _ = _inputs(torch.float32, False, False)
    tracked = int(bn.num_batches_tracked)
    assert _unit("python", conv, bn, x.detach().as_subclass(_Logged), None, True) is (
        NotImplemented
    )
    with _Mode():
        assert _unit("python", conv, bn, x, None, True) is NotImplemented
    assert int(bn.num_batches_tracked) == tracked

    unit = resnet_fused.FusedConvBNReLU2d.from_modules(*copy.deepcopy((conv, bn))).train()
    ref_conv, ref_bn = copy.deepcopy((conv, bn))
    for _ in range(2):  # the first call plans, the second runs the plan
        _Logged.calls.clear()
        out = unit(x.detach().as_subclass(_Logged))
        ref = _eager(ref_conv, ref_bn, x.detach(), None, True)
        assert "conv2d" in _Logged.calls and "batch_norm" in _Logged.calls
        _assert_identical(out.as_subclass(torch.Tensor), ref, "output")
    _Mode.calls.clear()
    with _Mode():
        out = unit(x.detach())
    ref = _eager(ref_conv, ref_bn, x.detach(), None, True)
    assert "conv2d" in _Mode.calls and "batch_norm" in _Mode.calls
    _assert_identical(out, ref, "output")
    _assert_identical(unit.bn.running_mean, ref_bn.running_mean, "running mean")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(training):
    conv, bn = _modules(torch.float64, True, True, True, 0.1, False)
    bn.train(training)
    x, r = _inputs(torch.float64, True, False)
    args = (
        x, conv.weight.detach().requires_grad_(), conv.bias.detach().requires_grad_(),
        bn.weight.detach().requires_grad_(), bn.bias.detach().requires_grad_(),
        bn.running_mean, bn.running_var, bn.num_batches_tracked if training else None,
        [1, 1], [1, 1], [1, 1], 1, training, 0.1, 1e-5, r, 1, 0.0,
    )  # fmt: skip
    torch.library.opcheck(OP, args)


def test_bad_arguments_are_refused():
    conv, bn = _modules(torch.float32, False, True, True, 0.1, False)
    x, _ = _inputs(torch.float32, False, False)
    with pytest.raises(TypeError, match="expected a Tensor or None"):
        ops.EAGER_UNIT(x, conv.weight, 3, None, None, None, None, None, (1, 1), (1, 1), (1, 1),
                       1, True, 0.1, 1e-5, None, 1, 0.0)  # fmt: skip
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        _unit("python", conv, bn, x, torch.zeros(5, 1, 1), True)
    with pytest.raises(RuntimeError, match="bn_weight should contain 5 elements"):
        OP(x, conv.weight, None, torch.ones(3), None, None, None, None, [1, 1], [1, 1], [1, 1],
           1, True, 0.1, 1e-5, None, 1, 0.0)  # fmt: skip
    with pytest.raises(RuntimeError, match="act must be an activation code"):
        OP(x, conv.weight, None, None, None, None, None, None, [1, 1], [1, 1], [1, 1],
           1, True, 0.1, 1e-5, None, 9, 0.0)  # fmt: skip


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_modules_run_the_op_from_their_plan(monkeypatch, mode):
    """RESNET_FUSED_AUTO=eager: a FusedConvBNReLU2d's plan runs the op (one node), and
    every step equals eager's modules bit for bit."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", "eager")
    conv, bn = _modules(torch.float32, True, True, True, None, False)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn).train(mode == "train")
    conv.train(mode == "train"), bn.train(mode == "train")
    ref_conv.train(mode == "train"), ref_bn.train(mode == "train")
    x, r = _inputs(torch.float32, True, False)
    rx, rr = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    for step in range(3):
        out, ref = unit(x, r), _eager(ref_conv, ref_bn, rx, rr, True)
        if step:
            assert unit._fold_cache.plan[1].unit is ops.EAGER_UNIT
        assert out.grad_fn.name() == "ConvBnActEagerBackward"
        _assert_identical(out, ref, "output")
        out.backward(torch.ones_like(out))
        ref.backward(torch.ones_like(ref))
        for a, b in zip(_grads(conv, bn, x, r), _grads(ref_conv, ref_bn, rx, rr), strict=True):
            _assert_identical(a, b, "grad")
        for a, b in zip(_state(bn), _state(ref_bn), strict=True):
            _assert_identical(a, b, "running statistics")


@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_under_autocast_the_plan_runs_the_op_as_eager(monkeypatch, mode, channels_last):
    """Under torch.autocast the op's Autocast kernel makes conv2d's casts (input, weight
    through autocast's cache, bias; the residual too) and runs the unit in the autocast
    dtype: a planned unit takes the one C++ call (no Python casts) and equals eager's
    modules under autocast bit for bit: training steps (outputs, gradients, running
    statistics) and inference under no_grad."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", "eager")
    conv, bn = _modules(torch.float32, True, True, True, 0.1, channels_last)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    training = mode == "train"
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn).train(training)
    for m in (conv, bn, ref_conv, ref_bn):
        m.train(training)
    x, r = _inputs(torch.float32, True, channels_last)
    r = r.detach().bfloat16().requires_grad_()  # (what a block's shortcut gives under autocast)
    rx, rr = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    calls = []
    real_unit = ops.EAGER_UNIT

    def counting_unit(*args):
        calls.append(args[0].dtype)
        return real_unit(*args)

    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(training):
            out, ref = unit(x, r), _eager(ref_conv, ref_bn, rx, rr, True)
        if step == 0:
            plan = unit._fold_cache.plan[1]
            assert plan.unit is ops.EAGER_UNIT
            monkeypatch.setattr(plan, "unit", counting_unit)
        else:
            assert calls[-1] == torch.float32  # (the op got fp32 tensors: it made the casts)
        _assert_identical(out, ref, f"output, step {step}")
        assert out.dtype == torch.bfloat16
        if training:
            assert out.grad_fn.name() == "ConvBnActEagerBackward" or step == 0
            out.backward(torch.ones_like(out))
            ref.backward(torch.ones_like(ref))
            for a, b in zip(_grads(conv, bn, x, r), _grads(ref_conv, ref_bn, rx, rr),
                            strict=True):  # fmt: skip
                _assert_identical(a, b, f"grad, step {step}")
        for a, b in zip(_state(bn), _state(ref_bn), strict=True):
            _assert_identical(a, b, f"running statistics, step {step}")
    assert len(calls) == 2


def test_benchmarks_do_not_count_the_eager_unit_as_fused(monkeypatch):
    from resnet_fused.bench import model as bench_model

    monkeypatch.setenv("RESNET_FUSED_AUTO", "eager")
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(*_modules(torch.float32, False, True,
                                                                 True, 0.1, False))  # fmt: skip
    x, _ = _inputs(torch.float32, False, False)
    unit(x)  # (plans)
    assert bench_model.fused_op_calls(lambda: unit(x).sum().backward()) == 0


def test_eval_fold_sees_training_by_the_op(monkeypatch):
    """Eval (fused: a cached fold), training steps run by the op, eval again: the fold is
    remade from the updated running statistics (the op bumps their versions)."""
    conv, bn = _modules(torch.float32, False, True, True, 0.1, False)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn)
    x, _ = _inputs(torch.float32, False, False)
    x = x.detach()

    def both(mode, policy):
        monkeypatch.setenv("RESNET_FUSED_AUTO", policy)
        for m in (unit, conv, bn, ref_conv, ref_bn):
            m.train(mode == "train")
        with torch.no_grad():
            return unit(x), _eager(ref_conv, ref_bn, x, None, True)

    for mode, policy in [("eval", "fused"), ("train", "eager"), ("train", "eager"),
                         ("eval", "fused")]:  # fmt: skip
        out, ref = both(mode, policy)
        torch.testing.assert_close(out, ref)
    _assert_identical(bn.running_var, ref_bn.running_var, "running var")


def test_tensor_signature():
    sig = _extension._C.tensor_signature
    x = torch.randn(2, 3, 4, 5)
    assert sig(x, None) == sig(torch.empty(2, 3, 4, 5), None)
    assert sig(x, None) != sig(x, x)
    assert sig(x) != sig(x.to(memory_format=torch.channels_last))
    assert sig(x) != sig(x.double())
    assert sig(x) != sig(x.requires_grad_())
    assert sig(x) != sig(x.view(2, 3, 20))
    assert sig(x, 3) is None


_FALLBACK = r"""
import copy, sys
sys.modules["resnet_fused._C"] = None  # the extension fails to import
import torch
from torch import nn
import resnet_fused
from resnet_fused import _extension, ops
assert not _extension.is_loaded() and ops.EAGER_UNIT is None
torch.manual_seed(0)
conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None)
unit = resnet_fused.FusedConvBNReLU2d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn))
x = torch.randn(2, 3, 5, 5, requires_grad=True)
xr = x.detach().clone().requires_grad_()
for mode in ("train", "train", "eval", "eval"):
    for m in (unit, conv, bn):
        m.train(mode == "train")
    out, ref = unit(x), torch.relu(bn(conv(xr)))
    torch.testing.assert_close(out, ref)
    out.sum().backward(); ref.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
torch.testing.assert_close(unit.bn.running_var, bn.running_var)
assert int(unit.bn.num_batches_tracked) == int(bn.num_batches_tracked) == 2
print("ok")
"""


def test_units_work_without_the_extension():
    """Without _C: no EAGER_UNIT; the modules (plans included) run eager's ops in Python."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RESNET_FUSED_AUTO": "eager", "RESNET_FUSED_CACHE_DIR": ""}  # fmt: skip
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", _FALLBACK], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
