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
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
