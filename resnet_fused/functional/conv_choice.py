"""How ``backend="auto"`` picks the convolution of a Conv+BN unit on CUDA (cuDNN or the
Triton implicit GEMM): timed once per layer key, kept in a bounded, thread-safe cache
(:func:`auto_choices`); ``RESNET_FUSED_CONV_BACKEND`` forces one."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch

from .._layout import bn_memory_format
from ..backends import resolve_backend, unavailable_reason

__all__ = ["auto_choices"]


class _AutoChoices:
    """The per-layer picks of ``backend="auto"``: a bounded LRU map (key -> backend),
    safe to use from several threads. Timing happens outside the lock; two threads that
    time the same new key at once both store the same kind of answer."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._picks: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> str | None:
        with self._lock:
            choice = self._picks.get(key)
            if choice is not None:
                self._picks.move_to_end(key)
            return choice

    def put(self, key: tuple, choice: str) -> None:
        with self._lock:
            self._picks[key] = choice
            self._picks.move_to_end(key)
            while len(self._picks) > self.capacity:
                self._picks.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._picks.clear()

    def snapshot(self) -> dict[tuple, str]:
        with self._lock:
            return dict(self._picks)

    def __len__(self) -> int:
        return len(self._picks)


_AUTO_CHOICES = _AutoChoices()


def _batch_bucket(n: int) -> int:
    """Batch sizes share a pick within a power of two (a last, smaller batch of an epoch
    does not time the layer again)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _auto_key(x, w, geometry, training, residual, relu, conv_bias=None) -> tuple:
    """What a layer's timing depends on: shapes (batch bucketed), dtype, layout,
    geometry, mode, epilogue, conv bias, TF32 mode (fp32 convolutions on cuDNN and
    Triton follow ``torch.backends.cudnn.allow_tf32``) and device."""
    return (
        _batch_bucket(x.shape[0]),
        tuple(x.shape[1:]),
        x.dtype,
        bn_memory_format(x),
        tuple(w.shape),
        geometry,
        training,
        residual is not None,
        relu,
        conv_bias is not None,
        bool(torch.backends.cudnn.allow_tf32) if x.dtype == torch.float32 else None,
        x.device,
    )


def _measure(fn, device: torch.device, repeats: int = 5) -> float:
    """Median time of ``fn`` in ms, with events recorded on ``device``'s current stream."""
    with torch.cuda.device(device):
        fn()  # warm-up: compiles and autotunes
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def auto_choices() -> dict[tuple, str]:
    """The per-shape picks ``backend="auto"`` made so far on CUDA (key -> backend)."""
    return _AUTO_CHOICES.snapshot()


def _choose(key: tuple, candidates, time_one) -> str:
    """The cached pick for ``key``, else the fastest candidate by ``time_one(c)``."""
    choice = _AUTO_CHOICES.get(key)
    if choice is None:
        times = {c: time_one(c) for c in candidates}
        choice = min(times, key=times.get)
        _AUTO_CHOICES.put(key, choice)
    return choice


def _resolve_conv_backend(
    backend, x, w, geometry, training, residual, relu, run, conv_bias=None
) -> str:
    """Like resolve_backend, but on CUDA "auto" times the cuDNN ("cuda") and Triton paths
    for this layer once and keeps the faster (override: RESNET_FUSED_CONV_BACKEND)."""
    impl = resolve_backend(backend, x.device)
    if backend != "auto" or x.device.type != "cuda":
        return impl
    forced = os.environ.get("RESNET_FUSED_CONV_BACKEND", "").strip()
    if forced:
        return resolve_backend(forced, x.device)
    candidates = [c for c in ("cuda", "triton") if unavailable_reason(c, x.device) is None]
    if len(candidates) < 2 or torch.compiler.is_compiling():
        return impl
    key = _auto_key(x, w, geometry, training, residual, relu, conv_bias)

    def time_one(c):
        with torch.no_grad():
            return _measure(lambda: run(c), x.device)

    return _choose(key, candidates, time_one)
