"""Machine ceilings, environment and input rotation.

The providers of a benchmark case are timed by :mod:`.harness` (interleaved rounds).
:func:`measure` times one callable alone, for the machine's ceilings (copy bandwidth,
matrix-product rate): ``triton.testing.do_bench`` on a GPU (CUDA events, L2 flushed
between runs, median), ``torch.utils.benchmark.Timer.adaptive_autorange`` on a CPU
(median over blocks); warm-up excluded. Inputs rotate through several buffers whose
total exceeds the last-level cache, so repeated runs do not read from cache.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_s: float
    iqr_s: float
    runs: int


_ALLOCATOR_TUNED = False
# "steady" (default): keep_freed_host_memory tunes glibc; "default": glibc as a plain
# Python process has it (``resnet-fused bench --host-allocator default``).
HOST_ALLOCATORS = ("steady", "default")
_HOST_ALLOCATOR = "steady"


def set_host_allocator(mode: str) -> None:
    """How CPU runs treat glibc's heap: ``"steady"`` keeps freed memory (see
    :func:`keep_freed_host_memory`), ``"default"`` leaves glibc's settings alone, so that
    the timings include the page faults a plain process pays for fresh outputs (which
    fall harder on eager, which allocates more tensors per unit). Set before the first
    timed run: a tuned process stays tuned."""
    global _HOST_ALLOCATOR
    if mode not in HOST_ALLOCATORS:
        raise ValueError(f"host allocator must be one of {HOST_ALLOCATORS}, got {mode!r}")
    _HOST_ALLOCATOR = mode


def host_allocator() -> str:
    return "steady" if _ALLOCATOR_TUNED else "default"


def allocator_text(env: dict) -> str:
    """A report's words for how a CPU run treated glibc's heap ("" for other devices)."""
    mode = env.get("host_allocator")
    if not mode:
        return ""
    if mode == "default":
        return "; glibc's default heap settings (fresh outputs page-fault)"
    return "; glibc kept from returning freed memory (steady state)"


def keep_freed_host_memory() -> bool:
    """Stop glibc from returning freed heap memory to the OS between timed runs.

    With glibc's defaults, two freed activation-sized blocks at the top of the heap
    exceed its trim threshold, so every iteration page-faults its outputs afresh: eager
    ``relu(x + r)`` then measures ~10x slower than its kernels run. Long-running
    processes often reach a steady state instead (or run another allocator); this puts
    the benchmark there, for every provider alike, unless ``set_host_allocator("default")``
    asked for glibc as it is. Returns whether the setting took (glibc only).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if _HOST_ALLOCATOR == "default":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and ok
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))
    for index in (3, 2):
        path = f"/sys/devices/system/cpu/cpu0/cache/index{index}/size"
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    return 32 << 20


def rotation_count(bytes_per_set: int, device: torch.device, cap: int = 8) -> int:
    """How many input sets to rotate through so their total is > 2x the last cache."""
    if bytes_per_set <= 0:
        return 1
    return max(1, min(cap, math.ceil(2 * last_level_cache_bytes(device) / bytes_per_set)))


def rotating(fn: Callable[..., object], input_sets: Sequence[tuple]) -> Callable[[], object]:
    """A no-argument callable that calls ``fn(*inputs)`` on the next input set each time."""
    cycle = itertools.cycle(input_sets)
    return lambda: fn(*next(cycle))


def measure(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> Timing:
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(
            fn,
            warmup=25,
            rep=max(100, int(min_run_time * 1000)),
            quantiles=[0.25, 0.5, 0.75],
            return_mode="median",
        )
        return Timing(q[1] / 1e3, (q[2] - q[0]) / 1e3, 0)
    from torch.utils import benchmark

    for _ in range(3):  # warm-up, outside the timer
        fn()
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).adaptive_autorange(
        threshold=0.05, min_run_time=min_run_time, max_run_time=10 * min_run_time
    )
    times = list(m.times)
    iqr = (
        statistics.quantiles(times, n=4)[2] - statistics.quantiles(times, n=4)[0]
        if len(times) >= 4
        else 0.0
    )
    return Timing(m.median, iqr, m.number_per_run * len(times))


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write counted)."""
    n = nbytes // 4
    sets = [
        (torch.randn(n, device=device), torch.empty(n, device=device))
        for _ in range(rotation_count(8 * n, device, cap=4))
    ]
    t = measure(rotating(lambda src, dst: dst.copy_(src), sets), device)
    return 2 * n * 4 / t.median_s / 1e9


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Measured dense matrix-product rate in TFLOP/s (random operands), the arithmetic
    ceiling for the convolution benchmarks."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, 0.3)
    return 2 * n**3 / t.median_s / 1e12


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def environment(device: torch.device) -> dict:
    import datetime
    import importlib.metadata

    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = ""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
    }
    if device.type == "cpu":
        env["host_allocator"] = host_allocator()
    return env
