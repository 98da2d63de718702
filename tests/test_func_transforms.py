"""Converted models, fused modules and the functional API under ``torch.func`` transforms
(``vmap``, ``grad``, ``jacrev``, ``jvp``, per-sample gradients) and ``make_fx``; and, running
fused, under the dispatch modes users measure with (``FakeTensorMode``, ``FlopCounterMode``).

The fused ops have no batching or forward-mode rules, and the fused path decides in Python
on values (the eval fold's fingerprint): under the transforms and make_fx the fused sites
run their modules themselves and the functional API eager's composition (``runs_eagerly``),
so every result is eager's own. Outside them the fused path runs as before (checked here
too). Everything in fp64, compared with the unconverted model to fp64 rounding.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_resnet import _randomise_bn
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

import resnet_fused
from resnet_fused import reference
from resnet_fused.bench.tutorial import TutorialResNet
from resnet_fused.functional._common import runs_eagerly

TOL = dict(rtol=1e-10, atol=1e-12)


def _make(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":  # torchvision's blocks: the fused block classes
        model = torchvision.models.resnet18(num_classes=5)
    elif name == "mobilenet_v3_small":  # Hardswish and ReLU units, SE blocks
        model = torchvision.models.mobilenet_v3_small(num_classes=5)
    elif name == "unit_module":
        conv, bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        model = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn)
        model = nn.Sequential(nn.Identity(), model)  # (parameter names of a model)
    elif name == "bn_act_module":
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            resnet_fused.FusedBatchNormAct2d(6, activation="silu"),
        )
    else:  # a user-written ResNet: the graph converter
        model = TutorialResNet((1, 1, 1, 1), widths=(8, 8, 16, 16), num_classes=5, small_input=True)
    _randomise_bn(model)
    return model.double()


class _UnitRef(nn.Module):
    """What FusedConvBNReLU2d replaces, with its parameter names: relu(bn(conv(x)))."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _BNSiLURef(nn.BatchNorm2d):
    """What FusedBatchNormAct2d(activation="silu") replaces: silu(batch_norm(x))."""

    def forward(self, x):
        return F.silu(super().forward(x))


def _unfused(model: nn.Module) -> nn.Module:
    """The fused modules' eager twin: the same parameters, names and buffers, eager's
    modules."""
    model = copy.deepcopy(model)
    fused = model[1]
    if isinstance(fused, resnet_fused.FusedConvBNReLU2d):
        model[1] = _UnitRef(fused.conv, fused.bn)
    else:
        ref = _BNSiLURef(fused.num_features).double()
        ref.load_state_dict(fused.state_dict())
        model[1] = ref
    return model


def _pair(name: str, mode: str):
    """The unconverted model and its converted copy (fused modules: their eager twin and
    the fused modules)."""
    model = _make(name)
    if name in ("unit_module", "bn_act_module"):
        fused = copy.deepcopy(model)
        model = _unfused(model)
    else:
        fused = resnet_fused.convert(copy.deepcopy(model))
    return model.train(mode == "train"), fused.train(mode == "train")


def _input(batch: int = 3, size: int = 16) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, size, size, dtype=torch.float64)


def _fused_ops(fn) -> list[str]:
    """The resnet_fused ops ``fn()`` dispatched (the profiler is not a dispatch mode: it
    does not change the path the model takes)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name.startswith("resnet_fused::")})


MODELS = ["tutorial", "resnet18", "mobilenet_v3_small", "unit_module", "bn_act_module"]


def test_fused_path_runs_outside_transforms_and_modes():
    """The premise of the comparisons below: outside transforms and modes the converted
    models run fused ops (so the tests compare the fallback, not eager with eager)."""
    assert not runs_eagerly()
    for name in MODELS:
        for mode in ("eval", "train"):
            _, fused = _pair(name, mode)
            x = _input()
            assert _fused_ops(lambda fused=fused, x=x: fused(x)), (name, mode)


@pytest.mark.parametrize("name", MODELS)
def test_vmap_over_samples(name):
    model, fused = _pair(name, "eval")
    x = _input()
    expected = vmap(lambda xi: model(xi[None]))(x)
    called = _fused_ops(lambda: vmap(lambda xi: fused(xi[None]))(x))
    out = vmap(lambda xi: fused(xi[None]))(x)
    torch.testing.assert_close(out, expected, **TOL)
    assert called == []


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_func_grad_of_functional_call(name, mode):
    """Gradients in every parameter through ``torch.func.grad`` of ``functional_call``
    (parameters and buffers passed in, so that training updates the passed statistics,
    as eager's BatchNorm does: compared too)."""
    model, fused = _pair(name, mode)
    x = _input()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    results = []
    for m in (model, fused):
        buffers = {k: v.clone() for k, v in m.named_buffers()}

        def loss(p, b, m=m):  # (the buffers as inputs: training writes them)
            return functional_call(m, {**p, **b}, (x,)).square().sum()

        torch.manual_seed(4)  # (mobilenet's Dropout draws the same mask for both)
        results.append((grad(loss)(params, buffers), buffers))
    (g_ref, b_ref), (g, b) = results
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], **TOL, msg=k)
    for k in b_ref:
        torch.testing.assert_close(b[k], b_ref[k], **TOL, msg=k)


