"""The activation as a parameter of every fused op (issue 21, item 1): identity, ReLU,
ReLU6, LeakyReLU, SiLU, Hardswish, GELU (exact and tanh) and Sigmoid on every backend, forward and
every gradient, against the fp64 reference; the eval epilogues; the modules; the
converter fusing every spelling of them.

The tolerance rule is reference_check's. Activations with kinks (ReLU6 at 0 and 6,
LeakyReLU at 0, Hardswish at -3 and 3) are treated as ReLU's kink is: within rounding of
a kink the derivative legitimately differs between the fused result, eager and fp64, so
the incoming gradient is zero at the few positions whose fp64 pre-activation lies within
the pre-activation's error bound of a kink (:func:`_kink_free`); everywhere else a
different branch is an error. The activations are continuous, so outputs need no such
care."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_device, backend_params, narrower_cpu_isas
from reference_check import assert_close_to_reference, kink_band, kink_free
from torch import nn

import resnet_fused
from resnet_fused.activations import (
    GELU,
    GELU_TANH,
    HARDSWISH,
    IDENTITY,
    LEAKY_RELU,
    NAMES,
    RELU,
    RELU6,
    SIGMOID,
    SILU,
    Act,
    act_of_call,
    act_of_module,
    as_act,
)
from tests.test_graph_convert import _assert_parity, _batch_norm_ops, _CountOps
from tests.test_norm_act import _convert, _randomise

ACTS = [
    Act(RELU6),
    Act(LEAKY_RELU, 0.2),
    Act(LEAKY_RELU, -0.3),
    Act(SILU),
    Act(HARDSWISH),
    Act(GELU),
    Act(GELU_TANH),
    Act(SIGMOID),
    Act(RELU),
    Act(IDENTITY),
]
ACT_IDS = [f"{a.name}{'' if a.kind != LEAKY_RELU else a.param}" for a in ACTS]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _kink_free(grad: torch.Tensor, act: Act, pre64: torch.Tensor, band: float) -> torch.Tensor:
    return kink_free(grad, act.kinks, pre64, band)


def _data(shape, dtype, device, channels_last, scale=2.0, offset=0.3):
    t = torch.randn(shape, dtype=torch.float64) * scale + offset
    t = t.to(device=device, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


# (activation, case): after a residual add, the activations whose derivative the output
# gives (read from the saved output) and the others (taken at the pre-activation
# recomputed from the input and the saved residual).
CASES = [
    pytest.param(act, case, id=f"{act_id}-{case}")
    for act, act_id in zip(ACTS, ACT_IDS, strict=True)
    for case in ("train", "train_residual", "train_residual_mixed", "eval", "eval_residual_nchw")
]


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu", "cuda", "triton")))
@pytest.mark.parametrize(("act", "case"), CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp64"])
def test_batch_norm_act_every_activation(backend, act, case, dtype):
    training = case.startswith("train")
    channels_last = not case.endswith("nchw") and act.kind % 2 == 0
    shape = (3, 5, 6, 7) if training else (2, 4, 5, 3)
    _check_batch_norm_act(backend, act, case, dtype, shape, channels_last)


# Channels (channels_last) and positions (NCHW) that take full vector steps and a partial
# last step for every vector width of the CPU kernels: 37 = 32 + 5 = 2*16 + 5 = 4*8 + 5 (the
# AVX-512 and AVX2 steps of float and bfloat16 values, and of double), 70 = 2*32 + 6; NCHW
# positions 35 = 32 + 3 and 9. The suite's other shapes have fewer than 32 of either. With a
# residual, the backward reduction reads it as a second stream in the same steps.
@pytest.mark.parametrize("backend", backend_params(("cpu",)))
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("case", ["train", "train_residual", "eval"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp64"])
def test_full_and_partial_vector_steps(backend, act, case, layout, dtype):
    shape = (2, 37, 5, 7) if (act.kind + (case == "eval")) % 2 == 0 else (3, 70, 3, 3)
    _check_batch_norm_act(backend, act, case, dtype, shape, layout == "channels_last")


def _check_batch_norm_act(backend, act, case, dtype, shape, channels_last):
    residual = "residual" in case
    device = backend_device(backend)
    training = case.startswith("train")
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = _data(shape, dtype, device, channels_last).requires_grad_()
    # (train_residual_mixed: the residual in the other layout than the input)
    r_cl = channels_last != case.endswith("mixed")
    r = _data(shape, dtype, device, r_cl, 1.0, 0.0).requires_grad_() if residual else None
    w = (torch.rand(shape[1], dtype=pdtype, device=device) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=pdtype, device=device).requires_grad_()
    rm = torch.randn(shape[1], dtype=pdtype, device=device) * 0.2
    rv = torch.rand(shape[1], dtype=pdtype, device=device) + 0.5
    rm_e, rv_e = rm.clone(), rv.clone()
    # The fp64 reference is torch's CPU ops: on a GPU, torch's fp64 Hardswish multiplies
    # by 1/6 rounded to float precision (3e-8 relative), so the reference on the GPU would
    # be further from the maths than the fused kernels are (moved back with _on).
    rm64, rv64 = rm.cpu().double(), rv.cpu().double()
    leaves = [t for t in (x, w, b, r) if t is not None]
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    x64, w64, b64 = leaves64[:3]
    r64 = leaves64[3] if residual else None

    def _on(t):
        return t.detach().to(device)

    out = resnet_fused.batch_norm_act(
        x, rm, rv, w, b, training, 0.1, 1e-5, residual=r, activation=act, backend=backend
    )
    pre_e = F.batch_norm(x, rm_e, rv_e, w, b, training, 0.1, 1e-5)
    pre_e = pre_e + r if residual else pre_e
    eager = act(pre_e)
    pre64 = F.batch_norm(x64, rm64, rv64, w64, b64, training, 0.1, 1e-5)
    pre64 = pre64 + r64 if residual else pre64
    ref = act(pre64)
    assert out.dtype == dtype and out.shape == x.shape
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_reference(out, eager, _on(ref), name="out")
    band = kink_band(pre_e, _on(pre64))
    grad = _kink_free(_data(shape, dtype, device, False, 1.0, 0.0), act, _on(pre64), band)
    grads = torch.autograd.grad(out, leaves, grad)
    eager_grads = torch.autograd.grad(eager, leaves, grad)
    ref_grads = torch.autograd.grad(ref, leaves64, grad.cpu().double())
    names = ["input", "weight", "bias", "residual"]
    for name, g, ge, gr in zip(names, grads, eager_grads, ref_grads, strict=False):
        assert_close_to_reference(g, ge, _on(gr), name=f"grad {name}")
    if training:
        rm_ref = rm64 * 0.9 + 0.1 * x64.mean((0, 2, 3))
        assert_close_to_reference(rm, rm_e, _on(rm_ref), name="rm")
        m = x64.numel() // shape[1]
        var64 = x64.var((0, 2, 3), unbiased=False) * m / (m - 1)
        assert_close_to_reference(rv, rv_e, _on(rv64 * 0.9 + 0.1 * var64), name="rv")


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_partial_step_padding_adds_nothing(backend, layout, residual):
    """A channel constant at 1e17 (variance 0: scale 1/sqrt(eps)) normalises to its bias,
    but a padding lane of a partial vector step read as x = 0 would have a pre-activation of
    about -3e19, where GELU-tanh's derivative overflows: its 0 * inf would make the channel's
    sums NaN. The gradients stay finite and agree with the fp64 reference, taken on the
    channel shifted to 0 (BatchNorm's maths do not change; torch's fp64 statistics of
    1e17s are themselves off by far more than fp32's rounding). With a residual, read in
    the same partial steps (its padding lanes: zero)."""
    device = backend_device(backend)
    act = Act(GELU_TANH)
    shape = (2, 3, 5, 7)  # 35 positions (NCHW: a partial step), 3 channels (channels_last)
    x = torch.randn(shape, dtype=torch.float64)
    x[:, 0] = 1e17
    x = x.float().to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(3, device=device) + 0.5).requires_grad_()
    b = torch.randn(3, device=device).requires_grad_()
    g = torch.randn(shape, device=device)
    r = torch.randn_like(x).requires_grad_() if residual else None
    leaves = (x, w, b, r) if residual else (x, w, b)
    out = resnet_fused.batch_norm_act(
        x, None, None, w, b, True, residual=r, activation=act, backend=backend
    )
    grads = torch.autograd.grad(out, leaves, g)
    eager = F.batch_norm(x, None, None, w, b, True)
    eager = act(eager + r if residual else eager)
    eager_grads = torch.autograd.grad(eager, leaves, g)
    leaves64 = [t.detach().cpu().double() for t in leaves]
    leaves64[0][:, 0] -= leaves64[0][0, 0, 0, 0].item()
    leaves64 = [t.requires_grad_() for t in leaves64]
    ref = F.batch_norm(leaves64[0], None, None, leaves64[1], leaves64[2], True)
    ref = act(ref + leaves64[3] if residual else ref)
    ref_grads = torch.autograd.grad(ref, leaves64, g.cpu().double())
    names = ("input", "weight", "bias", "residual")[: len(leaves)]
    for name, got, ge, gr in zip(names, grads, eager_grads, ref_grads, strict=True):
        assert torch.isfinite(got).all(), name
        assert_close_to_reference(got, ge, gr.to(device), name=f"grad {name}")


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda", "triton")))
@pytest.mark.parametrize("act", ACTS[:8], ids=ACT_IDS[:8])
def test_kinks_and_non_finite_values(backend, act):
    """Pre-activations exactly at the kinks (and at +-0, +-Inf, NaN): the forward as
    torch's activation, the gradient at each kink torch's one-sided value, and
    non-finite values where eager has them. The expected values are torch's CPU ops in
    fp64 on every backend (torch's CUDA Hardswish multiplies by 1/6 rounded to float
    precision, about 3e-8 from the fp64 value)."""
    device = backend_device(backend)
    values = torch.tensor(
        [-3.0, 3.0, 0.0, -0.0, 6.0, -6.0, 1.5, -1.5, 7.0, float("inf"), -float("inf"),
         float("nan"), 2.5, -2.5, 0.5, -0.5],
        dtype=torch.float64,
    )  # fmt: skip
    x = values.reshape(1, 1, 4, 4).repeat(2, 3, 1, 1).to(device)
    mean = torch.zeros(3, dtype=torch.float64, device=device)
    var = torch.full((3,), 1.0 - 1e-5, dtype=torch.float64, device=device)
    # (var + eps = 1 exactly: the pre-activation is the input itself)
    lib = resnet_fused.ops if backend == "triton" else torch.ops.resnet_fused
    forward = lib.bn_act_forward_triton if backend == "triton" else lib.bn_act_forward
    out = forward(x, mean, var, None, None, None, 1e-5, *act.args)
    # piecewise-linear ones exactly; the smooth ones (exp, erf, tanh) to fp64 rounding
    tol = 0.0 if act.kinks else 1e-14
    torch.testing.assert_close(out, act(x.cpu()).to(device), rtol=tol, atol=tol, equal_nan=True)
    g = torch.ones_like(x)
    finite = torch.isfinite(x)
    want = act.backward(g.cpu(), x.cpu()).to(device)
    reduce = (
        lib.bn_act_backward_reduce_triton if backend == "triton" else lib.bn_act_backward_reduce
    )
    _, _, masked = reduce(g, x, mean, var, None, None, None, 1e-5, *act.args, True)
    torch.testing.assert_close(masked[finite], want[finite], rtol=tol, atol=tol)
    if act.from_output:
        _, _, masked = reduce(g, x, mean, var, None, None, out, 1e-5, *act.args, True)
        torch.testing.assert_close(masked[finite], want[finite], rtol=tol, atol=tol)
    else:
        with pytest.raises((RuntimeError, ValueError), match="out"):
            reduce(g, x, mean, var, None, None, out, 1e-5, *act.args, True)
    # The same pre-activations as BN(x - r) + r, r read from the residual argument (exact:
    # these values minus 2 and plus 2 again round to themselves); with out as well: refused.
    r = torch.full_like(x, 2.0)
    _, _, masked = reduce(g, x - r, mean, var, None, None, None, 1e-5, *act.args, True, r)
    torch.testing.assert_close(masked[finite], want[finite], rtol=tol, atol=tol)
    with pytest.raises((RuntimeError, ValueError), match="out and residual"):
        reduce(g, x - r, mean, var, None, None, out, 1e-5, *act.args, True, r)


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu", "cuda", "triton")))
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_conv_bn_act_every_activation(backend, act, training, residual):
    """Conv -> BN (-> + residual) -> activation, training (batch statistics) and eval
    (BatchNorm folded into the convolution: oneDNN's post-op, the epilogue or the Triton
    convolution), fp32 channels_last, forward and every gradient (the residual's too)."""
    device = backend_device(backend)
    dtype = torch.float32
    x = _data((2, 3, 7, 6), dtype, device, True).requires_grad_()
    cw = (torch.randn(5, 3, 3, 3, dtype=torch.float64) * 0.4).to(device, dtype).requires_grad_()
    bw = (torch.rand(5, dtype=dtype, device=device) + 0.5).requires_grad_()
    bb = torch.randn(5, dtype=dtype, device=device).requires_grad_()
    rm = torch.randn(5, dtype=dtype, device=device) * 0.2
    rv = torch.rand(5, dtype=dtype, device=device) + 0.5
    leaves = [x, cw, bw, bb]
    names = ["x", "conv_w", "bn_w", "bn_b"]
    res = None
    if residual:
        res = _data((2, 5, 7, 6), dtype, device, True, 1.0, 0.0).requires_grad_()
        leaves.append(res)
        names.append("residual")
    # The fp64 reference on the CPU (see test_batch_norm_act_every_activation).
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    out = resnet_fused.conv_bn_act(
        x, cw, bw, bb, rm.clone(), rv.clone(), padding=1, training=training, activation=act,
        backend=backend, residual=res,
    )  # fmt: skip

    def pre(xx, ww, gw, gb, *r, m, v):
        y = F.batch_norm(F.conv2d(xx, ww, padding=1), m, v, gw, gb, training, 0.1, 1e-5)
        return y + r[0] if r else y

    pre_e = pre(*leaves, m=rm.clone(), v=rv.clone())
    pre64 = pre(*leaves64, m=rm.cpu().double(), v=rv.cpu().double())
    eager, ref = act(pre_e), act(pre64)
    pre64_d = pre64.detach().to(device)
    assert_close_to_reference(out, eager, ref.detach().to(device), name="out")
    grad = _kink_free(torch.randn_like(out), act, pre64_d, kink_band(pre_e, pre64_d))
    grads = torch.autograd.grad(out, leaves, grad)
    eager_grads = torch.autograd.grad(eager, leaves, grad)
    ref_grads = torch.autograd.grad(ref, leaves64, grad.cpu().double())
    for name, g, ge, gr in zip(names, grads, eager_grads, ref_grads, strict=True):
        assert_close_to_reference(g, ge, gr.to(device), name=f"grad {name}")


@pytest.mark.parametrize(
    ("act", "residual"),
    [
        pytest.param(act, residual, id=f"{act_id}-{'residual' if residual else 'plain'}")
        for act, act_id in zip(ACTS, ACT_IDS, strict=True)
        for residual in (False, True)
    ],
)
def test_eval_epilogue_paths(act, residual):
    """Every CPU eval epilogue, without autograd: oneDNN's fused convolution with the
    activation as its post-op, the same under inference_mode (the activation after it),
    aten's convolution with the bias plus the activation in place, and bias_act_."""
    from resnet_fused.functional import conv_bn_act as cba

    x = _data((2, 4, 6, 5), torch.float32, "cpu", True)
    w = torch.randn(6, 4, 3, 3) * 0.3
    b = torch.randn(6)
    r = _data((2, 6, 6, 5), torch.float32, "cpu", True, 1.0, 0.0) if residual else None
    geometry = ((1, 1), (1, 1), (1, 1), 1)
    ref64 = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    ref64 = act(ref64 + r.double() if residual else ref64)
    pre = F.conv2d(x, w, b, padding=1)
    eager = act(pre + r if residual else pre)
    for impl in ("cpu", cba.CPU_EPILOGUE, "torch"):
        for inference in (False, True):
            ctx = torch.inference_mode() if inference else torch.no_grad()
            with ctx:
                out = cba._eval_forward(impl, x, w, b, r, *geometry, act, None)
            assert_close_to_reference(out, eager, ref64, name=f"{impl} inference={inference}")
    y = F.conv2d(x, w, None, padding=1)
    torch.ops.resnet_fused.bias_act_(y, b, r, *act.args)
    assert_close_to_reference(y, eager, ref64, name="bias_act_")


@pytest.mark.parametrize("act", ["silu", "hardswish", "gelu", nn.LeakyReLU(-0.2)])
def test_module_with_residual_and_an_activation_from_its_input(act):
    """A fused unit called with a residual and an activation whose derivative needs the
    pre-activation: training steps (forward, backward, running statistics) and eval match
    the eager modules in fp64, call after call."""
    torch.manual_seed(0)
    unit = resnet_fused.FusedConvBNReLU2d(3, 4, 3, padding=1, activation=act).double()
    eager = copy.deepcopy(unit)
    a = as_act(act)
    for step, training in enumerate((True, True, False, True)):
        unit.train(training), eager.train(training)
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
        r = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
        out = unit(x, r)
        want = a(eager.bn(eager.conv(x)) + r)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, r, *unit.parameters()], g)
        exp = torch.autograd.grad(want, [x, r, *eager.parameters()], g)
        for i, (u, v) in enumerate(zip(got, exp, strict=True)):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-10, msg=f"step {step} grad {i}")
        torch.testing.assert_close(unit.bn.running_mean, eager.bn.running_mean)
        torch.testing.assert_close(unit.bn.running_var, eager.bn.running_var)


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu", "triton")))
@pytest.mark.parametrize("act", ["silu", nn.LeakyReLU(-0.2), "relu"])
def test_residual_made_under_inference_mode(backend, act):
    """A residual created under ``torch.inference_mode()`` and added in a training forward:
    eager's add does not save it (SiLU saves the sum); the fused BatchNorm, which saves the
    residual for activations whose derivative needs the pre-activation, saves a copy
    (autograd cannot save an inference tensor). Gradients as eager's."""
    device = backend_device(backend)
    with torch.inference_mode():
        r = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, device=device).add_(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    out = resnet_fused.batch_norm_act(
        x, None, None, w, b, True, residual=r, activation=act, backend=backend
    )
    a = as_act(act)
    eager = a(F.batch_norm(x, None, None, w, b, True) + r)
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(eager)
    for got, want in zip(
        torch.autograd.grad(out, (x, w, b), g),
        torch.autograd.grad(eager, (x, w, b), g),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_residual_changed_in_place_before_the_backward(backend):
    """The residual is saved for SiLU's backward (eager's add saves nothing of it):
    changing it in place before the backward raises autograd's error, never a wrong
    gradient. For ReLU (derivative from the output) nothing of it is saved."""
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    for act in ("silu", "relu"):
        r = torch.randn(2, 3, 4, 5)
        out = resnet_fused.batch_norm_act(
            x, None, None, None, None, True, residual=r, activation=act, backend=backend
        )
        r.mul_(2.0)
        if act == "silu":
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()
        else:
            out.sum().backward()


def test_activation_arguments():
    assert as_act(True) == Act(RELU) and as_act(False) == as_act(None) == Act(IDENTITY)
    assert as_act("silu") == as_act("swish") == as_act(nn.SiLU()) == Act(SILU)
    assert as_act("leaky_relu") == Act(LEAKY_RELU, 0.01)
    assert as_act(nn.LeakyReLU(0.2, inplace=True)) == Act(LEAKY_RELU, 0.2)
    assert as_act(nn.Hardtanh(0.0, 6.0)) == as_act(nn.ReLU6()) == Act(RELU6)
    assert as_act(nn.GELU(approximate="tanh")) == Act(GELU_TANH)
    assert act_of_module(nn.Hardtanh(-1.0, 1.0)) is None
    assert act_of_module(nn.Tanh()) is None
    assert act_of_call(F.hardtanh, (None, 0, 6), {}) == Act(RELU6)
    assert act_of_call(F.leaky_relu, (None,), {"negative_slope": 0.3}) == Act(LEAKY_RELU, 0.3)
    assert act_of_call(F.gelu, (None,), {"approximate": "tanh"}) == Act(GELU_TANH)
    assert act_of_call(torch.tanh, (None,), {}) is None
    assert as_act("sigmoid") == as_act(nn.Sigmoid()) == Act(SIGMOID)
    assert act_of_call(torch.sigmoid, (None,), {}) == act_of_call("sigmoid_", (None,), {})
    assert act_of_call(F.sigmoid, (None,), {}) == Act(SIGMOID)
    with pytest.raises(ValueError, match="activation: unknown activation 'mish'"):
        as_act("mish")
    with pytest.raises(ValueError, match="activation: Tanh is not an activation"):
        as_act(nn.Tanh())
    with pytest.raises(TypeError, match="activation must be"):
        as_act(3)
    with pytest.raises(ValueError, match="act: silu takes no parameter"):
        Act(SILU, 0.5)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="relu must be a bool"):
        resnet_fused.batch_norm_act(x, None, None, relu="silu")
    with pytest.raises(RuntimeError, match="act must be an activation code"):
        torch.ops.resnet_fused.bias_act(x, None, None, 10, 0.0)
    with pytest.raises(ValueError, match="act"):
        resnet_fused.ops.bias_act_triton(x, None, None, 10, 0.0)
    for k, name in enumerate(NAMES):
        assert as_act(name).kind == k


@pytest.mark.parametrize("act", ["silu", "hardswish", "relu6", nn.LeakyReLU(0.1), "gelu"])
def test_modules_take_the_activation(act):
    torch.manual_seed(0)
    unit = resnet_fused.FusedConvBNReLU2d(3, 4, 3, padding=1, activation=act).double()
    bn = resnet_fused.FusedBatchNormAct2d(4, activation=act).double()
    a = as_act(act)
    assert unit.activation == a and bn.activation == a and not unit.relu
    assert f"activation={a!r}" in repr(unit)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for training in (True, False):
        unit.train(training), bn.train(training)
        want = a(F.batch_norm(unit.conv(x), unit.bn.running_mean.clone(),
                              unit.bn.running_var.clone(), unit.bn.weight, unit.bn.bias,
                              training, 0.0, 1e-5))  # fmt: skip
        torch.testing.assert_close(unit(x), want, rtol=1e-10, atol=1e-10)
        y = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        want = a(F.batch_norm(y, bn.running_mean.clone(), bn.running_var.clone(), bn.weight,
                              bn.bias, training, 0.0, 1e-5))  # fmt: skip
        torch.testing.assert_close(bn(y), want, rtol=1e-10, atol=1e-10)
    unit.relu = True
    assert unit.activation == Act(RELU) and "relu=True, backend" in repr(unit)
    unit.activation = "hardswish"
    assert unit.activation == Act(HARDSWISH)
    # A module pickled before activations were a parameter holds `relu` only.
    old = copy.deepcopy(bn)
    del old.__dict__["_activation"]
    old.__dict__["relu"] = False
    old = pickle.loads(pickle.dumps(old))
    assert old.activation == Act(IDENTITY) and old.relu is False


class _Spellings(nn.Module):
    """Every spelling of every activation after a BatchNorm: modules (inplace or not),
    functions with positional and keyword parameters, in-place functions, after a
    residual add (ReLU6 and SiLU), after a BatchNorm alone."""

    def __init__(self):
        super().__init__()
        c = 4

        def conv(cin=c):
            return nn.Conv2d(cin, c, 3, padding=1, bias=False)

        self.conv1, self.bn1, self.act1 = conv(3), nn.BatchNorm2d(c), nn.SiLU(inplace=True)
        self.conv2, self.bn2 = conv(), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = conv(), nn.BatchNorm2d(c)
        self.conv4, self.bn4 = conv(), nn.BatchNorm2d(c)
        self.conv5, self.bn5, self.act5 = conv(), nn.BatchNorm2d(c), nn.Hardswish()
        self.conv6, self.bn6, self.act6 = conv(), nn.BatchNorm2d(c), nn.ReLU6(inplace=True)
        self.conv7, self.bn7, self.act7 = conv(), nn.BatchNorm2d(c), nn.SiLU()
        self.bn8, self.act8 = nn.BatchNorm2d(c), nn.GELU()
        self.conv9, self.bn9 = conv(), nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = F.hardtanh(self.bn2(self.conv2(x)), 0.0, 6.0)
        x = F.leaky_relu_(self.bn3(self.conv3(x)), 0.2)
        x = F.gelu(self.bn4(self.conv4(x)), approximate="tanh")
        x = self.act5(self.bn5(self.conv5(x)))
        x = self.act6(self.bn6(self.conv6(x)) + x)
        x = self.act7(self.bn7(self.conv7(x)) + x)
        x = self.act8(self.bn8(x))
        return F.silu(self.bn9(self.conv9(x)), inplace=True)


_ACT_OPS = ("silu", "hardswish", "hardtanh", "leaky_relu", "gelu", "relu", "sigmoid")


def _act_ops(model, x) -> int:
    model = copy.deepcopy(model)
    with _CountOps() as mode:
        model(x)
    return sum(any(op.startswith(f"aten.{a}") for a in _ACT_OPS) for op in mode.ops)


def test_converter_fuses_every_spelling():
    torch.manual_seed(0)
    model = _randomise(_Spellings()).double()
    converted = _convert(copy.deepcopy(model))
    report = resnet_fused.conversion_report(converted)
    assert sorted(report["fused"]) == [
        "bn8, act8 (bn-gelu)",
        "conv1, bn1, act1 (conv-bn-silu)",
        "conv2, bn2, hardtanh (conv-bn-relu6)",
        "conv3, bn3, leaky_relu_ (conv-bn-leaky_relu)",
        "conv4, bn4, gelu (conv-bn-gelu_tanh)",
        "conv5, bn5, act5 (conv-bn-hardswish)",
        "conv6, bn6, act6 (conv-bn-add-relu6)",
        "conv7, bn7, act7 (conv-bn-add-silu)",
        "conv9, bn9, silu (conv-bn-silu)",
    ], report["fused"]
    assert report["not_fused"] == [], report["not_fused"]
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    for training in (True, False):
        assert _batch_norm_ops(converted.train(training), x) == 0
    # In training no activation runs as an op of its own, act7 (SiLU after an add)
    # included. (In fp64 eval each unit is aten's convolution with the folded bias, then
    # the activation in place: two passes where eager makes three.)
    assert _act_ops(converted.train(), x) == 0
    assert _act_ops(model.train(), x) == 9
    _assert_parity(model, converted, x)


class _ResidualActs(nn.Module):
    """Residual blocks ending in ``act(bn(...) + shortcut)``, as timm's byobnet (SiLU in
    resnet33ts and friends) and ResNet blocks with another activation write them: an
    identity shortcut, a strided one through conv-BN, an in-place add (torchvision's
    ``out += identity``) and a BatchNorm whose input is no convolution's output."""

    def __init__(self, act):
        super().__init__()
        c = 4
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c)
        self.down = nn.Sequential(nn.Conv2d(c, c, 1, 2, bias=False), nn.BatchNorm2d(c))
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.bn4 = nn.BatchNorm2d(c)
        self.act1, self.act2, self.act3, self.act4 = act(), act(), act(), act()

    def forward(self, x):
        x = self.stem(x)
        x = self.act1(self.bn1(self.conv1(x)) + x)
        x = self.act2(self.bn2(self.conv2(x)) + self.down(x))
        out = self.bn3(self.conv3(x))
        out += x
        x = self.act3(out)
        return self.act4(self.bn4(F.avg_pool2d(x, 1)) + x)


