"""convert / unfuse / fused blocks / model constructors against torchvision's ResNets.

Each architecture is compared three ways: the converted model (fp32), the original
(fp32) and the original in fp64. Deep fp32 ResNets in training mode are ill-conditioned
(BatchNorm over few values per channel), so eager fp32 itself is far from fp64 on some
gradients; the converted model must be as close to fp64 as eager is (within a factor),
not bitwise equal to eager.
"""

from __future__ import annotations

import copy
import io
import pickle
import weakref

import pytest
import torch
import torchvision
from conftest import backend_device, backend_params, release_memory
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import resnet_fused

ARCHS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


def _rel_tensors(tensors, refs) -> float:
    """_rel of the concatenations, without making them (a copy of every parameter)."""
    num = den = 0.0
    for a, ref in zip(tensors, refs, strict=True):
        num += (a.detach().double() - ref.detach()).square().sum().item()
        den += ref.detach().double().square().sum().item()
    return (num / max(den, 1e-300)) ** 0.5


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN parameters and statistics (torchvision initialises 1 and 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def _train_in_step(models, x, target, steps, check_first_grads):
    """The same SGD steps on a fixed batch for each model, in lockstep; after every model's
    backward of the first step, ``check_first_grads(models)`` compares their gradients in
    place (no copies of them are kept). Returns each model's losses; gradients freed."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    losses = [[] for _ in models]
    for step in range(steps):
        for model, opt, model_losses in zip(models, opts, losses, strict=True):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x).float(), target)
            loss.backward()
            model_losses.append(loss.item())
        if step == 0:
            check_first_grads(models)
        for opt in opts:
            opt.step()
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    return losses


def _bn_buffers(model):
    return [
        t
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
        for t in (m.running_mean, m.running_var)
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_matches_original(arch):
    """Converted vs original, in fp64 for gradients and training (exact comparison: no
    ReLU kink rounding), and in fp32 for the forward passes and statistics (as close to
    fp64 as eager fp32 is)."""
    torch.manual_seed(0)
    original = getattr(torchvision.models, arch)(num_classes=10)
    _randomise_bn(original)
    converted = resnet_fused.convert(original, backend="cpu")

    # Everything converted; state_dict keys and values unchanged.
    report = resnet_fused.conversion_report(converted)
    assert report["not_fused"] == []
    blocks = [m for m in original.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(report["fused"]) == len(blocks) + 1  # + the stem, a site of ResNet.forward
    assert "conv1, bn1, relu (conv-bn-relu)" in report["fused"]
    assert type(converted.conv1) is nn.Conv2d and type(converted.bn1) is nn.BatchNorm2d
    sd_o, sd_c = original.state_dict(), converted.state_dict()
    assert list(sd_o) == list(sd_c)
    assert all(torch.equal(sd_o[k], sd_c[k]) for k in sd_o)

    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([3, 7])

    # fp32 forward (train and eval) and one step's running statistics against fp64.
    fp64 = copy.deepcopy(original).double()
    outs = {}
    for tag, model, inp in (("eager", original, x), ("fused", converted, x), ("fp64", fp64, x)):
        inp = inp.to(next(model.parameters()).dtype)
        with torch.no_grad():
            model.eval()
            ev = model(inp)
            model.train()
            tr = model(inp)
        outs[tag] = (ev, tr, _flat(_bn_buffers(model)))
    for i, what in enumerate(("eval output", "train output", "running statistics")):
        ref = _flat([outs["fp64"][i]])
        err_f, err_e = _rel(_flat([outs["fused"][i]]), ref), _rel(_flat([outs["eager"][i]]), ref)
        assert err_f <= 2 * err_e + 1e-6, f"fp32 {what}: fused {err_f:.2e} vs eager {err_e:.2e}"
    # Memory: the fp32 part's copies go before the fp64 part makes its own (the widest
    # models hold ~127M parameters: 1 GB per fp64 copy, and as much again in gradients).
    copies = [weakref.ref(converted), weakref.ref(fp64)]
    del converted, fp64, outs, sd_o, sd_c, report, model, inp, ev, tr
    release_memory()
    assert all(ref() is None for ref in copies), "the fp32 part's model copies are still alive"

    # fp64: two SGD steps from the same state; everything must agree closely.
    original64 = original.double()  # in place: the fp32 model is not needed any more
    converted64 = resnet_fused.convert(original64, backend="cpu")
    for m in (original64, converted64):
        m.train()

    def check_first_grads(models):
        ge, gf = (dict(m.named_parameters()) for m in models)
        assert list(ge) == list(gf)
        for k in ge:
            assert _rel(gf[k].grad, ge[k].grad.double()) < 1e-8, f"grad {k}"

    le, lf = _train_in_step([original64, converted64], x.double(), target, 2, check_first_grads)
    res = {}
    for tag, model in (("eager", original64), ("fused", converted64)):
        model.eval()
        with torch.no_grad():
            ev = model(x.double())
        res[tag] = (_bn_buffers(model), list(model.parameters()), [ev])
    for i, what in ((0, "running statistics"), (1, "parameters after 2 steps"), (2, "eval")):
        err = _rel_tensors(res["fused"][i], res["eager"][i])
        assert err < 1e-8, f"fp64 {what}: {err:.2e}"
    for a, b in zip(lf, le, strict=True):
        assert abs(a - b) <= 1e-9 * abs(b)


def test_unfuse_round_trip_and_checkpoints():
    torch.manual_seed(0)
    original = torchvision.models.resnet50(num_classes=10)
    _randomise_bn(original)
    converted = resnet_fused.convert(original, backend="cpu")
    plain = resnet_fused.unfuse(converted)
    assert type(plain.layer1[0]) is Bottleneck and type(plain.conv1) is nn.Conv2d
    assert type(plain.bn1) is nn.BatchNorm2d and type(plain.relu) is nn.ReLU
    assert not any(type(m).__module__.startswith("resnet_fused") for m in plain.modules()), (
        "unfuse left fused modules"
    )
    x = torch.randn(2, 3, 64, 64)
    original.eval(), converted.eval(), plain.eval()
    with torch.no_grad():
        ref = original(x)
        torch.testing.assert_close(plain(x), ref)
        torch.testing.assert_close(converted(x), ref, rtol=1e-4, atol=1e-4)
    # An unfused checkpoint loads into the fused model and back.
    fresh = resnet_fused.models.resnet50(num_classes=10, backend="cpu").eval()
    fresh.load_state_dict(original.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=1e-4, atol=1e-4)
    back = torchvision.models.resnet50(num_classes=10).eval()
    back.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref)
    # inplace=True converts the model object itself.
    same = resnet_fused.convert(back, backend="cpu", inplace=True)
    assert same is back and isinstance(back.layer1[0], resnet_fused.FusedBottleneck)


def test_copy_pickle_and_mode_switching():
    torch.manual_seed(0)
    model = resnet_fused.models.resnet18(num_classes=10, backend="cpu")
    _randomise_bn(model)
    x = torch.randn(2, 3, 48, 48)
    model.eval()
    with torch.no_grad():
        ref = model(x)  # fills the fold caches
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        for other in (clone, loaded, unpickled):
            torch.testing.assert_close(other(x), ref)
    with torch.no_grad():
        for other in (clone, loaded, unpickled):
            # The copy's stem site reads the copy's own bn1, not the original's.
            other.bn1.running_mean.add_(1.0)
            assert not torch.allclose(other(x), ref)
            torch.testing.assert_close(model(x), ref)
    # train -> eval -> train: statistics update only in training; eval folds again.
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(after, ref)  # running statistics moved
    eager = resnet_fused.unfuse(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(after, eager(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_channels_last_and_autocast(arch):
    """channels_last models under bf16 autocast: the converted model is as close to the
    fp64 model as eager autocast is (outputs and all gradients together)."""
    torch.manual_seed(0)
    original = getattr(torchvision.models, arch)(num_classes=10)
    _randomise_bn(original)
    original = original.to(memory_format=torch.channels_last)
    converted = resnet_fused.convert(original, backend="cpu")
    fp64 = copy.deepcopy(original).double()
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    for training in (True, False):
        results = {}
        for tag, model in (("eager", original), ("fused", converted), ("fp64", fp64)):
            model.train(training)
            model.zero_grad(set_to_none=True)
            if tag == "fp64":
                out = model(x.double())
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(x)
                assert out.dtype == torch.bfloat16
            grads = None
            if training:
                out.float().sum().backward() if tag != "fp64" else out.sum().backward()
                grads = _flat(p.grad for p in model.parameters())
            results[tag] = (out.detach().double(), grads)
        ref_out, ref_grads = results["fp64"]
        err_f = _rel(results["fused"][0], ref_out)
        err_e = _rel(results["eager"][0], ref_out)
        assert err_f <= 2 * err_e + 1e-3, f"out (training={training}): {err_f:.2e} vs {err_e:.2e}"
        if training:
            err_f = _rel(results["fused"][1], ref_grads)
            err_e = _rel(results["eager"][1], ref_grads)
            assert err_f <= 2 * err_e + 1e-3, f"gradients: {err_f:.2e} vs {err_e:.2e}"
    converted.eval()
    with torch.no_grad():
        out = converted(x)
    assert torch.isfinite(out).all()


def test_compile_fullgraph():
    torch.manual_seed(0)
    model = resnet_fused.models.resnet18(num_classes=10, backend="cpu")
    _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32)
    for training in (True, False):
        model.train(training)
        eager = copy.deepcopy(model)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        ref = eager(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        if training:
            out.sum().backward()
            ref.sum().backward()
            for (k, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=k)
            for a, b in zip(_bn_buffers(model), _bn_buffers(eager), strict=True):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("training", [False, True])
def test_compiled_converted_model_compiles_once(training):
    """A second call of a compiled converted model reuses the first graph: nothing that
    dynamo guards on (the blocks' fold caches) changes during a forward."""
    model = resnet_fused.convert(_tiny_resnet()).train(training)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        compiled(x)
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled for 3 calls of one shape"


def _tiny_resnet() -> ResNet:
    """torchvision's ResNet class with narrow custom stages (8 and 16 channels, one
    BasicBlock each, the second with a stride-2 downsample) and a 3x3 stem."""
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
    model.bn1 = nn.BatchNorm2d(8)
    model.maxpool = nn.Identity()
    model.layer1 = nn.Sequential(BasicBlock(8, 8))
    down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    model.layer2 = nn.Sequential(BasicBlock(8, 16, 2, down))
    model.layer3 = model.layer4 = nn.Identity()
    model.fc = nn.Linear(16, 10)
    return model


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu", "triton")))
def test_small_custom_resnet_other_backends(backend):
    """A custom ResNet on every backend; Triton runs its implicit-GEMM convolutions (in
    the interpreter without a GPU)."""
    device = backend_device(backend)
    torch.manual_seed(0)
    original = _tiny_resnet().to(device)
    _randomise_bn(original)
    converted = resnet_fused.convert(original, backend=backend)
    assert resnet_fused.conversion_report(converted)["not_fused"] == []
    x = torch.randn(4, 3, 8, 8, device=device)
    for training in (True, False):
        original.train(training), converted.train(training)
        ref, out = original(x), converted(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        if training:
            ref.sum().backward()
            out.sum().backward()
            for (k, p), q in zip(converted.named_parameters(), original.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=k)
    for a, b in zip(_bn_buffers(converted), _bn_buffers(original), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unrecognised_parts_are_left_untouched_and_reported():
    class MyBlock(BasicBlock):
        def forward(self, x):
            return super().forward(x) * 0.5

    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, norm_layer=None)
    model.layer2[0] = MyBlock(64, 128, 2, model.layer2[0].downsample)
    gn = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=lambda c: nn.GroupNorm(2, c))
    with pytest.warns(UserWarning, match=r"layer2\.0: MyBlock subclasses a torchvision block"):
        converted = resnet_fused.convert(model, backend="cpu")
    assert type(converted.layer2[0]) is MyBlock
    assert isinstance(converted.layer1[0], resnet_fused.FusedBasicBlock)
    with pytest.warns(UserWarning, match="GroupNorm is not a plain nn.BatchNorm2d"):
        converted_gn = resnet_fused.convert(gn, backend="cpu")
    assert not any(isinstance(m, resnet_fused.FusedBasicBlock) for m in converted_gn.modules())
    assert type(converted_gn.conv1) is nn.Conv2d
    report = resnet_fused.conversion_report(converted_gn)
    assert report["fused"] == [] and len(report["not_fused"]) == 5
    # A model with nothing to fuse passes through unchanged, with a warning saying why.
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="fused nothing in this model: it has no BatchNorm"):
        converted = resnet_fused.convert(plain)
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(converted(x), plain(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        resnet_fused.convert("resnet18")
    with pytest.raises(ValueError, match="backend must be one of"):
        resnet_fused.convert(model, backend="gpu")


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_refuses_uninitialized_lazy_modules(inplace):
    """Lazy modules before their first forward: a clear error naming them (before, the
    copy failed inside torch, and in place they were left unfused with a report calling
    LazyBatchNorm2d not 2-d); after one forward they are Conv2d / BatchNorm2d and fuse."""
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU())
    with pytest.raises(ValueError, match=r"lazy modules .*0 \(LazyConv2d\), 1 \(LazyBatchNorm2d\)"):
        resnet_fused.convert(model, inplace=inplace)
    assert type(model[0]) is nn.LazyConv2d  # (untouched)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    converted = resnet_fused.convert(model, inplace=inplace)
    assert len(resnet_fused.conversion_report(converted)["fused"]) == 1
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    # A lazy head outside any fused pattern: in place, the rest converts; a copy cannot
    # be made (torch refuses to copy uninitialized parameters): the error says why.
    headed = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)
    )
    if inplace:
        converted = resnet_fused.convert(headed, inplace=True)
        assert len(resnet_fused.conversion_report(converted)["fused"]) == 1
        assert converted(x).shape == (2, 2)
    else:
        with pytest.raises(ValueError, match=r"lazy modules .*4 \(LazyLinear\)"):
            resnet_fused.convert(headed)


def test_blocks_construct_like_torchvision():
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256))
    fused = resnet_fused.FusedBottleneck(64, 64, downsample=ds, backend="cpu")
    plain = Bottleneck(64, 64, downsample=copy.deepcopy(ds))
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-4)
    basic = resnet_fused.FusedBasicBlock(32, 32, backend="cpu")
    assert list(basic.state_dict()) == list(BasicBlock(32, 32).state_dict())
