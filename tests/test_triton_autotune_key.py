"""The Triton conv autotuner's key separates every launch whose best tile configuration
may differ: output size P, Q (not only M = N*P*Q), stride, padding, dilation, dtype, the
TF32 flag and the input/residual layout. The key is computed from the arguments of a real
launch exactly as triton.runtime.autotuner.Autotuner.run does (its ``keys`` over the named
arguments, then the dtype of every tensor argument)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from resnet_fused.triton import conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Recorder:
    """Stands in for an autotuned kernel: records the launch, computes the tuner's key."""

    def __init__(self, tuned):
        self.tuned = tuned
        self.keys = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = {**dict(zip(self.tuned.arg_names, args, strict=False)), **kwargs}
            named = {k: v for k, v in named.items() if k in self.tuned.arg_names}
            key = [named[k] for k in self.tuned.keys if k in named]
            key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
            self.keys.append(tuple(key))

        return launch


@pytest.fixture
def tune_key(monkeypatch):
    monkeypatch.setattr(conv, "_pinned_config", lambda: None)  # the autotuned path
    rec32 = _Recorder(conv._conv_tuned_fp32)
    rec16 = _Recorder(conv._conv_tuned_half)
    monkeypatch.setattr(conv, "_conv_tuned_fp32", rec32)
    monkeypatch.setattr(conv, "_conv_tuned_half", rec16)

    def key(n, cin, h, w, cout, k, s, p, d, *, dtype=torch.float32, cl=False, res=None):
        x = torch.randn(n, cin, h, w, device=DEVICE, dtype=dtype)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        wp = conv.pack_weight(torch.randn(cout, cin, k, k, device=DEVICE, dtype=dtype))
        rec = rec32 if dtype == torch.float32 else rec16
        before = len(rec.keys)
        out, _ = conv.conv2d(x, wp, (k, k), (s, s), (p, p), (d, d), residual=res)
        assert len(rec.keys) == before + 1
        return rec.keys[-1], out.shape

    return key


BASE = (1, 4, 8, 8, 4, 3, 1, 1, 1)  # N, Cin, H, W, Cout, k, stride, padding, dilation


def test_key_separates_padding_and_dilation_with_equal_output(tune_key):
    base, shape = tune_key(*BASE)
    no_pad, shape_p = tune_key(1, 4, 10, 10, 4, 3, 1, 0, 1)
    dilated, shape_d = tune_key(1, 4, 10, 10, 4, 3, 1, 1, 2)
    assert shape == shape_p == shape_d  # same M, Cout, Cin, R, S, stride
    assert len({base, no_pad, dilated}) == 3


def test_key_separates_output_height_and_width_with_equal_m(tune_key):
    square, shape = tune_key(*BASE)  # P = Q = 8
    wide, shape_w = tune_key(1, 4, 4, 16, 4, 3, 1, 1, 1)  # P = 4, Q = 16
    assert shape[2] * shape[3] == shape_w[2] * shape_w[3]
    assert square != wide


def test_key_separates_stride(tune_key):
    assert tune_key(*BASE)[0] != tune_key(1, 4, 16, 16, 4, 3, 2, 1, 1)[0]


def test_key_separates_tf32_flag(tune_key, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    tf32, _ = tune_key(*BASE)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ieee, _ = tune_key(*BASE)
    assert tf32 != ieee


def test_key_separates_input_and_residual_layout(tune_key):
    nchw, shape = tune_key(*BASE)
    nhwc, _ = tune_key(*BASE, cl=True)
    assert nchw != nhwc
    res = torch.randn(shape, device=DEVICE)
    res_nchw, _ = tune_key(*BASE, res=res)
    res_nhwc, _ = tune_key(*BASE, res=res.to(memory_format=torch.channels_last))
    assert res_nchw != res_nhwc


def test_key_separates_dtype(tune_key):
    assert tune_key(*BASE, dtype=torch.float16)[0] != tune_key(*BASE, dtype=torch.bfloat16)[0]
