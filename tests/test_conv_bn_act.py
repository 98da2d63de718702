"""conv_bn_act / FusedConvBNReLU2d on every backend against the fp64 reference.

The conv shapes are every distinct kind in torchvision's ResNet-18 and ResNet-50 (7x7
stem, 3x3 stride 1 and 2, 1x1 reduce and expand, 1x1 stride-2 downsample), scaled to
small channel counts and images so that Triton's interpreter runs them on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, backend_device, backend_params
from reference_check import assert_close_to_reference
from torch import nn

import resnet_fused
from resnet_fused import reference

# name: (N, C_in, H, W, C_out, kernel, stride, padding, dilation)
SHAPES = {
    "stem7x7s2": (2, 3, 13, 11, 8, 7, 2, 3, 1),
    "3x3s1": (2, 8, 7, 7, 8, 3, 1, 1, 1),
    "3x3s2": (2, 8, 9, 8, 16, 3, 2, 1, 1),
    "1x1reduce": (2, 16, 5, 5, 8, 1, 1, 0, 1),
    "1x1expand": (2, 8, 5, 6, 16, 1, 1, 0, 1),
    "downsample1x1s2": (2, 8, 7, 7, 16, 1, 2, 0, 1),
    "odd3x3dil2": (3, 5, 9, 7, 7, 3, 1, 2, 2),
}
# Each shape on every backend, train and eval; the remaining axes (dtype, layout,
# residual, relu, conv bias, affine) are covered by the tests after this one.


def _tensor(shape, dtype, device, layout, scale=1.0, offset=0.0):
    t = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(device=device, dtype=dtype)
    if layout == "channels_last":
        t = t.to(memory_format=torch.channels_last)
    return t


def _case(
    backend,
    shape_name,
    mode,
    *,
    dtype=torch.float32,
    pdtype=torch.float32,
    layout="channels_last",
    residual=True,
    relu=True,
    conv_bias=False,
    affine=True,
    momentum=0.1,
    steps=1,
    groups=1,
):
    device = backend_device(backend)
    n, cin, h, w, cout, k, s, p, d = SHAPES[shape_name]
    training = mode == "train"
    x = _tensor((n, cin, h, w), dtype, device, layout, scale=1.0, offset=0.3).requires_grad_()
    fan_in = cin // groups * k * k
    wt = (
        _tensor((cout, cin // groups, k, k), dtype, device, "nchw") / fan_in**0.5
    ).requires_grad_()
    cb = _tensor((cout,), dtype, device, "nchw").requires_grad_() if conv_bias else None
    g = (torch.rand(cout, dtype=pdtype, device=device) + 0.5).requires_grad_() if affine else None
    b = torch.randn(cout, dtype=pdtype, device=device).requires_grad_() if affine else None
    rm = torch.randn(cout, dtype=pdtype, device=device) * 0.1
    rv = torch.rand(cout, dtype=pdtype, device=device) + 0.5
    if mode == "untracked":
        rm = rv = None
    ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (w + 2 * p - d * (k - 1) - 1) // s + 1
    res = _tensor((n, cout, ho, wo), dtype, device, layout).requires_grad_() if residual else None
    rm_e, rv_e = (None, None) if rm is None else (rm.clone(), rv.clone())
    rm64, rv64 = (None, None) if rm is None else (rm.double(), rv.double())
    leaves = [t for t in (x, wt, cb, g, b, res) if t is not None]
    names = [
        nm
        for nm, t in zip(
            ("input", "conv_weight", "conv_bias", "bn_weight", "bn_bias", "residual"),
            (x, wt, cb, g, b, res),
            strict=True,
        )
        if t is not None
    ]
    kw = dict(stride=s, padding=p, dilation=d, groups=groups, eps=1e-5)
    for _ in range(steps):
        out = resnet_fused.conv_bn_act(
            x, wt, g, b, rm, rv, conv_bias=cb, training=training, momentum=momentum,
            residual=res, relu=relu, backend=backend, **kw,
        )  # fmt: skip
        # Eager and the fp64 reference up to the ReLU (pre-activations), then ReLU.
        eager_pre = reference.conv_bn_act(
            x, wt, g, b, rm_e, rv_e, conv_bias=cb, training=training, momentum=momentum,
            residual=res, relu=False, **kw,
        )  # fmt: skip
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        by_name = dict(zip(names, leaves64, strict=True))
        ref_pre = reference.conv_bn_act(
            by_name["input"], by_name["conv_weight"], by_name.get("bn_weight"),
            by_name.get("bn_bias"), rm64, rv64, conv_bias=by_name.get("conv_bias"),
            training=training, momentum=momentum, residual=by_name.get("residual"),
            relu=False, **kw,
        )  # fmt: skip
    eager = torch.relu(eager_pre) if relu else eager_pre
    ref = torch.relu(ref_pre) if relu else ref_pre
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close_to_reference(out, eager, ref, name="out")

    # Gradients. Where |pre-activation| is within rounding of 0, whether ReLU passes the
    # gradient differs between the fused result, eager and fp64 (eval mode folds BN, so
    # its rounding differs from eager's). All three are therefore differentiated through
    # the same ReLU mask, the fused output's: the mask itself is covered by `out` above.
    grad = _tensor(out.shape, dtype, device, "nchw")
    grads = torch.autograd.grad(out, leaves, grad)
    g_pre = grad * (out.detach() > 0) if relu else grad
    eager_grads = torch.autograd.grad(eager_pre, leaves, g_pre)
    ref_grads = torch.autograd.grad(ref_pre, leaves64, g_pre.double())
    for name, gr, ge, g64 in zip(names, grads, eager_grads, ref_grads, strict=True):
        if name == "conv_bias" and training:
            # Zero in exact arithmetic (BN removes any per-channel shift): noise relative
            # to the sum of the gradient it is made of.
            # At most twice eager's own (the exact value is 0), with that floor.
            scale = g_pre.double().abs().sum(dim=(0, 2, 3)).max().item()
            bound = max(1e-5 * scale, 2 * ge.abs().max().item())
            assert gr.abs().max().item() <= bound, f"grad conv_bias {gr}"
            continue
        assert_close_to_reference(gr, ge, g64, name=f"grad {name}")
    if rm is not None:
        assert_close_to_reference(rm, rm_e, rm64, name="running_mean")
        assert_close_to_reference(rv, rv_e, rv64, name="running_var")
    return out


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_resnet_conv_shapes(backend, mode, shape_name):
    _case(backend, shape_name, mode, residual=shape_name in ("1x1expand", "3x3s1"))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["train", "eval", "untracked"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    ("residual", "relu"), [(True, True), (False, True), (False, False), (True, False)]
)
def test_variants(backend, mode, layout, residual, relu):
    _case(backend, "3x3s1", mode, layout=layout, residual=residual, relu=relu)


DTYPES = [
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float64, torch.float64),
]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("dtype", "pdtype"), DTYPES, ids=["fp16", "bf16", "fp16-params", "fp64"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_dtypes(backend, mode, dtype, pdtype, layout):
    device = backend_device(backend)
    if dtype in (torch.float16, torch.bfloat16) and device == "cpu" and backend == "triton":
        pytest.skip("half-precision tl.dot is not supported by Triton's CPU interpreter")
    _case(backend, "3x3s2", mode, dtype=dtype, pdtype=pdtype, residual=False, layout=layout)
    _case(backend, "1x1expand", mode, dtype=dtype, pdtype=pdtype, residual=True, layout=layout)


@pytest.mark.parametrize("mode", ["train", "eval", "untracked"])
@pytest.mark.parametrize(("dtype", "pdtype"), [(torch.float32, torch.float32), *DTYPES])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_auto_policies_against_reference(auto_policy, mode, dtype, pdtype, layout):
    """backend="auto" always eager, and timed per shape (whichever it picks here): the
    running statistics move once per call over two steps, never in a timing trial."""
    _case("auto", "3x3s2", mode, dtype=dtype, pdtype=pdtype, layout=layout, residual=False,
          steps=2)  # fmt: skip
    _case("auto", "1x1expand", mode, dtype=dtype, pdtype=pdtype, layout=layout, conv_bias=True)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_conv_bias_and_no_affine(backend, mode):
    _case(backend, "3x3s1", mode, conv_bias=True)
    _case(backend, "1x1reduce", mode, affine=False, residual=False)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_grouped_conv(backend, mode):
    """groups > 1 runs aten's convolution with the fused BN kernels on every backend."""
    _case(backend, "3x3s1", mode, groups=2)
    _case(backend, "3x3s1", mode, groups=8, residual=False)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_running_stats_over_steps(backend, momentum):
    _case(backend, "3x3s2", "train", momentum=momentum, steps=3, residual=False)