@pytest.mark.parametrize(
    "act",
    [nn.SiLU, nn.Hardswish, nn.GELU, lambda: nn.GELU("tanh"), lambda: nn.LeakyReLU(-0.2),
     nn.ReLU6, nn.Sigmoid],
    ids=["silu", "hardswish", "gelu", "gelu_tanh", "leaky_relu-negative", "relu6", "sigmoid"],
)  # fmt: skip
def test_converter_fuses_activations_after_a_residual_add(act):
    """Every activation the kernels apply is fused with the BatchNorm and the add before
    it (those whose derivative the output does not give too: their backward recomputes
    the pre-activation from the saved input, statistics and residual): no activation and
    no batch_norm op of eager's left in training, nothing in the report's not_fused, and
    fp64 parity (outputs, every gradient, running statistics) through training steps."""
    torch.manual_seed(0)
    model = _randomise(_ResidualActs(act)).double()
    converted = _convert(copy.deepcopy(model))
    report = resnet_fused.conversion_report(converted)
    tag = act_of_module(act()).name if act is not nn.ReLU6 else "relu6"
    assert sorted(report["fused"]) == sorted([
        "stem.0, stem.1 (conv-bn)",
        f"conv1, bn1, act1 (conv-bn-add-{tag})",
        f"conv2, bn2, act2 (conv-bn-add-{tag})",
        "down.0, down.1 (conv-bn)",
        f"conv3, bn3, act3 (conv-bn-add-{tag})",
        f"bn4, act4 (bn-add-{tag})",
    ]), report["fused"]  # fmt: skip
    assert report["not_fused"] == [], report["not_fused"]
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    for training in (True, False):
        assert _batch_norm_ops(converted.train(training), x) == 0
    assert _act_ops(converted.train(), x) == 0
    assert _act_ops(model.train(), x) == 4
    _assert_parity(model, converted, x)


