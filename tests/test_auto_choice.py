"""The per-shape choice of ``backend="auto"``: the fused kernels (on CUDA: cuDNN or
Triton convolution) or eager PyTorch, timed once per key. What the cache keys on, its
bound and thread safety, the policy variable, that the timing really picks the faster
way (on the CPU, with a candidate slowed on purpose), that trials leave the caller's
state alone, and where no timing may happen (torch.compile, CUDA graph capture)."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from conftest import backend_device, backend_params
from torch import nn

import resnet_fused
from resnet_fused.activations import as_act
from resnet_fused.functional import auto_choice as fc
from resnet_fused.functional import conv_bn_act as fc_unit


def _key(n=8, tf32=True, bias=False, dtype=torch.float32, act="relu"):
    x = torch.empty(n, 4, 6, 6, dtype=dtype)
    w = torch.empty(8, 4, 3, 3, dtype=dtype)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        return fc.conv_unit_key(
            x, w, ((1, 1), (1, 1), (1, 1), 1), True, None, as_act(act),
            torch.empty(8) if bias else None,
        )  # fmt: skip
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_key_has_tf32_mode_conv_bias_and_a_batch_bucket():
    assert _key(tf32=True) != _key(tf32=False)  # fp32 convolutions change speed with TF32
    assert _key(tf32=True, dtype=torch.bfloat16) == _key(tf32=False, dtype=torch.bfloat16)
    assert _key(bias=True) != _key(bias=False)
    # the activation is part of the epilogue (and so of the timing), parameter included
    assert _key(act="silu") != _key() != _key(act="identity")
    assert _key(act=nn.LeakyReLU(0.1)) != _key(act=nn.LeakyReLU(0.2))
    # the last, smaller batch of an epoch reuses the pick of its power-of-two bucket
    assert _key(n=200) == _key(n=256) != _key(n=257)
    assert _key(n=1) != _key(n=2)


def test_cache_is_bounded_lru_and_thread_safe():
    cache = fc._AutoChoices(capacity=8)
    errors = []

    def worker(t):
        try:
            for i in range(2000):
                key = (t, i % 13)
                if cache.get(key) is None:
                    cache.put(key, "cuda" if i % 2 else "triton")
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache) == 8
    cache.put(("new",), "cuda")
    cache.get(next(iter(cache.snapshot())))  # touching the oldest keeps it
    assert len(cache.snapshot()) == 8 and ("new",) in cache.snapshot()


def test_choose_times_once_per_key(monkeypatch):
    monkeypatch.setenv(fc.POLICY_ENV, "time")
    monkeypatch.setattr(fc, "_AUTO_CHOICES", fc._AutoChoices(capacity=4))
    timed = []

    def fake_time(candidates, trial, device, repeats=5):
        timed.append(tuple(candidates))
        return {"cuda": 2.0, "triton": 1.0, "eager": 1.5}

    monkeypatch.setattr(fc, "_time_candidates", fake_time)
    cpu = torch.device("cpu")
    candidates = ["cuda", "triton", "eager"]
    assert fc.choose(("k",), candidates, None, cpu) == "triton"
    assert fc.choose(("k",), candidates, None, cpu) == "triton"
    assert timed == [("cuda", "triton", "eager")]
    key = ("k", ("cuda", "triton", "eager"))
    assert fc.auto_choices() == {key: "triton"}
    assert fc.auto_timings()[key] == {"cuda": 2.0, "triton": 1.0, "eager": 1.5}
    # The "fused" policy is a different question (eager is no candidate): its own key.
    monkeypatch.setenv(fc.POLICY_ENV, "fused")
    assert fc.choose(("k",), ["cuda", "eager"], None, cpu) == "cuda"  # one candidate left
    assert fc.choose(("k",), candidates, None, cpu) == "triton"
    assert timed[-1] == ("cuda", "triton")


def test_policy_variable(monkeypatch):
    def trial(c):
        raise AssertionError("no timing expected")

    cpu = torch.device("cpu")
    monkeypatch.setenv(fc.POLICY_ENV, "eager")
    assert fc.choose(("p",), ["cpu", "eager"], trial, cpu) == "eager"
    monkeypatch.setenv(fc.POLICY_ENV, "fused")
    assert fc.choose(("p",), ["cpu", "eager"], trial, cpu) == "cpu"
    monkeypatch.setenv(fc.POLICY_ENV, "fastest")
    with pytest.raises(ValueError, match="RESNET_FUSED_AUTO must be one of time, fused, eager"):
        resnet_fused.add_relu(torch.ones(2), torch.ones(2))
    monkeypatch.setenv(fc.POLICY_ENV, " Time ")
    assert fc.auto_policy() == "time"
    monkeypatch.delenv(fc.POLICY_ENV)
    assert fc.auto_policy() == "time"  # the default users get


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_eval_trial_uses_the_packed_weight_the_real_call_uses(backend, monkeypatch):
    """A module's cached fold carries the packed Triton weight; the trial that times
    Triton must run with it (not pack the weight inside the timed call)."""
    from resnet_fused.triton import conv as triton_conv

    device = backend_device(backend)
    x = torch.randn(2, 4, 6, 6, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 3, 3, device=device)
    b = torch.randn(8, device=device)
    packed = triton_conv.pack_weight(w)
    packs, trials = [], []
    monkeypatch.setattr(
        fc_unit, "_triton_pack", lambda t: packs.append(t) or triton_conv.pack_weight(t)
    )

    def fake_resolve(backend, x, w, geometry, training, residual, relu, run, conv_bias=None,
                     **kwargs):  # fmt: skip
        trials.append(run("triton"))
        return "triton"

    monkeypatch.setattr(fc_unit, "_resolve_conv_backend", fake_resolve)
    with torch.no_grad():
        out = resnet_fused.conv_bn_act(
            x, w, None, None, torch.zeros(8, device=device), torch.ones(8, device=device),
            padding=1, backend="auto",
            _folded=(w, b, packed, True),
        )  # fmt: skip
    assert trials and not packs, "the trial packed the weight that the real call gets packed"
    torch.testing.assert_close(out, trials[0])
    torch.testing.assert_close(
        out, torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1)), rtol=1e-4, atol=1e-4
    )


def test_timing_records_events_on_the_input_device(monkeypatch):
    """The trial timing runs under the input's CUDA device (not the current one)."""
    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(torch.device(self.device))

        def __exit__(self, *exc):
            entered.append(None)

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.recorded_in = None

        def record(self):
            self.recorded_in = entered[-1] if entered else "current device"

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            assert self.recorded_in == end.recorded_in == torch.device("cuda:1")
            return 1.0

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert fc._measure(lambda: None, torch.device("cuda:1")) == 1.0
    assert entered[0] == torch.device("cuda:1") and entered[-1] is None


