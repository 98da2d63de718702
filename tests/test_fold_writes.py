"""The eval fold cache notices every write to a fold input (issue 20, item 5).

The eval-mode fold (BatchNorm folded into the convolution's weight and bias) is cached
per unit. Writes through ``.data``, ``.detach()`` or numpy go to an alias with its own
version counter: they bump nothing of the parameter itself, so the cache also compares a
fingerprint of the inputs' contents (CPU; on other devices it refolds at every call).
Each test edits a model's parameters or buffers the way users do (EMA's ``p.data.mul_``,
``.data`` copies, single elements, ``p.data = ...``, numpy, ``load_state_dict``,
``vector_to_parameters``) and compares it with the unconverted model, edited alike, in fp64.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from conftest import backend_device, backend_params
from torch import nn

import resnet_fused
from resnet_fused import modules
from resnet_fused.bench.tutorial import TutorialResNet
from resnet_fused.ops import fingerprint as fingerprint_module

needs_op = pytest.mark.skipif(
    fingerprint_module.FINGERPRINT is None, reason="the extension's fingerprint op is missing"
)


# --- models --------------------------------------------------------------------------------


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n, dtype = m.num_features, m.weight.dtype
                m.weight.copy_(torch.rand(n, generator=gen, dtype=dtype) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen, dtype=dtype) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen, dtype=dtype) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen, dtype=dtype) + 0.5)
    return model


def _convert(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resnet_fused.convert(model)


class _Unit(nn.Module):
    """conv -> bn -> ReLU with FusedConvBNReLU2d's submodule names."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _unit_pair(dtype=torch.float64, backend="auto"):
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=True, dtype=dtype)
    bn = _randomise(nn.BatchNorm2d(6, dtype=dtype))
    reference = _Unit(conv, bn)
    fused = resnet_fused.FusedConvBNReLU2d.from_modules(
        copy.deepcopy(conv), copy.deepcopy(bn), backend=backend
    )
    return reference, fused, torch.randn(2, 3, 8, 8, dtype=dtype)


def _torchvision_pair():
    reference = _randomise(torchvision.models.resnet18(num_classes=5).double())
    return reference, _convert(reference), torch.randn(1, 3, 32, 32, dtype=torch.float64)


def _tutorial_pair():
    reference = _randomise(TutorialResNet((1, 1, 1, 1), widths=(8, 16, 16, 32), num_classes=5))
    reference = reference.double()
    fused = _convert(reference)
    assert resnet_fused.conversion_report(fused)["fused"]  # the graph pass fused its sites
    return reference, fused, torch.randn(2, 3, 32, 32, dtype=torch.float64)


_MODELS = {"unit": _unit_pair, "torchvision": _torchvision_pair, "tutorial": _tutorial_pair}


# --- edits (each applied alike to the reference and the converted model) ----------------------


def _params(model):
    return [p for _, p in model.named_parameters()]


def _edit_data_mul(model, step):
    for p in model.parameters():
        p.data.mul_(1.5)


def _edit_bn_buffers(model, step):
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.data.copy_(b.data * 0.5 - 0.25)
        elif name.endswith("running_var"):
            b.data.copy_(b.data * 1.7 + 0.1)


def _edit_single_element(model, step):
    for p in model.parameters():
        if p.dim() == 4:
            p.data[0, 0, 0, 0] += 1


def _edit_data_assign(model, step):
    for p in model.parameters():
        p.data = p.data * 1.5 - 0.01


def _edit_numpy(model, step):
    for p in model.parameters():
        a = p.detach().numpy()
        a *= 1.5


def _edit_load_state_dict(model, step):
    state = {
        k: v * (1.25 + step) if v.is_floating_point() else v for k, v in model.state_dict().items()
    }
    model.load_state_dict(state)


def _edit_vector_to_parameters(model, step):
    params = _params(model)
    vec = nn.utils.parameters_to_vector(params).detach() * 1.5
    nn.utils.vector_to_parameters(vec, params)


