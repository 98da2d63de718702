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


def _input(n, c, h, w, fmt):
    x = torch.randn(n, c, h, w)
    if fmt == "cl":
        return x.to(memory_format=CL)
    if fmt == "odd":  # (dense, channels_last-contiguous, but aten suggests NCHW for it)
        return torch.randn(n, c, w, h).to(memory_format=CL).transpose(2, 3)
    return x


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
    "x_fmt, w_fmt",
    [("nchw", "nchw"), ("nchw", "cl"), ("cl", "nchw"), ("cl", "cl"), ("odd", "nchw")],
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
    x = _input(3, cin, h, w, x_fmt)
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


@pytest.mark.parametrize(
    "shape, x_fmt, w_fmt",
    [
        ((2, 3, 5, 6), "nchw", "nchw"), ((2, 3, 5, 6), "cl", "nchw"),
        ((2, 3, 5, 6), "nchw", "cl"), ((2, 3, 5, 6), "cl", "cl"),
        ((2, 3, 4, 1), "odd", "nchw"), ((2, 1, 5, 6), "cl", "nchw"),
        ((1, 3, 5, 6), "cl", "nchw"), ((2, 3, 1, 1), "cl", "nchw"),
    ],
)  # fmt: skip
def test_layout_rule_is_eagers_convolution(shape, x_fmt, w_fmt):
    """conv_output_channels_last(x, w), which decides where the kernels that always write
    channels_last may run, says what eager's convolution writes, odd and ambiguous
    layouts included."""
    from resnet_fused._layout import conv_output_channels_last

    n, c, h, w_ = shape
    x = _input(n, c, h, w_, x_fmt)
    w = torch.randn(4, c, 3, 3)
    w = w.to(memory_format=CL) if w_fmt == "cl" else w
    out = torch.nn.functional.conv2d(x, w, padding=1)
    if out.is_contiguous() and out.is_contiguous(memory_format=CL):
        return  # (ambiguous output: either answer has eager's layout)
    assert conv_output_channels_last(x, w) == out.is_contiguous(memory_format=CL)


def test_strides_rule_is_torchs():
    """strides_like_channels_last (a port of aten's rule, 25x faster than
    torch._prims_common's) agrees with torch's suggest_memory_format on every
    permutation of dense, sliced and expanded 4-D tensors, ambiguous sizes included."""
    import itertools

    from torch._prims_common import suggest_memory_format

    from resnet_fused._layout import strides_like_channels_last

    shapes = [(2, 3, 5, 6), (2, 1, 5, 6), (1, 3, 5, 6), (2, 3, 1, 1), (2, 3, 4, 1), (1, 8, 1, 1)]
    checked = 0
    for shape in [*shapes, (2, 3, 5, 0), (1, 1, 1, 1)]:
        for perm in itertools.permutations(range(4)):
            t = torch.empty([shape[p] for p in perm]).permute(*[perm.index(i) for i in range(4)])
            views = [t, t.expand(*t.shape)] + ([t[:, :, ::2]] if t.shape[2] > 1 else [])
            for v in views:
                expected = suggest_memory_format(v) == CL
                assert strides_like_channels_last(v) == expected, (v.shape, v.stride())
                checked += 1
    assert checked > 400


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("x_fmt", ["nchw", "cl"])
def test_triton_backend_output_layout_is_eagers(monkeypatch, mode, x_fmt):
    """backend="triton" (here under the Triton interpreter): its convolution writes
    channels_last, so an NCHW unit runs aten's convolution with the Triton epilogue
    (eval) or the Triton BatchNorm kernels (training), and keeps eager's layout."""
    pytest.importorskip("triton")
    from resnet_fused.backends import unavailable_reason

    if unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("the Triton backend does not run on this machine's CPU tensors")
    torch.manual_seed(0)
    model = _Unit(4, 8, 3, 1, nn.ReLU(), False).train(mode == "train")
    fused = resnet_fused.convert(model, backend="triton")
    x = _input(2, 4, 6, 5, x_fmt)
    with torch.set_grad_enabled(mode == "train"):
        expected, got = model(x), fused(x)
    assert _layout(got) == _layout(expected), (got.stride(), expected.stride())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _bn_input(fmt: str) -> torch.Tensor:
    """A (2, 4, 5, 5) BatchNorm input: dense NCHW or channels_last, or a slice of a larger
    tensor in either layout (strided: not contiguous in any format)."""
    if fmt in ("nchw", "cl"):
        return _input(2, 4, 5, 5, fmt)
    base = torch.randn(2, 8, 5, 6)
    if fmt == "cl-slice":
        base = base.to(memory_format=CL)
    return base[:, 2:6, :, 1:]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("fmt", ["nchw", "cl", "nchw-slice", "cl-slice"])
@pytest.mark.parametrize("residual", ["none", "nchw", "cl"])
@pytest.mark.parametrize("mode", ["eval", "train", "train-grad"])
def test_batch_norm_act_output_layout_is_eagers(backend, fmt, residual, mode):
    """The fused BatchNorm(+add)+ReLU returns the layout eager's batch_norm (+ add_ + relu_)
    returns, strided inputs included: eager's BatchNorm writes a slice of a channels_last
    tensor channels_last (``suggest_memory_format``), as the fused kernels now do."""
    if backend == "triton" and not resnet_fused.is_available("triton", "cpu"):
        pytest.skip("Triton's interpreter is not available")
    if backend == "cpu" and not resnet_fused.is_available("cpu", "cpu"):
        pytest.skip("extension not built")
    training = mode.startswith("train")
    x = _bn_input(fmt).requires_grad_(mode == "train-grad")
    r = None if residual == "none" else _input(2, 4, 5, 5, residual)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.randn(4) * 0.1, torch.rand(4) + 0.5
    eager = torch.batch_norm(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, False)
    eager = (eager.add_(r) if r is not None else eager).relu_()
    out = resnet_fused.batch_norm_act(
        x, rm.clone(), rv.clone(), w, b, training, residual=r, backend=backend
    )
    assert _layout(out) == _layout(eager), (out.stride(), eager.stride())
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    if mode == "train-grad":
        g = torch.randn_like(eager)
        (gx,) = torch.autograd.grad(out, x, g)
        (gx_e,) = torch.autograd.grad(eager, x, g)
        torch.testing.assert_close(gx, gx_e, rtol=1e-4, atol=1e-5)
