"""Layer-level benchmarks: Conv -> BN -> (add) -> ReLU units of ResNet-50.

Providers:
    ``conv``     the convolution alone (cuDNN / oneDNN through ``nn.Conv2d``): the floor
                 the fused unit is compared with;
    ``eager``    ``nn.Conv2d`` -> ``nn.BatchNorm2d`` -> (add) -> ``nn.ReLU``, unfused;
    ``compile``  ``torch.compile`` of the eager unit;
    ``cpu`` / ``cuda`` / ``triton`` / ``auto``
                 :class:`resnet_fused.FusedConvBNReLU2d` with that backend (``auto`` on a
                 GPU times cuDNN against Triton per layer and keeps the faster).

Modes: ``train forward+backward`` (batch statistics, every gradient) and ``eval
forward`` (folded BatchNorm, cached). TFLOP/s count the convolution's multiply-adds
(x2) once for a forward and three times for forward+backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import resnet_fused
from resnet_fused._geometry import conv_output_hw

from . import harness
from .timing import matmul_rate


@dataclass(frozen=True)
class Layer:
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    hw: int  # input height = width
    tail: str  # "relu", "add_relu" (block output) or "bn" (downsample branch)

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_hw(self) -> int:
        k, s, p = (self.kernel,) * 2, (self.stride,) * 2, (self.padding,) * 2
        return conv_output_hw(self.hw, self.hw, k, s, p, (1, 1))[0]


# Every distinct convolution of torchvision's ResNet-50 (v1.5: stride in the 3x3), with
# what follows it. Names: stage.conv (first block of a stage differs: "b0").
RESNET50_LAYERS = [
    Layer("stem 7x7/2", 3, 64, 7, 2, 224, "relu"),
    Layer("l1.b0.conv1 1x1", 64, 64, 1, 1, 56, "relu"),
    Layer("l1.conv1 1x1", 256, 64, 1, 1, 56, "relu"),
    Layer("l1.conv2 3x3", 64, 64, 3, 1, 56, "relu"),
    Layer("l1.conv3 1x1", 64, 256, 1, 1, 56, "add_relu"),
    Layer("l1.down 1x1", 64, 256, 1, 1, 56, "bn"),
    Layer("l2.b0.conv1 1x1", 256, 128, 1, 1, 56, "relu"),
    Layer("l2.b0.conv2 3x3/2", 128, 128, 3, 2, 56, "relu"),
    Layer("l2.conv1 1x1", 512, 128, 1, 1, 28, "relu"),
    Layer("l2.conv2 3x3", 128, 128, 3, 1, 28, "relu"),
    Layer("l2.conv3 1x1", 128, 512, 1, 1, 28, "add_relu"),
    Layer("l2.down 1x1/2", 256, 512, 1, 2, 56, "bn"),
    Layer("l3.b0.conv1 1x1", 512, 256, 1, 1, 28, "relu"),
    Layer("l3.b0.conv2 3x3/2", 256, 256, 3, 2, 28, "relu"),
    Layer("l3.conv1 1x1", 1024, 256, 1, 1, 14, "relu"),
    Layer("l3.conv2 3x3", 256, 256, 3, 1, 14, "relu"),
    Layer("l3.conv3 1x1", 256, 1024, 1, 1, 14, "add_relu"),
    Layer("l3.down 1x1/2", 512, 1024, 1, 2, 28, "bn"),
    Layer("l4.b0.conv1 1x1", 1024, 512, 1, 1, 14, "relu"),
    Layer("l4.b0.conv2 3x3/2", 512, 512, 3, 2, 14, "relu"),
    Layer("l4.conv1 1x1", 2048, 512, 1, 1, 7, "relu"),
    Layer("l4.conv2 3x3", 512, 512, 3, 1, 7, "relu"),
    Layer("l4.conv3 1x1", 512, 2048, 1, 1, 7, "add_relu"),
    Layer("l4.down 1x1/2", 1024, 2048, 1, 2, 14, "bn"),
]
QUICK_LAYERS = [
    "stem 7x7/2",
    "l1.conv2 3x3",
    "l1.conv3 1x1",
    "l2.b0.conv2 3x3/2",
    "l3.conv2 3x3",
    "l3.conv3 1x1",
    "l4.conv2 3x3",
]
MODES = ("train forward+backward", "eval forward")


def layers(names: list[str] | None = None, quick: bool = False) -> list[Layer]:
    from .report import select

    return select(RESNET50_LAYERS, names, quick, QUICK_LAYERS, "layer(s)")


def flops(layer: Layer, batch: int) -> int:
    """Multiply-adds x2 of the convolution's forward."""
    return 2 * batch * layer.out_hw**2 * layer.c_out * layer.c_in * layer.kernel**2


