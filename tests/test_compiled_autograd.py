"""Compiled autograd (``torch._dynamo.compiled_autograd``) over a converted model's
backward: the library's C++ autograd nodes -- the eager unit's ``ConvBnActEagerBackward``
(csrc/unit.cpp) and the fused BatchNorm+activation's ``BnActFunction``
(csrc/bn_act_autograd.cpp) -- run in the compiled backward as one opaque call each, with
gradients equal bit for bit to the same model's backward without compiled autograd.

Before the eager unit's node implemented ``compiled_args`` / ``apply_with_saved``, any
backward through it under compiled autograd raised ``NotImplementedError: compiled_args
not implemented: ConvBnActEagerBackward`` (a forward run eagerly -- a graph break, a
module left uncompiled -- then ``loss.backward()`` with compiled autograd enabled)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import resnet_fused
from resnet_fused import _extension

pytestmark = pytest.mark.skipif(not _extension.is_loaded(), reason="extension not built")

ca = pytest.importorskip("torch._dynamo.compiled_autograd")


class _Block(nn.Module):
    """conv -> BN -> ReLU, conv -> BN -> add -> ReLU (a residual unit), BN -> SiLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = (
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
        )
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.bn3, self.act = nn.BatchNorm2d(c), nn.SiLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.act(self.bn3(y))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Hardswish(), _Block(6),
        # (every parameter the node keeps differs from the others' defaults: stride,
        # padding, dilation, groups, a conv bias, LeakyReLU's slope; GELU saves its input)
        nn.Conv2d(6, 6, 3, stride=2, padding=1, dilation=3, groups=2), nn.BatchNorm2d(6),
        nn.LeakyReLU(0.2), nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _node_names(out: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(f for f, _ in node.next_functions)
    return names


def _step(fused, x, compiled: bool, wrt_input_only: bool = False, reset: bool = True):
    """One forward (eager) and backward, under compiled autograd or not: (names of the
    backward's nodes, the gradients: the input's and every parameter's)."""
    x = x.clone().requires_grad_()
    out = fused(x)
    names = _node_names(out)
    loss = (out * torch.linspace(-1, 1, out.shape[1])).sum()

    def backward():
        if wrt_input_only:
            return torch.autograd.grad(loss, x)[0], {}
        loss.backward()
        return x.grad, {n: p.grad.clone() for n, p in fused.named_parameters()}

    captures = None
    if compiled:
        if reset:
            torch._dynamo.reset()
        before = torch._dynamo.utils.counters["compiled_autograd"]["captures"]
        with ca._enable(_COMPILER):
            gx, grads = backward()
        captures = torch._dynamo.utils.counters["compiled_autograd"]["captures"] - before
        assert not reset or captures >= 1, "compiled autograd did not capture the backward"
    else:
        gx, grads = backward()
    fused.zero_grad(set_to_none=True)
    _step.captures = captures
    return names, gx, grads


_COMPILER = torch.compile(backend="eager")


@pytest.mark.parametrize(
    "policy, node",
    [("eager", "ConvBnActEagerBackward"), ("fused", "BnActFunction")],
    ids=["eager-units", "fused-units"],
)
@pytest.mark.parametrize(
    "mode, layout",
    [("train", "nchw"), ("train", "channels_last"), ("frozen-bn", "channels_last")],
)
def test_compiled_autograd_matches_the_plain_backward(monkeypatch, policy, node, mode, layout):
    """Training, and fine-tuning with frozen BatchNorm (eval BN, parameters still
    learning: the eager unit's node saves the running statistics): every gradient under
    compiled autograd equals the plain backward's bit for bit, and the library's node
    was in the graph."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", policy)
    fused = resnet_fused.convert(_model()).train()
    if mode == "frozen-bn":
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    fused = fused.to(memory_format=fmt)
    x = torch.randn(3, 3, 7, 9).contiguous(memory_format=fmt)
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    names, gx, grads = _step(fused, x, compiled=False)
    assert any(node in n for n in names), names
    fused.load_state_dict(state)  # (the running statistics as before the first step)
    names_c, gx_c, grads_c = _step(fused, x, compiled=True)
    assert names_c == names
    assert torch.equal(gx_c, gx)
    assert grads_c.keys() == grads.keys()
    for name in grads:
        assert torch.equal(grads_c[name], grads[name]), name


@pytest.mark.parametrize("policy", ["eager", "fused"])
def test_compiled_autograd_gradient_of_the_input_only(monkeypatch, policy):
    """torch.autograd.grad of the input alone (parameters require grad but are not asked
    for): the node computes what the compiled backward asks for, as without it."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", policy)
    fused = resnet_fused.convert(_model(1)).train()
    x = torch.randn(2, 3, 5, 6)
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    _, gx, _ = _step(fused, x, compiled=False, wrt_input_only=True)
    fused.load_state_dict(state)
    _, gx_c, _ = _step(fused, x, compiled=True, wrt_input_only=True)
    assert torch.equal(gx_c, gx)
    assert all(p.grad is None for p in fused.parameters())


@pytest.mark.parametrize("policy", ["eager", "fused"])
def test_compiled_autograd_with_saved_tensor_hooks(monkeypatch, policy):
    """Saved-tensor hooks (activation offloading and the like) around the forward: the
    compiled backward unpacks the nodes' saved tensors through them, gradients unchanged."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", policy)
    fused = resnet_fused.convert(_model(2)).train()
    x = torch.randn(2, 3, 5, 6)
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    _, gx, grads = _step(fused, x, compiled=False)
    fused.load_state_dict(state)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t * 1, lambda t: t):
        _, gx_c, grads_c = _step(fused, x, compiled=True)
    assert packed
    assert torch.equal(gx_c, gx)
    for name in grads:
        assert torch.equal(grads_c[name], grads[name]), name


@pytest.mark.parametrize("policy", ["eager", "fused"])
def test_compiled_autograd_reuses_its_graph(monkeypatch, policy):
    """A second backward of the same structure runs the compiled graph already made (no
    new capture), the nodes' saved tensors swapped in afresh: its gradients are the plain
    backward's of that second step."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", policy)
    fused = resnet_fused.convert(_model(3)).train()
    x1, x2 = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8) * 2 + 1
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    _step(fused, x1, compiled=False)
    _, gx, grads = _step(fused, x2, compiled=False)
    fused.load_state_dict(state)
    _step(fused, x1, compiled=True)
    assert _step.captures >= 1
    _, gx_c, grads_c = _step(fused, x2, compiled=True, reset=False)
    assert _step.captures == 0, "the second backward was captured again"
    assert torch.equal(gx_c, gx)
    for name in grads:
        assert torch.equal(grads_c[name], grads[name]), name
