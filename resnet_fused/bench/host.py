"""Host-time benchmarks: where the Python around the kernels is what a step costs.

Cases (``resnet-fused bench --level host``):

* ``unit``: one Conv(3x3)+BN+ReLU unit on tiny tensors (1x8x4x4), where the compute is
  negligible and the time is host time: eager modules (``nn.Sequential(conv, bn, relu)``)
  against :class:`resnet_fused.FusedConvBNReLU2d` under the default ``backend="auto"``,
  in eval under ``no_grad`` and under ``inference_mode``, and a training step
  (forward+backward); eval and training also under bf16 autocast (``+autocast``);
* ``models``: whole models at 2x3x64x64 (channels_last), the converted model against the
  same eager model, in the unit's modes: the tutorial CIFAR ResNet and ``resnet18``
  (exact-class blocks), ``mobilenet_v2`` and ``efficientnet_b0`` (the graph pass: a
  generated forward over every site). At this size the step is mostly the Python and
  dispatch around the kernels, which on a GPU is what a launch-bound step costs;
* ``first_step``: the first training step of a converted ``resnet18`` (4x3x64x64) in a
  new process (conversion, forward, backward, ``auto``'s tuning) with a cold and a warm
  tuning table, and with a warm table converting in place (``convert(model,
  inplace=True)``: no copy of the model), against eager's first step in a new process;
  each process is started afresh, alternating between the providers, and the median over
  rounds is reported. The processes may write bytecode (``PYTHONDONTWRITEBYTECODE`` is
  dropped from their environment), so that resnet_fused's modules load compiled, as an
  installed package's do, and not byte-compiled in every process;
* ``r50_inference``: ResNet-50 inference (batch 8 and 1, 224x224, channels_last, fp32):
  eager, the converted model (with the default check of its cached folds, with
  ``RESNET_FUSED_FOLD_CHECK=versions``, and under ``torch.inference_mode`` where the
  others run under ``no_grad``), and ``torch.compile`` with freezing
  (``mode=None``, Inductor's ``freezing=True``), with the compile time reported beside it.

On a GPU (``--device cuda``), ``unit`` also runs at 32x64x8x8 (kernels still shorter than
their launches), timed as wall time of back-to-back calls, and ``first_step`` moves the
model to the GPU (CUDA's own start-up before the clock starts); ``r50_inference`` is the
CPU's.

The host-bound whole models (the tutorial CIFAR ResNet at 8x3x32x32, ``resnet18`` at
2x3x32x32) are the model level's (``--level model --models tutorial_resnet18 --batch 8
--image-size 32``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import resnet_fused

from . import harness

CASES = ("unit", "models", "first_step", "r50_inference")


# The unit's input shapes (N, C, H, W) per device: on a CPU the tiny one; on a GPU, where
# a launch costs more than these kernels at any batch from 1 to 32, also batch 32.
UNIT_SHAPES = {"cpu": ((1, 8, 4, 4),), "cuda": ((1, 8, 4, 4), (32, 64, 8, 8))}


def _amp_context(device_type: str, amp: bool) -> Callable[[], object]:
    """bf16 autocast for the ``+autocast`` modes; else no context at all (a disabled
    ``torch.autocast`` costs a few microseconds per step, charged to both providers,
    which a user's plain inference or training step does not pay)."""
    if amp:
        return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _unit_steps(
    mode: str, device: torch.device | str = "cpu", shape=(1, 8, 4, 4)
) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    c = shape[1]
    conv, bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    conv, bn = conv.to(device), bn.to(device)
    eager = nn.Sequential(conv, bn, nn.ReLU(inplace=True))
    fused = resnet_fused.FusedConvBNReLU2d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn))
    x = torch.randn(*shape, device=device)
    return _mode_steps({"eager": eager, "fused": fused}, mode, x, input_grad=True)