class _SigmoidGates(nn.Module):
    """BatchNorm -> Sigmoid in the spellings gates use (GhostNetV2's DFC attention:
    ``sigmoid(bn(conv(x)))`` times the features): the module, ``torch.sigmoid``, the
    in-place method, after a BatchNorm alone and after a residual add."""

    def __init__(self):
        super().__init__()
        c = 4
        self.conv1, self.bn1, self.gate = (
            nn.Conv2d(3, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.Sigmoid(),
        )
        self.conv2, self.bn2 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.bn3 = nn.BatchNorm2d(c)
        self.conv4, self.bn4 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.conv1(x) * self.gate(self.bn1(self.conv1(x)))
        y = torch.sigmoid(self.bn2(self.conv2(x)))
        z = self.bn3(y * x).sigmoid_()
        return torch.sigmoid(self.bn4(self.conv4(z)) + z)


def test_converter_fuses_sigmoid():
    torch.manual_seed(0)
    model = _randomise(_SigmoidGates()).double()
    converted = _convert(copy.deepcopy(model))
    report = resnet_fused.conversion_report(converted)
    assert sorted(report["fused"]) == [
        "bn3, sigmoid_ (bn-sigmoid)",
        "conv1, bn1, gate (conv-bn-sigmoid)",
        "conv2, bn2, sigmoid (conv-bn-sigmoid)",
        "conv4, bn4, sigmoid_1 (conv-bn-add-sigmoid)",
    ], report["fused"]
    assert report["not_fused"] == [], report["not_fused"]
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    for training in (True, False):
        assert _batch_norm_ops(converted.train(training), x) == 0
    for m, want in ((converted, 0), (model, 4)):
        with _CountOps() as mode:
            copy.deepcopy(m).train()(x)
        assert sum(op.startswith("aten.sigmoid") for op in mode.ops) == want
    _assert_parity(model, converted, x)


def test_timm_byobnet_silu_after_the_residual_add():
    """timm's resnet33ts (byobnet blocks: ``act(bn(conv(x)) + shortcut)`` with SiLU):
    every BatchNorm and every activation after one fused, the report complete, and the
    training step (output, every gradient, running statistics) and the eval output as
    eager's in fp64, within fp64's own noise for this model: eager channels_last against
    eager NCHW (the random BatchNorm statistics make gradients of 1e5 and more)."""
    import timm
    from timm.models.byobnet import BottleneckBlock

    torch.manual_seed(0)
    model = _randomise(timm.create_model("resnet33ts", pretrained=False, num_classes=4))
    model = model.double()
    blocks = [m for m in model.modules() if isinstance(m, BottleneckBlock)]
    assert blocks and all(isinstance(m.act, nn.SiLU) for m in blocks)
    converted = _convert(copy.deepcopy(model))
    report = resnet_fused.conversion_report(converted)
    assert report["not_fused"] == [], report["not_fused"]
    # one BN + add + SiLU site per block
    assert sum("-add-silu)" in e for e in report["fused"]) == len(blocks), report["fused"]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for training in (True, False):
        assert _batch_norm_ops(converted.train(training), x) == 0
    assert _act_ops(converted.train(), x) == 0
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    runs = {}
    for name, m, xx in (
        ("eager", model, x),
        ("layout", cl, x.contiguous(memory_format=torch.channels_last)),
        ("fused", converted, x),
    ):
        m.train()
        out = m(xx)
        F.cross_entropy(out, torch.arange(2)).backward()
        m.eval()
        with torch.no_grad():
            eval_out = m(xx)
        values = {"out": out.detach(), "eval out": eval_out}
        values.update((k, p.grad) for k, p in m.named_parameters())
        values.update((k, b) for k, b in m.named_buffers() if b.is_floating_point())
        runs[name] = values
    eager = runs["eager"]
    assert runs["fused"].keys() == eager.keys()
    for key, want in eager.items():
        noise = (runs["layout"][key] - want).abs().max().item()
        err = (runs["fused"][key] - want).abs().max().item()
        floor = 1e-13 * max(1.0, want.abs().max().item())
        assert err <= 2 * noise + floor, f"{key}: {err:.2e} against eager's noise {noise:.2e}"


def test_converted_activation_read_at_call_time():
    """An activation module replaced after conversion is what runs (fused when the
    kernels apply it, as a module when not); hooks on it make the site run unfused."""
    torch.manual_seed(0)
    model = _randomise(_Spellings()).double()
    converted = _convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    def same():
        model.eval(), converted.eval()
        with torch.no_grad():
            torch.testing.assert_close(converted(x), model(x), rtol=1e-10, atol=1e-10)

    same()
    for m in (model, converted):
        m.act1 = nn.Hardswish()
        m.act5 = nn.Tanh()  # not an activation the kernels apply: runs as the module
        m.act6 = nn.LeakyReLU(0.3)
    same()
    calls = []
    converted.act1.register_forward_hook(lambda *a: calls.append(1))
    same()
    assert calls == [1]


def test_norm_act_layers_fuse_their_activation():
    """timm-style norm-act BatchNorms with SiLU, Hardswish, ReLU6 or LeakyReLU: the act
    is fused (pattern with its name), none is reported as its own pass."""
    from tests.test_norm_act import _accounted_once, _net

    for act in (nn.SiLU, nn.Hardswish, nn.ReLU6, lambda: nn.LeakyReLU(0.1)):
        model = _net(act)
        converted = _convert(model)
        report = resnet_fused.conversion_report(converted)
        _accounted_once(model, report)
        assert not [e for e in report["not_fused"] if "own pass" in e], report["not_fused"]
        x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
        assert _act_ops(converted.train(), x) < _act_ops(model.train(), x)
        _assert_parity(model, converted, x)


@pytest.mark.parametrize("act", ["silu", "hardswish", "relu6", "gelu", "identity"])
@pytest.mark.parametrize("training", [True, False])
def test_eager_unit_op_matches_eager_modules(act, training):
    """The C++ eager unit with each activation: bit-identical to eager's modules,
    forward and every gradient (eager's own ops and backward formulas)."""
    from resnet_fused.ops import EAGER_UNIT

    if EAGER_UNIT is None:
        pytest.skip("the compiled extension is not loaded")
    a = as_act(act)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    bn = _randomise(nn.BatchNorm2d(4)).train(training)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    bn2 = copy.deepcopy(bn)
    out = EAGER_UNIT(
        x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, None,
        (1, 1), (1, 1), (1, 1), 1, training, 0.1, 1e-5, None, *a.args,
    )  # fmt: skip
    want = a(bn2(conv(x)))
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, conv.weight, bn.weight, bn.bias), g)
    ref = torch.autograd.grad(want, (x, conv.weight, bn2.weight, bn2.bias), g)
    for u, v in zip(got, ref, strict=True):
        assert torch.equal(u, v)
    assert torch.equal(bn.running_var, bn2.running_var)