@pytest.mark.parametrize("backend", backend_params())
def test_large_mean_statistics(backend):
    """Conv outputs around 1e4 with unit spread: the variance keeps fp32 accuracy."""
    device = backend_device(backend)
    x = torch.randn(2, 4, 6, 6, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 1, 1, device=device) * 0.3
    cb = torch.full((8,), 1e4, device=device)
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    # The conv bias moves every output by 1e4; batch statistics must not lose the spread.
    resnet_fused.conv_bn_act(
        x, w, None, None, rm, rv, conv_bias=cb, training=True, momentum=1.0, relu=False,
        backend=backend,
    )  # fmt: skip
    # Statistics of the fp32 convolution output, evaluated in fp64.
    y64 = F.conv2d(x, w, cb).double()
    var64 = y64.var(dim=(0, 2, 3), unbiased=True)
    assert var64.min() > 0.01  # a real spread under the 1e4 offset
    torch.testing.assert_close(rv.double(), var64, rtol=2e-5, atol=0)
    torch.testing.assert_close(rm.double(), y64.mean(dim=(0, 2, 3)), rtol=2.5e-7, atol=0)


def test_fold_matches_torch_fusion_and_is_differentiable():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, bias=True).double()
    bn = nn.BatchNorm2d(6).double()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    w_ref, b_ref = torch.nn.utils.fusion.fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    w_f, b_f = resnet_fused.fold_conv_bn(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
    )
    torch.testing.assert_close(w_f, w_ref.detach())
    torch.testing.assert_close(b_f, b_ref.detach())
    rm = bn.running_mean.clone().requires_grad_()
    rv = bn.running_var.clone().requires_grad_()
    inputs = (conv.weight, conv.bias, rm, rv, bn.weight, bn.bias)
    assert torch.autograd.gradcheck(
        lambda *a: resnet_fused.fold_conv_bn(*a, 1e-5), inputs, eps=1e-6, atol=1e-7
    )