def _mode_steps(models: dict, mode: str, x, *, input_grad: bool = False) -> dict:
    """One step per provider in ``mode`` (``eval``, ``inference_mode`` or ``train``,
    with ``+autocast``: bf16): the forward under no_grad / inference_mode, or forward
    and backward (of ones; with ``input_grad``, into a copy of ``x`` that requires grad);
    each returns its output in fp32 for the check."""
    base, _, amp = mode.partition("+")
    amp_ctx = _amp_context(x.device.type, bool(amp))
    steps = {}
    for name, m in models.items():
        m.train(base == "train")
        if base == "train":
            xi = x.clone().requires_grad_() if input_grad else x

            def step(m=m, xi=xi):
                with amp_ctx():
                    out = m(xi)
                out.backward(torch.ones_like(out))
                return out.detach().to(torch.float32, copy=True)

        else:
            ctx = torch.no_grad if base == "eval" else torch.inference_mode

            def step(m=m, ctx=ctx):
                with ctx(), amp_ctx():
                    return m(x).to(torch.float32, copy=True)

        steps[name] = step
    return steps


def run_unit(writer, min_run_time: float, rounds: int, progress=print, device="cpu") -> None:
    """Time per call of the unit, back-to-back calls (on a GPU: wall time with the device
    synchronised around each block of calls, the host's time per call wherever the
    kernels are shorter than their launches)."""
    device = torch.device(device)
    # TF32 convolutions on a GPU round at ~1e-3; fp32 agrees to ~1e-6 on a CPU.
    tolerance = 1e-5 if device.type == "cpu" else 3e-3
    for shape in UNIT_SHAPES[device.type]:
        label = "unit " + "x".join(map(str, shape))
        for mode in ("eval", "inference_mode", "train", "eval+autocast", "train+autocast"):
            steps = _unit_steps(mode, device, shape)
            stats = harness.measure_case(
                steps, device, min_run_time, baseline="eager", rounds=rounds,
                tolerance=3e-2 if "+autocast" in mode else tolerance,
                timer=harness.wall_timer(device),
            )  # fmt: skip
            for provider, s in stats.items():
                row = {
                    "case": label, "device": device.type, "mode": mode, "provider": provider,
                    "us_per_call": round(s.median_s * 1e6, 2),
                    **harness.timing_columns(s),
                    **harness.ratio_columns("time_vs_eager", stats["eager"], s),
                }  # fmt: skip
                writer(row)
                progress(f"{label} {mode:15s} {provider:6s} {row['us_per_call']:8.2f} us")


# The models case: what each builds (bench.model's names) and the input.
HOST_MODELS = ("tutorial_resnet18", "resnet18", "mobilenet_v2", "efficientnet_b0")
HOST_MODEL_SHAPE = (2, 3, 64, 64)


def _model_steps(name: str, mode: str, device) -> dict[str, Callable[[], object]]:
    from .model import build_model

    torch.manual_seed(0)
    eager = build_model(name).to(device).to(memory_format=torch.channels_last)
    fused = resnet_fused.convert(eager)  # (a copy: the same parameters, its own tensors)
    x = torch.randn(*HOST_MODEL_SHAPE, device=device).to(memory_format=torch.channels_last)
    fp64 = copy.deepcopy(eager).double().train(mode.startswith("train"))

    def reference():  # (the check's: eager's model in fp64, no autocast; not timed)
        with torch.no_grad():
            return fp64(x.double()).float()

    return {"reference": reference, **_mode_steps({"eager": eager, "fused": fused}, mode, x)}