# --- the timed choice on this machine's CPU, with one candidate slowed on purpose ----------


def _slowed(fn, seconds=0.1):
    """fn, a tenth of a second slower per call: far beyond timing noise on a busy
    2-core machine (where an OpenMP barrier can cost a scheduler tick)."""

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slow


@pytest.fixture
def timed_policy(monkeypatch):
    monkeypatch.setenv(fc.POLICY_ENV, "time")
    monkeypatch.setattr(fc, "_AUTO_CHOICES", fc._AutoChoices())
    calls = []
    real = fc._time_candidates

    def counting(candidates, trial, device, repeats=5):
        calls.append(tuple(candidates))
        return real(candidates, trial, device, repeats)

    monkeypatch.setattr(fc, "_time_candidates", counting)
    return calls


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
@pytest.mark.parametrize("slow", ["fused", "eager"])
@pytest.mark.parametrize("grad", [False, True])
def test_add_relu_picks_the_faster_way(timed_policy, monkeypatch, slow, grad):
    from resnet_fused.functional import add_relu as fa

    if slow == "fused":
        kernels = fa._add_relu_kernels

        def slow_kernels(backend):
            k = kernels(backend)
            return fa._AddReLUKernels(_slowed(k.forward), k.forward_inplace, k.backward)

        monkeypatch.setattr(fa, "_add_relu_kernels", slow_kernels)
    else:
        monkeypatch.setattr(fa, "_eager_add_relu", _slowed(fa._eager_add_relu))
    x = torch.randn(4, 8, 5, 5, requires_grad=grad)
    r = torch.randn(4, 8, 5, 5)
    for _ in range(2):
        out = resnet_fused.add_relu(x, r)
    ((key, pick),) = resnet_fused.auto_choices().items()
    assert pick == ("eager" if slow == "fused" else "cpu")
    assert key[0] == "add_relu" and key[-3] == grad
    times = resnet_fused.auto_timings()[key]
    assert times[pick] < times["cpu" if pick == "eager" else "eager"]
    assert len(timed_policy) == 1  # timed once for the two calls
    torch.testing.assert_close(out, torch.relu(x + r))
    # A batch in the same power-of-two bucket reuses the pick; the next bucket times again.
    resnet_fused.add_relu(x[:3], r[:3])
    assert len(timed_policy) == 1
    resnet_fused.add_relu(torch.cat([x, x]), torch.cat([r, r]))
    assert len(timed_policy) == 2


