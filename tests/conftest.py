"""Test configuration.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors: the variable
must be set before any Triton kernel is defined, so it is set here, before the tests
import resnet_fused's kernels.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# backend="auto" chooses between the fused kernels and eager ops by timing each new shape
# (resnet_fused.functional.auto_choice): a choice that depends on the machine's load.
# The suite pins the fused kernels so that every run tests the same code;
# tests/test_auto_choice.py and the "auto" cases of the op tests cover the timed choice and
# the eager pick. RESNET_FUSED_AUTO=time runs the whole suite as users get it.
os.environ.setdefault("RESNET_FUSED_AUTO", "fused")
# auto's tuning table (functional/tuning_cache.py) off: the suite's slowed and faked
# candidates must never reach a user's table, and no pick of an earlier run may decide a
# test. tests/test_tuning_cache.py sets its own folder per test.
os.environ["RESNET_FUSED_CACHE_DIR"] = ""

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import resnet_fused  # noqa: E402

# Property-based tests (hypothesis). "ci", the default: derandomized (the same examples on
# every run), a modest number of examples, no per-example deadline (the Triton interpreter
# and a shared machine make timings meaningless). RESNET_FUSED_HYPOTHESIS_EXAMPLES=500
# selects "explore": that many examples per property, from a fresh random seed each run
# (hypothesis prints the seed and a reproduction blob for any failure, and replays saved
# failures from its database, .hypothesis/, first).
HYPOTHESIS_EXAMPLES_ENV = "RESNET_FUSED_HYPOTHESIS_EXAMPLES"
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,  # exactly the derandomized examples, not failures saved by other runs
    deadline=None,
    suppress_health_check=_SLOW_OK,
    print_blob=True,
)
_explore_examples = os.environ.get(HYPOTHESIS_EXAMPLES_ENV, "").strip()
if _explore_examples:
    settings.register_profile(
        "explore",
        max_examples=int(_explore_examples),
        derandomize=False,
        deadline=None,
        suppress_health_check=_SLOW_OK,
        print_blob=True,
    )
settings.load_profile("explore" if _explore_examples else "ci")


def hypothesis_examples(ci: int) -> int:
    """Examples per property: ``ci`` in CI, RESNET_FUSED_HYPOTHESIS_EXAMPLES when set."""
    return int(_explore_examples) if _explore_examples else ci


TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def backend_device(backend: str) -> str:
    """The device a backend's tests run on here."""
    return {
        "torch": "cpu",
        "cpu": "cpu",
        "cuda": "cuda",
        "triton": TRITON_DEVICE,
        "auto": "cuda" if HAS_CUDA else "cpu",
    }[backend]


def backend_params(backends=("torch", "cpu", "cuda", "triton")):
    """pytest params for backends, skipping those that cannot run on this machine."""
    params = []
    for backend in backends:
        device = backend_device(backend)
        reason = resnet_fused.backends.unavailable_reason(backend, torch.device(device))
        if device == "cuda" and not HAS_CUDA:
            reason = "no CUDA GPU on this machine"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


def narrower_cpu_isas():
    """pytest params (ATEN_CPU_CAPABILITY value, the kernel table it selects) for the CPU
    kernel tables narrower than the one this process runs (csrc/cpu/isa.h): the portable
    table always, and the AVX2 table where this CPU runs the AVX-512 one. The tests that
    take them run their checks in a subprocess under that capability."""
    params = [pytest.param("default", "DEFAULT", id="default")]
    if resnet_fused._extension.is_loaded() and (
        resnet_fused._extension.build_info().get("cpu_isa") == "AVX512"
    ):
        params.append(pytest.param("avx2", "AVX2", id="avx2"))
    return params


AUTO_POLICIES = ("eager", "time")


@pytest.fixture(params=AUTO_POLICIES)
def auto_policy(request, monkeypatch):
    """backend="auto" under each policy of RESNET_FUSED_AUTO but the suite's pinned
    "fused": always eager, and timed per shape (fresh picks)."""
    from resnet_fused.functional import auto_choice

    monkeypatch.setenv(auto_choice.POLICY_ENV, request.param)
    auto_choice._AUTO_CHOICES.clear()
    yield request.param
    auto_choice._AUTO_CHOICES.clear()


