"""The per-layer choice of ``backend="auto"`` (cuDNN or Triton convolution on CUDA):
what its cache keys on, its bound, its thread safety, and that a trial times what the
real call runs. The timing itself needs a GPU; the cache and the trial wiring are tested
here with stand-in timings."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import backend_params

import resnet_fused
from resnet_fused.functional import conv_bn_act as fc_unit
from resnet_fused.functional import conv_choice as fc


def _key(n=8, tf32=True, bias=False, dtype=torch.float32):
    x = torch.empty(n, 4, 6, 6, dtype=dtype)
    w = torch.empty(8, 4, 3, 3, dtype=dtype)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        return fc._auto_key(
            x, w, ((1, 1), (1, 1), (1, 1), 1), True, None, True,
            torch.empty(8) if bias else None,
        )  # fmt: skip
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_key_has_tf32_mode_conv_bias_and_a_batch_bucket():
    assert _key(tf32=True) != _key(tf32=False)  # fp32 convolutions change speed with TF32
    assert _key(tf32=True, dtype=torch.bfloat16) == _key(tf32=False, dtype=torch.bfloat16)
    assert _key(bias=True) != _key(bias=False)
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
    monkeypatch.setattr(fc, "_AUTO_CHOICES", fc._AutoChoices(capacity=4))
    timed = []

    def time_one(c):
        timed.append(c)
        return {"cuda": 2.0, "triton": 1.0}[c]

    assert fc._choose(("k",), ["cuda", "triton"], time_one) == "triton"
    assert fc._choose(("k",), ["cuda", "triton"], time_one) == "triton"
    assert timed == ["cuda", "triton"]
    assert fc.auto_choices() == {("k",): "triton"}


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_eval_trial_uses_the_packed_weight_the_real_call_uses(backend, monkeypatch):
    """A module's cached fold carries the packed Triton weight; the trial that times
    Triton must run with it (not pack the weight inside the timed call)."""
    from resnet_fused.triton import conv as triton_conv

    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 3, 3)
    b = torch.randn(8)
    packed = triton_conv.pack_weight(w)
    packs, trials = [], []
    monkeypatch.setattr(
        fc_unit, "_triton_pack", lambda t: packs.append(t) or triton_conv.pack_weight(t)
    )

    def fake_resolve(backend, x, w, geometry, training, residual, relu, run, conv_bias=None):
        trials.append(run("triton"))
        return "triton"

    monkeypatch.setattr(fc_unit, "_resolve_conv_backend", fake_resolve)
    with torch.no_grad():
        out = resnet_fused.conv_bn_act(
            x, w, None, None, torch.zeros(8), torch.ones(8), padding=1, backend="auto",
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
