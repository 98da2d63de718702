"""The suite's report: every measured ratio against the speed goals of the project's
issues, from the rows the levels of this run wrote."""

from __future__ import annotations

import torch

from .report import geomean, is_per_provider, markdown_table

# (level, description, selector over rows, provider, goal) -- CPU and GPU goals.
CPU_GOALS = [
    ("op", "add+ReLU forward+backward", {"op": "add_relu", "mode": "forward+backward"}, 1.3),
    ("op", "BN+ReLU train forward+backward", {"op": "bn_relu", "mode": "train forward+backward"}, 1.3),
    ("op", "BN+add+ReLU train forward+backward", {"op": "bn_add_relu", "mode": "train forward+backward"}, 1.5),
    ("op", "BN+SiLU train forward+backward", {"op": "bn_silu", "mode": "train forward+backward"}, 1.5),
    ("op", "BN+Hardswish train forward+backward", {"op": "bn_hardswish", "mode": "train forward+backward"}, 1.5),
    ("op", "BN+ReLU6 train forward+backward", {"op": "bn_relu6", "mode": "train forward+backward"}, 1.5),
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


def default_provider(level: str, rows: list[dict], device: torch.device) -> str:
    """The provider that stands for what ``backend="auto"`` runs at ``level``: the op
    and layer levels' ``auto`` provider (else the backend auto resolves to here), the
    block and model levels call it ``fused``."""
    from resnet_fused.backends import auto_backend

    if level in ("block", "model"):
        return "fused"
    if level in ("op", "layer") and any(r["provider"] == "auto" for r in rows):
        return "auto"
    return auto_backend(device)[0]


_RATIO = {"model": "speedup_vs_eager_cl"}  # the row column holding the ratio to eager


def _ratio(rows: list[dict], sel: dict, provider: str, ratio_col: str) -> tuple[float, int]:
    """Geomean over the selected cases of one provider's (per-round median) speed-up
    against eager, and how many cases it covers. A case is every column that is not
    per-provider (shape, dtype, batch, layout, ...), so rows of different cases never
    pair."""
    picked = [r for r in rows if all(str(r.get(k)) == v for k, v in sel.items())]
    cases: dict[tuple, dict[str, dict]] = {}
    for r in picked:
        key = tuple((k, str(v)) for k, v in r.items() if not is_per_provider(k))
        cases.setdefault(key, {})[r["provider"]] = r
    ratios = [
        float(c[provider][ratio_col])
        for c in cases.values()
        if "eager" in c and provider in c and str(c[provider].get(ratio_col, "")) != ""
    ]
    return geomean(ratios), len(ratios)


def report(runs: dict[str, list[dict]], tag: str, device: torch.device) -> str:
    """Every goal's verdict from the rows of *this* run (``runs``: level -> the rows the
    level wrote), from the default provider alone."""
    goals = GPU_GOALS if device.type == "cuda" else CPU_GOALS
    table = []
    for level, what, sel, goal in goals:
        rows = runs.get(level, [])
        provider = default_provider(level, rows, device)
        g, n = _ratio(rows, sel, provider, _RATIO.get(level, "speedup_vs_eager"))
        measured = n > 0
        verdict = ("met" if g >= goal else "missed") if measured else "not measured"
        table.append([level, what, f"{goal:.2f}×", f"{g:.2f}×" if measured else "-",
                      provider, str(n), verdict])  # fmt: skip
    for level in ("op", "layer"):
        rows = runs.get(level, [])
        auto = [r for r in rows if r["provider"] == "auto" and str(r["speedup_vs_eager"])]
        if not auto:
            continue
        worst = min(float(r["speedup_vs_eager"]) for r in auto)
        beyond = sum(float(r["speedup_vs_eager_max"]) < 1.0 for r in auto)
        verdict = "met" if beyond == 0 else f"missed ({beyond} slower in every round)"
        table.append([level, "auto never slower than eager (smallest case)", "1.00×",
                      f"{worst:.2f}×", "auto", str(len(auto)), verdict])  # fmt: skip
    lines = [
        f"# Benchmark suite on {tag}",
        "",
        "Each level's full table is in its own report beside this file (op_*, layer_*, "
        "block_*, model_* .md/.csv/.png). A verdict comes from this run's rows only and "
        'from the default fused provider alone (what `backend="auto"` runs), never the '
        "best of several backends: the geometric mean over the selected cases of the "
        "provider's speed-up against eager, each a median of per-round ratios (the "
        "providers of a case are timed interleaved). The suite's selection, not every shape.",
        "",
        markdown_table(
            ["level", "measure", "goal", "measured", "provider", "cases", "verdict"], table
        ),
        "",
    ]
    return "\n".join(lines)
