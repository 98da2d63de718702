"""The harness every bench level runs on: providers, inputs, a correctness check before
timing, interleaved timing, ratio summaries and the CSV/markdown/PNG writer.

A level supplies its cases and, per case, one no-argument *step* per provider (a
training step, an inference, an op's forward+backward). :func:`measure_case` then

1. calls every step once and compares what it returns with the baseline provider's
   (``‖a − b‖ / ‖b‖`` over the returned tensors, the worst of them, leaving out the
   largest 0.1% of element differences: ReLU kinks within rounding); a provider that
   differs by more than the tolerance is refused with a :class:`MismatchError` — a
   sanity gate against timing different maths, not the correctness test (the test
   suite compares every backend with the fp64 reference);
2. warms every step up and picks, per provider, how many calls one timed block holds;
3. times the providers in alternating rounds: each round times one block of every
   provider, in an order rotated from round to round, so that drift of a shared machine
   (clock, other load) reaches every provider alike instead of becoming a ratio;
4. summarises per provider the median and inter-quartile range of the per-round times,
   and per pair of providers the *per-round* ratios (median, minimum and maximum): the
   spread of a ratio is measured, not inferred from the spreads of two times.

Timers: on a GPU, CUDA events around every call with the L2 cache flushed before each
(as ``triton.testing.do_bench``), the round's value being the median call; on a CPU,
``time.perf_counter`` around a block of calls with the garbage collector off (as
``timeit``/``torch.utils.benchmark``), the round's value being the mean call. The sync
level brings its own timer (a barrier before every step, the slowest rank's time).
"""

from __future__ import annotations

import functools
import gc
import math
import os
import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from . import report
from .timing import environment, keep_freed_host_memory, rotating, rotation_count

__all__ = [
    "ROUNDS",
    "TIMING_NOTE",
    "MismatchError",
    "Stats",
    "Writer",
    "default_tolerance",
    "input_sets",
    "interleave",
    "measure_case",
    "ratio_columns",
    "ratio_spread",
    "refuse_reference",
    "rel_diff",
    "rotating",
    "start",
    "timing_columns",
]

ROUNDS = 7  # alternating rounds per case (odd: the median is one of them)

Timer = Callable[[Callable[[], object], int], float]  # (step, calls) -> seconds per call


class MismatchError(ValueError):
    """A provider's first step differs from the baseline's beyond the tolerance."""


def start(device: torch.device) -> dict:
    """Per-run setup (steady-state host allocator on a CPU); the environment columns
    every row carries."""
    if device.type == "cpu":
        keep_freed_host_memory()
    return environment(device)


def input_sets(make: Callable[[], tuple], bytes_per_set: int, device, cap: int = 8) -> list:
    """Enough independent input sets (``make()`` each) that rotating through them reads
    more than twice the last-level cache, so that no provider is timed from cache."""
    return [make() for _ in range(rotation_count(bytes_per_set, device, cap))]


def refuse_reference(providers: Sequence[str], device: torch.device) -> None:
    """A ``ValueError`` when a provider that stands for the default fused backend
    (``fused``, ``auto``) would run the pure-PyTorch reference because the compiled
    extension did not import: timing it under a fused name would report the reference
    as the fused kernels."""
    from resnet_fused.backends import auto_backend

    backend, why = auto_backend(device)
    labelled = [p for p in providers if p in ("fused", "auto")]
    if labelled and backend == "torch" and why is not None:
        raise ValueError(
            f"provider(s) {labelled} would time backend 'torch' (the pure-PyTorch reference) "
            f"under a fused name, because {why}. Build the extension, or choose providers "
            "that name a usable backend (see `resnet-fused info`)"
        )


# ---------------------------------------------------------------------------------------
# Correctness before timing


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def rel_diff(value, ref) -> float:
    """The worst ``‖a − b‖ / ‖b‖`` over the tensors of two step results, position by
    position, leaving out the largest 0.1% of the element differences (at least one).
    Where a pre-activation lies within rounding of zero two correct computations may put
    it on either side of a ReLU: that element's gradient then differs by a whole value
    (one such element of 1.6M gives ~1e-3 in the plain norm), while different maths
    differs everywhere."""
    worst = 0.0
    for a, b in zip(_tensors(value), _tensors(ref), strict=False):
        d = (a.detach().double() - b.detach().double()).flatten().abs()
        n, drop = d.numel(), max(1, math.ceil(1e-3 * d.numel()))
        if n > drop:
            d = d[d <= d.kthvalue(n - drop).values]
        worst = max(worst, (d.norm() / b.detach().double().norm().clamp_min(1e-30)).item())
    return worst


