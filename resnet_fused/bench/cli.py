"""``resnet-fused bench``: runs the benchmarks and writes CSV + markdown reports."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import op, report
from .timing import device_name

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--level", choices=["op"], default="op", help="what to benchmark")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--batch", type=int, default=None, help="batch size (default: 8 on CPU, 256 on GPU)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--providers",
        default=None,
        help="comma-separated: eager,compile,cpu,cuda,triton (default: all here)",
    )
    parser.add_argument(
        "--min-run-time", type=float, default=0.5, help="seconds of timing per measurement (CPU)"
    )
    parser.add_argument("--out", default="results", help="output folder")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda, but no CUDA GPU is available here")
    return torch.device(name)


def run_bench(args: argparse.Namespace) -> int:
    device = _device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 8)
    dtype = DTYPES[args.dtype]
    providers = args.providers.split(",") if args.providers else None
    if providers:
        valid = {"eager", "compile", *op.fused_providers(device)}
        unknown = [p for p in providers if p not in valid]
        if unknown:
            print(
                f"bench: provider(s) {unknown} not available here; choose from {sorted(valid)}",
                file=sys.stderr,
            )
            return 2
    rows = op.bench_add_relu(
        device, batch, dtype, providers=providers, min_run_time=args.min_run_time
    )
    tag = report.slug(device_name(device).split("(")[0]) or device.type
    csv_path = os.path.join(args.out, f"op_add_relu_{tag}.csv")
    md_path = os.path.join(args.out, f"op_add_relu_{tag}.md")
    report.write_csv(rows, csv_path)
    with open(md_path, "w") as f:
        f.write(summarise_add_relu(rows))
    print(f"wrote {csv_path} and {md_path}")
    return 0


def summarise_add_relu(rows: list[dict]) -> str:
    env = rows[0]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fused = [p for p in providers if p not in ("eager", "compile")]
    lines = [
        "# add+ReLU op benchmark",
        "",
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda'] or '-'}; {env['date']}. dtype {env['dtype']}.",
        f"Measured copy bandwidth: {env['copy_gbps']} GB/s. GB/s charge every provider the "
        "fused op's minimal traffic (forward 3 tensors, forward+backward 6).",
        "",
    ]
    header = [
        "shape",
        "layout",
        "mode",
        *[f"{p} ms" for p in providers],
        *[f"{p} ×eager" for p in fused],
        *[f"{p} % of copy" for p in fused],
    ]
    table = []
    keys = list(dict.fromkeys((r["shape"], r["layout"], r["mode"]) for r in rows))
    for key in keys:
        by = {r["provider"]: r for r in rows if (r["shape"], r["layout"], r["mode"]) == key}
        table.append(
            [
                *key,
                *[f"{by[p]['median_ms']:.3f}" for p in providers],
                *[f"{by[p]['speedup_vs_eager']:.2f}" for p in fused],
                *[f"{100 * by[p]['fraction_of_copy']:.0f}%" for p in fused],
            ]
        )
    lines.append(report.markdown_table(header, table))
    lines.append("")
    lines.append("Geometric mean speed-up against eager `torch.relu(x + r)`:")
    lines.append("")
    for p in [q for q in providers if q != "eager"]:
        for mode in ("forward", "forward+backward"):
            g = report.geomean(
                r["speedup_vs_eager"] for r in rows if r["provider"] == p and r["mode"] == mode
            )
            lines.append(f"- {p}, {mode}: **{g:.2f}×**")
    lines.append("")
    return "\n".join(lines)
