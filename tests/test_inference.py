"""Inference as users run it: converted models under ``torch.no_grad`` and
``torch.inference_mode`` (models and inputs made inside or outside the context), in fp32,
bf16 and fp16 (cast models and autocast), NCHW and channels_last, ``torch.export`` and
``torch.compile`` of the converted eval model.

These are the paths that gradient-enabled tests never reach: the cached fold, the oneDNN
fused convolutions and the finite-input marks. Each case compares the converted model with
the fp64 model under the project's tolerance rule (twice eager's own error in that dtype,
plus the dtype's floor).

bf16 convolutions run on oneDNN only where this CPU supports them (AVX-512 BF16/AMX or
AVX-NE-CONVERT); elsewhere the fused path uses aten's convolution and the C++ epilogue.
``no_onednn_bf16`` forces that branch, so that a CPU with bf16 oneDNN checks it too.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torchvision
from reference_check import FLOOR
from test_resnet import _randomise_bn
from torch import nn

import resnet_fused
from resnet_fused.bench.tutorial import TutorialResNet
from resnet_fused.functional import conv_bn_act as conv_bn_act_module


def _make(model_name: str) -> nn.Module:
    torch.manual_seed(0)
    if model_name == "resnet18":  # torchvision's blocks: the fused block classes
        model = torchvision.models.resnet18(num_classes=10)
    else:  # a user-written ResNet: the graph converter
        model = TutorialResNet(
            (1, 1, 1, 1), widths=(8, 16, 16, 32), num_classes=10, small_input=True
        )
        if model_name == "tutorial-silu":  # SiLU in the blocks, after the residual add too
            for block in (model.layer1, model.layer2, model.layer3, model.layer4):
                block[0].relu = nn.SiLU()
    _randomise_bn(model)
    return model.eval()


DTYPES = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "bf16-autocast": (torch.float32, torch.bfloat16),
}


def _context(name: str):
    return torch.no_grad() if name == "no_grad" else torch.inference_mode()


def _run_case(model_name, context, dtype_name, layout, *, inside: bool):
    dtype, autocast = DTYPES[dtype_name]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)

    model = _make(model_name)
    with torch.no_grad():
        ref = model.double()(x.double())

    def build():
        m = _make(model_name).to(dtype=dtype, memory_format=fmt)
        return m, resnet_fused.convert(m)

    amp = (
        torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    )
    if inside:  # model, conversion and input all made inside the context
        with _context(context):
            eager_model, fused = build()
            xi = x.to(dtype=dtype, memory_format=fmt)
            with amp:
                eager, outs = eager_model(xi), [fused(xi), fused(xi)]
    else:
        eager_model, fused = build()
        xi = x.to(dtype=dtype, memory_format=fmt)
        with _context(context), amp:
            eager, outs = eager_model(xi), [fused(xi), fused(xi)]
    eager_err = (eager.double() - ref).abs().max().item()
    bound = 2 * eager_err + FLOOR[eager.dtype] * max(ref.abs().max().item(), 1.0)
    for out in outs:  # the first call folds, the second uses the cached fold
        assert out.dtype == eager.dtype and out.shape == eager.shape
        assert torch.isfinite(out).all()
        err = (out.double() - ref).abs().max().item()
        assert err <= bound, (err, eager_err, bound)
    if context == "inference_mode":
        assert outs[0].is_inference()


CASES = [
    (m, c, d, layout, inside)
    for m in ("resnet18", "tutorial", "tutorial-silu")
    for c, inside in (("no_grad", False), ("inference_mode", False), ("inference_mode", True))
    for d in DTYPES
    for layout in ("nchw", "channels_last")
]


@pytest.mark.parametrize(("model_name", "context", "dtype_name", "layout", "inside"), CASES)
def test_converted_model_inference(model_name, context, dtype_name, layout, inside):
    _run_case(model_name, context, dtype_name, layout, inside=inside)


@pytest.fixture
def no_onednn_bf16(monkeypatch):
    """This CPU as one without bf16 oneDNN (an AVX2-only x86): the fused path must not
    call oneDNN's bf16 convolution."""
    monkeypatch.setattr(
        conv_bn_act_module, "_onednn_supports", lambda dtype: dtype == torch.float32
    )
    calls = []
    real = torch.ops.mkldnn._convolution_pointwise

    class Spy:
        def __call__(self, x, *args):
            calls.append(x.dtype)
            return real(x, *args)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(conv_bn_act_module, "_mkldnn_pointwise", Spy())
    return calls


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype_name", ["bf16", "bf16-autocast"])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("model_name", ["resnet18", "tutorial-silu"])
def test_bf16_inference_without_onednn_bf16(
    no_onednn_bf16, model_name, context, dtype_name, layout
):
    _run_case(model_name, context, dtype_name, layout, inside=False)
    assert torch.bfloat16 not in no_onednn_bf16