_EDITS = {
    "data-mul": _edit_data_mul,
    "bn-buffers-data": _edit_bn_buffers,
    "single-element": _edit_single_element,
    "data-assign": _edit_data_assign,
    "numpy": _edit_numpy,
    "load-state-dict": _edit_load_state_dict,
    "vector-to-parameters": _edit_vector_to_parameters,
}


# --- how the models run ------------------------------------------------------------------------


def _run(model, x, mode):
    if mode == "no-grad":
        with torch.no_grad():
            return model(x)
    if mode == "inference-mode":
        with torch.inference_mode():
            return model(x)
    if mode == "grad-frozen":  # grad mode on, frozen parameters: the cached fold serves
        return model(x.detach().requires_grad_()).detach()
    return model(x).detach()  # "grad": parameters require grad, the fold is made per call


def _prepare(model, mode):
    model.eval()
    model.requires_grad_(mode == "grad")
    return model


def _assert_same(out, ref, what):
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9 * scale, msg=what)


MODES = ["no-grad", "grad-frozen", "inference-mode", "grad"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("edit", sorted(_EDITS))
@pytest.mark.parametrize("arch", sorted(_MODELS))
def test_edits_reach_the_fold(arch, edit, mode):
    reference, fused, x = _MODELS[arch]()
    assert [n for n, _ in reference.named_parameters()] == [n for n, _ in fused.named_parameters()]
    assert [n for n, _ in reference.named_buffers()] == [n for n, _ in fused.named_buffers()]
    _prepare(reference, mode)
    _prepare(fused, mode)
    for step in range(2):
        for call in range(2):  # the first call folds and plans, the second runs the plan
            _assert_same(_run(fused, x, mode), _run(reference, x, mode), f"step {step} {call}")
        _EDITS[edit](reference, step)
        _EDITS[edit](fused, step)
    for call in range(2):
        _assert_same(_run(fused, x, mode), _run(reference, x, mode), f"after the edits {call}")


def test_issue_reproducer_ema_scaling():
    """The issue's report: a converted eval resnet18 run once under no_grad, then every
    parameter scaled through ``.data`` (the EMA idiom): the next output was the old one."""
    reference, fused, x = _torchvision_pair()
    reference.eval()
    fused.eval()
    with torch.no_grad():
        fused(x)
        for model in (reference, fused):
            for p in model.parameters():
                p.data.mul_(1.5)
        out, ref = fused(x), reference(x)
    assert (out - ref).norm() / ref.norm() < 1e-12


def test_nan_written_through_data_reaches_the_output():
    """fp32 on oneDNN's path: the cached fold also records whether W' is finite (oneDNN's
    ReLU post-op maps NaN to 0); a NaN written through ``.data`` must refold and show."""
    reference, fused, x = _unit_pair(torch.float32)
    reference.eval()
    fused.eval()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(fused(x), reference(x))
        reference.conv.weight.data[1, 0, 0, 0] = float("nan")
        fused.conv.weight.data[1, 0, 0, 0] = float("nan")
        out, ref = fused(x), reference(x)
    assert out[:, 1].isnan().any()
    torch.testing.assert_close(out, ref, equal_nan=True)


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_triton_packed_weight_follows_data_edits(backend):
    """The cached fold holds Triton's packed weight too: a ``.data`` edit repacks it (on
    a GPU, where folds are made at every call, the edits show as well)."""
    reference, fused, x = _unit_pair(torch.float32, backend=backend)
    device = backend_device(backend)
    reference, fused, x = reference.to(device), fused.to(device), x.to(device)
    reference.eval()
    fused.eval()
    with torch.no_grad():
        for edit in (_edit_data_mul, _edit_single_element, _edit_bn_buffers):
            for _ in range(2):
                torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-4)
            edit(reference, 0)
            edit(fused, 0)
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-4)