class _EagerUnit(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu

    def forward(self, x, residual=None):
        y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


class _ConvOnly(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x, residual=None):
        return self.conv(x)


def _modules(layer: Layer, device, dtype) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(
        layer.c_in, layer.c_out, layer.kernel, layer.stride, layer.padding, bias=False
    ).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    bn = nn.BatchNorm2d(layer.c_out).to(device)  # fp32 parameters, as under autocast
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    return conv, bn


def make_unit(layer: Layer, provider: str, device, dtype, training: bool) -> nn.Module:
    conv, bn = _modules(layer, device, dtype)
    relu = layer.tail != "bn"
    if provider == "conv":
        unit: nn.Module = _ConvOnly(conv)
    elif provider == "eager" or provider.startswith("compile"):
        unit = _EagerUnit(conv, bn, relu)
    else:
        unit = resnet_fused.FusedConvBNReLU2d.from_modules(conv, bn, relu, backend=provider)
    unit.train(training)
    if provider.startswith("compile"):
        from .op import compiled

        return compiled(unit, provider)
    return unit


def _inputs(layer: Layer, batch: int, device, dtype, fmt, backward: bool):
    x = torch.randn(batch, layer.c_in, layer.hw, layer.hw, device=device, dtype=dtype)
    x = x.to(memory_format=fmt).requires_grad_(backward)
    out_shape = (batch, layer.c_out, layer.out_hw, layer.out_hw)
    r = None
    if layer.tail == "add_relu":
        r = torch.randn(out_shape, device=device, dtype=dtype).to(memory_format=fmt)
        r.requires_grad_(backward)
    g = torch.randn(out_shape, device=device, dtype=dtype).to(memory_format=fmt)
    return x, r, g


def _step(unit: nn.Module, backward: bool) -> Callable:
    params = [p for p in unit.parameters() if p.requires_grad]

    if not backward:

        def forward(x, r, g):
            with torch.no_grad():
                return unit(x, r)

        return forward

    def forward_backward(x, r, g):
        out = unit(x, r)
        inputs = [t for t in (x, r) if t is not None]
        grads = torch.autograd.grad(out, inputs + params, g, allow_unused=True)
        return grads[: len(inputs)]  # every gradient computed; the inputs' compared

    return forward_backward


def run_layers(
    selected: list[Layer],
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    providers: list[str],
    layouts=("channels_last",),
    min_run_time: float = 0.5,
    progress: Callable[[str], None] = print,
    on_row: Callable[[dict], None] | None = None,
    modes=MODES,
    rounds: int = harness.ROUNDS,
) -> list[dict]:
    harness.refuse_reference(providers, device)
    env = harness.start(device)
    env["matmul_tflops"] = round(matmul_rate(device, dtype), 3)
    rows = []
    elsize = torch.empty((), dtype=dtype).element_size()
    for layer in selected:
        for layout in layouts:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            for mode in modes:
                training = mode.startswith("train")
                backward = "backward" in mode
                io = batch * (
                    layer.c_in * layer.hw**2 + 3 * layer.c_out * layer.out_hw**2
                )  # x, r, g, out
                sets = harness.input_sets(
                    lambda: _inputs(layer, batch, device, dtype, fmt, backward),  # noqa: B023
                    io * elsize, device, cap=3,
                )  # fmt: skip
                if any(p.startswith("compile") for p in providers):
                    torch._dynamo.reset()
                if "auto" in providers:  # this case's picks, timed afresh
                    resnet_fused.functional.auto_choice.reset()
                units = {}
                for provider in providers:
                    torch.manual_seed(0)  # the same weights for every provider
                    units[provider] = make_unit(layer, provider, device, dtype, training)
                steps = {p: harness.rotating(_step(u, backward), sets) for p, u in units.items()}
                measured = harness.measure_case(
                    steps, device, min_run_time, baseline="eager" if "eager" in steps else None,
                    unchecked=("conv",), tolerance=harness.default_tolerance(dtype, device),
                    rounds=rounds,
                )  # fmt: skip
                work = flops(layer, batch) * (3 if backward else 1)
                for provider in providers:
                    t = measured[provider]
                    row = {
                        **env,
                        "layer": layer.name,
                        "shape": f"{batch}x{layer.c_in}x{layer.hw}x{layer.hw}"
                        f"->{layer.c_out} k{layer.kernel}s{layer.stride}",
                        "tail": layer.tail,
                        "dtype": str(dtype).replace("torch.", ""),
                        "layout": layout,
                        "mode": mode,
                        "provider": provider,
                        **harness.timing_columns(t),
                        "tflops": round(work / t.median_s / 1e12, 3),
                        "fraction_of_matmul": round(
                            work / t.median_s / 1e12 / env["matmul_tflops"], 3
                        ),
                        **harness.ratio_columns("speedup_vs_eager", t, measured.get("eager")),
                        **harness.ratio_columns("ratio_vs_conv", t, measured.get("conv")),
                    }
                    if provider == "auto":
                        picks = set(resnet_fused.auto_choices().values())
                        row["auto_pick"] = "/".join(sorted(picks))
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
                    progress(
                        f"{layer.name:18s} {layout:13s} {mode:22s} {provider:8s} "
                        f"{row['median_ms']:9.3f} ms {row['tflops']:8.2f} TFLOP/s "
                        f"x{harness.ratio_spread(row)} eager, x{row['ratio_vs_conv']} conv"
                    )
                del units, steps, sets
    return rows


def providers_here(device: torch.device) -> list[str]:
    from .op import fused_providers

    fused = fused_providers(device)
    # "auto": what backend="auto" runs (the fastest of the fused paths and eager per shape)
    return ["conv", "eager", "compile", *fused, *(["auto"] if fused else [])]


def summarise(rows: list[dict]) -> str:
    from . import report

    env = rows[0]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fused = [p for p in providers if p not in ("conv", "eager") and not p.startswith("compile")]
    lines = [
        "# Layer benchmark: Conv -> BN -> (add) -> ReLU units of ResNet-50",
        "",
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda'] or '-'}; {env['date']}; dtype {rows[0]['dtype']} "
        "(BatchNorm parameters fp32).",
        f"Measured {rows[0]['dtype']} matrix-product rate (the ceiling): "
        f"{env.get('matmul_tflops', '-')} TFLOP/s. "
        "TFLOP/s count the convolution's 2*MACs (x3 for forward+backward). ×eager is the "
        "speed-up over the unfused eager unit; ×conv is the unit's speed relative to the "
        "convolution alone (1.0 = the fused unit costs no more than its convolution). "
        + harness.TIMING_NOTE.format(rounds=env.get("rounds", harness.ROUNDS)),
        "",
        "## Geometric means",
        "",
    ]
    groups = list(dict.fromkeys((r["layout"], r["mode"]) for r in rows))
    table = []
    for layout, mode in groups:
        cells = []
        for p in [q for q in providers if q != "eager"]:
            sel = [
                r
                for r in rows
                if r["layout"] == layout and r["mode"] == mode and r["provider"] == p
            ]
            ge = report.geomean(r["speedup_vs_eager"] for r in sel)
            gc = report.geomean(r["ratio_vs_conv"] for r in sel)
            cells.append(f"{ge:.2f}× / {gc:.2f}×")
        table.append([layout, mode, *cells])
    lines.append(
        report.markdown_table(
            ["layout", "mode", *[f"{p} ×eager / ×conv" for p in providers if p != "eager"]],
            table,
        )
    )
    lines += ["", report.ratio_table(rows, ("layout", "mode"), providers)]
    lines += ["", "## Every measurement (ms; TFLOP/s)", ""]
    header = ["layer", "layout", "mode", *[f"{p}" for p in providers]]
    if fused:
        header.append("auto pick" if "auto" in providers else "")
    ranged = [p for p in providers if p != "eager"] if "eager" in providers else []
    header += [f"{p} ×eager (range)" for p in ranged]
    table = []
    keys = list(dict.fromkeys((r["layer"], r["layout"], r["mode"]) for r in rows))
    for key in keys:
        by = {r["provider"]: r for r in rows if (r["layer"], r["layout"], r["mode"]) == key}
        cells = [
            f"{by[p]['median_ms']:.3f} ({by[p]['tflops']:.3g})" if p in by else "-"
            for p in providers
        ]
        extra = [by["auto"].get("auto_pick", "")] if "auto" in by else ([""] if fused else [])
        spreads = [harness.ratio_spread(by[p]) if p in by else "-" for p in ranged]
        table.append([*key, *cells, *extra, *spreads])
    lines.append(report.markdown_table(header, table))
    lines.append("")
    lines += report.never_slower(rows, ("layer", "layout", "mode"))
    return "\n".join(lines)
