"""How ``backend="auto"`` runs an op at a given shape: the fused kernels, or eager
PyTorch where eager measures faster.

For every op call under ``backend="auto"`` the candidates are the fused backends that can
run the tensors (``"cpu"`` on a CPU; ``"cuda"`` and, for the convolution units,
``"triton"`` on a GPU) and ``"eager"``: the unfused aten ops a user's unconverted model
runs (``F.conv2d``, ``F.batch_norm``, add, ReLU). The first call with a new key times each
candidate (forward, plus backward when autograd records the call: the training step is
what is measured), interleaved over a few rounds, and keeps the fastest in a bounded,
thread-safe cache (:func:`auto_choices`). So ``"auto"`` is never slower than eager by more
than the timing's noise, at the price of one short timing per shape. The picks are kept
on disk per machine (:mod:`.tuning_cache`, ``$RESNET_FUSED_CACHE_DIR``): a new process
uses them instead of timing again, and ``resnet-fused tune`` fills the table ahead of
training. :func:`auto_choice_sources` says where each pick came from.

``RESNET_FUSED_AUTO`` sets the policy, read at each call:
    ``time`` (default)  time the candidates once per key, as above;
    ``fused``           always the fused kernels (never eager; no timing on a CPU);
    ``eager``           always eager PyTorch.
``RESNET_FUSED_CONV_BACKEND`` forces the fused backend of the Conv+BN units (no timing).

No timing happens while a CUDA stream is capturing a graph or for synchronised BatchNorm
(the trials would run collectives): those calls use the cached pick when there is one,
else the fused kernels. Under ``torch.compile`` the fused kernels are traced (its graph
fuses eager ops itself; the fused ops are opaque custom ops to it).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from .._layout import bn_memory_format
from ..backends import resolve_backend, unavailable_reason
from . import tuning_cache

__all__ = [
    "EAGER",
    "POLICY_ENV",
    "auto_choice_sources",
    "auto_choices",
    "auto_policy",
    "auto_timings",
    "reset",
]

EAGER = "eager"
POLICY_ENV = "RESNET_FUSED_AUTO"
POLICIES = ("time", "fused", "eager")
CONV_BACKEND_ENV = "RESNET_FUSED_CONV_BACKEND"


# Where a pick came from (auto_choice_sources): timed by this process, read from the
# tuning table (timed by an earlier process), or read from the table and timed there by
# ``resnet-fused tune``.
TIMED, CACHE, TUNED = "timed", "cache", "tuned"


class _AutoChoices:
    """The per-key picks of ``backend="auto"``: a bounded LRU map (key -> (pick, times,
    source)), safe to use from several threads. Timing happens outside the lock; two
    threads that time the same new key at once both store an answer of the same kind."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._picks: OrderedDict[tuple, tuple[str, dict[str, float], str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> str | None:
        with self._lock:
            entry = self._picks.get(key)
            if entry is None:
                return None
            self._picks.move_to_end(key)
            return entry[0]

    def put(
        self, key: tuple, choice: str, times: dict[str, float] | None = None, source: str = TIMED
    ) -> None:
        with self._lock:
            self._picks[key] = (choice, dict(times or {}), source)
            self._picks.move_to_end(key)
            while len(self._picks) > self.capacity:
                self._picks.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._picks.clear()

    def snapshot(self) -> dict[tuple, str]:
        with self._lock:
            return {k: v[0] for k, v in self._picks.items()}

    def timings(self) -> dict[tuple, dict[str, float]]:
        with self._lock:
            return {k: dict(v[1]) for k, v in self._picks.items()}

    def sources(self) -> dict[tuple, str]:
        with self._lock:
            return {k: v[2] for k, v in self._picks.items()}

    def __len__(self) -> int:
        return len(self._picks)


_AUTO_CHOICES = _AutoChoices()


def auto_choices() -> dict[tuple, str]:
    """The picks ``backend="auto"`` made so far: key -> ``"cpu"``/``"cuda"``/``"triton"``
    (fused) or ``"eager"``. A key starts with the op's name (``"conv_bn_act"``,
    ``"batch_norm_act"``, ``"add_relu"``), then what the timing depended on (batch size
    bucketed to a power of two, the other dimensions, dtype, layout, mode, epilogue,
    whether the backward was timed, device, ...)."""
    return _AUTO_CHOICES.snapshot()


