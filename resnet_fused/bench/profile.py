"""Where a Conv+BN(+add)+ReLU unit's time goes, per provider: ``resnet-fused bench --level
profile``.

For each selected ResNet-50 layer and provider (those of the layer level: ``eager``,
``cpu``/``cuda``/``triton``, ``auto``), one training step (forward + backward of every
input and parameter) is

* profiled with :mod:`torch.profiler` over a few steps after warm-up: the kernels (on a
  GPU) or aten ops (on a CPU) with their time per step and count per step, sorted by
  time, in ``profile_<tag>.md``;
* traced once at the aten level (a ``TorchDispatchMode``): every op with the dtype, shape
  and strides of its tensor arguments, in ``profile_<tag>_ops.txt``, so that the memory
  format of every gradient handed to the convolution backward, the dtype of every pass
  and the number of passes can be read off.

The summary table gives each provider's device time per step, its kernel (or op) count
per step and the share spent in convolution kernels, beside eager's.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_fused.functional import auto_choice

from . import layer as layer_level
from .report import markdown_table

STEPS = 5


def _tensor_desc(t) -> str:
    if not isinstance(t, torch.Tensor):
        return ""
    fmt = ""
    if t.dim() == 4:
        if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
            fmt = " NHWC"
        elif t.is_contiguous():
            fmt = " NCHW"
        else:
            fmt = f" strides{tuple(t.stride())}"
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}{fmt}"


class _OpLog(TorchDispatchMode):
    """Every aten op of a step with its tensor arguments' dtype, shape and layout."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [a for a in (*args, *kwargs.values())]
        flat += [x for a in args if isinstance(a, (list, tuple)) for x in a]
        descs = [d for d in (_tensor_desc(a) for a in flat) if d]
        self.lines.append(f"{func}: {', '.join(descs)}")
        return func(*args, **kwargs)


def _is_conv_kernel(name: str) -> bool:
    n = name.lower()
    return any(k in n for k in ("conv", "cudnn", "xmma", "implicit", "wgrad", "dgrad", "gemm",
                                "sm90", "cutlass", "_conv_bn_stats", "conv_bias_act"))  # fmt: skip


def _profile(step: Callable[[], object], device: torch.device) -> tuple[list[dict], float]:
    """Per kernel (GPU) or op (CPU): time per step (ms) and calls per step; total ms/step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(STEPS):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows = []
    for evt in prof.key_averages():
        if device.type == "cuda":
            t = getattr(evt, "self_device_time_total", None)
            if t is None:
                t = evt.self_cuda_time_total
            if t <= 0 or evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            t = evt.self_cpu_time_total
            if t <= 0 or not evt.key.startswith("aten::"):
                continue
        rows.append({"name": evt.key, "ms": t / 1e3 / STEPS, "calls": evt.count / STEPS})
    rows.sort(key=lambda r: -r["ms"])
    return rows, sum(r["ms"] for r in rows)


def _wall_ms(step: Callable[[], object], device: torch.device, steps: int = 20) -> float:
    """Host wall time per step with the device synchronised at the ends: above the
    kernels' own time when the GPU waits for the host (launch-bound)."""
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def run_profiles(
    selected, batch: int, device: torch.device, dtype: torch.dtype, providers: list[str],
    out_dir: str, tag: str, progress: Callable[[str], None] = print, top: int = 15,
) -> str:  # fmt: skip
    """Profiles every (layer, provider) training step; writes the markdown report and the
    op trace; returns the report's path."""
    os.makedirs(out_dir, exist_ok=True)
    summary, details, trace = [], [], []
    fmt = torch.channels_last
    for lay in selected:
        x, r, g = layer_level._inputs(lay, batch, device, dtype, fmt, True)
        for provider in providers:
            torch.manual_seed(0)
            if provider == "auto":  # this layer's picks, timed afresh
                auto_choice.reset()
            unit = layer_level.make_unit(lay, provider, device, dtype, True)
            step_fn = layer_level._step(unit, True)

            def step(step_fn=step_fn, args=(x, r, g)):
                return step_fn(*args)

            for _ in range(3):  # warm-up: autotuning, auto's timing trials, allocations
                step()
            wall = _wall_ms(step, device)
            kernels, total = _profile(step, device)
            log = _OpLog()
            with log:
                step()
            conv_ms = sum(k["ms"] for k in kernels if _is_conv_kernel(k["name"]))
            calls = sum(k["calls"] for k in kernels)
            picks = ""
            if provider == "auto":
                picks = "/".join(sorted(set(auto_choice.auto_choices().values())))
            summary.append([lay.name, provider, f"{wall:.3f}", f"{total:.3f}", f"{calls:.0f}",
                            f"{conv_ms:.3f}", f"{total - conv_ms:.3f}", picks])  # fmt: skip
            details += [f"### {lay.name}, {provider}", "",
                        markdown_table(["kernel" if device.type == "cuda" else "op",
                                        "ms/step", "calls/step"],
                                       [[k["name"][:110], f"{k['ms']:.4f}", f"{k['calls']:g}"]
                                        for k in kernels[:top]]), ""]  # fmt: skip
            trace += [f"## {lay.name}, {provider} (one training step)", *log.lines, ""]
            progress(f"{lay.name:18s} {provider:8s} {wall:9.3f} ms wall, {total:9.3f} ms/step "
                     f"in {calls:5.0f} "
                     f"{'kernels' if device.type == 'cuda' else 'ops'}/step, "
                     f"{total - conv_ms:8.3f} ms outside the convolution")  # fmt: skip
            del unit, step_fn
    from .harness import start

    env = start(device)
    unit_word = "kernels" if device.type == "cuda" else "aten ops"
    lines = [
        f"# Profile of Conv+BN(+add)+ReLU training steps on {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda'] or '-'}; "
        f"{env['date']}; batch {batch}, {str(dtype).replace('torch.', '')}, channels_last; "
        f"{STEPS} profiled steps after 3 warm-up steps. 'wall' is the host's time per step "
        "with the device synchronised at the ends (unprofiled, 20 steps): above the "
        f"{unit_word}' own time when the device waits for the host. The {unit_word}' time "
        "is their own time per step; 'conv' counts convolution/GEMM kernels (cuDNN, Triton "
        "conv) by name.",
        "",
        markdown_table(
            [
                "layer",
                "provider",
                "wall ms/step",
                f"{unit_word} ms/step",
                f"{unit_word}/step",
                "conv ms",
                "outside conv ms",
                "auto pick",
            ],
            summary,
        ),
        "",
        f"The op trace (dtype, shape, layout of every argument of every aten op of one step) "
        f"is in {tag}_ops.txt.",
        "",
        *details,
    ]
    path = os.path.join(out_dir, f"{tag}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, f"{tag}_ops.txt"), "w") as f:
        f.write("\n".join(trace))
    return path
