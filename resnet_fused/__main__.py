"""Command line: ``python -m resnet_fused`` / ``resnet-fused``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="resnet-fused", description="Fused ResNet kernels: build report and benchmarks."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build information and usable backends")
    check = sub.add_parser(
        "check", help="quick correctness self-check of every usable backend (exit 1 on mismatch)"
    )
    check.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    bench = sub.add_parser("bench", help="run the benchmarks on this machine")
    from .bench.cli import add_bench_arguments

    add_bench_arguments(bench)
    _add_tune_arguments(sub)
    args = parser.parse_args(argv)

    if args.command == "info":
        from .info import format_info

        print(format_info())
        return 0
    if args.command == "check":
        import torch

        from .check import run_check

        if args.device == "cuda" and not torch.cuda.is_available():
            print("check: --device cuda, but no CUDA GPU is available here", file=sys.stderr)
            return 2
        return run_check(None if args.device == "auto" else [args.device])
    if args.command == "bench":
        from .bench.cli import run_bench

        return run_bench(args)
    if args.command == "tune":
        return run_tune(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


TUNE_DTYPES = ("fp32", "bf16", "fp16")


def _add_tune_arguments(sub) -> None:
    tune = sub.add_parser(
        "tune",
        help="time backend='auto''s picks for a model's shapes and store them in the tuning "
        "table (a later process uses them instead of timing)",
        description="Converts the model with resnet_fused.convert and runs a training step "
        "(forward and backward) and/or an eval forward under RESNET_FUSED_AUTO=time, so "
        "that every fused unit times fused against eager once and stores its pick in auto's "
        "tuning table ($RESNET_FUSED_CACHE_DIR, else $XDG_CACHE_HOME/resnet_fused, else "
        "~/.cache/resnet_fused). Picks hold for batch sizes in the same power-of-two bucket; "
        "run it with the thread count (CPU) and settings of the real run.",
    )
    tune.add_argument(
        "model", help="a torchvision ResNet name (resnet18, resnet50, ...), timm:<name>, "
        "or tutorial (the user-written ResNet-18 of resnet_fused.bench.tutorial)",
    )  # fmt: skip
    tune.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    tune.add_argument("--image-size", type=int, default=224, help="input height = width")
    tune.add_argument(
        "--dtype", choices=TUNE_DTYPES, default="fp32",
        help="fp32, or bf16/fp16 autocast (fp32 parameters), as the benchmarks run",
    )  # fmt: skip
    tune.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last")
    tune.add_argument("--mode", choices=("train", "eval", "both"), default="both")
    tune.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    tune.add_argument(
        "--retime", action="store_true",
        help="time every pick again, overwriting the table's entries (default: keep them)",
    )  # fmt: skip


def run_tune(args) -> int:
    import os

    import torch
    import torch.nn.functional as F

    import resnet_fused
    from resnet_fused.functional import auto_choice, tuning_cache

    if args.batch < 1 or args.image_size < 1:
        print("tune: --batch and --image-size must be positive", file=sys.stderr)
        return 2
    if tuning_cache.table_dir() is None:
        print(
            f"tune: auto's tuning table is off ({tuning_cache.CACHE_DIR_ENV} is empty): "
            "set it to a folder, or unset it for the default",
            file=sys.stderr,
        )
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("tune: --device cuda, but no CUDA GPU is available here", file=sys.stderr)
        return 2
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )  # fmt: skip
    from .bench.model import build_model, unknown_model

    name = "tutorial_resnet18" if args.model == "tutorial" else args.model
    problem = unknown_model(name)
    if problem:
        print(f"tune: {problem}", file=sys.stderr)
        return 2
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    model = build_model(name).to(device, memory_format=fmt)
    model = resnet_fused.convert(model)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    x = x.to(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    modes = ("train", "eval") if args.mode == "both" else (args.mode,)

    path = tuning_cache.table_path(device)
    before = tuning_cache.added_count()
    seen = set(auto_choice.auto_choices())
    saved_policy = os.environ.get(auto_choice.POLICY_ENV)
    os.environ[auto_choice.POLICY_ENV] = "time"
    try:
        with tuning_cache.tuning_session(read=not args.retime):
            for mode in modes:
                model.train(mode == "train")
                with torch.autocast(
                    device.type, dtype=amp or torch.bfloat16, enabled=amp is not None
                ):
                    if mode == "train":
                        loss = F.cross_entropy(model(x).float(), y)
                    else:
                        with torch.no_grad():
                            model(x)
                if mode == "train":
                    loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    finally:
        if saved_policy is None:
            os.environ.pop(auto_choice.POLICY_ENV, None)
        else:
            os.environ[auto_choice.POLICY_ENV] = saved_policy
    sources = auto_choice.auto_choice_sources()
    new = [k for k in sources if k not in seen]
    timed = sum(sources[k] == auto_choice.TIMED for k in new)
    kept = len(new) - timed
    added = tuning_cache.added_count() - before
    total = len(tuning_cache.table_entries(device))
    fp = tuning_cache.fingerprint(device)["device"]
    where = ", ".join(
        str(fp[k]) for k in ("name", "isa", "capability") if fp.get(k) is not None
    ) + (f", threads {fp['threads']}" if "threads" in fp else "")
    print(
        f"tune: {args.model} on {device.type} ({where}), {args.dtype}, {args.layout}, "
        f"batch {args.batch}, {args.image_size}x{args.image_size}, {' + '.join(modes)}: "
        f"{len(new)} picks ({timed} timed, {kept} already in the table); "
        f"{added} added to {path} ({total} entries)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