def auto_timings() -> dict[tuple, dict[str, float]]:
    """The median time in ms of every candidate behind each pick of :func:`auto_choices`
    (empty for a pick that was not timed; for a pick read from the tuning table, the
    times stored with it)."""
    return _AUTO_CHOICES.timings()


def auto_choice_sources() -> dict[tuple, str]:
    """Where each pick of :func:`auto_choices` (same keys) came from: ``"timed"`` (timed
    by this process), ``"cache"`` (read from the tuning table on disk, timed by an
    earlier process) or ``"tuned"`` (read from the table, timed by ``resnet-fused
    tune``)."""
    return _AUTO_CHOICES.sources()


def reset() -> None:
    """Forget every pick of this process and everything read from the tuning table (the
    next new key reads the table again); for tests and benchmarks that time afresh."""
    _AUTO_CHOICES.clear()
    tuning_cache.reset()


def auto_policy() -> str:
    """``RESNET_FUSED_AUTO`` as read now: ``"time"`` (default), ``"fused"`` or ``"eager"``."""
    value = os.environ.get(POLICY_ENV, "").strip().lower() or "time"
    if value not in POLICIES:
        raise ValueError(
            f"{POLICY_ENV} must be one of {', '.join(POLICIES)} (or unset), got {value!r}"
        )
    return value


def forced_conv_backend() -> str | None:
    return os.environ.get(CONV_BACKEND_ENV, "").strip() or None


def batch_bucket(n: int) -> int:
    """Batch sizes share a pick within a power of two (a last, smaller batch of an epoch
    does not time the op again)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def layout_class(t: torch.Tensor) -> str:
    """The layout a kernel's speed depends on."""
    if t.dim() == 4 and bn_memory_format(t) == torch.channels_last and not t.is_contiguous():
        return "channels_last"
    return "contiguous" if t.is_contiguous() else "strided"


def tf32_mode(dtype: torch.dtype) -> bool | None:
    """fp32 convolutions on cuDNN and Triton follow ``torch.backends.cudnn.allow_tf32``."""
    return bool(torch.backends.cudnn.allow_tf32) if dtype == torch.float32 else None