def test_batch_norm_act_site_follows_data_edits():
    """FusedBatchNormAct2d's plan keeps no values: a ``.data`` edit shows at once."""
    bn = _randomise(nn.BatchNorm2d(4, dtype=torch.float64)).eval()
    fused = resnet_fused.FusedBatchNormAct2d.from_batch_norm(copy.deepcopy(bn)).eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        for step in range(3):
            for _ in range(2):
                _assert_same(fused(x), torch.relu(bn(x)), f"step {step}")
            for m in (bn, fused):
                _edit_data_mul(m, step)
                _edit_bn_buffers(m, step)


@pytest.mark.parametrize("missing", ["_FINGERPRINT", "_FOLD_KEY", "_FOLD_KEY_CHECK"])
def test_without_the_op_nothing_is_cached(monkeypatch, missing):
    """Without the fingerprint op or the fold key's functions (an extension built without
    them), CPU folds are made at every call: correct, never stale."""
    monkeypatch.setattr(modules, missing, None)
    reference, fused, x = _unit_pair()
    reference.eval()
    fused.eval()
    with torch.no_grad():
        for step in range(2):
            for _ in range(2):
                _assert_same(fused(x), reference(x), f"step {step}")
                assert fused._fold_cache.entry is None
            _edit_data_mul(reference, step)
            _edit_data_mul(fused, step)


def test_other_devices_refold_at_every_call_without_a_sync(monkeypatch):
    """Off the CPU a fingerprint would cost a device-to-host sync per unit: the fold is
    made at every call instead, and nothing about it is read back (``finite`` unknown,
    no packed weight). There is no GPU here: tensors are made to say they are not on the
    CPU (the fold reads ``is_cpu`` only)."""
    reference, fused, x = _unit_pair()
    reference.eval()
    fused.eval()
    folds = []
    cached_fold = modules._cached_fold

    def spy(*args, **kwargs):
        folds.append(cached_fold(*args, **kwargs))
        return folds[-1]

    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    monkeypatch.setattr(modules, "_cached_fold", spy)
    with torch.no_grad():
        for step in range(2):
            for _ in range(2):
                _assert_same(fused(x), reference(x), f"step {step}")
                assert fused._fold_cache.entry is None
            _edit_data_mul(reference, step)
            _edit_data_mul(fused, step)
    assert len(folds) == 4 and all(f[2] is None and f[3] is None for f in folds)


@needs_op
def test_unchanged_parameters_keep_the_fold():
    """The cache still serves: no refold while nothing changed (the same W' object)."""
    _, fused, x = _unit_pair()
    fused.eval()
    with torch.no_grad():
        fused(x)
        entry = fused._fold_cache.entry
        assert entry is not None
        for _ in range(3):
            fused(x)
            assert fused._fold_cache.entry is entry
        fused.bn.running_var.data[2] += 0.5
        fused(x)
        assert fused._fold_cache.entry is not entry


_VERSIONED_EDITS = ("load-state-dict", "vector-to-parameters", "data-assign")


@needs_op
@pytest.mark.parametrize("edit", sorted(_EDITS))
def test_versions_only_fold_check(edit, monkeypatch):
    """RESNET_FUSED_FOLD_CHECK=versions: no fingerprint of the contents at any call;
    edits that bump a version counter or replace the tensor (load_state_dict,
    vector_to_parameters, ``p.data = ...``) still reach the fold, writes through ``.data``
    or numpy (no counter bumped) do not: the fold stays as it was (documented)."""
    monkeypatch.setenv(modules.FOLD_CHECK_ENV, "versions")
    calls = []  # (the contents read: by the fingerprint op, or by the key's check)
    real, real_check = modules._FINGERPRINT, modules._FOLD_KEY_CHECK
    monkeypatch.setattr(modules, "_FINGERPRINT", lambda ts: calls.append(1) or real(ts))

    def check(key, contents, *tensors):
        if contents:
            calls.append(1)
        return real_check(key, contents, *tensors)

    monkeypatch.setattr(modules, "_FOLD_KEY_CHECK", check)
    reference, fused, x = _unit_pair(backend="cpu")  # (the folded path at every call)
    for m in (reference, fused):
        _prepare(m, "no-grad")
    with torch.no_grad():
        for _ in range(2):
            _assert_same(fused(x), reference(x), "before")
        before = fused(x)
    _EDITS[edit](reference, 0)
    _EDITS[edit](fused, 0)
    with torch.no_grad():
        for _ in range(2):
            if edit in _VERSIONED_EDITS:
                _assert_same(fused(x), reference(x), "after")
            else:
                assert not torch.allclose(reference(x), before)  # the edit matters
                _assert_same(fused(x), before, "the fold as it was")
    assert not calls
    monkeypatch.setenv(modules.FOLD_CHECK_ENV, "contents")  # the default again: seen
    with torch.no_grad():
        _assert_same(fused(x), reference(x), "contents checked again")
    assert calls


