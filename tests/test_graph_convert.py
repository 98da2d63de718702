"""The graph-level converter (resnet_fused.graph_convert through resnet_fused.convert) on
models that are not torchvision's: the tutorial ResNet in its common spellings, timm's
ResNets, untraceable blocks, shared values, hooks; and what converted models must keep
doing (FX tracing, torch.compile, copies, checkpoints, unfuse).

Parity is checked in fp64 against the unconverted model: outputs, every gradient, the
running statistics and two SGD steps, in training and in eval mode."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_resnet import _randomise_bn
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused

timm = pytest.importorskip("timm")  # a test dependency (Makefile DEPS, pyproject extras)


# --- the tutorial ResNet, in several spellings ----------------------------------------------


class ResidualBlock(nn.Module):
    """The block every tutorial writes (spelling 'tutorial'); other spellings of the same
    computation are selected with ``spelling``."""

    def __init__(self, cin, cout, stride=1, spelling="tutorial"):
        super().__init__()
        self.spelling = spelling
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=spelling != "functional")
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        elif spelling == "identity":
            self.shortcut = nn.Identity()

    def forward(self, x):
        s = self.spelling
        if s in ("tutorial", "identity"):  # one ReLU module reused, +=
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += self.shortcut(x)
            return self.relu(out)
        if s == "functional":  # F.relu, +, shortcut first
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.shortcut(x) + self.bn2(self.conv2(out))
            return F.relu(out)
        if s == "torch":  # torch.relu, torch.add(shortcut, out), .relu()
            out = torch.relu(self.bn1(self.conv1(x)))
            out = torch.add(self.shortcut(x), self.bn2(self.conv2(out)))
            return out.relu()
        if s == "inplace_methods":  # .relu_(), .add_() as statements
            out = self.bn1(self.conv1(x))
            out.relu_()
            out = self.bn2(self.conv2(out))
            out.add_(self.shortcut(x))
            out.relu_()
            return out
        raise AssertionError(s)


SPELLINGS = ["tutorial", "identity", "functional", "torch", "inplace_methods"]


class TutorialResNet(nn.Module):
    def __init__(self, spelling="tutorial", num_classes=10, widths=(8, 16)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers.append(ResidualBlock(cin, w, 1 if i == 0 else 2, spelling))
            layers.append(ResidualBlock(w, w, 1, spelling))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(out.flatten(1))


# --- helpers --------------------------------------------------------------------------------


def _bn_state(model):
    return [
        t.detach().clone()
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
        for t in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _batch_norm_ops(model, x) -> int:
    """aten batch_norm ops (any variant) run by one forward (of a copy: the model's
    running statistics stay as they are)."""
    model = copy.deepcopy(model)
    with _CountOps() as mode:
        model(x)
    return sum("batch_norm" in op for op in mode.ops)


def _close(a, b, atol, msg=None):
    """Equal up to fp64 rounding relative to the reference's scale."""
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= atol * scale, f"{msg or ''}: max error {err:.2e}, scale {scale:.2e}"


def _assert_parity(original, converted, x, *, steps=2, atol=1e-9, frozen_bn=False):
    """fp64: outputs, every gradient, running statistics and parameters through ``steps``
    SGD steps in training mode (every BatchNorm in eval with ``frozen_bn``), then the
    eval output."""
    target = torch.arange(x.shape[0]) % 3
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (original, converted)]
    for _ in range(steps):
        outs, grads = [], []
        for m, opt in zip((original, converted), opts, strict=True):
            m.train()
            for bn in m.modules():
                if frozen_bn and isinstance(bn, nn.BatchNorm2d):
                    bn.eval()
            opt.zero_grad(set_to_none=True)
            out = m(x)
            F.cross_entropy(out.flatten(1), target).backward()
            outs.append(out.detach())
            grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
            opt.step()
        _close(outs[1], outs[0], atol)
        assert grads[0].keys() == grads[1].keys()
        for k, g in grads[0].items():
            _close(grads[1][k], g, atol, msg=k)
        for a, b in zip(_bn_state(converted), _bn_state(original), strict=True):
            _close(a.double(), b.double(), atol)
    for a, b in zip(converted.parameters(), original.parameters(), strict=True):
        _close(a, b, atol)
    original.eval(), converted.eval()
    with torch.no_grad():
        _close(converted(x), original(x), atol)


