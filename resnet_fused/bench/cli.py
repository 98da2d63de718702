"""``resnet-fused bench``: runs the benchmarks and writes CSV + markdown reports."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import block, goals, harness, host, layer, model, op, report, sync, timing
from .timing import device_name

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = (
    "add_relu", "bn_relu", "bn_add_relu", "bn_relu6", "bn_silu", "bn_hardswish", "bn_gelu",
    "bn_add_silu",
)  # fmt: skip
DEFAULT_OPS = ("add_relu", "bn_relu", "bn_add_relu", "bn_relu6", "bn_silu", "bn_hardswish")
LAYOUTS = ("channels_last", "nchw")


LEVELS = ("suite", "op", "layer", "block", "model", "sync", "profile", "host")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--level",
        choices=LEVELS,
        default="suite",
        help="suite (default): a quick selection of every level (under 3 minutes on a "
        "2-core CPU); op: the elementwise/BN ops; layer: ResNet-50's Conv+BN+(add)+ReLU "
        "units; block: ResNet blocks; model: whole ResNets, converted vs eager vs compile; "
        "sync: synchronised BatchNorm over --world ranks (torch.distributed), fused vs "
        "nn.SyncBatchNorm / eager; profile: where a layer's training step spends its time "
        "per provider (torch.profiler kernels and an aten op trace; --layers, default the "
        "deep 3x3 layers); host: host time of a tiny unit, a new process's first step, "
        "ResNet-50 inference vs torch.compile with freezing (CPU only) (sync, profile and host "
        "are not part of the suite)",
    )
    parser.add_argument(
        "--world", type=int, default=2, help="sync level: number of ranks (processes)"
    )
    parser.add_argument("--sync-cases", default=None, help="sync level: comma-separated case names")
    parser.add_argument(
        "--models",
        "--model",
        dest="models",
        default=None,
        help="model level: comma-separated model names: torchvision (resnet50), timm "
        "(timm:resnet50d) or tutorial_resnet18 (default: resnet50,resnet18 on a GPU, "
        "resnet18,resnet50 on a CPU)",
    )
    parser.add_argument("--image-size", type=int, default=224, help="model level: image size")
    parser.add_argument(
        "--amp", action="store_true", help="model level: bf16 autocast (default on a GPU)"
    )
    parser.add_argument(
        "--mode",
        choices=["train", "eval", "both"],
        default="both",
        help="layer/block/model levels: training step, inference, or both",
    )
    parser.add_argument(
        "--ops",
        default=",".join(DEFAULT_OPS),
        help=f"comma-separated ops of the op level, of {','.join(OPS)} (default: "
        f"{','.join(DEFAULT_OPS)})",
    )
    parser.add_argument(
        "--layers",
        default=None,
        help="comma-separated layer names of the layer level (default: all ResNet-50 convs; "
        "--quick: a selection)",
    )
    parser.add_argument(
        "--blocks", default=None, help="comma-separated block names of the block level"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--batch", type=int, default=None, help="batch size (default: per level and device)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--layouts", default=None, help="comma-separated: channels_last,nchw (default: per level)"
    )
    parser.add_argument(
        "--providers",
        default=None,
        help="comma-separated: eager, compile, compile-max (max-autotune), the fused "
        "backends cpu/cuda/triton (op, layer), conv/auto (layer), fused/fused-<backend> "
        "(block, model), fused-compile, and (CUDA) eager-graph/fused-graph, the step "
        "captured as a CUDA graph (model) (default: all here but compile on a CPU; model "
        "level on a GPU: all but compile-max and fused-<backend>)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=0.5,
        help="seconds of timing per provider and case, over all rounds (at least 0.1 on a GPU)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=harness.ROUNDS,
        help="alternating timing rounds per case: every provider is timed once per round, "
        "in a rotated order; medians over the rounds (default: %(default)s)",
    )
    parser.add_argument(
        "--host-cases",
        default=None,
        help="host level: comma-separated cases: unit (a tiny Conv+BN+ReLU unit's host time), "
        "models (whole models at 2x3x64x64, converted vs eager), "
        "first_step (a new process's first training step, cold and warm tuning table), "
        "r50_inference (ResNet-50 inference vs torch.compile with freezing); default: all",
    )
    parser.add_argument(
        "--host-allocator",
        choices=timing.HOST_ALLOCATORS,
        default="steady",
        help="CPU runs: steady (default) keeps glibc from returning freed memory to the OS "
        "between timed runs (the steady state of a long-running process); default leaves "
        "glibc as a plain process has it, page faults on fresh outputs included",
    )
    parser.add_argument("--out", default="results", help="output folder")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA GPU is available here")
    return torch.device(name)


class _BadArgs(ValueError):
    pass


def _providers(args, valid: list[str], default: list[str], first=("eager",)) -> list[str]:
    providers = args.providers.split(",") if args.providers else default
    unknown = [p for p in providers if p not in valid]
    if unknown:
        raise _BadArgs(f"provider(s) {unknown} not available here; choose from {valid}")
    providers = [p for p in first if p not in providers] + providers
    # torch.compile before the fused providers, so that rows can show both ratios.
    return sorted(providers, key=lambda p: (p not in first, not p.startswith("compile")))


def _modes(args, train: str, eval_: str) -> tuple[str, ...]:
    return {"train": (train,), "eval": (eval_,), "both": (train, eval_)}[args.mode]


def _tag(device: torch.device) -> str:
    return report.slug(device_name(device).split("(")[0]) or device.type


_Writer = harness.Writer


def run_bench(args: argparse.Namespace) -> int:
    runs: dict[str, list[dict]] = {}  # this run's rows per level (the suite's verdicts)
    # Benchmarks time auto's choices afresh in this process: picks from the tuning table
    # (made at another time, under other load) would make first-step times and auto's
    # picks depend on the table's history. (The host level's first_step case measures
    # the table itself, in processes of its own.)
    from ..functional import auto_choice
    from ..functional.tuning_cache import CACHE_DIR_ENV

    os.environ[CACHE_DIR_ENV] = ""
    auto_choice.reset()
    try:
        device = _device(args.device)
        timing.set_host_allocator(getattr(args, "host_allocator", "steady"))
        if args.rounds < 1:
            raise _BadArgs(f"--rounds must be at least 1, got {args.rounds}")
        levels = ("op", "layer", "block", "model") if args.level == "suite" else (args.level,)
        if args.level == "suite":  # its own folder: the per-level full reports stay apart
            args.out = os.path.join(args.out, "suite")
        for level in levels:
            run = {"op": _run_op, "layer": _run_layer, "block": _run_block, "model": _run_model,
                   "sync": _run_sync, "profile": _run_profile, "host": _run_host}  # fmt: skip
            print(f"== {level} level ==", flush=True)
            runs[level] = run[level](args, device, suite=args.level == "suite")
    except (_BadArgs, ValueError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if args.level == "suite":
        path = os.path.join(args.out, f"suite_{_tag(device)}.md")
        with open(path, "w") as f:
            f.write(goals.report(runs, _tag(device), device))
        print(f"wrote {path}")
    return 0


def _run_host(args, device, suite=False) -> list[dict]:
    default = host.CASES if device.type == "cpu" else ("unit", "models", "first_step")
    cases = (args.host_cases or ",".join(default)).split(",")
    out = _Writer(os.path.join(args.out, f"host_{_tag(device)}"))
    try:
        host.run_host(cases, out, args.min_run_time or 1.0, args.rounds, device=device)
    except ValueError as e:
        raise _BadArgs(str(e)) from None
    out.finish(host.summarise(out.rows), ("case", "mode"), "host time")
    return out.rows


def _run_op(args, device, suite=False) -> list[dict]:
    batch = args.batch or (256 if device.type == "cuda" else 8)
    dtype = DTYPES[args.dtype]
    fused = op.fused_providers(device)
    valid = ["eager", "compile", "compile-max", *fused, *(["auto"] if fused else [])]
    default = [p for p in valid if p != "compile-max"]
    if device.type == "cpu":
        default = [p for p in default if p != "compile"]
    providers = _providers(args, valid, default)
    ops = args.ops.split(",")
    layouts = tuple((args.layouts or "channels_last,nchw").split(","))
    bad = [o for o in ops if o not in OPS] + [x for x in layouts if x not in LAYOUTS]
    if bad:
        raise _BadArgs(f"unknown op(s)/layout(s) {bad}")
    cases = []
    if "add_relu" in ops:
        cases += op.add_relu_cases(batch, dtype, layouts)
    cases += [c for c in op.batch_norm_act_cases(batch, dtype, layouts, quick=args.quick or suite)
              if c.op in ops]  # fmt: skip
    if suite:  # one shape per op, channels_last
        seen, picked = set(), []
        for c in cases:
            if c.layout == "channels_last" and (c.op, c.mode) not in seen:
                seen.add((c.op, c.mode))
                picked.append(c)
        cases = picked
    out = _Writer(os.path.join(args.out, f"op_{_tag(device)}"))
    op.run_cases(
        cases, device, providers, min_run_time=0.2 if suite else args.min_run_time,
        progress=report.Progress(len(cases) * len(providers)), rounds=args.rounds, on_row=out,
    )  # fmt: skip
    out.finish(summarise(out.rows), ("op", "shape", "layout", "mode"), "op level")
    return out.rows


def _run_layer(args, device, suite=False) -> list[dict]:
    dtype = DTYPES[args.dtype]
    batch = args.batch or (256 if device.type == "cuda" else 4)
    valid = [*layer.providers_here(device), "compile-max"]
    default = [p for p in valid if not p.startswith("compile")]
    providers = _providers(args, valid, default, first=("conv", "eager"))
    layouts = tuple((args.layouts or "channels_last").split(","))
    names = args.layers.split(",") if args.layers else None
    if suite and names is None:
        names = ["l1.conv2 3x3", "l3.conv3 1x1", "l2.down 1x1/2"]
    selected = layer.layers(names, args.quick)
    modes = _modes(args, "train forward+backward", "eval forward")
    out = _Writer(os.path.join(args.out, f"layer_{_tag(device)}_{args.dtype}"))
    total = len(selected) * len(layouts) * len(modes) * len(providers)
    layer.run_layers(
        selected, batch, device, dtype, providers, layouts,
        0.2 if suite else args.min_run_time, progress=report.Progress(total), on_row=out,
        modes=modes, rounds=args.rounds,
    )  # fmt: skip
    out.finish(layer.summarise(out.rows), ("layer", "mode"), "layer level")
    return out.rows


def _run_profile(args, device, suite=False) -> list[dict]:
    from . import profile

    dtype = DTYPES[args.dtype]
    batch = args.batch or (256 if device.type == "cuda" else 4)
    valid = [p for p in layer.providers_here(device) if p not in ("conv", "compile")]
    providers = _providers(args, valid, valid)
    names = args.layers.split(",") if args.layers else ["l3.conv2 3x3", "l4.conv2 3x3"]
    path = profile.run_profiles(
        layer.layers(names), batch, device, dtype, providers, args.out,
        f"profile_{_tag(device)}_{args.dtype}",
    )  # fmt: skip
    print(f"wrote {path}")
    return []


def _run_block(args, device, suite=False) -> list[dict]:
    dtype = DTYPES[args.dtype]
    batch = args.batch or (256 if device.type == "cuda" else 4)
    fused = ["fused"] + [f"fused-{b}" for b in op.fused_providers(device)]
    valid = ["eager", "compile", "compile-max", *fused]
    default = ["eager", "fused"] + (["compile"] if device.type == "cuda" else [])
    providers = _providers(args, valid, default)
    names = args.blocks.split(",") if args.blocks else None
    selected = block.blocks(names, args.quick or suite)
    modes = _modes(args, "train", "eval")
    out = _Writer(os.path.join(args.out, f"block_{_tag(device)}_{args.dtype}"))
    block.run_blocks(
        selected, batch, device, dtype, providers, modes, 0.2 if suite else args.min_run_time,
        progress=report.Progress(len(selected) * len(modes) * len(providers)), on_row=out,
        rounds=args.rounds,
    )  # fmt: skip
    out.finish(block.summarise(out.rows), ("block", "mode"), "block level")
    return out.rows


def _run_model(args, device, suite=False) -> list[dict]:
    batch = args.batch or (256 if device.type == "cuda" else 8)
    if args.providers:  # the CUDA-graph providers by name, before "not available here"
        try:
            model.refuse_graphs(args.providers.split(","), device)
        except ValueError as exc:
            raise _BadArgs(str(exc)) from None
    valid = model.providers_here(device)
    default = model.default_providers(device)
    if suite:  # the suite's quick selection
        default = ["eager", "fused"] + (["compile"] if device.type == "cuda" else [])
    providers = _providers(args, valid, default)
    if args.models is None:
        models = "resnet50,resnet18" if device.type == "cuda" else "resnet18,resnet50"
        names = ["resnet50"] if suite and device.type == "cpu" else models.split(",")
    else:
        names = args.models.split(",")
    bad = [why for n in names if (why := model.unknown_model(n))]
    if bad:
        raise _BadArgs("unknown model(s): " + "; ".join(bad))
    amp = args.amp or device.type == "cuda"
    layouts = tuple((args.layouts or "channels_last,nchw").split(","))
    modes = _modes(args, "train", "eval")
    out = _Writer(os.path.join(args.out, f"model_{_tag(device)}"))
    per = len(providers) * ("channels_last" in layouts) + ("nchw" in layouts)
    failures: list[str] = []
    model.run_models(
        names, batch, args.image_size, device, providers, layouts, amp,
        max(args.min_run_time, 1.0) if device.type == "cpu" else args.min_run_time,
        progress=report.Progress(len(names) * len(modes) * per), on_row=out, modes=modes,
        rounds=args.rounds, failures=failures,
    )  # fmt: skip
    out.finish(model.summarise(out.rows, failures), ("model", "mode", "layout"), "model level")
    return out.rows


def _run_sync(args, device, suite=False) -> list[dict]:
    dtype = DTYPES[args.dtype]
    batch = args.batch or (32 if device.type == "cuda" else 4)
    if args.world < 2:
        raise _BadArgs(f"--world must be at least 2 for the sync level, got {args.world}")
    valid = sync.providers_here(device)
    providers = _providers(args, valid, valid)
    providers = [p for p in sync.PROVIDERS if p in providers]
    names = args.sync_cases.split(",") if args.sync_cases else None
    selected = sync.cases(names, args.quick)
    out = _Writer(os.path.join(args.out, f"sync_{_tag(device)}_{args.dtype}"))
    print(f"{args.world} ranks, {len(selected)} cases x {len(providers)} providers", flush=True)
    sync.run_sync(
        selected, batch, args.world, device, dtype, providers, args.min_run_time, on_row=out,
        rounds=args.rounds,
    )  # fmt: skip
    out.finish(sync.summarise(out.rows), ("case",), "sync level (training step)")
    return out.rows


def summarise(rows: list[dict]) -> str:
    env = rows[0]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    others = [p for p in providers if p != "eager"]
    lines = [
        "# Op benchmark",
        "",
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda'] or '-'}; {env['date']}; dtype {env['dtype']}"
        + timing.allocator_text(env)
        + ".",
        f"Measured copy bandwidth: {env['copy_gbps']} GB/s. GB/s charge every provider the "
        "fused op's minimal traffic, so GB/s ratios are speed ratios. "
        + harness.TIMING_NOTE.format(rounds=env.get("rounds", harness.ROUNDS)),
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
    if any(p.startswith("compile") for p in providers):
        lines += ["", "Against eager and against torch.compile:", ""]
        lines.append(report.ratio_table(rows, ("op", "mode"), providers))
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
                *[harness.ratio_spread(by[p]) for p in others],
                *[f"{100 * by[p]['fraction_of_copy']:.0f}%" for p in providers],
                *[str(by[p]["saved_mb"]) for p in providers],
            ]
        )
    lines.append(report.markdown_table(header, table))
    lines.append("")
    lines += report.never_slower(rows, ("op", "shape", "layout", "mode"))
    return "\n".join(lines)