def timing_allowed(device: torch.device) -> bool:
    """False under torch.compile tracing and while a CUDA stream captures a graph."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn`` in ms: CUDA events on ``device``'s current stream,
    else the host clock."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _measure(fn, device: torch.device, repeats: int = 5) -> float:
    """Median time of ``fn`` in ms after one warm-up call (compiles and autotunes)."""
    return _time_candidates(["only"], lambda _: fn(), device, repeats)["only"]


# A timed sample lasts at least this long (a block of calls): single calls of a small op
# are below a CPU timer's noise (a preempted OpenMP thread costs a scheduler tick).
_SAMPLE_MS = {"cpu": 2.0, "cuda": 0.5}
_MAX_CALLS_PER_SAMPLE = 64


def _time_candidates(
    candidates: Sequence[str], trial: Callable[[str], object], device: torch.device,
    repeats: int = 5, decided_after: int = 3, clear_ratio: float = 1.15,
) -> dict[str, float]:  # fmt: skip
    """Median ms per call of ``trial(c)`` for each candidate: a warm-up call each (it
    compiles, autotunes, allocates, starts thread pools), a timed call each that sizes
    the samples (blocks of calls of at least ``_SAMPLE_MS``), then up to ``repeats``
    rounds that time one sample of every candidate in a rotated order, so that a drifting
    machine charges them alike. After ``decided_after`` rounds it stops when the fastest
    median is ahead of every other by ``clear_ratio`` (a close call gets every round)."""
    ctx = torch.cuda.device(device) if device.type == "cuda" else _null()
    with ctx:
        for c in candidates:
            trial(c)
        warm = [_time_once(lambda c=c: trial(c), device) for c in candidates]
        target = _SAMPLE_MS.get(device.type, 1.0)
        calls = max(1, min(_MAX_CALLS_PER_SAMPLE, int(target / max(min(warm), 1e-3)) + 1))

        def block(c):
            for _ in range(calls):
                trial(c)

        def medians():
            return {c: sorted(s)[len(s) // 2] for c, s in samples.items()}

        samples: dict[str, list[float]] = {c: [] for c in candidates}
        for r in range(repeats):
            for i in range(len(candidates)):
                c = candidates[(i + r) % len(candidates)]
                samples[c].append(_time_once(lambda c=c: block(c), device) / calls)
            if r + 1 >= decided_after and len(candidates) > 1:
                times = sorted(medians().values())
                if times[0] * clear_ratio < times[1]:
                    break
    return medians()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# A CPU inference unit (eval, no autograd) keeps its first candidate (the backend's own
# path: one oneDNN convolution with the BatchNorm folded in and the activation and
# residual as post-ops) unless another is faster in the trial by this margin. A trial runs
# one unit back to back, its weights and operands hot in cache; in a model each unit meets
# them after the other layers' traffic, which costs the candidates that make more passes
# over memory (aten's convolution and a separate epilogue pass, eager's unfolded BatchNorm
# and activation) more than the trial shows, and close calls flip with the machine's noise
# from one process to the next. Measured on ResNet-50 inference (one thread,
# channels_last, interleaved in one process): the plain timed picks, whose close calls
# went to the aten convolution, ran 2.7% (batch 1) and 3.5% (batch 8) slower than the
# first candidate throughout; with the margin, level with it. Clear wins (the stem's aten
# convolution, eager's unit at tiny tensors) are kept. Training picks are the plain
# fastest: the same margin there made small models' training steps slower (the trials of
# a training unit time its backward too, and close calls there went the other way).
CPU_PREFERENCE_MARGIN = 0.10


def pick(
    candidates: Sequence[str], times: dict[str, float], device: torch.device,
    prefer_first: bool = False,
) -> str:  # fmt: skip
    """The pick from ``times`` (ms per call of each candidate): the fastest; with
    ``prefer_first`` on a CPU, the first candidate unless the fastest beats it by
    :data:`CPU_PREFERENCE_MARGIN`."""
    best = min(candidates, key=lambda c: times[c])  # ties: the earlier (fused) one
    first = candidates[0]
    close = times[best] * (1.0 + CPU_PREFERENCE_MARGIN) >= times[first]
    if prefer_first and device.type == "cpu" and best != first and close:
        return first
    return best


def choose(
    key: tuple | Callable[[], tuple],
    candidates: Sequence[str],
    trial: Callable[[str], object],
    device: torch.device,
    *,
    can_time: bool = True,
    prefer_first: bool = False,
) -> str:
    """The pick for ``key`` among ``candidates`` (fused backends, in the order of
    preference when nothing is timed, and possibly ``"eager"``), under the policy of
    ``RESNET_FUSED_AUTO``. ``trial(c)`` runs candidate ``c`` once as the real call
    would (forward, and backward when the call records autograd) without side effects
    on the caller's state. ``key`` may be a function that builds it: it is called only
    when there is a choice to make (not under the "eager" or a one-candidate "fused"
    policy, not under torch.compile). A key this process has not seen is looked up in
    the tuning table (:mod:`.tuning_cache`) before it is timed; a new timed pick is
    added to the table. ``prefer_first``: an inference unit's pick (see
    :data:`CPU_PREFERENCE_MARGIN`)."""
    policy = auto_policy()
    if policy == EAGER and EAGER in candidates:
        return EAGER
    if policy == "fused":
        candidates = [c for c in candidates if c != EAGER] or list(candidates)
    candidates = list(candidates)
    if len(candidates) == 1:
        return candidates[0]
    fused_first = next((c for c in candidates if c != EAGER), candidates[0])
    if torch.compiler.is_compiling():
        return fused_first  # (the cache's lock is not traceable)
    key = (*(key() if callable(key) else key), tuple(candidates))
    choice = _AUTO_CHOICES.get(key)
    if choice is not None:
        return choice
    stored = tuning_cache.lookup(key, device, candidates)  # read once per process
    if stored is not None:
        choice, times, source = stored
        if prefer_first and all(isinstance(times.get(c), (int, float)) for c in candidates):
            # (a table written before this rule: the pick made again from its times)
            choice = pick(candidates, times, device, prefer_first)
        _AUTO_CHOICES.put(key, choice, times, source)
        return choice
    if not (can_time and timing_allowed(device)):
        return fused_first
    times = _time_candidates(candidates, trial, device)
    choice = pick(candidates, times, device, prefer_first)
    _AUTO_CHOICES.put(key, choice, times)
    tuning_cache.record(key, device, choice, times)
    return choice


def grad_trial(forward: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor | None]):
    """A trial that runs ``forward(impl, *leaves)`` and its backward: ``leaves`` are
    detached aliases of ``tensors`` (those that require grad stay requiring grad), the
    gradients go to ``torch.autograd.grad`` and nowhere else (no ``.grad`` is touched),
    with one random output gradient in the output's layout (drawn from a generator of its
    own: the default one is left as it was). Nothing is prepared until
    the first trial runs (most calls find their pick cached and never run one)."""
    state: dict[str, list] = {}

    def trial(impl: str):
        if not state:
            leaves = [
                None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors
            ]
            state["leaves"] = leaves
            state["wrt"] = [t for t in leaves if t is not None and t.requires_grad]
            state["grad_out"] = []
        with torch.enable_grad():
            out = forward(impl, *state["leaves"])
            if not state["grad_out"]:
                # from a generator of its own: a trial must not move the user's random
                # stream (a seeded run's dropout masks would then differ from eager's)
                gen = torch.Generator(device=out.device)
                gen.manual_seed(0)
                state["grad_out"].append(torch.empty_like(out).normal_(generator=gen))
            torch.autograd.grad(out, state["wrt"], state["grad_out"][0])
        return out

    return trial


def make_trial(forward: Callable[..., torch.Tensor], tensors, grad: bool):
    """``"auto"``'s timing trial of ``forward(impl, *tensors)``: with its backward when the
    call records autograd (what a training step runs, :func:`grad_trial`), else under
    no_grad."""
    if grad:
        return grad_trial(forward, tensors)

    def trial(impl):
        with torch.no_grad():
            return forward(impl, *tensors)

    return trial


def conv_unit_key(x, w, geometry, training, residual, act, conv_bias=None, grad=False):
    """What a Conv+BN unit's timing depends on: shapes (batch bucketed), dtype, layout,
    geometry, mode, epilogue (residual; the activation as ``(code, parameter)``), conv
    bias, whether the backward is timed, the TF32 mode and device."""
    return (
        "conv_bn_act",
        batch_bucket(x.shape[0]),
        tuple(x.shape[1:]),
        x.dtype,
        bn_memory_format(x),
        tuple(w.shape),
        geometry,
        training,
        residual is not None,
        act.args,
        conv_bias is not None,
        grad,
        tf32_mode(x.dtype),
        x.device,
    )


def _resolve_conv_backend(
    backend, x, w, geometry, training, residual, act, trial, conv_bias=None, *, grad=False,
    can_time=True, alternative: str | None = None,
) -> str:  # fmt: skip
    """Like resolve_backend, but ``"auto"`` picks the fastest of the fused backends (on
    CUDA cuDNN + the CUDA BatchNorm kernels, or the Triton convolution) and eager for this
    unit, timed once per :func:`conv_unit_key` (``RESNET_FUSED_CONV_BACKEND`` forces a
    fused backend). ``alternative``: another way of running the unit on the resolved
    backend (the CPU eval unit's aten convolution + epilogue), timed with the others
    under the ``time`` policy only (``fused`` runs the backend's own path, untimed)."""
    device = x.device
    impl = resolve_backend(backend, device)
    if backend != "auto" or impl == "torch":
        return impl
    forced = forced_conv_backend()
    if forced:
        return resolve_backend(forced, device)
    fused = [impl]
    if alternative is not None and auto_policy() == "time":
        fused.append(alternative)
    if device.type == "cuda":
        fused = [c for c in ("cuda", "triton") if unavailable_reason(c, device) is None]
    return choose(
        lambda: conv_unit_key(x, w, geometry, training, residual, act, conv_bias, grad),
        [*fused, EAGER], trial, device, can_time=can_time,
        prefer_first=not training and not grad,
    )  # fmt: skip