# --- the module ----------------------------------------------------------------------


def _modules(cin=4, cout=6, k=3, stride=1, padding=1, bias=False, device="cpu"):
    conv = nn.Conv2d(cin, cout, k, stride, padding, bias=bias).to(device)
    bn = nn.BatchNorm2d(cout).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return conv, bn


@pytest.mark.parametrize("backend", backend_params())
def test_module_matches_sequential_train_and_eval(backend):
    device = backend_device(backend)
    conv, bn = _modules(device=device)
    seq = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU())
    fused = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn, backend=backend)
    # Same state_dict keys up to the prefix.
    keys = {k.replace("0.", "conv.", 1).replace("1.", "bn.", 1) for k in seq.state_dict()}
    assert keys == set(fused.state_dict())
    x = torch.randn(3, 4, 7, 7, device=device).to(memory_format=torch.channels_last)
    for step in range(2):
        out, ref = fused(x), seq(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=f"train step {step}")
        torch.testing.assert_close(fused.bn.running_var, seq[1].running_var)
        assert int(fused.bn.num_batches_tracked) == step + 1
    fused.eval()
    seq.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), seq(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", backend_params())
def test_module_fold_cache_is_refreshed(backend):
    device = backend_device(backend)
    conv, bn = _modules(device=device)
    fused = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn, backend=backend).eval()
    seq = nn.Sequential(conv, bn, nn.ReLU()).eval()  # shares the same modules
    x = torch.randn(2, 4, 6, 6, device=device)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), seq(x), rtol=1e-4, atol=1e-4)
        cached = fused._fold_cache.entry
        if x.is_cpu:
            assert cached is not None
            fused(x)
            assert fused._fold_cache.entry is cached  # reused while nothing changed
        else:
            # On other devices the fold's fingerprint would cost a device-to-host sync
            # per unit: the fold is made at every call and nothing is kept.
            assert cached is None
        # An optimizer step on the conv weight.
        opt = torch.optim.SGD(fused.parameters(), lr=0.5)
        conv.weight.grad = torch.randn_like(conv.weight)
        bn.weight.grad = torch.randn_like(bn.weight)
        opt.step()
        torch.testing.assert_close(fused(x), seq(x), rtol=1e-4, atol=1e-4)
        # In-place buffer edits and load_state_dict.
        bn.running_mean.add_(0.5)
        torch.testing.assert_close(fused(x), seq(x), rtol=1e-4, atol=1e-4)
        other_conv, other_bn = _modules(device=device)
        donor = resnet_fused.FusedConvBNReLU2d.from_modules(other_conv, other_bn)
        fused.load_state_dict(donor.state_dict())
        torch.testing.assert_close(fused(x), seq(x), rtol=1e-4, atol=1e-4)
        # bn.eps is part of the fold.
        bn.eps = 1e-1
        torch.testing.assert_close(fused(x), seq(x), rtol=1e-4, atol=1e-4)
    # With gradients the fold is differentiable and the cache is not used.
    out = fused(x)
    out.sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None