def default_tolerance(dtype: torch.dtype, device: torch.device, amp: bool = False) -> float:
    """The gate's bound on :func:`rel_diff`: fp32 on a CPU agrees to ~1e-6; bf16/fp16,
    autocast and TF32 convolutions on a GPU round at ~1e-3 per op. Different maths
    (another normalisation, a missing ReLU or residual) differs by 5e-2 and more."""
    low = amp or dtype in (torch.float16, torch.bfloat16) or device.type == "cuda"
    return 3e-2 if low else 1e-3


# ---------------------------------------------------------------------------------------
# Timers


def cpu_timer(
    fn: Callable[[], object], calls: int, sync: Callable[[], object] | None = None
) -> float:
    """Wall time per call of ``calls`` back-to-back calls, the garbage collector off;
    ``sync`` (a device synchronisation) before the clock starts and before it stops."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync is not None:
            sync()
        return (time.perf_counter() - t0) / calls
    finally:
        if enabled:
            gc.enable()


_FLUSH: dict[torch.device, torch.Tensor] = {}


def cuda_timer(device: torch.device) -> Timer:
    """Events around every call on ``device``'s current stream, L2 flushed before each;
    the median call in seconds."""
    device = torch.device(device)
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(256 << 20, dtype=torch.int8, device=device)
    flush = _FLUSH[device]

    def timer(fn: Callable[[], object], calls: int) -> float:
        with torch.cuda.device(device):
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
            for s, e in zip(starts, ends, strict=True):
                flush.zero_()
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize(device)
            return (
                statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
                / 1e3
            )

    return timer


def wall_timer(device: torch.device) -> Timer:
    """Wall time of ``calls`` back-to-back calls, the device synchronised before and after;
    seconds per call. What a host-bound step costs on a GPU: the host's time per call
    when the kernels are shorter than their launches (no L2 flush between calls, which
    would hide host time behind the flush kernel)."""
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_timer
    return functools.partial(cpu_timer, sync=functools.partial(torch.cuda.synchronize, device))


def _default_timer(device: torch.device) -> Timer:
    return cuda_timer(device) if device.type == "cuda" else cpu_timer


# ---------------------------------------------------------------------------------------
# Interleaved timing


def interleave(
    steps: dict[Hashable, Callable[[], object]],
    device: torch.device,
    min_run_time: float,
    rounds: int = ROUNDS,
    timer: Timer | None = None,
) -> dict[Hashable, list[float]]:
    """Seconds per call of every step, one value per round; the steps alternate within
    every round (order rotated by one each round). ``min_run_time`` is each provider's
    timed budget over all rounds (at least 0.1 s on a GPU)."""
    timer = timer or _default_timer(device)
    rounds = max(1, rounds)
    budget = max(min_run_time, 0.1) if device.type == "cuda" else min_run_time
    calls = {}
    for key, fn in steps.items():  # warm-up and a first estimate of one call
        est = min(timer(fn, 1), timer(fn, 1))
        if device.type == "cuda" and est < 0.025:  # as do_bench: ~25 ms of warm-up
            timer(fn, max(1, min(1000, int(0.025 / max(est, 1e-7)))))
            est = timer(fn, 5)
        calls[key] = max(1, min(10_000, math.ceil(budget / rounds / max(est, 1e-7))))
    keys = list(steps)
    per_round: dict[Hashable, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            per_round[key].append(timer(steps[key], calls[key]))
    return per_round


@dataclass
class Stats:
    """One provider's per-round times (seconds per call) and its check against the
    baseline."""

    times: list[float]
    rel_diff: float | None = None  # None: not checked (the baseline, or by design)
    extra: dict = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr_s(self) -> float:
        if len(self.times) < 4:
            return max(self.times) - min(self.times)
        q = statistics.quantiles(self.times, n=4)
        return q[2] - q[0]

    def ratio(self, ref: Stats) -> tuple[float, float, float]:
        """``ref``'s time over this one's, per round: (median, min, max)."""
        ratios = [a / b for a, b in zip(ref.times, self.times, strict=True)]
        return statistics.median(ratios), min(ratios), max(ratios)


_CHECK_SEED = 0


def measure_case(
    steps: dict[Hashable, Callable[[], object]],
    device: torch.device,
    min_run_time: float,
    *,
    baseline: Hashable | None = None,
    unchecked: Sequence[Hashable] = (),
    tolerance: float = 1e-3,
    rounds: int = ROUNDS,
    timer: Timer | None = None,
    reference: Callable[[], object] | None = None,
    twice_baseline_error: bool = False,
) -> dict[Hashable, Stats]:
    """Check every step against ``baseline``'s (first call), then time them interleaved.
    Steps in ``unchecked`` compute something else by design (the convolution alone).
    ``reference``, when given, computes the first call's result in fp64 (called at most
    once, only when a step is beyond the tolerance; not timed): a step beyond the
    tolerance from the baseline is still accepted when it is within the tolerance of the
    reference. The baseline's own rounding can put a pre-activation within rounding of a
    kink on the other side, and a per-channel sum (a BatchNorm's weight and bias
    gradients) then differs by a whole term; where the step agrees with the fp64 maths it
    computes the same thing. With ``twice_baseline_error``, the project's tolerance rule
    instead: accepted when its distance from the reference is at most twice the
    baseline's own plus the tolerance (whole models, where a training BatchNorm over a
    few values per channel amplifies any rounding: eager's own bf16 output can be tens of
    percent from fp64's).
    Each checked first call starts from the same random seed, so that steps drawing random
    numbers (a model's dropout in training) draw the same ones; the user's random state is
    restored afterwards."""

    def seeded(fn):
        state = torch.random.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            torch.manual_seed(_CHECK_SEED)
            return fn()
        finally:
            torch.random.set_rng_state(state)
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)

    first = {key: seeded(fn) for key, fn in steps.items()}
    ref = None
    diffs: dict[Hashable, float | None] = dict.fromkeys(steps)
    if baseline is not None:
        if baseline not in steps:
            raise ValueError(f"baseline provider {baseline!r} is not among {list(steps)}")
        for key in steps:
            if key == baseline or key in unchecked:
                continue
            diffs[key] = d = rel_diff(first[key], first[baseline])
            if d <= tolerance:
                continue
            if reference is not None and ref is None:
                ref = seeded(reference)
            d_ref = None if ref is None else rel_diff(first[key], ref)
            d_base = None if ref is None else rel_diff(first[baseline], ref)
            bound = tolerance + (2 * d_base if twice_baseline_error and d_base is not None else 0)
            if d_ref is not None and d_ref <= bound:
                continue
            against_ref = (
                ""
                if d_ref is None
                else f" and from the fp64 reference by {d_ref:.2e} ({baseline!r}: {d_base:.2e})"
            )
            raise MismatchError(
                f"provider {key!r} differs from {baseline!r} by {d:.2e} (relative norm)"
                f"{against_ref} on its first step, over the tolerance {tolerance:.0e}: it "
                "does not compute the same thing, so its time would not be comparable"
            )
    del first, ref
    per_round = interleave(steps, device, min_run_time, rounds, timer)
    return {key: Stats(per_round[key], diffs[key]) for key in steps}


def ratio_columns(name: str, stats: Stats, ref: Stats | None, digits: int = 3) -> dict:
    """``name`` = median per-round ratio ref/this, with ``name_min``/``name_max`` over
    the rounds; blanks when there is no reference."""
    if ref is None:
        return {name: "", f"{name}_min": "", f"{name}_max": ""}
    med, lo, hi = stats.ratio(ref)
    return {name: round(med, digits), f"{name}_min": round(lo, digits),
            f"{name}_max": round(hi, digits)}  # fmt: skip


def timing_columns(stats: Stats, digits: int = 4) -> dict:
    return {
        "median_ms": round(stats.median_s * 1e3, digits),
        "iqr_ms": round(stats.iqr_s * 1e3, digits),
        "rounds": len(stats.times),
        "rel_diff": "" if stats.rel_diff is None else f"{stats.rel_diff:.1e}",
    }


def ratio_spread(row: dict, name: str = "speedup_vs_eager") -> str:
    """``"1.02× (0.98–1.05)"``: a row's median per-round ratio and its range."""
    if row.get(name, "") == "":
        return "-"
    lo, hi = row.get(f"{name}_min", ""), row.get(f"{name}_max", "")
    spread = f" ({float(lo):.2f}–{float(hi):.2f})" if lo != "" and hi != "" else ""
    return f"{float(row[name]):.2f}×{spread}"


TIMING_NOTE = (
    "Providers are timed interleaved: {rounds} rounds, each timing every provider once "
    "in a rotated order; times are medians over the rounds, ratios are medians of the "
    "per-round ratios with their range (min–max over the rounds) in brackets."
)


# ---------------------------------------------------------------------------------------
# Writing


class Writer:
    """Rows to a CSV after every measurement (a timeout keeps what ran), then markdown
    and a PNG plot."""

    def __init__(self, stem: str) -> None:
        self.stem, self.rows = stem, []
        os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)

    def __call__(self, row: dict) -> None:
        self.rows.append(row)
        report.write_csv(self.rows, self.stem + ".csv")

    def finish(self, markdown: str, label_keys: tuple[str, ...], title: str) -> None:
        with open(self.stem + ".md", "w") as f:
            f.write(markdown)
        png = report.plot(self.rows, self.stem + ".png", label_keys, title)
        print(f"wrote {self.stem}.csv, .md" + (", .png" if png else ""))