@pytest.fixture(autouse=True)
def _fp32_convolutions():
    """fp32 convolutions and matrix products in full fp32 for every test (torch's default
    lets cuDNN use TF32 for fp32 convolutions; the Triton convolution follows the same
    flag), so that fp32 results are compared at fp32 accuracy against eager's fp32 error.
    Tests of the TF32 mode set the flags themselves."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with dynamo's caches empty. Dynamo keeps at most
    ``recompile_limit`` (8) compiled entries per code object for the whole process and
    then runs that frame uncompiled: the ninth differently built model compiled in one
    process is not compiled, converted or not (plain torchvision ResNets too). Without
    this, a test's compile counts would depend on how many models earlier tests compiled."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


# --- memory ---------------------------------------------------------------------------
#
# The suite's peak resident memory stays within 8 GB. Tensors freed by a test go back to
# glibc's heap, which keeps them (RSS only grows over a session) unless asked to return
# free pages (malloc_trim); model copies referenced from reference cycles wait for the
# cycle collector. After a test that grew the process by more than RELEASE_AFTER_GROWTH,
# and after each test module, both are run.

RELEASE_AFTER_GROWTH = 256 * 2**20


def _libc_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim if hasattr(libc, "malloc_trim") else None  # glibc only
    except OSError:
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def rss_bytes() -> int:
    """The process's resident set size now (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def release_memory() -> None:
    """Frees unreachable cycles and returns glibc's free heap pages to the system."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (getrusage; 0 where unavailable)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (KiB on Linux)
    except (ImportError, OSError):
        return 0


# The peak of each process that ran tests, printed at the end of the run (pytest-xdist's
# workers report theirs to the main process as they finish), so that the budget above is
# checked by every run rather than assumed.
_PEAKS: dict[str, int] = {}


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # (an xdist worker: to the main process)
        workeroutput["peak_rss_bytes"] = peak_rss_bytes()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):  # (pytest-xdist's hook, in the main process)
    peak = getattr(node, "workeroutput", {}).get("peak_rss_bytes")
    if peak is not None:
        _PEAKS[node.gateway.id] = peak


def pytest_terminal_summary(terminalreporter):
    peaks = dict(_PEAKS) or {"this process": peak_rss_bytes()}
    text = ", ".join(f"{name} {peak / 2**30:.1f} GiB" for name, peak in sorted(peaks.items()))
    terminalreporter.write_line(f"peak resident memory: {text} (budget 8 GB per process)")


@pytest.fixture(autouse=True)
def _release_memory_after_heavy_tests():
    before = rss_bytes()
    yield
    if rss_bytes() - before > RELEASE_AFTER_GROWTH:
        release_memory()


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_module():
    yield
    release_memory()


# --- intra-op threads under pytest-xdist ---------------------------------------------------
#
# `make test` runs the suite in two pytest-xdist worker processes (-n 2, this project's
# 2-core CI machine), each with one intra-op thread: the suite's tensors are small, and
# torch's second thread mostly waits at barriers (tests/test_conv_bn_act.py and
# test_batch_norm_act.py on that machine: 179 s in one process with two threads, 115 s with
# one, 65 s in two workers with one each). The tests whose results must not depend on the
# thread count run their multi-threaded side under ``several_threads`` (at least two).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def several_threads():
    """torch's intra-op threads at least two for the test (restored after), so that the
    CPU kernels' parallel paths run even in a one-thread worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread():
    """torch's intra-op threads pinned to one for the test, restored after: on a machine
    whose cores other processes keep busy, intra-op threads spinning at their barriers made
    the digits training tests several times slower (258 s instead of 57 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- failures as they happen ------------------------------------------------------------
#
# RESNET_FUSED_FAILURE_LOG=path appends each failure's traceback to that file as soon as
# the test fails (by the main process: with pytest-xdist, workers report to it as they go),
# so that a run cut short by a timeout -- a lent GPU machine's command limit -- still says
# why each test failed; pytest's own summary is printed only at the end.
FAILURE_LOG_ENV = "RESNET_FUSED_FAILURE_LOG"


def pytest_runtest_logreport(report):
    path = os.environ.get(FAILURE_LOG_ENV)
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a") as f:
        f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