def test_onednn_bf16_asked_of_torch():
    """The bf16 oneDNN path is taken exactly where torch says this CPU supports it."""
    assert conv_bn_act_module._onednn_supports(torch.bfloat16) == bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    assert conv_bn_act_module._onednn_supports(torch.float32)


def test_inference_tensors_are_never_marked_finite():
    """Outputs made under inference_mode have no version counter: nothing may read it,
    and a NaN written into such an output in place must still reach the next unit's
    output as NaN (oneDNN's ReLU post-op would turn it into 0)."""
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(4).eval()
    _randomise_bn(nn.Sequential(bn))
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn)
    with torch.inference_mode():
        y = unit(torch.randn(1, 4, 6, 6))
        y[0, :, 2, 2] = float("nan")
        out = unit(y)
    assert torch.isnan(out).any()


@pytest.mark.parametrize("model_name", ["resnet18", "tutorial"])
def test_export_converted_eval_model(model_name):
    model = _make(model_name)
    fused = resnet_fused.convert(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    exported = torch.export.export(fused, (x,))
    with torch.no_grad():
        out = exported.module()(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_compile_converted_eval_model(context):
    model = _make("tutorial")
    fused = resnet_fused.convert(model)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 3, 16, 16)
    with _context(context):
        expected = model(x)
        out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def _jit_trace(module: nn.Module, x: torch.Tensor):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (torch.jit.trace is deprecated)
        return torch.jit.trace(module, x, check_trace=False)


@pytest.mark.parametrize(
    "model_name", ["resnet18", "tutorial", "mobilenet_v3_small", "bn_act_module", "unit_module"]
)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_jit_trace_of_converted_models(model_name, mode):
    """torch.jit.trace of a converted model (or a fused module) records eager's ops: its
    fused sites run their modules while a trace records them (the fused path's Python
    decisions -- cached folds, plans, timing trials, marks -- cannot be traced; the
    fingerprint op's integer result made tracing fail). The trace runs without
    resnet_fused's ops and matches the unconverted model on another input, outputs and
    (training) running statistics."""
    import copy

    torch.manual_seed(0)
    if model_name == "mobilenet_v3_small":  # graph sites: conv-bn-hardswish, SE blocks
        model = torchvision.models.mobilenet_v3_small(num_classes=10)
        _randomise_bn(model)
    elif model_name == "bn_act_module":
        model = nn.Sequential(nn.BatchNorm2d(6), nn.SiLU())
        _randomise_bn(model)
    elif model_name == "unit_module":
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        _randomise_bn(model)
    else:
        model = _make(model_name)
    model.train(mode == "train")
    if model_name == "bn_act_module":
        fused = resnet_fused.FusedBatchNormAct2d(6, activation="silu")
        fused.load_state_dict(model[0].state_dict())
        x, x2 = torch.randn(4, 6, 8, 8), torch.randn(3, 6, 8, 8)
    elif model_name == "unit_module":
        fused = resnet_fused.FusedConvBNReLU2d.from_modules(*copy.deepcopy(model[:2]))
        x, x2 = torch.randn(4, 3, 8, 8), torch.randn(3, 3, 8, 8)
    else:
        fused = resnet_fused.convert(model)
        x, x2 = torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)
    fused.train(mode == "train")
    with torch.no_grad() if mode == "eval" else contextlib.nullcontext():
        expected_first = model(x)
        traced = _jit_trace(fused, x)
        kinds = {node.kind() for node in traced.inlined_graph.nodes()}
        assert not [k for k in kinds if k.startswith("resnet_fused::")], kinds
        assert "aten::_convolution" in kinds or "aten::batch_norm" in kinds
        torch.manual_seed(1)  # (dropout in training: the same draws)
        out = traced(x2)
        torch.manual_seed(1)
        torch.testing.assert_close(out, model(x2), rtol=1e-5, atol=1e-5)
    if mode == "train":  # tracing ran the forward once, as eager's first call
        assert expected_first.shape[0] == 4
        for (name, b), b_e in zip(fused.named_buffers(), model.buffers(), strict=True):
            torch.testing.assert_close(b, b_e, rtol=1e-5, atol=1e-6, msg=name)