# --- the fingerprint op ------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _fp(*tensors) -> int:
    return fingerprint_module.fingerprint(tensors)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 3, 63, 64, 65, 1000, 70_001, 300_000])
def test_fingerprint_sees_single_element_edits(dtype, numel):
    """Every single-element edit (each position near the ends of blocks and chunks, and
    some inside), swaps, zeroing and scaling change the value; equal contents agree."""
    gen = torch.Generator().manual_seed(numel)
    t = (torch.randn(numel, generator=gen) + 3.0).to(dtype)
    base = _fp(t)
    assert _fp(t.clone()) == base
    positions = sorted({0, 1, 62, 63, 64, 65, 127, 128, numel // 2, 65535, 65536, numel - 1})
    positions = [i for i in positions if i < numel]
    for i in positions:
        for new in (t[i] + 1, -t[i], torch.zeros((), dtype=dtype), t[i] * 1.5):
            u = t.clone()
            u[i] = new
            assert _fp(u) != base, (i, new)
        if i + 1 < numel:
            u = t.clone()
            u[i], u[i + 1] = t[i + 1], t[i]
            assert _fp(u) != base, ("swap", i)
    if numel > 1:
        assert _fp(t.flip(0)) != base
        assert _fp(torch.zeros_like(t)) != base
        assert _fp(t * 1.5) != base
        assert _fp(-t) != base
    assert _fp(t[:-1]) != base  # a shorter tensor, even where the dropped bytes are zero
    z = torch.zeros(numel, dtype=dtype)
    assert _fp(z) != _fp(torch.zeros(numel + 1, dtype=dtype))


@needs_op
def test_fingerprint_layouts_and_lists():
    """Dense tensors (channels_last, any permutation) hash their bytes in memory order,
    without a copy, and see every single-element edit; other strided views hash as their
    contiguous copy; views with a storage offset read from their own start; lists are
    order- and boundary-dependent."""
    a = torch.randn(8, 16, 3, 3)
    cl = a.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    assert _fp(cl) == _fp(cl.permute(0, 2, 3, 1).contiguous())  # memory order
    assert _fp(cl) != _fp(cl.contiguous())  # (the fold cache keys on strides too)
    base = _fp(cl)
    for i in ((0, 0, 0, 0), (7, 15, 2, 2), (3, 9, 1, 0)):
        u = cl.clone()
        assert u.stride() == cl.stride()
        u[i] += 1.0
        assert _fp(u) != base, i
    t = a.transpose(0, 1)  # (dense too: memory order)
    assert _fp(t) == _fp(a)
    assert _fp(a[:, ::2].transpose(0, 1)) == _fp(a[:, ::2].transpose(0, 1).contiguous())
    assert _fp(a[:, ::2]) == _fp(a[:, ::2].clone())
    flat = a.flatten()
    assert _fp(flat[5:100]) == _fp(flat[5:100].clone())
    assert _fp(a) == _fp(a.view(-1)) == _fp(a.view(16, 8, 9))  # bytes, not shapes
    b = torch.randn(7)
    assert _fp(a, b) != _fp(b, a)
    assert _fp(flat[:10], flat[10:20]) != _fp(flat[:20])
    assert _fp(torch.empty(0)) == _fp(torch.empty(0, 3))
    assert _fp(torch.tensor(2.0)) != _fp(torch.tensor(3.0))


@needs_op
def test_fingerprint_does_not_depend_on_threads(several_threads):
    t = torch.randn(3_000_000)
    several = _fp(t)
    torch.set_num_threads(1)  # (the fixture restores the threads)
    assert _fp(t) == several


@needs_op
def test_fingerprint_refuses_other_devices_and_layouts():
    with pytest.raises((RuntimeError, NotImplementedError)):
        _fp(torch.randn(4, 4).to_sparse())
    with pytest.raises((RuntimeError, NotImplementedError)):
        _fp(torch.randn(4, device="meta"))


# --- the fold's key (resnet_fused._C.fold_key / fold_key_check) -------------------------------

needs_key = pytest.mark.skipif(
    modules._FOLD_KEY is None or fingerprint_module.FINGERPRINT is None,
    reason="the extension's fold key functions are missing",
)


def _key_inputs():
    gen = torch.Generator().manual_seed(3)
    w = nn.Parameter(
        torch.randn(6, 4, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    )
    rm, rv = torch.randn(6, generator=gen), torch.rand(6, generator=gen) + 0.5
    bw, bb = (
        nn.Parameter(torch.randn(6, generator=gen)),
        nn.Parameter(torch.randn(6, generator=gen)),
    )
    return [w, None, rm, rv, bw, bb]


@needs_key
def test_fold_key_check_sees_every_change_of_the_inputs():
    """The key's check: the same tensors unchanged give their fingerprint now (the op's,
    over the tensors present), or 0 without the contents; anything else gives None: another
    object with equal contents, an in-place write (version), a tensor where None was (or
    the reverse), another shape or strides of the same object (set_/resize_), a storage
    swapped in, an inference tensor in a keyed tensor's place."""
    check = modules._FOLD_KEY_CHECK
    ins = _key_inputs()
    key = modules._FOLD_KEY(*ins)
    present = [t for t in ins if t is not None]
    before = fingerprint_module.fingerprint(present)
    assert check(key, True, *ins) == before
    assert check(key, False, *ins) == 0
    ins[0].data.mul_(2)  # (no version bump: the fingerprint tells)
    now = check(key, True, *ins)
    assert now is not None and now != before
    assert now == fingerprint_module.fingerprint(present)

    def changed(i, value):
        args = list(ins)
        args[i] = value
        return check(key, True, *args)

    assert changed(4, nn.Parameter(ins[4].detach().clone())) is None  # equal contents
    assert changed(1, torch.zeros(6)) is None
    assert changed(2, None) is None
    with torch.inference_mode():
        inference = torch.ones(6)
    assert changed(3, inference) is None
    assert check(key, True, *ins[:-1]) is None  # (another count of inputs)
    with torch.no_grad():
        ins[5].add_(1)  # a version bump
    assert check(key, True, *ins) is None
    key = modules._FOLD_KEY(*ins)
    assert check(key, False, *ins) == 0
    ins[2].set_(ins[2].untyped_storage(), 0, (3,), (2,))  # the same object, another view
    assert check(key, False, *ins) is None
    key = modules._FOLD_KEY(*ins)
    ins[2].set_(torch.randn(3).untyped_storage(), 0, (3,), (1,))  # another storage
    assert check(key, False, *ins) is None


@needs_key
def test_wrapper_subclass_weights_are_not_cached():
    """A weight that is a wrapper tensor subclass (its storage holds no data: the values
    live in its inner tensors) gets no fold key, so nothing is cached and nothing reads
    its storage (the key's check read address 0 there: a segfault, found by a reviewer)."""
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
    _randomise(nn.Sequential(conv, bn))
    w = conv.weight.detach()
    tt = TwoTensor(w.clone(), w.clone())
    assert modules._FOLD_KEY(tt) is None
    conv.weight = nn.Parameter(tt, requires_grad=False)
    reference = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).eval()
    x = torch.randn(2, 4, 5, 5)

    def plain(t):
        return t.a if isinstance(t, TwoTensor) else t

    with torch.no_grad():
        expected = plain(reference(x))
        for backend in ("auto", "cpu"):
            unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn, backend=backend)
            unit.eval()
            for _ in range(3):
                out = unit(x)
                assert unit._fold_cache.entry is None
                torch.testing.assert_close(plain(out), expected, rtol=1e-4, atol=1e-5)


@needs_key
def test_folded_modules_move_with_swapped_parameters():
    """After eval calls (a cached fold), ``.double()`` and ``load_state_dict`` work where
    torch swaps parameters in place (torch.__future__.set_swap_module_params_on_conversion:
    torch.utils.swap_tensors refuses tensors with weak references; the fold's key holds
    none), and the moved module's fold is made anew."""
    reference, fused, x = _unit_pair(dtype=torch.float32, backend="cpu")
    reference.eval()
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-5, atol=1e-5)
    saved = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        fused.double()
        reference.double()
        x = x.double()
        with torch.no_grad():
            _assert_same(fused(x), reference(x), "moved to fp64")
            state = {k: v * 1.5 if v.is_floating_point() else v
                     for k, v in reference.state_dict().items()}  # fmt: skip
        reference.load_state_dict(state)
        fused.load_state_dict(state)
        with torch.no_grad():
            _assert_same(fused(x), reference(x), "loaded")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(saved)