def _unit(c_in=8, c_out=8, k=3):
    conv = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
    bn = torch.nn.BatchNorm2d(c_out)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    return conv, bn


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
@pytest.mark.parametrize("slow", ["fused", "eager"])
@pytest.mark.parametrize("training", [True, False])
def test_conv_unit_picks_the_faster_way_and_trials_leave_state_alone(
    timed_policy, monkeypatch, slow, training
):
    """The pick is the faster way; the timing trials (forward and backward in training)
    update no running statistics and accumulate no .grad: after one call the state is
    exactly that of one eager step."""
    from resnet_fused.functional import conv_bn_act as fu

    if slow == "fused":
        monkeypatch.setattr(fu, "_train_forward", _slowed(fu._train_forward, 0.3))
        monkeypatch.setattr(fu, "_eval_forward", _slowed(fu._eval_forward, 0.3))
    else:
        monkeypatch.setattr(fu, "_eager_unit", _slowed(fu._eager_unit, 0.3))
    conv, bn = _unit()
    conv_e, bn_e = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last)
    res = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last)
    out = resnet_fused.conv_bn_act(
        x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, padding=1,
        training=training, residual=res,
    )  # fmt: skip
    out.sum().backward()
    expected = torch.relu(bn_e.train(training)(conv_e(x)) + res)
    expected.sum().backward()
    ((key, pick),) = resnet_fused.auto_choices().items()
    assert pick == ("eager" if slow == "fused" else "cpu")
    assert key[0] == "conv_bn_act" and key[7] == training and key[11] is True  # grad timed
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_mean, bn_e.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, bn_e.running_var, rtol=1e-5, atol=1e-6)
    for p, p_e in [(conv.weight, conv_e.weight), (bn.weight, bn_e.weight), (bn.bias, bn_e.bias)]:
        torch.testing.assert_close(p.grad, p_e.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_batch_norm_act_trials_leave_running_statistics_alone(timed_policy):
    bn = torch.nn.BatchNorm2d(8)
    bn_e = copy.deepcopy(bn)
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    for _ in range(3):
        out = resnet_fused.batch_norm_act(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, 1e-5
        )
        out.sum().backward()
        torch.relu(bn_e(x)).sum().backward()
    assert len(timed_policy) == 1
    assert set(resnet_fused.auto_choices().values()) <= {"cpu", "eager"}
    torch.testing.assert_close(bn.running_mean, bn_e.running_mean)
    torch.testing.assert_close(bn.running_var, bn_e.running_var)
    torch.testing.assert_close(bn.weight.grad, bn_e.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_converted_resnet_trains_like_eager_under_the_timed_choice(timed_policy):
    """A converted ResNet-18 under the users' default policy: whatever each unit picks,
    two SGD steps match the eager model's (outputs, every gradient, running statistics;
    fp64, so that any wrong wiring shows far above rounding)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    model = model.to(memory_format=torch.channels_last)
    eager = copy.deepcopy(model)
    fused = resnet_fused.convert(copy.deepcopy(model))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, fused)]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64).to(memory_format=torch.channels_last)
    for _ in range(2):
        outs = []
        for m, opt in zip((eager, fused), opts, strict=True):
            opt.zero_grad()
            out = m(x)
            out.square().mean().backward()
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
        for (name, p), p_f in zip(eager.named_parameters(), fused.parameters(), strict=True):
            torch.testing.assert_close(p_f.grad, p.grad, rtol=1e-7, atol=1e-9, msg=name)
        for opt in opts:
            opt.step()
    for (name, b), b_f in zip(eager.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(b_f, b, rtol=1e-9, atol=1e-12, msg=name)
    picks = resnet_fused.auto_choices()
    assert sum(k[0] == "conv_bn_act" for k in picks) >= 10  # the distinct unit shapes
    assert len(timed_policy) == len(picks)


def test_no_timing_under_compile_or_graph_capture(monkeypatch):
    monkeypatch.setenv(fc.POLICY_ENV, "time")
    monkeypatch.setattr(fc, "_AUTO_CHOICES", fc._AutoChoices())

    def trial(c):
        raise AssertionError("no timing expected")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cuda = torch.device("cuda")
    assert not fc.timing_allowed(cuda)
    assert fc.choose(("g",), ["cuda", "triton", "eager"], trial, cuda) == "cuda"
    fc._AUTO_CHOICES.put(("g", ("cuda", "triton", "eager")), "eager")
    assert fc.choose(("g",), ["cuda", "triton", "eager"], trial, cuda) == "eager"  # cached
    assert fc.timing_allowed(torch.device("cpu"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fc.timing_allowed(torch.device("cpu"))
    assert fc.choose(("c",), ["cpu", "eager"], trial, torch.device("cpu")) == "cpu"
    assert fc.auto_choices() == {("g", ("cuda", "triton", "eager")): "eager"}


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_compiled_unit_runs_without_timing(timed_policy):
    conv, bn = _unit()
    x = torch.randn(2, 8, 6, 6)

    def f(x):
        return resnet_fused.conv_bn_act(
            x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, padding=1
        )

    with torch.no_grad():
        out = torch.compile(f, fullgraph=True)(x)
        torch.testing.assert_close(out, torch.relu(bn.eval()(conv(x))), rtol=1e-4, atol=1e-4)
    assert timed_policy == []


def test_conv_backend_variable_forces_a_fused_backend(monkeypatch):
    monkeypatch.setenv(fc.POLICY_ENV, "time")
    monkeypatch.setenv(fc.CONV_BACKEND_ENV, "torch")
    conv, _ = _unit()
    x = torch.randn(2, 8, 6, 6)
    picks = []
    monkeypatch.setattr(fc, "choose", lambda *a, **k: picks.append(a) or "eager")
    impl = fc._resolve_conv_backend(
        "auto", x, conv.weight, ((1, 1), (1, 1), (1, 1), 1), True, None, True, None
    )
    assert impl == "torch" and not picks


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_autocast_training_step_under_each_policy(auto_policy, layout):
    """bf16 autocast on the CPU, each policy: the converted model's gradients (all
    parameters, relative 2-norm error against the fp64 model) are within twice the eager
    model's own autocast error (which is large: bf16 through 18 layers)."""
    import torchvision

    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = torchvision.models.resnet18(num_classes=10).to(memory_format=fmt)
    ref = copy.deepcopy(model).double()
    fused = resnet_fused.convert(copy.deepcopy(model))
    x = torch.randn(4, 3, 64, 64).to(memory_format=fmt)
    ref(x.double()).square().mean().backward()
    g64 = torch.cat([p.grad.flatten() for p in ref.parameters()])

    def error(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x).float().square().mean()
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in m.parameters()]).double()
        return ((g - g64).norm() / g64.norm()).item()

    eager_err, fused_err = error(model), error(fused)
    assert fused_err <= 2 * eager_err + 1e-3, (auto_policy, fused_err, eager_err)
    if auto_policy == "eager":
        assert fused_err == eager_err  # the same ops


