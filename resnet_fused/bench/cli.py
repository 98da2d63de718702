"""``resnet-fused bench``: runs the benchmarks and writes CSV + markdown reports."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import layer, model, op, report
from .timing import device_name

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = ("add_relu", "bn_relu", "bn_add_relu")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--level",
        choices=["op", "layer", "model"],
        default="op",
        help="op: the elementwise/BN ops; layer: ResNet-50's Conv+BN+(add)+ReLU units; "
        "model: whole ResNets, converted vs eager vs compile",
    )
    parser.add_argument(
        "--models", default="resnet18,resnet50", help="model level: torchvision model names"
    )
    parser.add_argument("--image-size", type=int, default=224, help="model level: image size")
    parser.add_argument(
        "--amp", action="store_true", help="model level: bf16 autocast (default on a GPU)"
    )
    parser.add_argument(
        "--ops",
        default=",".join(OPS),
        help=f"comma-separated ops of the op level (default: {','.join(OPS)})",
    )
    parser.add_argument(
        "--layers",
        default=None,
        help="comma-separated layer names of the layer level (default: all ResNet-50 convs; "
        "--quick: a selection)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--batch", type=int, default=None, help="batch size (default: 8 on CPU, 256 on GPU)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--layouts", default="channels_last,nchw", help="comma-separated: channels_last,nchw"
    )
    parser.add_argument(
        "--providers",
        default=None,
        help="comma-separated: eager,compile,cpu,cuda,triton (layer level also: conv,auto) "
        "(default: all here)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument(
        "--min-run-time", type=float, default=0.5, help="seconds of timing per measurement (CPU)"
    )
    parser.add_argument("--out", default="results", help="output folder")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA GPU is available here")
    return torch.device(name)


def run_bench(args: argparse.Namespace) -> int:
    try:
        device = _device(args.device)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    batch = args.batch or (256 if device.type == "cuda" else 8)
    dtype = DTYPES[args.dtype]
    if args.level == "layer":
        return run_layer_bench(args, device, dtype)
    if args.level == "model":
        return run_model_bench(args, device)
    valid = ["eager", "compile", *op.fused_providers(device)]
    providers = args.providers.split(",") if args.providers else valid
    unknown = [p for p in providers if p not in valid]
    if unknown:
        print(
            f"bench: provider(s) {unknown} not available here; choose from {valid}", file=sys.stderr
        )
        return 2
    if "eager" not in providers:
        providers = ["eager", *providers]  # ratios are against eager
    ops = args.ops.split(",")
    bad_ops = [o for o in ops if o not in OPS]
    layouts = tuple(args.layouts.split(","))
    bad_layouts = [x for x in layouts if x not in ("channels_last", "nchw")]
    if bad_ops or bad_layouts:
        print(f"bench: unknown op(s)/layout(s) {bad_ops + bad_layouts}", file=sys.stderr)
        return 2

    cases = []
    if "add_relu" in ops:
        cases += op.add_relu_cases(batch, dtype, layouts)
    bn_cases = op.batch_norm_act_cases(batch, dtype, layouts, quick=args.quick)
    cases += [c for c in bn_cases if c.op in ops]
    rows = op.run_cases(cases, device, providers, min_run_time=args.min_run_time)

    tag = report.slug(device_name(device).split("(")[0]) or device.type
    csv_path = os.path.join(args.out, f"op_{tag}.csv")
    md_path = os.path.join(args.out, f"op_{tag}.md")
    report.write_csv(rows, csv_path)
    with open(md_path, "w") as f:
        f.write(summarise(rows))
    print(f"wrote {csv_path} and {md_path}")
    return 0


def run_layer_bench(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> int:
    batch = args.batch or (256 if device.type == "cuda" else 4)
    valid = layer.providers_here(device)
    default = [p for p in valid if p != "compile"]
    providers = args.providers.split(",") if args.providers else default
    unknown = [p for p in providers if p not in valid]
    if unknown:
        print(
            f"bench: provider(s) {unknown} not available here; choose from {valid}", file=sys.stderr
        )
        return 2
    providers = [p for p in ("conv", "eager") if p not in providers] + providers
    layouts = (
        tuple(args.layouts.split(","))
        if args.layouts != "channels_last,nchw"
        else ("channels_last",)
    )
    try:
        selected = layer.layers(args.layers.split(",") if args.layers else None, args.quick)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    tag = report.slug(device_name(device).split("(")[0]) or device.type
    stem = os.path.join(args.out, f"layer_{tag}_{args.dtype}")
    rows: list[dict] = []

    def save(row: dict) -> None:  # after every measurement: a timeout keeps what ran
        rows.append(row)
        report.write_csv(rows, stem + ".csv")

    layer.run_layers(
        selected, batch, device, dtype, providers, layouts, args.min_run_time, on_row=save
    )
    with open(stem + ".md", "w") as f:
        f.write(layer.summarise(rows))
    print(f"wrote {stem}.csv and {stem}.md")
    return 0


def run_model_bench(args: argparse.Namespace, device: torch.device) -> int:
    batch = args.batch or (256 if device.type == "cuda" else 8)
    fused = ["fused"] + [f"fused-{b}" for b in op.fused_providers(device)]
    valid = ["eager", "compile", *fused]
    default = ["eager", "fused", "compile"] if device.type == "cuda" else ["eager", "fused"]
    providers = args.providers.split(",") if args.providers else default
    unknown = [p for p in providers if p not in valid]
    if unknown:
        print(f"bench: provider(s) {unknown} not available; choose from {valid}", file=sys.stderr)
        return 2
    providers = [p for p in ("eager",) if p not in providers] + providers
    names = args.models.split(",")
    bad = [n for n in names if not hasattr(__import__("torchvision").models, n)]
    if bad:
        print(f"bench: unknown torchvision model(s) {bad}", file=sys.stderr)
        return 2
    amp = args.amp or device.type == "cuda"
    tag = report.slug(device_name(device).split("(")[0]) or device.type
    stem = os.path.join(args.out, f"model_{tag}")
    rows: list[dict] = []

    def save(row: dict) -> None:
        rows.append(row)
        report.write_csv(rows, stem + ".csv")

    layouts = tuple(args.layouts.split(","))
    model.run_models(
        names, batch, args.image_size, device, providers, layouts, amp,
        max(args.min_run_time, 1.0) if device.type == "cpu" else args.min_run_time,
        on_row=save,
    )  # fmt: skip
    with open(stem + ".md", "w") as f:
        f.write(model.summarise(rows))
    print(f"wrote {stem}.csv and {stem}.md")
    return 0


def summarise(rows: list[dict]) -> str:
    env = rows[0]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    others = [p for p in providers if p != "eager"]
    lines = [
        "# Op benchmark",
        "",
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda'] or '-'}; {env['date']}; dtype {env['dtype']}.",
        f"Measured copy bandwidth: {env['copy_gbps']} GB/s. GB/s charge every provider the "
        "fused op's minimal traffic, so GB/s ratios are speed ratios.",
        "",
        "## Geometric-mean speed-up against eager",
        "",
    ]
    groups = list(dict.fromkeys((r["op"], r["mode"]) for r in rows))
    table = []
    for op_name, mode in groups:
        cells = []
        for p in others:
            g = report.geomean(
                r["speedup_vs_eager"]
                for r in rows
                if r["op"] == op_name and r["mode"] == mode and r["provider"] == p
            )
            cells.append(f"{g:.2f}×")
        table.append([op_name, mode, *cells])
    lines.append(report.markdown_table(["op", "mode", *others], table))
    lines += ["", "## Every measurement", ""]
    header = [
        "op",
        "shape",
        "layout",
        "mode",
        *[f"{p} ms" for p in providers],
        *[f"{p} ×eager" for p in others],
        *[f"{p} %copy" for p in providers],
        *[f"{p} saved MB" for p in providers],
    ]
    table = []
    keys = list(dict.fromkeys((r["op"], r["shape"], r["layout"], r["mode"]) for r in rows))
    for key in keys:
        by = {
            r["provider"]: r for r in rows if (r["op"], r["shape"], r["layout"], r["mode"]) == key
        }
        table.append(
            [
                *key,
                *[f"{by[p]['median_ms']:.3f}" for p in providers],
                *[f"{by[p]['speedup_vs_eager']:.2f}" for p in others],
                *[f"{100 * by[p]['fraction_of_copy']:.0f}%" for p in providers],
                *[str(by[p]["saved_mb"]) for p in providers],
            ]
        )
    lines.append(report.markdown_table(header, table))
    lines.append("")
    return "\n".join(lines)
