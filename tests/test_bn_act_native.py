"""The fused BatchNorm+activation's autograd in C++ (csrc/bn_act_autograd.cpp:
``_C.bn_act_train``) against the Python path it replaces (``_BatchNormAct``): the same op
calls with the same arguments, so outputs, every gradient and the running statistics are
equal bit for bit, for every activation, with and without residual and affine
parameters, in training and eval, for every subset of inputs that need a gradient."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import resnet_fused
from resnet_fused.functional import batch_norm_act as bn_module

pytestmark = pytest.mark.skipif(
    bn_module._BN_ACT_TRAIN is None, reason="extension not built (no bn_act_train)"
)

_NATIVE_FN = bn_module._BN_ACT_TRAIN
ACTS = [
    "identity", "relu", "relu6", "leaky_relu", "silu", "hardswish", "gelu", "gelu_tanh",
    "sigmoid",
]  # fmt: skip


def _inputs(dtype, layout, residual, affine, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 5, 6, 7)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    r = torch.randn(shape, generator=gen, dtype=torch.float64) if residual else None
    w = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(5, generator=gen, dtype=torch.float64) if affine else None
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    pdtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    return (
        x.to(dtype).contiguous(memory_format=fmt),
        None if r is None else r.to(dtype).contiguous(memory_format=fmt),
        None if w is None else w.to(pdtype),
        None if b is None else b.to(pdtype),
        g.to(dtype).contiguous(memory_format=fmt),
    )


def _run(native, monkeypatch, act, training, need, tensors, running):
    """batch_norm_act on the "cpu" backend through bn_act_train (native) or the Python
    autograd.Function; the output, the gradients of the tensors in ``need`` and the
    running statistics after the call."""
    x, r, w, b, g = (None if t is None else t.clone() for t in tensors)
    rm, rv = (t.clone() for t in running)
    monkeypatch.setattr(bn_module, "_BN_ACT_TRAIN", _NATIVE_FN if native else None)
    leaves = {"x": x, "r": r, "w": w, "b": b}
    for name in need:
        if leaves[name] is not None:
            leaves[name].requires_grad_()
    out = resnet_fused.batch_norm_act(
        x, rm, rv, w, b, training, 0.1, 1e-5, residual=r, activation=act, backend="cpu"
    )
    if out.requires_grad:  # (the path asked for)
        assert ("BnActFunction" in out.grad_fn.name()) == native, out.grad_fn.name()
    wanted = [leaves[n] for n in need if leaves[n] is not None]
    grads = torch.autograd.grad(out, wanted, g) if wanted and out.requires_grad else ()
    return out, grads, rm, rv


def _identical(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), what
    assert torch.equal(a, b), f"{what}: max difference {(a.double() - b.double()).abs().max()}"


_NEEDS = [("x",), ("w",), ("b",), ("r",), ("x", "w", "b", "r"), ("w", "b"), ("x", "r")]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
def test_native_equals_python_path(monkeypatch, act, training, dtype):
    for layout, residual, affine, need in itertools.product(
        ["nchw", "channels_last"], [False, True], [True, False], _NEEDS
    ):
        tensors = _inputs(dtype, layout, residual, affine)
        running = (torch.randn(5) * 0.1, torch.rand(5) + 0.5)
        case = f"{layout} residual={residual} affine={affine} need={need}"
        native = _run(True, monkeypatch, act, training, need, tensors, running)
        python = _run(False, monkeypatch, act, training, need, tensors, running)
        _identical(native[0], python[0], f"output, {case}")
        assert len(native[1]) == len(python[1]), case
        for i, (a, b) in enumerate(zip(native[1], python[1], strict=True)):
            _identical(a, b, f"gradient {i}, {case}")
        _identical(native[2], python[2], f"running mean, {case}")
        _identical(native[3], python[3], f"running var, {case}")


def test_native_node_runs_and_python_path_remains(monkeypatch):
    """Outside torch.compile the "cpu" backend's training call is the C++ node; a tensor
    with __torch_function__ gets the Python autograd.Function (NotImplemented from the
    extension), with the same result."""
    x, _, w, b, g = _inputs(torch.float32, "nchw", False, True)
    x.requires_grad_()
    out = resnet_fused.batch_norm_act(x, None, None, w, b, True, backend="cpu")
    assert "BnActFunction" in out.grad_fn.name()

    class Tagged(torch.Tensor):
        pass

    xt = x.detach().clone().as_subclass(Tagged).requires_grad_()
    out_t = resnet_fused.batch_norm_act(xt, None, None, w, b, True, backend="cpu")
    assert "_BatchNormAct" in out_t.grad_fn.name()
    assert torch.equal(out_t.as_subclass(torch.Tensor), out.detach())
    (gx,) = torch.autograd.grad(out, x, g)
    (gxt,) = torch.autograd.grad(out_t, xt, g)
    assert torch.equal(gxt.as_subclass(torch.Tensor), gx)


def test_native_node_modules_and_checks(monkeypatch):
    """A training step of a converted model's BatchNorm sites and fused units (planned:
    BatchNormPlan.run and TrainPlan's _train_forward) takes the C++ node; the saved
    tensors go through saved_tensors_hooks; an in-place change of a saved input after the
    forward is refused at the backward, as autograd refuses it for eager's ops."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", "fused")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.SiLU(), nn.BatchNorm2d(6),
        nn.ReLU6(),
    )  # fmt: skip
    fused = resnet_fused.convert(model).train()
    x = torch.randn(2, 3, 6, 6)
    names = set()
    for _ in range(2):  # (the second call: the plans)
        out = fused(x)
        node, stack = out.grad_fn, [out.grad_fn]
        while stack:
            node = stack.pop()
            if node is None:
                continue
            names.add(node.name())
            stack.extend(f for f, _ in node.next_functions)
        out.sum().backward()
    assert any("BnActFunction" in n for n in names), names
    assert not any("_BatchNormAct" in n for n in names), names

    packed = []
    xr = torch.randn(2, 6, 5, 5, requires_grad=True)
    w, b = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = resnet_fused.batch_norm_act(xr, None, None, w, b, True, backend="cpu")
    assert "BnActFunction" in out.grad_fn.name()
    assert any(t is xr or t.data_ptr() == xr.data_ptr() for t in packed)

    y = torch.randn(2, 6, 5, 5)
    yl = y.clone().requires_grad_()
    y2 = yl * 1  # (a non-leaf, changed in place below)
    out = resnet_fused.batch_norm_act(y2, None, None, w, b, True, backend="cpu")
    with torch.no_grad():
        y2.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_native_computes_the_gradients_asked_for(monkeypatch, act, training):
    """Every leaf requires a gradient, a subset is asked for (torch.autograd.grad): the
    C++ node asks autograd which gradients this backward computes (the Python Function
    decides at the forward from requires_grad), so it may skip the sums; the gradients it
    gives equal the Python path's to rounding (SiLU/GELU's act' then comes from the
    elementwise pass instead of the reduction pass's stored product)."""
    x, _, w, b, g = _inputs(torch.float32, "channels_last", False, True)
    running = (torch.randn(5) * 0.1, torch.rand(5) + 0.5)
    for wanted in (("x",), ("w",), ("b",), ("x", "b")):
        got = {}
        for native in (True, False):
            monkeypatch.setattr(bn_module, "_BN_ACT_TRAIN", _NATIVE_FN if native else None)
            leaves = {"x": x.clone().requires_grad_(), "w": w.clone().requires_grad_(),
                      "b": b.clone().requires_grad_()}  # fmt: skip
            rm, rv = (t.clone() for t in running)
            out = resnet_fused.batch_norm_act(
                leaves["x"], rm, rv, leaves["w"], leaves["b"], training, activation=act,
                backend="cpu",
            )  # fmt: skip
            got[native] = torch.autograd.grad(out, [leaves[n] for n in wanted], g)
        for a, c in zip(got[True], got[False], strict=True):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_native_residual_that_is_the_input(monkeypatch):
    """relu(bn(x) + x): one tensor as input and residual (the Python path passes an alias,
    see functional._common.distinct); the gradients sum over both uses, equal bit for bit."""
    x, _, w, b, g = _inputs(torch.float32, "nchw", False, True)
    got = {}
    for native in (True, False):
        monkeypatch.setattr(bn_module, "_BN_ACT_TRAIN", _NATIVE_FN if native else None)
        xl, wl, bl = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone()
        out = resnet_fused.batch_norm_act(xl, None, None, wl, bl, True, residual=xl,
                                          backend="cpu")  # fmt: skip
        got[native] = (out, *torch.autograd.grad(out, [xl, wl], g))
    for i, (a, c) in enumerate(zip(got[True], got[False], strict=True)):
        _identical(a.detach(), c.detach(), f"result {i}")


def test_native_declines_under_a_torch_function_mode():
    """A TorchFunctionMode sees the Python path's calls (the extension returns
    NotImplemented there): the output's node is the Python Function's."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x, _, w, b, _ = _inputs(torch.float32, "nchw", False, True)
    x.requires_grad_()
    with Mode():
        out = resnet_fused.batch_norm_act(x, None, None, w, b, True, backend="cpu")
    assert "_BatchNormAct" in out.grad_fn.name()
    assert seen