@pytest.mark.parametrize("name", ["tutorial", "resnet18", "bn_act_module"])
def test_jacrev_and_jvp_in_the_input(name):
    model, fused = _pair(name, "eval")
    x = _input(batch=1, size=8)
    torch.testing.assert_close(jacrev(fused)(x), jacrev(model)(x), **TOL)
    v = torch.randn_like(x)
    out, tangent = jvp(fused, (x,), (v,))
    out_ref, tangent_ref = jvp(model, (x,), (v,))
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(tangent, tangent_ref, **TOL)


@pytest.mark.parametrize("name", ["tutorial", "resnet18"])
def test_per_sample_gradients_in_training(name):
    """functorch's recipe for per-sample gradients of a model with BatchNorm in training:
    ``replace_all_batch_norm_modules_`` (no running statistics), then ``vmap(grad(...))``
    over samples. The converted model gives the unconverted model's gradients."""
    from torch.func import replace_all_batch_norm_modules_

    model, fused = _pair(name, "train")
    x = _input(batch=4, size=64 if name == "resnet18" else 16)  # (resnet18: 2x2 maps at the end)
    y = torch.arange(4) % 5
    out = []
    for m in (model, fused):
        replace_all_batch_norm_modules_(m)
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(p, xi, yi, m=m):
            return F.cross_entropy(functional_call(m, p, (xi[None],)), yi[None])

        out.append(vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y))
    for k in out[0]:
        torch.testing.assert_close(out[1][k], out[0][k], **TOL, msg=k)


@pytest.mark.parametrize("name", ["tutorial", "resnet18", "mobilenet_v3_small"])
def test_make_fx_traces_the_models_own_ops(name):
    from torch.fx.experimental.proxy_tensor import make_fx

    model, fused = _pair(name, "eval")
    x = _input()
    graph = make_fx(lambda inp: fused(inp))(x)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "resnet_fused" in t]
    assert any("convolution" in t for t in targets)
    torch.testing.assert_close(graph(x), model(x), **TOL)


@pytest.mark.parametrize("name", ["tutorial", "resnet18"])
def test_make_fx_pre_dispatch(name):
    """make_fx(pre_dispatch=True) keeps its proxy mode on a stack of its own."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model, fused = _pair(name, "eval")
    x = _input()
    graph = make_fx(lambda inp: fused(inp), pre_dispatch=True)(x)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "resnet_fused" in t]
    torch.testing.assert_close(graph(x), model(x), **TOL)


def test_sync_bn_model_under_a_transform_says_why_it_cannot_run():
    model, _ = _pair("tutorial", "train")
    fused = resnet_fused.convert(copy.deepcopy(model), sync_bn=True).train()
    params = {k: v.detach() for k, v in fused.named_parameters()}
    buffers = {k: v.clone() for k, v in fused.named_buffers()}
    x = _input()
    with pytest.raises(RuntimeError, match="torch.func transform"):
        grad(lambda p, b: functional_call(fused, {**p, **b}, (x,)).sum())(params, buffers)


@pytest.mark.parametrize("name", ["tutorial", "resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_flop_counter_counts_the_models_flops(name, mode):
    """FlopCounterMode over a converted model (which runs fused under it) counts the
    unconverted model's flops."""
    from torch.utils.flop_counter import FlopCounterMode

    model, fused = _pair(name, mode)
    x = _input()
    counts = []
    for m in (model, fused):
        with FlopCounterMode(display=False) as counter:
            out = m(x)
            if mode == "train":
                out.sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] > 0
    assert counts[1] == counts[0]


