"""The suite's report: every measured ratio against the speed goals of the project's
issues, read back from the CSVs the levels wrote."""

from __future__ import annotations

import csv
import glob
import os

import torch

from .report import geomean, markdown_table

# (level, description, selector over rows, provider, goal) -- CPU and GPU goals.
CPU_GOALS = [
    ("op", "add+ReLU forward+backward", {"op": "add_relu", "mode": "forward+backward"}, 1.3),
    ("op", "BN+ReLU train forward+backward", {"op": "bn_relu", "mode": "train forward+backward"}, 1.3),
    ("op", "BN+add+ReLU train forward+backward", {"op": "bn_add_relu", "mode": "train forward+backward"}, 1.5),
    ("layer", "Conv+BN(+add)+ReLU eval, channels_last", {"mode": "eval forward", "layout": "channels_last"}, 1.05),
    ("model", "ResNet-50 eval (vs eager channels_last)", {"model": "resnet50", "mode": "eval"}, 1.08),
    ("model", "ResNet-50 training (vs eager channels_last)", {"model": "resnet50", "mode": "train"}, 1.05),
]  # fmt: skip
GPU_GOALS = [
    ("layer", "Conv+BN(+add)+ReLU training", {"mode": "train forward+backward"}, 1.15),
    ("layer", "Conv+BN(+add)+ReLU eval", {"mode": "eval forward"}, 1.3),
    ("model", "ResNet-50 training, AMP", {"model": "resnet50", "mode": "train"}, 1.3),
    ("model", "ResNet-50 inference, AMP", {"model": "resnet50", "mode": "eval"}, 1.5),
]


def _rows(out: str, level: str, tag: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, f"{level}_{tag}*.csv"))):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def _ratio(rows: list[dict], sel: dict, fused: set[str]) -> tuple[float, str]:
    """Geomean over the selected cases of eager time / the best fused provider's time."""
    picked = [r for r in rows if all(r.get(k) == v for k, v in sel.items())]
    cases: dict[tuple, dict[str, float]] = {}
    for r in picked:
        key = tuple(r.get(k) for k in ("op", "layer", "block", "model", "shape", "mode", "layout"))
        cases.setdefault(key, {})[r["provider"]] = float(r["median_ms"])
    ratios, used = [], set()
    for c in cases.values():
        cands = {p: t for p, t in c.items() if p in fused}
        if "eager" in c and cands:
            best = min(cands, key=cands.get)
            used.add(best)
            ratios.append(c["eager"] / cands[best])
    return geomean(ratios), "/".join(sorted(used))


def report(out: str, tag: str, device: torch.device) -> str:
    goals = GPU_GOALS if device.type == "cuda" else CPU_GOALS
    fused = {"cpu", "cuda", "triton", "auto", "fused", "fused-cpu", "fused-cuda", "fused-triton"}
    table = []
    for level, what, sel, goal in goals:
        rows = _rows(out, level, tag)
        g, used = _ratio(rows, sel, fused) if rows else (float("nan"), "")
        measured = g == g  # nan: not measured in this run
        verdict = ("met" if g >= goal else "missed") if measured else "not measured"
        table.append([level, what, f"{goal:.2f}×", f"{g:.2f}×" if measured else "-", used, verdict])
    lines = [
        f"# Benchmark suite on {tag}",
        "",
        "Each level's full table is in its own report beside this file (op_*, layer_*, "
        "block_*, model_* .md/.csv/.png). Ratios are geometric means of eager time over "
        "the fused time in this run (the selection of the suite, not every shape).",
        "",
        markdown_table(
            ["level", "measure", "goal", "measured", "fused provider", "verdict"], table
        ),
        "",
    ]
    return "\n".join(lines)
