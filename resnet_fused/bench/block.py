"""Block-level benchmarks: torchvision ResNet blocks vs their fused twins.

Blocks: a ResNet-18 ``BasicBlock`` and a ResNet-50 ``Bottleneck`` per stage (the first
block of a stage, with its stride and downsample branch, and a plain one). Providers:
``eager`` (torchvision's block), ``compile`` (torch.compile of it) and ``fused`` /
``fused-<backend>`` (:func:`resnet_fused.convert`). Modes: training forward+backward and
eval forward; images/s and TFLOP/s over the block's convolutions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import resnet_fused

from . import harness


@dataclass(frozen=True)
class Block:
    name: str
    kind: str  # "basic" or "bottleneck"
    inplanes: int
    planes: int
    stride: int
    hw: int  # input height = width

    def build(self) -> nn.Module:
        cls = BasicBlock if self.kind == "basic" else Bottleneck
        out = self.planes * cls.expansion
        down = None
        if self.stride != 1 or self.inplanes != out:
            down = nn.Sequential(
                nn.Conv2d(self.inplanes, out, 1, self.stride, bias=False), nn.BatchNorm2d(out)
            )
        return cls(self.inplanes, self.planes, self.stride, down)


BLOCKS = [
    Block("r18.layer1", "basic", 64, 64, 1, 56),
    Block("r18.layer2.0", "basic", 64, 128, 2, 56),
    Block("r18.layer3", "basic", 256, 256, 1, 14),
    Block("r50.layer1.0", "bottleneck", 64, 64, 1, 56),
    Block("r50.layer2.0", "bottleneck", 256, 128, 2, 56),
    Block("r50.layer3", "bottleneck", 1024, 256, 1, 14),
    Block("r50.layer4", "bottleneck", 2048, 512, 1, 7),
]
QUICK_BLOCKS = ["r18.layer2.0", "r50.layer3"]


def blocks(names: list[str] | None = None, quick: bool = False) -> list[Block]:
    from .report import select

    return select(BLOCKS, names, quick, QUICK_BLOCKS, "block(s)")


def _flops(block: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def hook(m, i, o):
        nonlocal total
        total += 2 * o.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in block.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        block(x)
    for h in handles:
        h.remove()
    return total


def _build(spec: Block, provider: str, device, dtype, training: bool) -> nn.Module:
    torch.manual_seed(0)  # the same weights for every provider
    block = spec.build().to(device=device, dtype=dtype)
    block = block.to(memory_format=torch.channels_last).train(training)
    if provider.startswith("fused"):
        backend = provider.split("-", 1)[1] if "-" in provider else "auto"
        block = resnet_fused.convert(block, backend=backend, inplace=True)
    elif provider.startswith("compile"):
        from .op import compiled

        block = compiled(block, provider)
    return block


def _step(block: nn.Module, x: torch.Tensor, g: torch.Tensor, training: bool) -> Callable:
    params = [p for p in block.parameters() if p.requires_grad]

    def step():
        if not training:
            with torch.no_grad():
                return block(x)
        out = block(x)
        return torch.autograd.grad(out, [x, *params], g)[:1]  # the input's compared

    return step


def run_blocks(
    selected: list[Block],
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    providers: list[str],
    modes=("train", "eval"),
    min_run_time: float = 0.5,
    progress: Callable[[str], None] = print,
    on_row: Callable[[dict], None] | None = None,
    rounds: int = harness.ROUNDS,
) -> list[dict]:
    harness.refuse_reference(providers, device)
    env = harness.start(device)
    rows = []
    for spec in selected:
        for mode in modes:
            training = mode == "train"
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch, spec.inplanes, spec.hw, spec.hw, generator=gen)
            x = x.to(device=device, dtype=dtype, memory_format=torch.channels_last)
            x.requires_grad_(training)
            reference = spec.build().to(device=device, dtype=dtype).train(training)
            work = _flops(reference, x.detach()) * (3 if training else 1)
            with torch.no_grad():
                out_shape = reference(x.detach()).shape
            del reference
            g = torch.randn(out_shape, generator=gen).to(device=device, dtype=dtype)
            g = g.to(memory_format=torch.channels_last)
            if any(p.startswith("compile") for p in providers):
                torch._dynamo.reset()
            blocks_ = {p: _build(spec, p, device, dtype, training) for p in providers}
            steps = {p: _step(b, x, g, training) for p, b in blocks_.items()}
            measured = harness.measure_case(
                steps, device, min_run_time, baseline="eager" if "eager" in steps else None,
                tolerance=harness.default_tolerance(dtype, device), rounds=rounds,
            )  # fmt: skip
            for provider in providers:
                t = measured[provider]
                row = {
                    **env,
                    "block": spec.name,
                    "shape": f"{batch}x{spec.inplanes}x{spec.hw}x{spec.hw}",
                    "dtype": str(dtype).replace("torch.", ""),
                    "mode": mode,
                    "provider": provider,
                    **harness.timing_columns(t),
                    "images_per_s": round(batch / t.median_s, 2),
                    "tflops": round(work / t.median_s / 1e12, 4),
                    **harness.ratio_columns("speedup_vs_eager", t, measured.get("eager")),
                    **harness.ratio_columns("speedup_vs_compile", t, measured.get("compile")),
                }
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                progress(
                    f"{spec.name:14s} {mode:5s} {provider:12s} {row['median_ms']:9.3f} ms "
                    f"{row['images_per_s']:9.1f} img/s x{harness.ratio_spread(row)} eager"
                )
            del blocks_, steps
    return rows


def summarise(rows: list[dict]) -> str:
    from . import report

    env = rows[0]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines = [
        "# Block benchmark: torchvision ResNet blocks vs fused blocks",
        "",
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda'] or '-'}; {env['date']}; dtype {env['dtype']}; channels_last.",
        harness.TIMING_NOTE.format(rounds=env.get("rounds", harness.ROUNDS)),
        "",
        report.ratio_table(rows, ("mode",), providers),
        "",
    ]
    others = [p for p in providers if p != "eager"]
    header = ["block", "shape", "mode", *[f"{p} ms" for p in providers]]
    header += [f"{p} ×eager (range)" for p in others] if "eager" in providers else []
    table = []
    for key in dict.fromkeys((r["block"], r["shape"], r["mode"]) for r in rows):
        by = {r["provider"]: r for r in rows if (r["block"], r["shape"], r["mode"]) == key}
        cells = [*key, *[f"{by[p]['median_ms']:.3f}" if p in by else "-" for p in providers]]
        if "eager" in providers:
            cells += [harness.ratio_spread(by[p]) if p in by else "-" for p in others]
        table.append(cells)
    lines.append(report.markdown_table(header, table))
    lines.append("")
    return "\n".join(lines)