def _jit_script(module: nn.Module):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (torch.jit.script is deprecated)
        return torch.jit.script(module)


def _structure(model: nn.Module) -> list:
    return [(name, type(m).__name__) for name, m in model.named_modules()]


@pytest.mark.parametrize("model_name", ["resnet18", "tutorial", "mobilenet_v3_small", "block"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_jit_script_of_converted_models(model_name, mode):
    """torch.jit.script of a converted model raises a clear error naming the way out
    (before: "Unknown type annotation" for torchvision's blocks, "'_GraphConversion'
    object has no attribute '__globals__'" for the graph converter's models), also for a
    module that holds one, which is left as it was; copies and pickles carry it. The way
    out works: the unfused model scripts and matches the unconverted one, outputs and
    (training) running statistics."""
    import copy
    import pickle

    torch.manual_seed(0)
    if model_name == "mobilenet_v3_small":  # graph sites: conv-bn-hardswish, SE blocks
        model = torchvision.models.mobilenet_v3_small(num_classes=10)
        _randomise_bn(model)
        shape = (2, 3, 32, 32)
    elif model_name == "block":  # a bare torchvision block (convert returns the fused block)
        model = torchvision.models.resnet.BasicBlock(8, 8)
        _randomise_bn(model)
        shape = (2, 8, 6, 6)
    else:
        model = _make(model_name)
        shape = (2, 3, 32, 32)
    model.train(mode == "train")
    fused = resnet_fused.convert(model)
    wrapper = nn.Sequential(fused, nn.Identity())
    before = _structure(wrapper)
    for target in (fused, wrapper, copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        with pytest.raises(RuntimeError, match=r"Script resnet_fused\.unfuse\(model\)"):
            _jit_script(target)
    assert wrapper[0] is fused and _structure(wrapper) == before
    scripted = _jit_script(resnet_fused.unfuse(fused))
    x = torch.randn(shape)
    with torch.no_grad() if mode == "eval" else contextlib.nullcontext():
        torch.manual_seed(1)  # (dropout in training: the same draws)
        out = scripted(x)
        torch.manual_seed(1)
        torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)
    if mode == "train":
        for (name, b), b_e in zip(scripted.named_buffers(), model.buffers(), strict=True):
            torch.testing.assert_close(b, b_e, rtol=1e-6, atol=1e-7, msg=name)


def test_a_models_own_prepare_scriptable_is_kept():
    """A model class with a ``__prepare_scriptable__`` of its own keeps it converted."""

    class Scriptable(nn.Sequential):
        def __prepare_scriptable__(self):
            return resnet_fused.unfuse(self)

    torch.manual_seed(0)
    model = Scriptable(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    fused = resnet_fused.convert(model)
    assert "__prepare_scriptable__" not in fused.__dict__
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(_jit_script(fused)(x), model(x))
