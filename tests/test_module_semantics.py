"""Fused modules behave like the modules they replace in what a user observes:

* each BatchNorm's own ``training`` flag and settings, read at call time (frozen-BN
  fine-tuning: ``model.train()`` then ``.eval()`` on every BatchNorm), whatever the
  enclosing block's flag;
* forward hooks (and pre-hooks) on a converted model's convs and BatchNorms fire with the
  values they would see in the unconverted model, or the part is left unfused and
  ``conversion_report`` says why.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import backend_params
from test_resnet import _randomise_bn
from torch import nn

import resnet_fused


def _bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.detach().clone()
        for m in _bns(model)
        for t in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]


def _step(model: nn.Module, x: torch.Tensor):
    """One forward/backward; the output and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_same_step(model, fused, x, *, atol=1e-9):
    out_ref, grads_ref = _step(model, x)
    out, grads = _step(fused, x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=atol)
    assert grads.keys() == grads_ref.keys()
    for k in grads_ref:  # fp64 rounding, relative to each gradient's scale
        scale = max(1.0, grads_ref[k].abs().max().item())
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=0, atol=atol * scale, msg=k)
    for a, b in zip(_bn_state(fused), _bn_state(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


# --- each BatchNorm's own training flag ---------------------------------------------------


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_frozen_batch_norm_fine_tuning(arch, backend):
    """model.train() with every BatchNorm in eval (the usual frozen-BN recipe): outputs,
    gradients equal the unconverted model's and the running statistics stay frozen."""
    model = getattr(torchvision.models, arch)(num_classes=7).double()
    _randomise_bn(model)
    fused = resnet_fused.convert(model, backend=backend)
    for m in (model, fused):
        m.train()
        for bn in _bns(m):
            bn.eval()
    frozen = _bn_state(fused)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    _assert_same_step(model, fused, x)
    for a, b in zip(_bn_state(fused), frozen, strict=True):
        assert torch.equal(a, b), "a frozen BatchNorm's running statistics moved"


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_mixed_batch_norm_modes_and_settings_read_at_call_time(backend):
    """Any mix of train/eval BatchNorms, with settings changed after conversion
    (momentum None, eps, track_running_stats off), in a model in train and in eval mode."""
    model = torchvision.models.resnet18(num_classes=5).double()
    _randomise_bn(model)
    fused = resnet_fused.convert(model, backend=backend)
    x = torch.randn(2, 3, 36, 36, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for model_mode in (True, False):
        for m in (model, fused):
            m.train(model_mode)
        flags = torch.randint(0, 2, (len(_bns(model)),), generator=gen).tolist()
        for i, flag in enumerate(flags):
            for m in (model, fused):
                bn = _bns(m)[i]
                bn.train(bool(flag))
                if i % 5 == 1:
                    bn.momentum = None
                if i % 7 == 2:
                    bn.eps = 1e-3
        _assert_same_step(model, fused, x)
        _assert_same_step(model, fused, x)  # momentum=None: the cumulative average moves on


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_fused_conv_bn_relu_follows_its_bn_flag(backend):
    conv = nn.Conv2d(5, 6, 3, padding=1, bias=False).double()
    bn = nn.BatchNorm2d(6).double()
    _randomise_bn(nn.Sequential(bn))
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(
        conv, bn, backend=backend
    ).train()  # the module trains ...
    bn.eval()  # ... its BatchNorm is frozen
    x = torch.randn(3, 5, 9, 9, dtype=torch.float64)
    before = _bn_state(unit)
    expected = torch.relu(nn.functional.batch_norm(
        conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps
    ))  # fmt: skip
    torch.testing.assert_close(unit(x), expected, rtol=0, atol=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(_bn_state(unit), before, strict=True))
    unit.eval()
    bn.train()  # the module in eval, its BatchNorm training: batch statistics, updated
    out = unit(x)
    ref_bn = nn.BatchNorm2d(6).double()
    ref_bn.load_state_dict({
        "weight": bn.weight, "bias": bn.bias, "running_mean": before[0],
        "running_var": before[1], "num_batches_tracked": before[2],
    })  # fmt: skip
    torch.testing.assert_close(out, torch.relu(ref_bn(conv(x))), rtol=0, atol=1e-10)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=1e-12)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked)


# --- hooks ----------------------------------------------------------------------------------


def _capture(store: list):
    def hook(module, args, output):
        store.append(output.detach().clone())

    return hook


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
@pytest.mark.parametrize("training", [True, False])
def test_hooks_registered_after_conversion_fire_with_the_same_values(backend, training):
    model = torchvision.models.resnet18(num_classes=4).double()
    _randomise_bn(model)
    fused = resnet_fused.convert(model, backend=backend)
    assert not resnet_fused.conversion_report(fused)["not_fused"]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    seen = {"ref": [], "fused": []}
    handles = []
    for key, m in (("ref", model), ("fused", fused)):
        m.train(training)
        for name in ("bn1", "layer1.0.bn1", "layer2.0.downsample.1", "layer3.1.conv2"):
            handles.append(m.get_submodule(name).register_forward_hook(_capture(seen[key])))
        # a pre-hook that changes the input (as pruning/quantisation tools do)
        handles.append(
            m.get_submodule("layer2.1.conv1").register_forward_pre_hook(
                lambda mod, args: (args[0] * 0.5,)
            )
        )
    report = resnet_fused.conversion_report(fused)
    hooked = " ".join(report["not_fused"])
    for part in ("layer1.0", "layer2.0", "layer2.1", "layer3.1", "conv1, bn1, relu (conv-bn-relu)"):
        assert part in hooked, f"{part} should be reported as running unfused: {report}"
    assert "layer1.1" in report["fused"]
    _assert_same_step(model, fused, x)
    assert len(seen["fused"]) == len(seen["ref"]) == 4
    for a, b in zip(seen["fused"], seen["ref"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    for h in handles:
        h.remove()
    assert not resnet_fused.conversion_report(fused)["not_fused"]  # fused again
    _assert_same_step(model, fused, x)


def test_hooks_registered_before_conversion():
    """Hooks on modules that conversion would replace (a block itself): those parts stay
    unfused and are reported; hooks on the stem's bn1 (a fused site of the ResNet's
    forward) make that site run unfused, reported; every hook still fires."""
    model = torchvision.models.resnet18(num_classes=4).double()
    _randomise_bn(model)
    seen = []
    model.bn1.register_forward_hook(_capture(seen))
    model.layer3[0].register_forward_hook(_capture(seen))
    model.layer1[1].bn2.register_forward_hook(_capture(seen))
    ref = []
    plain = torchvision.models.resnet18(num_classes=4).double()
    plain.load_state_dict(model.state_dict())
    plain.bn1.register_forward_hook(_capture(ref))
    plain.layer3[0].register_forward_hook(_capture(ref))
    plain.layer1[1].bn2.register_forward_hook(_capture(ref))
    with pytest.warns(UserWarning, match="hooks"):
        fused = resnet_fused.convert(model)
    report = resnet_fused.conversion_report(fused)
    assert any(
        r.startswith("conv1, bn1, relu (conv-bn-relu)") and "hooks" in r
        for r in report["not_fused"]
    ), report
    assert any(r.startswith("layer3.0") and "hooks" in r for r in report["not_fused"]), report
    assert any(r.startswith("layer1.1") and "hooks" in r for r in report["not_fused"]), report
    assert "layer1.0" in report["fused"]
    _assert_same_step(plain.train(), fused.train(), torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert len(seen) == len(ref) == 3
    for a, b in zip(seen, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_global_module_hooks_see_every_module():
    model = torchvision.models.resnet18(num_classes=4).double().eval()
    fused = resnet_fused.convert(model)
    calls = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, a, o: calls.append(type(m).__name__)
    )
    try:
        x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
        model(x)
        n_ref = calls.count("BatchNorm2d")
        calls.clear()
        out = fused(x)
        assert calls.count("BatchNorm2d") == n_ref
    finally:
        handle.remove()
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-9)


def test_fused_conv_bn_relu_hooks():
    unit = resnet_fused.FusedConvBNReLU2d(4, 6, 3, padding=1).double()
    seen = []
    unit.bn.register_forward_hook(_capture(seen))
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    out = unit(x)
    assert len(seen) == 1
    torch.testing.assert_close(out, torch.relu(seen[0]), rtol=0, atol=0)


# --- bf16 inference in both layouts -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("how", ["autocast", "bfloat16"])
def test_bf16_inference_in_both_layouts(layout, how):
    """A converted ResNet in eval, bf16 through autocast or .bfloat16(), NCHW and
    channels_last: as close to the fp64 model as eager bf16 is."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    _randomise_bn(model)
    fused = resnet_fused.convert(model)
    x = torch.randn(2, 3, 48, 48)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ref = model.double()(x.double()).detach()
    model.float()
    if how == "bfloat16":
        model_b, fused_b = model.bfloat16(), fused.bfloat16()
        xb = x.bfloat16().to(memory_format=fmt)
        eager, out = model_b(xb), fused_b(xb)
    else:
        model_b, fused_b = model.to(memory_format=fmt), fused.to(memory_format=fmt)
        xb = x.to(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager, out = model_b(xb), fused_b(xb)
    err = (out.double() - ref).abs().max().item()
    eager_err = (eager.double() - ref).abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= 2 * eager_err + 1.6e-2 * ref.abs().max().item(), (err, eager_err)


# --- the eval fold cache under threads and replaced parameters ------------------------------


def _frozen_pair(dtype=torch.float32):
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).to(dtype)
    bn = nn.BatchNorm2d(6).to(dtype).eval()
    _randomise_bn(nn.Sequential(bn))
    return conv, bn


def test_fold_cache_never_pairs_a_key_with_another_value():
    """A reader that runs right after any write of a refold (a thread switch there) sees
    a consistent cache: the fold it gets has the dtype it asked for."""
    from resnet_fused.modules import FoldCache, _cached_fold

    conv, bn = _frozen_pair()
    torn = []

    class Preempted(FoldCache):
        __slots__ = ("armed",)

        def __setattr__(self, name, value):
            object.__setattr__(self, name, value)
            if getattr(self, "armed", False) and name != "armed":
                object.__setattr__(self, "armed", False)  # one reader per write
                w = _cached_fold(conv, bn, torch.bfloat16, self, pack=False)[0]
                torn.append(w.dtype != torch.bfloat16)
                object.__setattr__(self, "armed", True)

    cache = Preempted()
    with torch.no_grad():
        _cached_fold(conv, bn, torch.float32, cache, pack=False)
        cache.armed = True
        w = _cached_fold(conv, bn, torch.bfloat16, cache, pack=False)[0]
    assert w.dtype == torch.bfloat16
    assert torn and not any(torn), "a reader saw one fold's key with another fold's value"


def test_fold_cache_refolds_a_replaced_parameter():
    """A parameter replaced by a new tensor refolds, even where the new tensor reuses the
    old one's id, address and version counter (freed large tensors and their Python
    objects come back at the same addresses: here that happens on some tries)."""
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(256).eval()
    _randomise_bn(nn.Sequential(bn))
    conv.weight = nn.Parameter(torch.randn(256, 256, 3, 3))
    # "torch": the fewest allocations of its own between the replacements
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn, backend="torch").eval()
    x = torch.randn(1, 256, 4, 4)
    with torch.no_grad():
        for i in range(12):
            unit(x)  # fills the cache
            for _ in range(1 + i % 3):
                del conv.weight  # the old parameter dies here ...
                conv.weight = nn.Parameter(torch.randn(256, 256, 3, 3))
            expected = torch.relu(bn(nn.functional.conv2d(x, conv.weight, None, 1, 1)))
            torch.testing.assert_close(unit(x), expected, rtol=1e-4, atol=1e-4, msg=f"try {i}")


def test_eval_model_from_several_threads():
    """One eval model called from several threads gives the single-thread results, also
    while its parameters change between rounds of calls."""
    from concurrent.futures import ThreadPoolExecutor

    model = torchvision.models.resnet18(num_classes=6).eval()
    _randomise_bn(model)
    fused = resnet_fused.convert(model)
    inputs = [torch.randn(1, 3, 32, 32) for _ in range(6)]
    with torch.no_grad(), ThreadPoolExecutor(max_workers=3) as pool:
        for round_ in range(3):
            expected = [fused(x) for x in inputs]  # single thread, current parameters
            got = list(pool.map(fused, inputs))
            for i, (a, b) in enumerate(zip(got, expected, strict=True)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{round_}/{i}")
            # parameters change between rounds: in place, replaced, and the BN statistics
            model_bn = fused.layer1[0].bn1
            fused.layer1[0].conv1.weight.mul_(1.5)
            fused.layer2[0].conv2.weight = nn.Parameter(fused.layer2[0].conv2.weight * -1)
            model_bn.running_var.mul_(2.0)


def test_supported_torch_versions_are_stated_and_older_ones_refused():
    from resnet_fused import _compat

    for ok in ("2.11.0", "2.14.1+cu130", "2.15.0.dev20270101", "3.0.0"):
        _compat.check_torch_version(ok)
    for old in ("2.6.0", "2.10.1+cpu"):
        with pytest.raises(ImportError, match=r"needs torch >= 2\.11.*found torch " + old[:4]):
            _compat.check_torch_version(old)
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "torch>=2.11" in project["project"]["dependencies"]
    assert "torch>=2.11" in project["build-system"]["requires"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_modules_promote_a_residual_of_another_dtype_as_eager(training):
    """``act(bn(conv(x)) + residual)`` in eager promotes: an fp32 residual under bf16
    autocast gives an fp32 result, and so does a bf16 BatchNorm output plus an fp32
    residual. The fused modules do the same (the unit without the residual, then eager's
    add), where they used to cast the residual to bf16 (FusedConvBNReLU2d) or refuse it
    (FusedBatchNormAct2d); outputs, gradients and running statistics follow eager's."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    _randomise_bn(nn.Sequential(bn))
    fused = resnet_fused.FusedConvBNReLU2d.from_modules(
        copy.deepcopy(conv), copy.deepcopy(bn), activation="relu6"
    )
    for m in (conv, bn, fused):
        m.train(training)
    x = torch.randn(2, 6, 5, 5)
    r = torch.randn(2, 8, 5, 5, requires_grad=True)
    outs, grads = [], []
    for run in (lambda: F.relu6(bn(conv(x)) + r), lambda: fused(x, r)):
        r.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run()
        out.float().sum().backward()
        outs.append(out)
        grads.append(r.grad.clone())
    assert outs[0].dtype == outs[1].dtype == torch.float32
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[1], grads[0])  # (a 0/1 mask, up to kink flips)
    torch.testing.assert_close(fused.bn.running_mean, bn.running_mean, rtol=1e-2, atol=1e-3)
    # BatchNorm + add + act: a bf16 input, an fp32 residual
    bna = resnet_fused.FusedBatchNormAct2d.from_batch_norm(copy.deepcopy(bn)).train(training)
    xb = torch.randn(2, 8, 5, 5).bfloat16()
    ref = torch.relu(copy.deepcopy(bn)(xb) + r.detach())
    got = bna(xb, r.detach())
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_modules_broadcast_a_residual_as_eager(training):
    """``act(bn(conv(x)) + residual)`` in eager broadcasts a (1, C, 1, 1) or (C, 1, 1)
    residual over the output; the fused modules do the same (the unit without it, then
    eager's add), where they raised: outputs, gradients (the residual's summed over the
    broadcast dimensions) and running statistics as eager's. A residual that does not
    broadcast gets eager's error."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    _randomise_bn(nn.Sequential(bn))
    fused = resnet_fused.FusedConvBNReLU2d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn))
    bna = resnet_fused.FusedBatchNormAct2d.from_batch_norm(copy.deepcopy(bn))
    bn_alone = copy.deepcopy(bn)
    for m in (conv, bn, fused, bna, bn_alone):
        m.train(training)
    x, y = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    for shape in ((1, 4, 1, 1), (4, 1, 1), (1, 1, 5, 5)):
        r = torch.randn(shape, requires_grad=True)
        for eager, got in (
            (lambda r: torch.relu(bn(conv(x)) + r), lambda r: fused(x, r)),
            (lambda r: torch.relu(bn_alone(y) + r), lambda r: bna(y, r)),
        ):
            ref = eager(r)
            (g_ref,) = torch.autograd.grad(ref.sum(), r)
            out = got(r)
            (g,) = torch.autograd.grad(out.sum(), r)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(fused.bn.running_mean, bn.running_mean)
    torch.testing.assert_close(fused.bn.running_var, bn.running_var)
    torch.testing.assert_close(bna.running_var, bn_alone.running_var)
    with pytest.raises(RuntimeError, match="must match the size"):
        fused(x, torch.randn(3, 4, 5, 5))