@pytest.mark.parametrize("backend", backend_params(("cpu", "cuda", "triton")))
@pytest.mark.parametrize(
    "act", [Act(SILU), Act(GELU), Act(GELU_TANH)], ids=["silu", "gelu", "gelu_tanh"]
)
def test_fp32_smooth_activations_over_the_float_range(backend, act):
    """fp32 SiLU and GELU (the CPU kernels' inline exp and erf, Triton's) on a sweep of
    pre-activations from -120 to 120, dense near 0, where exp under- and overflows, and
    at +-Inf and NaN: the forward and act' (the reduction pass's masked gradient) each
    within the tolerance rule (2x eager fp32's error plus the fp32 floor) of fp64, with
    non-finite values where eager has them."""
    device = backend_device(backend)
    dense = torch.linspace(-12.0, 12.0, 4801, dtype=torch.float64)
    wide = torch.linspace(-120.0, 120.0, 2401, dtype=torch.float64)
    edges = torch.tensor([-88.8, -88.7, -87.4, -87.3, -104.0, -103.9, 88.7, 88.8, 1e-30, -1e-30,
                          1e17, -1e17, float("inf"), -float("inf"), float("nan")],
                         dtype=torch.float64)  # fmt: skip
    pre64 = torch.cat([dense, wide, edges])
    pad = (-pre64.numel()) % 8
    pre64 = torch.cat([pre64, torch.zeros(pad, dtype=torch.float64)])
    pre32 = pre64.float()
    pre64 = pre32.double()  # the fp32 values exactly
    c = 8
    x = pre32.reshape(-1, c, 1, 1).to(device)  # channels of any value: BN is the identity
    mean = torch.zeros(c, dtype=torch.float64 if backend == "cpu" else torch.float32, device=device)
    var = torch.full_like(mean, 1.0 - 1e-5)
    lib = resnet_fused.ops if backend == "triton" else torch.ops.resnet_fused
    forward = lib.bn_act_forward_triton if backend == "triton" else lib.bn_act_forward
    reduce = (
        lib.bn_act_backward_reduce_triton if backend == "triton" else lib.bn_act_backward_reduce
    )
    # the pre-activation is x itself (var + eps = 1, no affine) up to fp32 rounding of 1/sqrt(1)
    out = forward(x, mean, var, None, None, None, 1e-5, *act.args).cpu().reshape(-1)
    g = torch.ones_like(x)
    _, _, masked = reduce(g, x, mean, var, None, None, None, 1e-5, *act.args, True)
    masked = masked.cpu().reshape(-1)
    finite = torch.isfinite(pre64)
    ref_out = act(pre64)
    ref_grad = act.backward(torch.ones_like(pre64), pre64)
    eager_grad = act.backward(torch.ones_like(pre32), pre32)
    assert_close_to_reference(out[finite], act(pre32)[finite], ref_out[finite], name=act.name)
    assert_close_to_reference(
        masked[finite], eager_grad[finite], ref_grad[finite], name=f"{act.name}'"
    )
    # NaN in, NaN out; at +-Inf the limit (Inf, 0; act' 1, 0) or NaN as eager has there
    nan = torch.isnan(pre64)
    assert out[nan].isnan().all() and masked[nan].isnan().all()
    inf = torch.isinf(pre64)
    limit = torch.where(pre64[inf] > 0, float("inf"), 0.0).float()
    dlimit = torch.where(pre64[inf] > 0, 1.0, 0.0).float()
    assert ((out[inf] == limit) | (out[inf].isnan() & act(pre32)[inf].isnan())).all(), out[inf]
    assert ((masked[inf] == dlimit) | (masked[inf].isnan() & eager_grad[inf].isnan())).all(), (
        masked[inf]
    )