# --- the tutorial ResNet ----------------------------------------------------------------------


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_tutorial_resnet_fully_fused_with_parity(spelling):
    torch.manual_seed(0)
    model = TutorialResNet(spelling).double()
    _randomise_bn(model)
    params = list(model.parameters())
    buffers = list(model.buffers())
    keys = list(model.state_dict())
    conv1 = model.layers[0].conv1
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = resnet_fused.convert(model, backend="cpu", inplace=True)
    assert converted is model
    # Nothing moved: the same parameter and buffer objects, keys, submodules.
    assert all(a is b for a, b in zip(converted.parameters(), params, strict=True))
    assert all(a is b for a, b in zip(converted.buffers(), buffers, strict=True))
    assert list(converted.state_dict()) == keys
    assert converted.layers[0].conv1 is conv1
    report = resnet_fused.conversion_report(converted)
    assert report["not_fused"] == [], report
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert sum(e.count("bn") for e in report["fused"]) >= n_bn
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    for training in (True, False):
        converted.train(training)
        assert _batch_norm_ops(converted, x) == 0, f"eager batch_norm ran (training={training})"
        original.train(training)
        assert _batch_norm_ops(original, x) > 0  # the count sees eager BatchNorm
    _assert_parity(original, converted, x)


def test_frozen_batch_norm_fine_tuning():
    torch.manual_seed(0)
    model = TutorialResNet().double()
    _randomise_bn(model)
    fused = resnet_fused.convert(model, backend="cpu")
    frozen = _bn_state(fused)
    x = torch.randn(3, 3, 10, 10, dtype=torch.float64)
    _assert_parity(model, fused, x, frozen_bn=True)
    assert all(torch.equal(a, b) for a, b in zip(_bn_state(fused), frozen, strict=True))


# --- timm -------------------------------------------------------------------------------------


TIMM = ["resnet18", "resnet26", "resnet50", "resnet50d", "resnet101", "seresnet50"]


@pytest.mark.parametrize("name", TIMM)
def test_timm_resnets_fully_fused_with_parity(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5).double()
    _randomise_bn(model)
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = resnet_fused.convert(model, backend="cpu")
    report = resnet_fused.conversion_report(converted)
    assert report["not_fused"] == [], report
    assert list(converted.state_dict()) == list(original.state_dict())
    # 48x48: the last stage's BatchNorm sees 2x2 values per sample and channel (fewer make
    # training ill-conditioned enough for fp64 rounding to show)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    for training in (True, False):
        converted.train(training)
        assert _batch_norm_ops(converted, x) == 0, f"eager batch_norm ran (training={training})"
    # 1e-8 of each tensor's scale, as tests/test_resnet.py allows deep fp64 ResNets: two
    # training steps through 100 layers amplify rounding to ~1e-9
    _assert_parity(original, converted, x, atol=1e-8)


def test_timm_deep_stem_crosses_module_boundaries():
    model = timm.create_model("resnet50d", pretrained=False)
    report = resnet_fused.conversion_report(resnet_fused.convert(model, backend="cpu"))
    # conv1 is Sequential(conv, bn, act, conv, bn, act, conv); its last conv meets the
    # model's bn1 and act1
    assert "conv1.6, bn1, act1 (conv-bn-relu)" in report["fused"], report["fused"]


# --- what is left alone ---------------------------------------------------------------------


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.inner = nn.Sequential(
            nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = -x
        return self.inner(F.relu(self.bn(self.conv(x))))


def test_untraceable_block_converts_its_children_and_is_reported():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), _Untraceable()
    ).double()
    _randomise_bn(model)
    with pytest.warns(UserWarning, match="not traced"):
        converted = resnet_fused.convert(model, backend="cpu")
    report = resnet_fused.conversion_report(converted)
    assert "0, 1, 2 (conv-bn-relu)" in report["fused"]
    assert "3.inner.0, 3.inner.1, 3.inner.2 (conv-bn-relu)" in report["fused"]
    text = "\n".join(report["not_fused"])
    assert "3: not traced (TraceError" in text, text
    assert "3.bn: left alone: its parent 3 could not be traced" in text
    _assert_parity(model, converted, torch.randn(2, 3, 8, 8, dtype=torch.float64))


