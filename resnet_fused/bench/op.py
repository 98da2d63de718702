"""Op-level benchmarks: fused ops against eager PyTorch and ``torch.compile`` of it.

Every provider is charged the *fused* op's minimal traffic (in whole tensors: e.g. add+ReLU
forward reads x and residual and writes out = 3), so GB/s compare directly across
providers and the ratio of two GB/s is the ratio of their speeds. Each result is also
shown as a fraction of the measured device copy bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused.backends import is_available
from resnet_fused.functional import auto_choice

from . import harness
from .timing import copy_bandwidth

# Block outputs of torchvision ResNet-50 (C, H, W): where the residual add + ReLU runs.
RESNET50_BLOCK_OUTPUTS = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
# Inputs of ResNet-50's BN + ReLU (stem and block bodies; C, H, W).
RESNET50_BN_RELU = [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
# Inputs of MobileNetV2's / EfficientNet-B0's BN + activation (expanded depthwise blocks).
MOBILENET_BN_ACT = [(32, 112, 112), (144, 56, 56), (192, 28, 28), (384, 14, 14), (960, 7, 7)]
# BatchNorm + another activation: op name -> the activation (resnet_fused.activations).
ACT_OPS = {"bn_relu6": "relu6", "bn_silu": "silu", "bn_hardswish": "hardswish", "bn_gelu": "gelu"}
# BatchNorm + residual add + another activation (the end of a ResNet block with SiLU, as
# timm's byobnet models build it): op name -> the activation.
ADD_ACT_OPS = {"bn_add_silu": "silu"}

# Minimal tensor passes of the fused op: (op, mode) -> full-size tensors moved.
TRAFFIC = {
    ("add_relu", "forward"): 3,
    ("add_relu", "forward+backward"): 6,
    # BN+ReLU: stats (1) + forward (2); backward: reduce (2) + elementwise (3).
    ("bn_relu", "train forward"): 3,
    ("bn_relu", "train forward+backward"): 8,
    ("bn_relu", "eval forward"): 2,
    # BN+add+ReLU: stats (1) + forward (3); backward: reduce (3 + 1 write) + elementwise (3).
    ("bn_add_relu", "train forward"): 4,
    ("bn_add_relu", "train forward+backward"): 11,
    ("bn_add_relu", "eval forward"): 3,
    # BN + another activation: as BN+ReLU (its backward recomputes the pre-activation).
    **{(name, "train forward"): 3 for name in ACT_OPS},
    **{(name, "train forward+backward"): 8 for name in ACT_OPS},
    **{(name, "eval forward"): 2 for name in ACT_OPS},
    # BN + add + another activation: as BN+add+ReLU, the backward's reduction reading the
    # residual where BN+add+ReLU's reads the output.
    **{(name, "train forward"): 4 for name in ADD_ACT_OPS},
    **{(name, "train forward+backward"): 11 for name in ADD_ACT_OPS},
    **{(name, "eval forward"): 3 for name in ADD_ACT_OPS},
}


def compiled(fn, provider: str):
    """torch.compile for provider "compile" (default mode) or "compile-max"
    (mode="max-autotune")."""
    mode = "max-autotune" if provider == "compile-max" else None
    return torch.compile(fn, dynamic=False, mode=mode)


def fused_providers(device: torch.device) -> list[str]:
    """The fused backends worth timing here (never Triton's interpreter)."""
    out = []
    for backend in ("cpu", "cuda", "triton"):
        if is_available(backend, device) and not (backend == "triton" and device.type == "cpu"):
            out.append(backend)
    return out


@dataclass
class Case:
    op: str
    shape: tuple[int, ...]
    layout: str
    mode: str
    dtype: torch.dtype


def _eager_add_relu(x, r):
    return torch.relu(x + r)


def _eager_bn_act(x, r, rm, rv, w, b, training, act="relu"):
    """What the eager modules run: batch_norm, add, the activation in place (as
    torchvision's blocks: ReLU, ReLU6, SiLU and Hardswish with inplace=True)."""
    y = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    if r is not None:
        y = y + r
    if act == "relu":
        return torch.relu_(y)
    if act == "relu6":
        return F.hardtanh_(y, 0.0, 6.0)
    if act == "silu":
        return F.silu(y, inplace=True)
    if act == "hardswish":
        return F.hardswish(y, inplace=True)
    return F.gelu(y)


def _make_fn(case: Case, provider: str) -> Callable:
    training = not case.mode.startswith("eval")
    if case.op == "add_relu":
        if provider == "eager":
            return _eager_add_relu
        if provider.startswith("compile"):
            return compiled(_eager_add_relu, provider)
        return lambda x, r: resnet_fused.add_relu(x, r, backend=provider)
    act = {**ACT_OPS, **ADD_ACT_OPS}.get(case.op, "relu")
    if provider == "eager":
        return lambda x, r, rm, rv, w, b: _eager_bn_act(x, r, rm, rv, w, b, training, act)
    if provider.startswith("compile"):
        fn = compiled(_eager_bn_act, provider)
        return lambda x, r, rm, rv, w, b: fn(x, r, rm, rv, w, b, training, act)
    return lambda x, r, rm, rv, w, b: resnet_fused.batch_norm_act(
        x, rm, rv, w, b, training, residual=r, activation=act, backend=provider
    )


def _inputs(case: Case, device: torch.device, requires_grad: bool):
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format

    def full():
        return torch.randn(case.shape, device=device, dtype=case.dtype).to(memory_format=fmt)

    x = full().requires_grad_(requires_grad)
    if case.op == "add_relu":
        return (x, full().requires_grad_(requires_grad)), full()
    c = case.shape[1]
    r = full().requires_grad_(requires_grad) if case.op.startswith("bn_add_") else None
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    w = (torch.rand(c, device=device) + 0.5).requires_grad_(requires_grad)
    b = torch.randn(c, device=device).requires_grad_(requires_grad)
    return (x, r, rm, rv, w, b), full()


def _step(fn: Callable, backward: bool) -> Callable:
    if not backward:

        def forward(*args):
            with torch.no_grad():
                return fn(*args[:-1])

        return forward

    def forward_backward(*args):
        inputs, grad = args[:-1], args[-1]
        out = fn(*inputs)
        leaves = [t for t in inputs if t is not None and t.requires_grad]
        return torch.autograd.grad(out, leaves, grad)

    return forward_backward


def _fp64_reference(case: Case, backward: bool, inputs: tuple) -> Callable[[], object]:
    """Eager's op on fp64 copies of one input set (the first calls' set): the arbiter of
    the first-step check where eager's own rounding moves an element across a kink."""

    def run():
        copies = tuple(
            None if t is None else t.detach().double().requires_grad_(t.requires_grad)
            for t in inputs
        )
        return _step(_make_fn(case, "eager"), backward)(*copies)

    return run


def _saved_bytes(fn: Callable, args) -> int:
    """Bytes autograd keeps for the backward (activation memory of the op)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args[:-1])
    return total


def _peak_cuda_bytes(step: Callable, args) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_cases(
    cases: list[Case],
    device: torch.device,
    providers: list[str],
    min_run_time: float = 0.5,
    progress: Callable[[str], None] = print,
    rounds: int = harness.ROUNDS,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    env = harness.start(device)
    copy_gbps = copy_bandwidth(device)
    rows = []
    for case in cases:
        numel = 1
        for s in case.shape:
            numel *= s
        elsize = torch.empty((), dtype=case.dtype).element_size()
        backward = "backward" in case.mode
        traffic = TRAFFIC[(case.op, case.mode)]
        sets = harness.input_sets(
            lambda c=case, b=backward: (lambda a, g: (*a, g))(*_inputs(c, device, b)),
            (traffic + 2) * numel * elsize,
            device,
        )
        if any(p.startswith("compile") for p in providers):
            torch._dynamo.reset()  # a fresh cache per case: no recompile limit reached
        if "auto" in providers:
            auto_choice.reset()  # this case's picks, timed afresh
        fns = {p: _make_fn(case, p) for p in providers}
        steps = {p: harness.rotating(_step(fn, backward), sets) for p, fn in fns.items()}
        measured = harness.measure_case(
            steps, device, min_run_time, baseline="eager" if "eager" in steps else None,
            tolerance=harness.default_tolerance(case.dtype, device), rounds=rounds,
            reference=_fp64_reference(case, backward, sets[0]),
        )  # fmt: skip
        for provider in providers:
            t = measured[provider]
            gbps = traffic * numel * elsize / t.median_s / 1e9
            saved = _saved_bytes(fns[provider], sets[0]) if backward else ""
            step = _step(fns[provider], backward)
            peak = _peak_cuda_bytes(step, sets[0]) if device.type == "cuda" else ""
            row = {
                **env,
                "op": case.op,
                "shape": "x".join(map(str, case.shape)),
                "dtype": str(case.dtype).replace("torch.", ""),
                "layout": case.layout,
                "mode": case.mode,
                "provider": provider,
                **harness.timing_columns(t),
                "gbps": round(gbps, 2),
                "copy_gbps": round(copy_gbps, 2),
                "fraction_of_copy": round(gbps / copy_gbps, 3),
                **harness.ratio_columns("speedup_vs_eager", t, measured.get("eager")),
                "saved_mb": round(saved / 2**20, 3) if saved != "" else "",
                "peak_mb": round(peak / 2**20, 3) if peak != "" else "",
            }
            if provider == "auto":
                row["auto_pick"] = "/".join(sorted(set(auto_choice.auto_choices().values())))
            rows.append(row)
            if on_row is not None:
                on_row(row)
            progress(
                f"{case.op:12s} {row['shape']:>16s} {case.layout:13s} {case.mode:23s} "
                f"{provider:8s} {row['median_ms']:9.3f} ms {gbps:7.1f} GB/s "
                f"({100 * gbps / copy_gbps:5.1f}% of copy) x{harness.ratio_spread(row)}"
            )
        del steps, fns, sets
    return rows


def add_relu_cases(batch: int, dtype: torch.dtype, layouts=("channels_last", "nchw")) -> list[Case]:
    return [
        Case("add_relu", (batch, *chw), layout, mode, dtype)
        for chw in RESNET50_BLOCK_OUTPUTS
        for layout in layouts
        for mode in ("forward", "forward+backward")
    ]


def batch_norm_act_cases(
    batch: int, dtype: torch.dtype, layouts=("channels_last", "nchw"), quick: bool = False
) -> list[Case]:
    relu_shapes = RESNET50_BN_RELU[1:4:2] if quick else RESNET50_BN_RELU
    add_shapes = RESNET50_BLOCK_OUTPUTS[:3:2] if quick else RESNET50_BLOCK_OUTPUTS
    act_shapes = MOBILENET_BN_ACT[1:4:2] if quick else MOBILENET_BN_ACT
    modes = ("train forward", "train forward+backward", "eval forward")
    cases = []
    ops = [("bn_relu", relu_shapes), ("bn_add_relu", add_shapes)]
    ops += [(name, act_shapes) for name in ACT_OPS]
    ops += [(name, add_shapes) for name in ADD_ACT_OPS]
    for op, shapes in ops:
        for chw in shapes:
            for layout in layouts:
                for mode in modes:
                    cases.append(Case(op, (batch, *chw), layout, mode, dtype))
    return cases