@pytest.mark.parametrize(("cap", "isa"), narrower_cpu_isas())
def test_portable_cpu_kernels_in_subprocess(cap, isa):
    """The narrower CPU kernel tables (the portable one, and AVX2 on an AVX-512 CPU), chosen
    with ATEN_CPU_CAPABILITY in a subprocess: every activation, forward and backward (the
    portable table's scalar csrc/act.h, the AVX2 table's vectors), and the full and partial
    vector steps."""
    import os
    import subprocess
    import sys

    if not resnet_fused.is_available("cpu", "cpu"):
        pytest.skip("extension not built")
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import resnet_fused, test_activations as t\n"
        f"assert resnet_fused._extension.build_info()['cpu_isa'] == {isa!r}\n"
        "for p in t.CASES:\n"
        "    for dtype in (torch.float32, torch.bfloat16):\n"
        "        torch.manual_seed(0)\n"
        "        t.test_batch_norm_act_every_activation('cpu', *p.values, dtype)\n"
        "for act in t.ACTS[:8]:\n"
        "    t.test_kinks_and_non_finite_values('cpu', act)\n"
        "for act in t.ACTS:\n"
        "    for case in ('train', 'eval'):\n"
        "        for layout in ('channels_last', 'nchw'):\n"
        "            for dtype in t.DTYPES:\n"
        "                t.test_full_and_partial_vector_steps('cpu', act, case, layout, dtype)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_ops_do_not_take_bool_of_an_activation(backend, monkeypatch):
    """The ops' Python never calls ``bool(act)``: Dynamo in torch < 2.14 cannot trace
    ``bool()`` of a frozen dataclass, and torch.compile(fullgraph=True) of every fused op
    failed there (seen on torch 2.11). ``act.active`` says the same and traces."""

    def refuse(self):
        raise AssertionError("bool(Act) called")

    monkeypatch.setattr(Act, "__bool__", refuse)
    device = backend_device(backend)
    for act in (Act(RELU), Act(IDENTITY), Act(SILU)):
        for residual in (False, True):
            for training in (True, False):
                x = torch.randn(2, 3, 5, 4, device=device, requires_grad=True)
                w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
                g = torch.rand(4, device=device, requires_grad=True)
                b = torch.randn(4, device=device, requires_grad=True)
                r = torch.randn(2, 4, 5, 4, device=device) if residual else None
                out = resnet_fused.conv_bn_act(
                    x, w, g, b, torch.zeros(4), torch.ones(4), padding=1, training=training,
                    activation=act, residual=r, backend=backend,
                )  # fmt: skip
                y = resnet_fused.batch_norm_act(
                    out, torch.zeros(4), torch.ones(4), g, b, training, activation=act,
                    residual=r, backend=backend,
                )  # fmt: skip
                y.sum().backward()
                with torch.no_grad():
                    resnet_fused.conv_bn_act(
                        x, w, g, b, torch.zeros(4), torch.ones(4), padding=1, training=False,
                        activation=act, residual=r, backend=backend,
                    )  # fmt: skip
    # and a converted model's sites (the converter's own forward functions)
    seq = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(), nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Hardswish(),
    ).to(device)  # fmt: skip
    fused = resnet_fused.convert(seq, backend=backend)
    assert resnet_fused.conversion_report(fused)["fused"]
    x = torch.randn(2, 3, 5, 4, device=device, requires_grad=True)
    fused(x).sum().backward()
    with torch.no_grad():
        fused.eval()(x)