class _SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.bn(self.conv(x))  # two users: the ReLU and the sum
        z = F.relu(y)
        return F.relu(self.bn2(self.conv2(z))) + y


def test_value_with_two_users_is_left_alone_and_reported():
    torch.manual_seed(0)
    model = _SharedBN().double()
    _randomise_bn(model)
    with pytest.warns(UserWarning, match="2 users"):
        converted = resnet_fused.convert(model, backend="cpu")
    report = resnet_fused.conversion_report(converted)
    assert report["fused"] == ["conv2, bn2, relu_1 (conv-bn-relu)", "conv, bn (conv-bn)"]
    assert report["not_fused"] == ["relu: left alone: not fused with bn: its output has 2 users"]
    _assert_parity(model, converted, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_warns_when_nothing_is_fused():
    # a BatchNorm after a convolution that cannot be fused is fused alone
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding_mode="reflect", padding=1),
                          nn.BatchNorm2d(4))  # fmt: skip
    with pytest.warns(UserWarning, match="padding_mode='reflect'"):
        converted = resnet_fused.convert(model)
    report = resnet_fused.conversion_report(converted)
    assert report["fused"] == ["1 (bn)"]
    assert report["not_fused"] == [
        "0: left alone: not fused with 1: padding_mode='reflect' (only 'zeros' is fused)"
    ]
    with pytest.raises(TypeError, match="leaf_modules"):
        resnet_fused.convert(model, leaf_modules=["ResidualBlock"])
    # nothing to fuse at all: the warning says so, and why
    for model, why in (
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "no BatchNorm layer"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()), "only 2-d BatchNorm"),
    ):
        with pytest.warns(UserWarning, match="fused nothing") as record:
            converted = resnet_fused.convert(model)
        assert why in str(record[-1].message)
        assert resnet_fused.conversion_report(converted)["fused"] == []
        x = torch.randn(3, 4)
        torch.testing.assert_close(converted.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_leaf_modules_are_converted_on_their_own():
    model = TutorialResNet().double()
    converted = resnet_fused.convert(model, backend="cpu", leaf_modules=[ResidualBlock])
    fused = resnet_fused.conversion_report(converted)["fused"]
    # no site crosses into a block, each block converted from its own forward
    assert "layers.0.conv1, layers.0.bn1, layers.0.relu (conv-bn-relu)" in fused
    assert "forward" in converted.layers[0].__dict__
    _assert_parity(model, converted, torch.randn(2, 3, 8, 8, dtype=torch.float64))


# --- hooks --------------------------------------------------------------------------------------


def test_hooks_on_fused_modules_and_containers():
    torch.manual_seed(0)
    model = TutorialResNet().double()
    _randomise_bn(model)
    fused = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for path in ("layers.1.bn2", "layers.2"):  # a fused BN; a traced-through container
        seen = {}
        handles = [
            m.get_submodule(path).register_forward_hook(
                lambda mod, a, out, key=key, seen=seen: seen.__setitem__(key, out.detach().clone())
            )
            for key, m in (("ref", model), ("fused", fused))
        ]
        assert any("hooks" in e for e in resnet_fused.conversion_report(fused)["not_fused"])
        _assert_parity(model, fused, x, steps=1)
        torch.testing.assert_close(seen["fused"], seen["ref"], rtol=0, atol=1e-9)
        for h in handles:
            h.remove()
        assert resnet_fused.conversion_report(fused)["not_fused"] == []


# --- what converted models keep doing ---------------------------------------------------------


def test_feature_extraction_of_converted_models():
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    for original, nodes in (
        (torchvision.models.resnet18(num_classes=4), {"layer2": "f2", "layer3": "f3"}),
        (TutorialResNet(), {"layers.1": "f1", "layers.3": "f3"}),
    ):
        original = original.double()
        _randomise_bn(original)
        converted = resnet_fused.convert(original, backend="cpu")
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        for training in (False, True):
            ref = create_feature_extractor(copy.deepcopy(original), nodes).train(training)(x)
            extractor = create_feature_extractor(converted, nodes).train(training)
            if "fused_conv_bn" not in extractor.code:
                # FX traces the root's class forward: a graph-converted root gives the
                # unfused graph (same modules), which converts like any model
                assert isinstance(original, TutorialResNet)
                # (inplace: copying a GraphModule resets its training flag, not its graph)
                extractor = resnet_fused.convert(extractor, backend="cpu", inplace=True)
                assert not resnet_fused.conversion_report(extractor)["not_fused"]
                assert _batch_norm_ops(extractor, x) == 0
            out = extractor(x)
            for k in nodes.values():
                torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-9)