def test_a_counting_dispatch_mode_sees_the_fused_ops():
    """Dispatch modes other than make_fx's are not transforms: the model runs fused
    under them (as a user counting the ops that run expects), with eager's results."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(str(func))
            return func(*args, **(kwargs or {}))

    model, fused = _pair("tutorial", "eval")
    x = _input()
    names = []
    with OpLog():
        out = fused(x)
    assert any("resnet_fused" in n for n in names)
    assert not any("batch_norm" in n for n in names)
    torch.testing.assert_close(out, model(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["tutorial", "resnet18"])
def test_fake_tensor_mode_forward(name):
    """Shape propagation with fake inputs through the fused path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model, fused = _pair(name, "eval")
    x = _input()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor(x)
        out, ref = fused(fake), model(fake)
    assert out.shape == ref.shape == (3, 5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-10)  # still fused after


# --- the functional API -------------------------------------------------------------------


def _conv_bn_args():
    torch.manual_seed(2)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    bn_w = torch.rand(6, dtype=torch.float64) + 0.5
    bn_b = torch.randn(6, dtype=torch.float64)
    rm = torch.randn(6, dtype=torch.float64) * 0.1
    rv = torch.rand(6, dtype=torch.float64) + 0.5
    return x, w, bn_w, bn_b, rm, rv


@pytest.mark.parametrize("activation", ["relu", "silu", "hardswish"])
def test_functional_conv_bn_act_under_vmap_grad_and_jvp(activation):
    x, w, bn_w, bn_b, rm, rv = _conv_bn_args()
    r = torch.randn(3, 6, 7, 7, dtype=torch.float64) if activation == "relu" else None

    def unit(fn, x, w, r=r, training=False):
        stats = (None, None) if training else (rm, rv)
        return fn(
            x, w, bn_w, bn_b, *stats, padding=1, training=training, residual=r,
            activation=activation,
        )  # fmt: skip

    fused = functools.partial(unit, resnet_fused.conv_bn_act)
    ref = functools.partial(unit, reference.conv_bn_act)

    assert _fused_ops(lambda: fused(x, w))  # (the fused path outside transforms)
    rs = r if r is not None else torch.zeros(3, 6, 7, 7, dtype=torch.float64)
    per_sample = vmap(lambda xi, ri: fused(xi[None], w, ri[None] if r is not None else None))
    expected = vmap(lambda xi, ri: ref(xi[None], w, ri[None] if r is not None else None))
    torch.testing.assert_close(per_sample(x, rs), expected(x, rs), **TOL)
    for training in (False, True):
        g = grad(lambda w, t=training: fused(x, w, training=t).sum())(w)
        g_ref = grad(lambda w, t=training: ref(x, w, training=t).sum())(w)
        torch.testing.assert_close(g, g_ref, **TOL)
    v = torch.randn_like(x)
    torch.testing.assert_close(
        jvp(lambda x: fused(x, w), (x,), (v,)), jvp(lambda x: ref(x, w), (x,), (v,)), **TOL
    )