@needs_key
def test_versions_check_does_not_trust_a_new_counter_at_a_freed_address(monkeypatch):
    """RESNET_FUSED_FOLD_CHECK=versions: a Parameter remade from ``w.data`` (same memory,
    a version counter of its own) often lands at the freed Parameter's address; written in
    place as many times as the keyed counter had been, its count matches. The key compares
    the counter's identity too, so the fold is remade (found by a reviewer: the key held
    only the address, and the unit returned the old weights' result)."""
    monkeypatch.setenv(modules.FOLD_CHECK_ENV, "versions")
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
    _randomise(nn.Sequential(conv, bn))
    unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn, backend="cpu").eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        conv.weight.mul_(1.0)
        unit(x)
        unit(x)
        keyed = conv.weight._version
        d = conv.weight.data
        conv._parameters["weight"] = None
        conv.weight = nn.Parameter(d)  # (a new counter, at 0)
        while conv.weight._version < keyed:
            conv.weight.add_(0.5)
        expected = torch.relu(bn(conv(x)))
        torch.testing.assert_close(unit(x), expected, rtol=1e-5, atol=1e-5)


@needs_key
def test_an_eager_plan_keeps_no_fold(monkeypatch):
    """A unit planned to run eager's unfolded ops drops the fold its planning call made
    (which, through the fold's key, would keep a later-replaced parameter's storage)."""
    monkeypatch.setenv("RESNET_FUSED_AUTO", "eager")
    reference, fused, x = _unit_pair()
    reference.eval()
    fused.eval()
    with torch.no_grad():
        for _ in range(2):
            _assert_same(fused(x), reference(x), "eager plan")
            assert fused._fold_cache.entry is None


@needs_key
def test_fold_key_keeps_no_tensor_alive_and_refuses_bad_arguments():
    import weakref

    ins = _key_inputs()
    ref = weakref.ref(ins[4])
    key = modules._FOLD_KEY(*ins)
    ins[4] = None
    assert ref() is None  # a replaced parameter is not kept alive by the cached fold
    assert modules._FOLD_KEY_CHECK(key, True, *ins) is None
    with pytest.raises(TypeError, match="Tensor or None"):
        modules._FOLD_KEY(torch.ones(2), 3)
    with pytest.raises((TypeError, ValueError)):
        modules._FOLD_KEY_CHECK(object(), True, torch.ones(2))
    with pytest.raises(TypeError):
        modules._FOLD_KEY_CHECK(key)
    with torch.inference_mode():
        inference = torch.ones(2)
    assert modules._FOLD_KEY(inference) is None  # (no version counter: not keyed)
    assert modules._FOLD_KEY(torch.ones(2, device="meta")) is None