def test_compile_fullgraph():
    torch.manual_seed(0)
    model = TutorialResNet()
    _randomise_bn(model)
    converted = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(2, 3, 8, 8)
    for training in (True, False):
        model.train(training), converted.train(training)
        compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
        out, ref = compiled(x), model(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        if training:
            out.sum().backward()
            ref.sum().backward()
            for (k, p), q in zip(converted.named_parameters(), model.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=k)
        for a, b in zip(_bn_state(converted), _bn_state(model), strict=True):
            torch.testing.assert_close(a, b)


def test_copy_pickle_save_and_unfuse():
    torch.manual_seed(0)
    model = TutorialResNet().double()
    _randomise_bn(model)
    converted = resnet_fused.convert(model, backend="cpu").eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = converted(x)
    buf = io.BytesIO()
    torch.save(converted, buf)
    buf.seek(0)
    copies = [
        copy.deepcopy(converted),
        pickle.loads(pickle.dumps(converted)),
        torch.load(buf, weights_only=False),
    ]
    for other in copies:
        conversion = other.__dict__["forward"]
        assert conversion.module is other  # the copy's forward reads the copy's modules
        with torch.no_grad():
            torch.testing.assert_close(other(x), ref, rtol=0, atol=0)
        assert _batch_norm_ops(other, x) == 0
        with torch.no_grad():  # the copy's own state: changing it changes only the copy
            other.bn1.running_mean.add_(1.0)
            assert not torch.equal(other(x), ref)
            torch.testing.assert_close(converted(x), ref, rtol=0, atol=0)
    plain = resnet_fused.unfuse(converted)
    assert "forward" not in plain.__dict__
    assert not any("forward" in m.__dict__ for m in plain.modules())
    assert resnet_fused.conversion_report(plain) == {"fused": [], "not_fused": []}
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ref, rtol=0, atol=1e-12)
    assert _batch_norm_ops(plain, x) > 0
    # a state_dict saved from the converted model loads into a fresh unconverted one
    fresh = TutorialResNet().double().eval()
    fresh.load_state_dict(converted.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=0, atol=1e-12)


def test_generated_forward_looks_modules_up_through_their_dicts(monkeypatch):
    """A converted forward reaches its modules through the ``_modules`` dicts (checked by
    the guards before it runs), never through ``nn.Module.__getattr__`` (about 0.7 us
    per step of every path at every use: more than a MobileNetV2's fused units saved at
    small sizes). Leaf modules (the Linear) are called from those lookups too; the
    results stay the original's."""
    torch.manual_seed(0)
    model = TutorialResNet().double()
    _randomise_bn(model)
    converted = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    looked_up = []
    module_getattr = nn.Module.__getattr__

    def counting(self, name):
        value = module_getattr(self, name)
        if isinstance(value, nn.Module):
            looked_up.append(name)
        return value

    for training in (False, True):  # (eval first: its outputs read the running stats)
        model.train(training), converted.train(training)
        converted(x)  # (the first call plans)
        monkeypatch.setattr(nn.Module, "__getattr__", counting)
        looked_up.clear()
        ref = model(x)
        assert looked_up, "the counter sees the original model's module lookups"
        looked_up.clear()
        out = converted(x)
        monkeypatch.undo()
        assert looked_up == [], looked_up
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    source = converted.__dict__["forward"].sources["eval"]
    assert "._modules" in source and "getattr(self" not in source


