"""A converted unit's output has the memory layout eager's modules give it.

oneDNN's fused convolution (``mkldnn::_convolution_pointwise``) given a weight reordered
for it writes a channels_last output whatever its input's layout; eager's convolution of
an NCHW input with an NCHW weight writes NCHW. The CPU eval unit kept such a weight for
NCHW inputs too, so a converted NCHW model in eval returned channels_last activations
wherever ``auto`` picked that path: slower eager ops after it and, in a model whose
forward ends in ``x.view(x.size(0), -1)``, a RuntimeError ("view size is not compatible
with input tensor's size and stride") where the unconverted model runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import resnet_fused
from resnet_fused.functional import auto_choice

CL = torch.channels_last


class _Unit(nn.Module):
    def __init__(self, cin, cout, k, stride, act, residual):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act
        self.residual = residual

    def forward(self, x, r=None):
        y = self.bn(self.conv(x))
        return self.act(y + r) if self.residual else self.act(y)


def _layout(t: torch.Tensor) -> tuple[bool, bool]:
    return t.is_contiguous(), t.is_contiguous(memory_format=CL)


def _force(monkeypatch, pick: str) -> None:
    """auto's pick for every unit: ``pick`` where it is a candidate (the CPU eval unit's
    candidates: "cpu", oneDNN's fused convolution; "cpu-epilogue", aten's convolution and
    a one-pass epilogue; "eager")."""
    real = auto_choice.choose

    def choose(key, candidates, trial, device, **kwargs):
        if pick in candidates:
            return pick
        return real(key, candidates, trial, device, **kwargs)

    monkeypatch.setattr(auto_choice, "choose", choose)
    monkeypatch.setenv("RESNET_FUSED_AUTO", "time")
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", "")
    auto_choice.reset()


CASES = {
    # cin, cout, kernel, stride, activation, residual, input H x W
    "3x3": (4, 8, 3, 1, nn.ReLU(), False, (6, 7)),
    "1x1-stride2": (8, 16, 1, 2, nn.ReLU(), False, (6, 6)),
    "residual": (8, 8, 3, 1, nn.ReLU(), True, (5, 6)),
    "silu": (4, 8, 3, 1, nn.SiLU(), False, (6, 5)),
    "1x1-spatial": (8, 8, 3, 1, nn.ReLU(), False, (1, 1)),
}


@pytest.mark.parametrize("pick", ["cpu", "cpu-epilogue", "eager"])
@pytest.mark.parametrize(
    "x_fmt, w_fmt", [("nchw", "nchw"), ("nchw", "cl"), ("cl", "nchw"), ("cl", "cl")]
)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["eval", "eval-grad", "train"])
def test_unit_output_layout_is_eagers(monkeypatch, pick, x_fmt, w_fmt, case, mode):
    """Every pick of auto for a conv -> BN -> act (+ residual) unit, in eval (no_grad and
    with autograd recording) and in training: the output's layout (contiguous,
    channels_last) is eager's, for each layout of the input and of the weight, and its
    values eager's."""
    _force(monkeypatch, pick)
    cin, cout, k, stride, act, residual, (h, w) = CASES[case]
    torch.manual_seed(0)
    model = _Unit(cin, cout, k, stride, act, residual)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    if w_fmt == "cl":
        model = model.to(memory_format=CL)
    model.train(mode == "train")
    fused = resnet_fused.convert(model)
    x = torch.randn(3, cin, h, w)
    x = x.to(memory_format=CL) if x_fmt == "cl" else x
    ho = (h + 2 * (k // 2) - k) // stride + 1
    wo = (w + 2 * (k // 2) - k) // stride + 1
    r = torch.randn(3, cout, ho, wo) if residual else None
    r = r.to(memory_format=CL) if r is not None and x_fmt == "cl" else r
    for _ in range(2):  # the first call plans, the second runs the plan
        with torch.set_grad_enabled(mode != "eval"):
            expected = model(x, r)
            got = fused(x, r)
        assert _layout(got) == _layout(expected), (got.stride(), expected.stride())
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


class _Flattening(nn.Module):
    """A user's network: features, then ``view`` to the classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.features(x)
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("pick", ["cpu", "cpu-epilogue"])
def test_converted_model_with_view_runs_in_eval(monkeypatch, pick):
    """The model's ``x.view(x.size(0), -1)`` after a fused unit works in eval, as it does
    unconverted (before: RuntimeError with the "cpu" pick)."""
    _force(monkeypatch, pick)
    torch.manual_seed(0)
    model = _Flattening().eval()
    fused = resnet_fused.convert(model)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        for _ in range(2):
            torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)


def test_cuda_candidates_keep_eagers_layout(monkeypatch):
    """On CUDA, auto times the Triton convolution (which writes channels_last) only where
    eager's output is channels_last too: a channels_last input or weight. (The candidate
    list is a function of the layouts: checked here with CPU tensors standing in.)"""
    monkeypatch.setattr(auto_choice, "unavailable_reason", lambda c, d: None)
    dev = torch.device("cuda")
    x, w = torch.empty(2, 4, 5, 6), torch.empty(8, 4, 3, 3)
    assert auto_choice.cuda_conv_candidates(x, w, dev) == ["cuda"]
    assert auto_choice.cuda_conv_candidates(x.to(memory_format=CL), w, dev) == ["cuda", "triton"]
    assert auto_choice.cuda_conv_candidates(x, w.to(memory_format=CL), dev) == ["cuda", "triton"]
    # (an NCHW tensor with one channel is channels_last too: eager treats it as NCHW)
    x1 = torch.empty(2, 1, 5, 6)
    assert auto_choice.cuda_conv_candidates(x1, torch.empty(8, 1, 3, 3), dev) == ["cuda"]
    monkeypatch.setattr(
        auto_choice, "unavailable_reason", lambda c, d: "not built" if c == "triton" else None
    )
    assert auto_choice.cuda_conv_candidates(x.to(memory_format=CL), w, dev) == ["cuda"]