def test_timing_trials_leave_the_random_stream_alone(timed_policy):
    """A first training call that times its candidates (forward and backward, with a
    random output gradient) leaves torch's default generator where eager's modules
    leave it, so a seeded run draws the same dropout masks after it."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
    fused = resnet_fused.FusedConvBNReLU2d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn))
    eager = nn.Sequential(conv, bn, nn.ReLU())
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    states = []
    for m in (eager, fused):
        torch.manual_seed(123)
        m(x).sum().backward()
        states.append(torch.random.get_rng_state())
    assert timed_policy, "the fused call timed its candidates"
    assert torch.equal(states[0], states[1])


def test_inference_units_keep_the_fused_path_on_close_calls(monkeypatch):
    """On a CPU an inference unit's pick stays with the first candidate (oneDNN with the
    BatchNorm folded in) unless another is faster by CPU_PREFERENCE_MARGIN in the trial;
    training units, other ops and other devices take the plain fastest. A tuning table's
    entry for an inference unit is picked again from its times by the same rule."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    margin = fc.CPU_PREFERENCE_MARGIN
    close = {"cpu": 1.0, "cpu-epilogue": 1.0 / (1 + margin / 2), "eager": 1.0 / (1 + margin / 3)}
    clear = dict(close, eager=1.0 / (1 + 2 * margin))
    names = ["cpu", "cpu-epilogue", "eager"]
    assert fc.pick(names, close, cpu, prefer_first=True) == "cpu"
    assert fc.pick(names, clear, cpu, prefer_first=True) == "eager"
    assert fc.pick(names, close, cpu) == "cpu-epilogue"
    assert fc.pick(["cuda", "triton", "eager"], {"cuda": 1.0, "triton": 0.97, "eager": 2.0},
                   cuda, prefer_first=True) == "triton"  # fmt: skip

    # Wired to the conv unit: eval without autograd prefers, training does not.
    monkeypatch.setenv(fc.POLICY_ENV, "time")
    monkeypatch.setattr(fc, "_AUTO_CHOICES", fc._AutoChoices())
    monkeypatch.setattr(
        fc, "_time_candidates",
        lambda candidates, trial, device, repeats=5: {c: close.get(c, 1.0) for c in candidates},
    )  # fmt: skip
    conv, bn = _unit()
    x = torch.randn(2, 8, 6, 6)
    for training in (False, True):
        with torch.no_grad():
            resnet_fused.conv_bn_act(
                x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                padding=1, training=training,
            )  # fmt: skip
    picks = {key[7]: p for key, p in resnet_fused.auto_choices().items()}
    assert picks[False] == "cpu"  # (cpu-epilogue is 5% faster: a close call)
    assert picks[True] == "eager"  # (training: cpu or eager, eager 3% faster: the fastest)

    # A stored pick made under the plain rule is made again for an inference unit.
    monkeypatch.setattr(
        fc.tuning_cache, "lookup", lambda key, device, candidates: ("eager", close, "cache")
    )
    assert fc.choose(("s",), names, None, cpu, prefer_first=True) == "cpu"
    assert fc.choose(("t",), names, None, cpu) == "eager"  # (the table's own pick)