class _TorchCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.add(y, torch.sigmoid(y), alpha=0.5)
        y = torch.cat([y, y.relu()], dim=1)
        return torch.flatten(torch.mean(y, dim=(2, 3)), 1).clamp(min=0.0)


def test_torch_functions_trace_as_fx_records_them(monkeypatch):
    """Calls of torch's own functions on traced values are recorded as call_function
    nodes without torch.overrides' table of every overridable function (built on first
    use: ~12 ms of a new process's convert); the graph is the one FX's own Proxy makes,
    and Tensor methods stay call_method nodes."""
    from resnet_fused import graph_convert as gc

    def nodes(graph):
        return [(n.op, n.target, str(n.args), str(n.kwargs)) for n in graph.nodes]

    model = _TorchCalls()
    ours = gc._Tracer((), set()).trace(model)
    monkeypatch.setattr(gc._InplaceProxy, "__torch_function__", fx_proxy_torch_function())
    fx_own = gc._Tracer((), set()).trace(model)
    assert nodes(ours) == nodes(fx_own)
    ops = {(op, t if isinstance(t, str) else t.__name__) for op, t, *_ in nodes(ours)}
    assert {("call_function", "relu"), ("call_function", "cat"), ("call_function", "flatten"),
            ("call_method", "relu"), ("call_method", "clamp")} <= ops  # fmt: skip


def fx_proxy_torch_function():
    return torch.fx.Proxy.__dict__["__torch_function__"]


def test_converting_a_resnet_in_a_new_process_builds_no_override_table():
    import subprocess
    import sys

    code = (
        "import torch, torchvision, resnet_fused\n"
        "from torch.overrides import _get_tensor_methods\n"
        "before = _get_tensor_methods.cache_info().currsize\n"
        "resnet_fused.convert(torchvision.models.resnet18(num_classes=10))\n"
        "print(before, _get_tensor_methods.cache_info().currsize)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)  # fmt: skip
    before, after = out.stdout.strip().splitlines()[-1].split()
    if before != "0":
        pytest.skip("this torch builds torch.overrides' table at import: nothing to save")
    assert after == "0"


class _FunctionActs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.leaky_relu(self.bn(self.conv(x)), 0.2)
        return F.silu(self.bn2(self.conv2(y)))


def test_compiled_sites_with_function_activations_compile_once():
    """Sites whose activation is a function call (passed as ``(code, parameter)``)
    compile once (a global cache of their Act, filled by the first compiled call, made
    Dynamo recompile the model)."""
    import torch._dynamo.testing

    torch.manual_seed(0)
    model = _FunctionActs().eval()
    x = torch.randn(2, 3, 6, 6)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(resnet_fused.convert(model), backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


class _SelfResidual(nn.Module):
    """Sites whose input is also their residual: conv-bn-add-relu (stride 1, same
    width), bn-add-relu and add-relu of a tensor with itself."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)) + x)
        y = torch.relu(self.bn2(y) + y)
        return torch.relu(y + y)


def test_sites_whose_input_is_their_residual_compile_export_and_differentiate():
    """One tensor passed as a fused Function's input and its residual: torch.compile
    (fullgraph) and strict torch.export trace it (Dynamo refuses a Function given one
    tensor twice; the residual is passed as an alias), and the input's gradient sums
    both uses, as eager's."""
    torch.manual_seed(0)
    model = _SelfResidual().double()
    _randomise_bn(model)
    converted = resnet_fused.convert(model, backend="cpu")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for training in (True, False):
        model.train(training), converted.train(training)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        outs = [model(xs[0]), converted(xs[1])]
        for out in outs:
            (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0, atol=1e-10)
        compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-12)
    exported = torch.export.export(converted.eval(), (x,), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model.eval()(x), rtol=0, atol=1e-12)