def run_models(writer, min_run_time: float, rounds: int, progress=print, device="cpu") -> None:
    """Time per step of whole models at a tiny input, converted against eager (the
    converted model's own first call, which plans, is the check's)."""
    device = torch.device(device)
    label = "x".join(map(str, HOST_MODEL_SHAPE))
    for name in HOST_MODELS:
        for mode in ("eval", "inference_mode", "train", "eval+autocast", "train+autocast"):
            steps = _model_steps(name, mode, device)
            reference = steps.pop("reference")
            # Eval folds BatchNorm into the convolution (fp32: ~1e-6 relative); bf16
            # autocast rounds the two orders differently, through a whole network; in
            # training the last stages' BatchNorms see 8 values per channel and amplify
            # any rounding (eager's own bf16 output is 20-40% from fp64's there): then
            # the fp64 reference decides (the tolerance rule: twice eager's own error).
            # (At 32x32 the last maps are 1x1: 2 values per channel, where even fp32
            # training outputs are 60-95% apart between any two implementations.)
            tolerance = 5e-2 if "+autocast" in mode else 1e-4
            stats = harness.measure_case(
                steps, device, min_run_time, baseline="eager", rounds=rounds,
                tolerance=tolerance, timer=harness.wall_timer(device), reference=reference,
                twice_baseline_error=True,
            )  # fmt: skip
            for provider, st in stats.items():
                row = {
                    "case": f"{name} {label}", "device": device.type, "mode": mode,
                    "provider": provider, **harness.timing_columns(st),
                    **harness.ratio_columns("time_vs_eager", stats["eager"], st),
                }  # fmt: skip
                writer(row)
                progress(f"{name} {mode:15s} {provider:6s} {row['median_ms']:8.3f} ms  "
                         f"x{row['time_vs_eager']}")  # fmt: skip


_FIRST_STEP = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, torchvision
import resnet_fused
device = torch.device(sys.argv[2])
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10).to(device)
x = torch.randn(4, 3, 64, 64, device=device)
y = torch.randint(0, 10, (4,), device=device)
if device.type == "cuda":
    torch.cuda.synchronize(device)  # CUDA's own start-up is not the step's
t1 = time.perf_counter()
if sys.argv[1] != "eager":
    model = resnet_fused.convert(model, inplace=sys.argv[1] == "fused-inplace")
out = model(x)
torch.nn.functional.cross_entropy(out, y).backward()
if device.type == "cuda":
    torch.cuda.synchronize(device)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_step_s": t2 - t1}))