def test_module_constructor_and_options():
    m = resnet_fused.FusedConvBNReLU2d(3, 5, 3, stride=2, padding=1, relu=False, backend="torch")
    assert m.conv.weight.shape == (5, 3, 3, 3) and m.bn.num_features == 5
    x = torch.randn(2, 3, 8, 8)
    seq = nn.Sequential(m.conv, m.bn)
    torch.testing.assert_close(m(x), seq(copy.deepcopy(x)), rtol=1e-5, atol=1e-5)
    m2 = resnet_fused.FusedConvBNReLU2d(3, 5, 3, padding="same", momentum=None)
    assert m2(x).shape == (2, 5, 8, 8)
    with pytest.raises(NotImplementedError, match="padding_mode"):
        resnet_fused.FusedConvBNReLU2d.from_modules(
            nn.Conv2d(3, 5, 3, padding_mode="reflect"), nn.BatchNorm2d(5)
        )
    with pytest.raises(ValueError, match="num_features"):
        resnet_fused.FusedConvBNReLU2d.from_modules(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(4))


# --- torch.library / torch.compile ----------------------------------------------------


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_opcheck_triton_conv_ops(backend):
    device = backend_device(backend)
    from resnet_fused.triton.conv import pack_weight

    x = torch.randn(2, 4, 6, 5, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(6, 4, 3, 3, device=device) * 0.2
    wp = pack_weight(w)
    b = torch.randn(6, device=device)
    res = torch.randn(2, 6, 3, 3, device=device)
    geo = ([3, 3], [2, 2], [1, 1], [1, 1])
    lib = torch.ops.resnet_fused
    torch.library.opcheck(lib.conv_bias_act_triton.default, (x, wp, *geo, b, res, 1, 0.0))
    torch.library.opcheck(
        lib.conv_bias_act_triton.default, (x, wp, *geo, None, None, 4, 0.0)
    )  # SiLU
    rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
    torch.library.opcheck(lib.conv_bn_stats_triton.default, (x, wp, *geo, rm, rv, 0.1))
    torch.library.opcheck(lib.conv_bn_stats_triton.default, (x, wp, *geo, None, None, 0.1))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph(backend, training):
    device = backend_device(backend)
    compiler = "inductor" if backend in ("cpu", "cuda") else "aot_eager"

    def block(x, w, g, b, rm, rv, res):
        y = resnet_fused.conv_bn_act(
            x * 1.5, w, g, b, rm, rv, padding=1, training=training, residual=res,
            backend=backend,
        )  # fmt: skip
        return y * 2.0

    x = torch.randn(2, 4, 5, 5, device=device, requires_grad=True)
    w = (torch.randn(6, 4, 3, 3, device=device) * 0.2).requires_grad_()
    g = (torch.rand(6, device=device) + 0.5).requires_grad_()
    b = torch.randn(6, device=device, requires_grad=True)
    res = torch.randn(2, 6, 5, 5, device=device, requires_grad=True)
    rm_c, rv_c = torch.zeros(6, device=device), torch.ones(6, device=device)
    rm_e, rv_e = rm_c.clone(), rv_c.clone()
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    out = compiled(x, w, g, b, rm_c, rv_c, res)
    grads = torch.autograd.grad(out.sum(), (x, w, g, b, res))
    expected = block(x, w, g, b, rm_e, rv_e, res)
    expected_grads = torch.autograd.grad(expected.sum(), (x, w, g, b, res))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for name, gc, ge in zip(["x", "w", "g", "b", "res"], grads, expected_grads, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-4, msg=f"grad {name}")
    torch.testing.assert_close(rm_c, rm_e)
    torch.testing.assert_close(rv_c, rv_e)


@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_torch_backend_on_old_torch(training, monkeypatch):
    """The path torch < 2.14 takes under compile for the "torch" backend (the reference
    composition) gives eager's outputs, gradients and running statistics."""
    monkeypatch.setattr(resnet_fused._compat, "OLD_COMPILED_AUTOGRAD", True)
    test_compile_fullgraph("torch", training)


@pytest.mark.skipif(not HAS_CUDA, reason="TF32 is a CUDA mode")
@pytest.mark.parametrize("backend", backend_params(("cuda", "triton")))
@pytest.mark.parametrize("training", [True, False])
def test_tf32(backend, training):
    """With torch's TF32 flag on (its default for convolutions), fp32 convolutions may
    use TF32: the result is then TF32-accurate (about 1e-3 relative), not fp32."""
    torch.backends.cudnn.allow_tf32 = True
    x = torch.randn(4, 32, 9, 9, device="cuda").to(memory_format=torch.channels_last)
    w = torch.randn(16, 32, 3, 3, device="cuda") / 17
    g, b = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    rm, rv = torch.randn(16, device="cuda") * 0.1, torch.rand(16, device="cuda") + 0.5
    out = resnet_fused.conv_bn_act(
        x, w, g, b, rm.clone(), rv.clone(), padding=1, training=training, backend=backend
    )
    ref = reference.conv_bn_act(
        x.double(), w.double(), g.double(), b.double(), rm.double(), rv.double(), padding=1,
        training=training,
    )  # fmt: skip
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < 5e-3, rel


# --- autocast ------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="autocast to half on CUDA")
@pytest.mark.parametrize("backend", backend_params(("cuda", "triton")))
@pytest.mark.parametrize("training", [True, False])
def test_autocast(backend, training):
    conv, bn = _modules(device="cuda")
    fused = resnet_fused.FusedConvBNReLU2d.from_modules(
        copy.deepcopy(conv), copy.deepcopy(bn), backend=backend
    ).train(training)
    seq = nn.Sequential(conv, bn, nn.ReLU()).train(training)
    x = torch.randn(4, 4, 8, 8, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, ref = fused(x), seq(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)


# --- bad input -------------------------------------------------------------------------------


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    p = torch.ones(6)
    f = resnet_fused.conv_bn_act
    with pytest.raises(ValueError, match="conv_weight expects 3 input channels"):
        f(x, torch.randn(6, 3, 3, 3), p, p, p, p)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        f(x, torch.randn(6, 1, 3, 3), p, p, p, p, groups=3)
    with pytest.raises(ValueError, match="input must be a 4-D tensor"):
        f(x[0], w, p, p, p, p)
    with pytest.raises(ValueError, match="conv_weight must be a 4-D tensor"):
        f(x, w[0], p, p, p, p)
    with pytest.raises(ValueError, match=r"bn_weight must have shape \(C,\) = \(6,\)"):
        f(x, w, torch.ones(4), p, p, p)
    with pytest.raises(ValueError, match="running_mean and running_var must both"):
        f(x, w, p, p, p, None)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        f(x, w, p, p, p, p, padding=1, residual=torch.randn(2, 6, 3, 3))
    with pytest.raises(TypeError, match="conv_weight must have the dtype of input"):
        f(x, w.double(), p, p, p, p)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        f(x, w, p, p, p, p, stride=0)
    with pytest.raises(TypeError, match="padding must be an int or a pair"):
        f(x, w, p, p, p, p, padding="same")
    with pytest.raises(ValueError, match="output would be empty"):
        f(torch.randn(2, 4, 2, 2), w, p, p, p, p)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        f(torch.randn(1, 4, 3, 3), w, p, p, p, p, training=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        f(x, w, p, p, p, p, backend="cudnn")


def test_opcheck_fold_op():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    cb, rm, g, b = (torch.randn(6, dtype=torch.float64) for _ in range(4))
    rv = torch.rand(6, dtype=torch.float64) + 0.5
    fold = torch.ops.resnet_fused.fold_conv_bn.default
    torch.library.opcheck(fold, (w, cb, rm, rv, g, b, 1e-5, torch.float64))
    torch.library.opcheck(fold, (w, None, rm, rv, None, None, 1e-3, torch.float64))
    torch.library.opcheck(
        fold, (w.float(), None, rm.float(), rv.float(), g.float(), None, 1e-5, torch.bfloat16)
    )


def test_onednn_binary_post_op_skipped_at_1x1_on_old_torch(monkeypatch):
    """torch < 2.14's oneDNN fails its add post-op at 1x1 maps ("could not create a
    memory", resnet18's last block at 32x32): there the eval unit with a residual takes
    aten's convolution and the epilogue, with eager's result."""
    from resnet_fused.functional import conv_bn_act as cba

    monkeypatch.setattr(cba, "ONEDNN_BINARY_FAILS_AT_1X1", True)
    binary_calls = []
    real = cba._mkldnn_pointwise

    class Spy:
        def __call__(self, *args):
            return real(*args)

        def binary(self, x, *args):
            binary_calls.append(tuple(x.shape[-2:]))
            return real.binary(x, *args)

    monkeypatch.setattr(cba, "_mkldnn_pointwise", Spy())
    for hw in (1, 3):
        x = torch.randn(2, 8, hw, hw).to(memory_format=torch.channels_last)
        w = torch.randn(8, 8, 3, 3) * 0.2
        g, b = torch.rand(8) + 0.5, torch.randn(8)
        rm, rv = torch.randn(8) * 0.1, torch.rand(8) + 0.5
        res = torch.randn(2, 8, hw, hw).to(memory_format=torch.channels_last)
        with torch.no_grad():
            out = resnet_fused.conv_bn_act(
                x, w, g, b, rm, rv, padding=1, residual=res, backend="cpu"
            )  # fmt: skip
        expected = torch.relu(F.batch_norm(F.conv2d(x, w, padding=1), rm, rv, g, b) + res)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    if cba._mkldnn_ok(torch.randn(1, 8, 3, 3)):  # (oneDNN used on this machine at all)
        assert binary_calls == [(3, 3)], binary_calls