def test_functional_conv_bn_act_under_autocast_and_transforms():
    """Autocast inside the transform casts eager's ops, as in the unconverted code (the
    fused path's autocast branch folds with a fused op)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, bn_w, bn_b, rm, rv = (t.float() for t in _conv_bn_args())

    def run(fn, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(x, w, bn_w, bn_b, rm, rv, padding=1).float()

    g = grad(lambda w: run(resnet_fused.conv_bn_act, w).sum())(w)
    torch.testing.assert_close(g, grad(lambda w: run(reference.conv_bn_act, w).sum())(w))
    graph = make_fx(lambda w: run(resnet_fused.conv_bn_act, w))(w)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "resnet_fused" in t]
    torch.testing.assert_close(graph(w), run(reference.conv_bn_act, w))


def test_functional_sync_bn_under_a_transform_without_distributed():
    """Without torch.distributed, sync_bn means this process's statistics (with a
    warning), under a transform as on the fused path."""
    x, w, bn_w, bn_b, _, _ = _conv_bn_args()

    def loss(w, fn, **sync):
        return fn(x, w, bn_w, bn_b, None, None, padding=1, training=True, **sync).sum()

    with pytest.warns(UserWarning, match="not initialised"):
        resnet_fused.distributed._warned = False
        g = grad(loss)(w, resnet_fused.conv_bn_act, sync_bn=True)
    torch.testing.assert_close(g, grad(loss)(w, reference.conv_bn_act), **TOL)


def test_functional_batch_norm_act_and_add_relu_under_vmap_and_grad():
    torch.manual_seed(3)
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    r = torch.randn_like(x)
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    bias = torch.randn(5, dtype=torch.float64)

    def bn(x, r=r):  # batch statistics (no running statistics to update in place)
        return resnet_fused.batch_norm_act(x, None, None, weight, bias, True, residual=r)

    def bn_ref(x, r=r):
        return reference.batch_norm_act(x, None, None, weight, bias, True, residual=r)

    assert _fused_ops(lambda: bn(x))
    torch.testing.assert_close(
        vmap(bn)(x[:, None], r[:, None]), vmap(bn_ref)(x[:, None], r[:, None]), **TOL
    )
    torch.testing.assert_close(
        grad(lambda x: bn(x).sum())(x), grad(lambda x: bn_ref(x).sum())(x), **TOL
    )

    expected = torch.relu(x + r)
    torch.testing.assert_close(vmap(resnet_fused.add_relu)(x, r), expected, **TOL)
    torch.testing.assert_close(
        grad(lambda x: resnet_fused.add_relu(x, r).sum())(x), (expected > 0).double(), **TOL
    )
    inplace = vmap(lambda a, b: resnet_fused.add_relu_(a.clone(), b))(x, r)
    torch.testing.assert_close(inplace, expected, **TOL)


def test_the_extensions_context_check_agrees_with_torchs_queries():
    """runs_eagerly reads the extension's one-call check (csrc/unit.cpp), or torch's four
    queries without the extension: both must agree in every context."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from resnet_fused import _extension
    from resnet_fused.functional import _common

    check = getattr(_extension._C, "eager_only_context", None)
    if check is None:
        pytest.skip("the extension is not built")
    seen = {}

    def record(name):
        seen.setdefault(name, []).append((check(), _common._eager_only_context()))

    def probe(name):
        return lambda x: record(name) or x * 2

    record("plain")
    vmap(probe("vmap"))(torch.ones(2))
    grad(lambda x: probe("grad")(x).sum())(torch.ones(2))
    jvp(probe("jvp"), (torch.ones(2),), (torch.ones(2),))
    make_fx(probe("make_fx"))(torch.ones(2))
    make_fx(probe("pre_dispatch"), pre_dispatch=True)(torch.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (torch.jit.trace is deprecated)
        torch.jit.trace(probe("jit.trace"), torch.ones(2), check_trace=False)
    with FakeTensorMode():
        record("fake")
    expected = {"plain": False, "fake": False}
    for name, results in seen.items():
        for ext, py in results:
            assert ext == py == expected.get(name, True), (name, ext, py)


def test_the_extensions_hook_check_agrees_with_the_python_one():
    """has_hooks reads the extension's one-call check outside torch.compile: it must say
    what the Python version says for every kind of hook, global or a module's own, on
    any of the modules given (None skipped), and in an eager-only context."""
    from resnet_fused import modules

    if modules._ANY_MODULE_HOOKS is None:
        pytest.skip("the extension is not built")
    from torch.nn.modules import module as nn_module

    def both(*mods):
        fast = modules._ANY_MODULE_HOOKS(nn_module, *mods)
        slow = modules._has_hooks(*mods)
        assert fast is slow, (fast, slow)
        return fast

    conv, bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
    assert both() is False and both(conv, None, bn) is False
    hook_kinds = {
        "forward": lambda m: m.register_forward_hook(lambda *a: None),
        "forward_pre": lambda m: m.register_forward_pre_hook(lambda *a: None),
        "backward": lambda m: m.register_full_backward_hook(lambda *a: None),
        "backward_pre": lambda m: m.register_full_backward_pre_hook(lambda *a: None),
    }
    for kind, register in hook_kinds.items():
        for target in (conv, bn):
            handle = register(target)
            assert both(conv, None, bn) is True, kind
            assert both(None) is False
            handle.remove()
            assert both(conv, bn) is False
    global_kinds = {
        "forward": lambda: nn_module.register_module_forward_hook(lambda *a: None),
        "forward_pre": lambda: nn_module.register_module_forward_pre_hook(lambda *a: None),
        "backward": lambda: nn_module.register_module_full_backward_hook(lambda *a: None),
        "backward_pre": lambda: nn_module.register_module_full_backward_pre_hook(lambda *a: None),
    }
    for kind, register in global_kinds.items():
        handle = register()
        try:
            assert both() is True, kind
        finally:
            handle.remove()
        assert both(conv) is False
    assert vmap(lambda x: x * both(conv, bn))(torch.ones(2)).sum() == 2  # (eager-only)