"""


def _first_step(provider: str, cache_dir: str | None, device: str = "cpu") -> float:
    env = dict(os.environ)
    env.pop("RESNET_FUSED_AUTO", None)  # the users' default: timed choice
    env["RESNET_FUSED_CACHE_DIR"] = cache_dir if cache_dir is not None else ""
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    kind = "eager" if provider == "eager" else "fused"
    if provider.endswith("-inplace"):
        kind = "fused-inplace"
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_STEP, kind, device],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["first_step_s"]


def run_first_step(writer, rounds: int, progress=print, device="cpu") -> None:
    device = torch.device(device)
    dev = str(device)
    times: dict[str, list[float]] = {
        "eager": [],
        "fused-cold": [],
        "fused-warm": [],
        "fused-warm-inplace": [],
    }
    with tempfile.TemporaryDirectory() as warm_dir:
        _first_step("fused-warm", warm_dir, dev)  # fills the table the warm runs read
        for r in range(rounds):
            order = list(times)
            order = order[r % len(order) :] + order[: r % len(order)]
            for provider in order:
                if provider == "fused-cold":
                    with tempfile.TemporaryDirectory() as cold_dir:
                        t = _first_step(provider, cold_dir, dev)
                else:
                    t = _first_step(provider, None if provider == "eager" else warm_dir, dev)
                times[provider].append(t)
    eager = times["eager"]
    for provider, ts in times.items():
        ratios = [t / e for t, e in zip(ts, eager, strict=True)]
        row = {
            "case": "first step resnet18 4x3x64x64", "device": device.type, "mode": "train",
            "provider": provider,
            "median_ms": round(statistics.median(ts) * 1e3, 1), "rounds": len(ts),
            "time_vs_eager": round(statistics.median(ratios), 3),
            "time_vs_eager_min": round(min(ratios), 3),
            "time_vs_eager_max": round(max(ratios), 3),
        }  # fmt: skip
        writer(row)
        progress(f"first step {provider:10s} {row['median_ms']:8.1f} ms  x{row['time_vs_eager']}")


R50_BATCHES = (8, 1)


def run_r50_inference(writer, min_run_time: float, rounds: int, progress=print) -> None:
    """ResNet-50 inference, channels_last fp32, at batch 8 (issue 19's anchor) and 1:
    eager, the converted model (its eval folds checked by their inputs' contents, the
    default, and by version counters alone, ``RESNET_FUSED_FOLD_CHECK=versions``, which
    like freezing does not see writes through ``.data``) and torch.compile with freezing
    (compile time reported beside it)."""
    import torchvision

    from ..modules import FOLD_CHECK_ENV

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    # A converted copy per provider: a fold cached under one check is remade under the
    # other, and each times its units' backends itself.
    fused, fused_versions, fused_inference = (resnet_fused.convert(model) for _ in range(3))
    import torch._inductor.config as inductor_config

    for batch in R50_BATCHES:
        x = torch.randn(batch, 3, 224, 224).to(memory_format=torch.channels_last)
        torch._dynamo.reset()
        saved = inductor_config.freezing
        inductor_config.freezing = True
        try:
            compiled = torch.compile(model)
            start = time.perf_counter()
            with torch.no_grad():
                compiled(x)
            compile_s = time.perf_counter() - start
        finally:
            inductor_config.freezing = saved

        def step(m, fold_check=None, context=torch.no_grad, x=x):
            saved = os.environ.get(FOLD_CHECK_ENV)
            if fold_check is not None:
                os.environ[FOLD_CHECK_ENV] = fold_check
            try:
                with context():
                    return m(x)
            finally:
                if fold_check is not None:
                    if saved is None:
                        del os.environ[FOLD_CHECK_ENV]
                    else:
                        os.environ[FOLD_CHECK_ENV] = saved

        steps = {
            "eager": functools.partial(step, model),
            "fused": functools.partial(step, fused, "contents"),
            "fused-fold-check-versions": functools.partial(step, fused_versions, "versions"),
            "fused-inference-mode": functools.partial(
                step, fused_inference, "contents", torch.inference_mode
            ),
            "compile-freezing": functools.partial(step, compiled),
        }
        stats = harness.measure_case(
            steps, torch.device("cpu"), min_run_time, baseline="eager", rounds=rounds,
            tolerance=2e-3,
        )  # fmt: skip
        case = f"resnet50 inference {batch}x3x224x224 channels_last"
        for provider, s in stats.items():
            row = {
                "case": case, "mode": "eval", "provider": provider, **harness.timing_columns(s),
                **harness.ratio_columns("time_vs_eager", stats["eager"], s),
                "compile_s": round(compile_s, 1) if provider == "compile-freezing" else "",
            }  # fmt: skip
            writer(row)
            progress(f"r50 inference batch {batch} {provider:26s} {row['median_ms']:9.2f} ms")


def summarise(rows: list[dict]) -> str:
    lines = [
        "# Host-time benchmarks",
        "",
        "time_vs_eager: this provider's time over eager's, the median of per-round ratios "
        "(min-max in brackets); below 1 is faster than eager.",
        "",
        "| case | mode | provider | median | vs eager |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        spread = ""
        if r.get("time_vs_eager_min", "") != "":
            spread = f" ({r['time_vs_eager_min']}-{r['time_vs_eager_max']})"
        extra = f", compile {r['compile_s']} s" if r.get("compile_s") else ""
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['provider']} | {r['median_ms']} ms{extra} | "
            f"{r.get('time_vs_eager', '')}{spread} |"
        )
    return "\n".join(lines) + "\n"


def run_host(cases, writer, min_run_time: float, rounds: int, progress=print, device="cpu") -> None:
    device = torch.device(device)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown host case(s) {unknown}; known: {', '.join(CASES)}")
    if "r50_inference" in cases and device.type != "cpu":
        raise ValueError("the r50_inference host case is the CPU's (torch.compile with freezing "
                         "against the converted model on the CPU); on a GPU the model level "
                         "compares compiled and fused models")  # fmt: skip
    if "unit" in cases:
        run_unit(writer, min_run_time, rounds, progress, device)
    if "models" in cases:
        run_models(writer, min_run_time, rounds, progress, device)
    if "first_step" in cases:
        run_first_step(writer, max(3, rounds // 2), progress, device)
    if "r50_inference" in cases:
        run_r50_inference(writer, min_run_time, rounds, progress)
