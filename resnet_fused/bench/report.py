"""Writing benchmark results: CSV (one row per measurement) and a markdown summary."""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def select(items: list, names: list[str] | None, quick: bool, quick_names, what: str) -> list:
    """``items`` (each with a ``name``) by name in the given order, else the quick
    selection or all; a ValueError naming the unknown ones and the choices."""
    if names:
        by_name = {item.name: item for item in items}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"unknown {what} {unknown}; choose from {list(by_name)}")
        return [by_name[n] for n in names]
    return [item for item in items if item.name in quick_names] if quick else list(items)


def write_csv(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def geomean(values: Iterable[float]) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_table(rows: list[dict], group_keys: tuple[str, ...], providers: list[str]) -> str:
    """Geometric means per group of each provider's speed-up against eager and (when it
    was timed) against torch.compile: each case's ratio is the row's own per-round ratio
    (``speedup_vs_eager``/``speedup_vs_eager_cl``, the median of the per-round ratios the
    rows print) where the row has one, else the ratio of the median times; so the table
    agrees with the rows under it."""
    has_compile = "compile" in providers
    others = [p for p in providers if p != "eager"]
    header = [*group_keys, *[f"{p} ×eager" for p in others]]
    if has_compile:
        header += [f"{p} ×compile" for p in others if p != "compile"]
    table = []
    groups = list(dict.fromkeys(tuple(r[k] for k in group_keys) for r in rows))
    for group in groups:
        sel = [r for r in rows if tuple(r[k] for k in group_keys) == group]
        by_case: dict[tuple, dict[str, dict]] = {}
        for r in sel:
            case = tuple((k, v) for k, v in r.items() if not is_per_provider(k))
            by_case.setdefault(case, {})[r["provider"]] = r
        cells = []
        for ref in ["eager"] + (["compile"] if has_compile else []):
            for p in others:
                if ref == "compile" and p == "compile":
                    continue
                g = geomean(
                    _case_ratio(c[ref], c[p], ref) for c in by_case.values() if ref in c and p in c
                )
                cells.append(f"{g:.2f}×")
        table.append([*map(str, group), *cells])
    return markdown_table(header, table)


def _case_ratio(ref_row: dict, row: dict, ref: str) -> float:
    """``row``'s speed-up over ``ref_row`` (same case): its per-round median ratio where
    it has one against ``ref``, else the ratio of the median times."""
    columns = ("speedup_vs_eager", "speedup_vs_eager_cl") if ref == "eager" else (
        "speedup_vs_compile",)  # fmt: skip
    for col in columns:
        value = row.get(col, "")
        if value not in ("", None):
            return float(value)
    return float(ref_row["median_ms"]) / float(row["median_ms"])


# Columns that differ between the providers of one measured case.
_PER_PROVIDER = {
    "provider", "median_ms", "iqr_ms", "gbps", "fraction_of_copy", "speedup_vs_eager",
    "speedup_vs_compile", "saved_mb", "peak_mb", "tflops", "images_per_s", "ratio_vs_conv",
    "auto_pick", "speedup_vs_eager_cl", "layout_provider", "fraction_of_matmul", "rounds",
    "rel_diff", "speedup_vs_baseline", "convert_s", "first_step_s", "peak_step_mb",
    "graph_pool_mb", "fused_op_calls",
}  # fmt: skip


def never_slower(
    rows: list[dict], label_keys: tuple[str, ...], provider: str = "auto",
    ratio: str = "speedup_vs_eager",
) -> list[str]:  # fmt: skip
    """Markdown lines on whether ``provider`` (what ``backend="auto"`` runs) was ever
    slower than eager: the smallest per-case ratio, the cases below 1.0×, and those slower
    in every timing round (beyond the run's noise), with auto's picks. Empty when the rows
    have no such provider."""
    sel = [r for r in rows if r["provider"] == provider and str(r.get(ratio, "")) != ""]
    if not sel:
        return []
    worst = min(sel, key=lambda r: float(r[ratio]))
    below = [r for r in sel if float(r[ratio]) < 1.0]
    beyond = [r for r in below if float(r.get(f"{ratio}_max", r[ratio])) < 1.0]

    def label(r):
        pick = f" [picked {r['auto_pick']}]" if r.get("auto_pick") else ""
        return " ".join(str(r[k]) for k in label_keys) + pick

    lines = [
        f"## Is `{provider}` ever slower than eager?",
        "",
        f"{len(sel)} cases; smallest ratio {float(worst[ratio]):.2f}× ({label(worst)}); "
        f"{len(below)} below 1.00×, {len(beyond)} of them slower in every round "
        "(beyond this run's noise).",
    ]
    if below:
        lines += [""] + [
            f"* {label(r)}: {float(r[ratio]):.2f}× "
            f"({float(r.get(f'{ratio}_min', r[ratio])):.2f}–"
            f"{float(r.get(f'{ratio}_max', r[ratio])):.2f})"
            + (" **every round slower**" if r in beyond else "")
            for r in below
        ]
    return [*lines, ""]


def is_per_provider(column: str) -> bool:
    """Whether a column differs between the providers of one case (a time, a ratio and
    its range, a check) rather than describing the case."""
    return column in _PER_PROVIDER or (
        column.endswith(("_min", "_max")) and column[:-4] in _PER_PROVIDER
    )


def plot(rows: list[dict], path: str, label_keys: tuple[str, ...], title: str) -> str | None:
    """A PNG bar chart of every provider's speed-up against eager per case; returns the
    path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "eager"]
    cases: dict[str, dict[str, float]] = {}
    eager: dict[str, float] = {}
    for r in rows:
        label = " ".join(str(r[k]) for k in label_keys)
        if r["provider"] == "eager":
            eager[label] = float(r["median_ms"])
        else:
            cases.setdefault(label, {})[r["provider"]] = float(r["median_ms"])
    labels = [c for c in cases if c in eager]
    if not labels or not providers:
        return None
    height = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(labels) * max(1, len(providers)) + 1.5))
    for i, p in enumerate(providers):
        values = [eager[c] / cases[c][p] if p in cases[c] else 0.0 for c in labels]
        ax.barh([j + i * height for j in range(len(labels))], values, height, label=p)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up against eager (×)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Progress:
    """A progress bar in front of each line printed while the benchmarks run."""

    def __init__(self, total: int, width: int = 20, stream=None) -> None:
        import sys

        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream or sys.stdout

    def __call__(self, line: str) -> None:
        self.done += 1
        filled = min(self.width, self.width * self.done // self.total)
        bar = "#" * filled + "." * (self.width - filled)
        print(f"[{bar}] {self.done:3d}/{self.total} {line}", file=self.stream, flush=True)
