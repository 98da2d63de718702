"""The supported-models table: converts each of a list of torchvision and timm CNNs with
``resnet_fused.convert`` and counts what it fused (issue 21, item 5).

Per model (``pretrained=False``, 10 classes, BatchNorm parameters and statistics set to
random non-trivial values, fp64, a small random batch):

* ``batchnorms``: the model's BatchNorm modules (``nn.modules.batchnorm._BatchNorm``,
  timm's ``BatchNormAct2d`` included);
* ``fused_sites`` / ``bn_fused``: the entries of ``conversion_report(model)["fused"]``,
  and how many BatchNorms appear in one (by module path; a torchvision block fused whole
  is reported by its own path, and the BatchNorms under it count as fused);
  ``site_kinds``: the entries per pattern (``conv-bn-relu``, ``bn-relu``, ..., ``block``);
* ``eager_bn_ops_train`` / ``eager_bn_ops_eval``: aten ops whose name contains
  ``batch_norm`` dispatched by one training forward and one eval forward of the converted
  model (a ``TorchDispatchMode``): BatchNorms that still run eagerly;
* ``act_not_fused``: activations after a fused BatchNorm that run as their own pass
  (``conversion_report`` entries "... runs as its own pass": activations the kernels do
  not apply), with their classes; ``other_not_fused``: every other ``not_fused``
  entry;
* ``max_diff_eval`` / ``max_diff_train``: max |converted - original| of the output, eval
  and training forward, in fp64; ``rel_diff_eval`` / ``rel_diff_train``: the same over
  max |original| (the random BatchNorm statistics make some models' outputs huge, 1e6 to
  1e16, where the absolute difference alone says little); ``noise_eval`` /
  ``noise_train``: fp64's own noise for the model, the relative difference between the
  unconverted model in NCHW and in channels_last.

The counts are measured, not written: ``docs/supported_models.md`` and ``.csv`` are this
script's output. ``RESNET_FUSED_AUTO=fused`` is set for the runs, so that ``auto`` never
times a unit and picks eager ops (the counts would depend on the machine's timing)::

    python benchmarks/supported_models.py                 # every model, into docs/
    python benchmarks/supported_models.py --models tv:resnet18,timm:resnet50d --out /tmp
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # as a script: before resnet_fused is imported (see above);
    os.environ["RESNET_FUSED_AUTO"] = "fused"  # imported (tests), measure() sets it itself

import argparse
import contextlib
import copy
import csv
import datetime
import platform
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused

ACT_MARK = "runs as its own pass"  # conversion_report's words for an unfused activation
NUM_CLASSES = 10
BATCH = 2
DEFAULT_SIZE = 64


@dataclass(frozen=True)
class Spec:
    """One model of the table: ``tv:<name>`` (torchvision) or ``timm:<name>``, the image
    size it runs at, and keyword arguments for its constructor."""

    key: str
    size: int = DEFAULT_SIZE
    kwargs: tuple[tuple[str, object], ...] = ()

    @property
    def source(self) -> str:
        return "torchvision" if self.key.startswith("tv:") else "timm"

    @property
    def name(self) -> str:
        return self.key.split(":", 1)[1]


MODELS = [
    # torchvision
    Spec("tv:resnet18"),
    Spec("tv:resnet50"),
    Spec("tv:resnext50_32x4d"),
    Spec("tv:wide_resnet50_2"),
    Spec("tv:mobilenet_v2"),
    Spec("tv:mobilenet_v3_small"),
    Spec("tv:mobilenet_v3_large"),
    Spec("tv:efficientnet_b0"),
    Spec("tv:efficientnet_v2_s"),
    Spec("tv:regnet_x_400mf"),
    Spec("tv:regnet_y_400mf"),
    Spec("tv:densenet121"),
    Spec("tv:shufflenet_v2_x1_0"),
    Spec("tv:mnasnet1_0"),
    Spec("tv:googlenet", kwargs=(("aux_logits", False), ("init_weights", False))),
    Spec("tv:inception_v3", size=96, kwargs=(("aux_logits", False), ("init_weights", False))),
    Spec("tv:resnet34"),
    Spec("tv:efficientnet_b3"),
    Spec("tv:regnet_y_800mf"),
    Spec("tv:vgg11_bn"),
    Spec("tv:densenet169"),
    # timm
    Spec("timm:resnet50"),
    Spec("timm:resnet50d"),
    Spec("timm:seresnet50"),
    Spec("timm:resnetv2_50"),
    Spec("timm:efficientnet_b0"),
    Spec("timm:efficientnet_lite0"),
    Spec("timm:mobilenetv2_100"),
    Spec("timm:mobilenetv3_small_100"),
    Spec("timm:regnetx_002"),
    Spec("timm:regnety_002"),
    Spec("timm:repvgg_a0"),
    Spec("timm:dpn68"),
    Spec("timm:cspresnet50"),
    Spec("timm:skresnet18"),
    Spec("timm:rexnet_100"),
    Spec("timm:resnest14d"),
    Spec("timm:ghostnet_100"),
    Spec("timm:densenet121"),
    Spec("timm:dla34"),
    Spec("timm:res2net50_26w_4s"),
    Spec("timm:ese_vovnet19b_dw"),
    Spec("timm:tf_efficientnet_b0"),
    Spec("timm:tresnet_m"),
    Spec("timm:hrnet_w18_small"),
    Spec("timm:cspdarknet53"),
    Spec("timm:selecsls42b"),
    Spec("timm:mixnet_s"),
    Spec("timm:xception41"),
    Spec("timm:gernet_s"),
    Spec("timm:hardcorenas_a"),
    Spec("timm:lcnet_050"),
    Spec("timm:fbnetc_100"),
    Spec("timm:mobilevit_xxs"),
    Spec("timm:efficientnetv2_rw_s"),
    Spec("timm:tinynet_a"),
    Spec("timm:semnasnet_100"),
    Spec("timm:resnet18d"),
    Spec("timm:seresnext26d_32x4d"),
    Spec("timm:ecaresnet26t"),
    Spec("timm:mobileone_s0"),
    Spec("timm:convmixer_768_32"),
    Spec("timm:ghostnetv2_100"),
    Spec("timm:darknet53"),
    Spec("timm:spnasnet_100"),
    Spec("timm:fastvit_t8"),
    Spec("timm:repghostnet_050"),
    Spec("timm:resnet33ts"),  # byobnet blocks: SiLU after the residual add
    Spec("timm:seresnext26ts"),
]

COLUMNS = [
    ("source", "source"),
    ("model", "model"),
    ("input", "input"),
    ("batchnorms", "BatchNorms"),
    ("bn_fused", "BN fused"),
    ("fused_sites", "fused sites"),
    ("site_kinds", "fused site kinds"),
    ("eager_bn_ops_train", "eager BN ops (train)"),
    ("eager_bn_ops_eval", "eager BN ops (eval)"),
    ("act_not_fused", "activations not fused"),
    ("act_kinds", "their kinds"),
    ("other_not_fused", "other not fused"),
    ("max_diff_eval", "max abs diff eval (fp64)"),
    ("max_diff_train", "max abs diff train (fp64)"),
    ("rel_diff_eval", "relative diff eval"),
    ("rel_diff_train", "relative diff train"),
    ("noise_eval", "eager layout noise eval"),
    ("noise_train", "eager layout noise train"),
]
CSV_ONLY = ["convert_s", "measure_s", "convert_warnings", "other_reasons", "error"]


def spec_for(key: str) -> Spec:
    """The listed spec of ``key`` (``tv:`` or ``timm:`` prefix), else a default one."""
    for spec in MODELS:
        if spec.key == key:
            return spec
    if not key.startswith(("tv:", "timm:")):
        raise ValueError(f"model {key!r}: expected tv:<torchvision name> or timm:<timm name>")
    return Spec(key)


def build(spec: Spec) -> nn.Module:
    """A fresh, randomly initialised model of ``spec`` with NUM_CLASSES classes."""
    kwargs = {"num_classes": NUM_CLASSES, **dict(spec.kwargs)}
    if spec.source == "timm":
        import timm

        return timm.create_model(spec.name, pretrained=False, **kwargs)
    return getattr(torchvision.models, spec.name)(**kwargs)


def batchnorm_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm parameters and running statistics (models initialise 1 and 0,
    which would hide a wrong scale, shift or statistic)."""
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            if m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def site_paths(entry: str) -> list[str]:
    """The module paths of a fused-site entry: ``"a.conv1, a.bn1, a.relu (conv-bn-relu)"``
    -> ``["a.conv1", "a.bn1", "a.relu"]``; ``"layer1.0"`` (a whole fused block) ->
    ``["layer1.0"]``."""
    body = entry.rsplit(" (", 1)[0] if entry.endswith(")") else entry
    return [p.strip() for p in body.split(",") if p.strip()]


def site_kind(entry: str) -> str:
    """The pattern of a fused-site entry (``conv-bn-relu``, ``bn-add-relu``, ...);
    ``block`` for a torchvision block fused whole (reported by its path alone)."""
    return entry.rsplit(" (", 1)[1].rstrip(")") if entry.endswith(")") else "block"


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k} ×{n}" for k, n in counter.most_common()) or "-"


def fused_batchnorms(bn_paths: list[str], fused_entries: list[str]) -> list[str]:
    """The BatchNorm paths named by a fused site, or under one (a whole fused block)."""
    sites = {p for e in fused_entries for p in site_paths(e)}

    def covered(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:i]) in sites for i in range(1, len(parts) + 1))

    return [p for p in bn_paths if covered(p)]


class _CountOps(TorchDispatchMode):
    """Names of the aten ops dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def counted_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(output, aten batch_norm ops dispatched) of one forward."""
    with _CountOps() as mode:
        out = model(x)
    return out, sum("batch_norm" in op for op in mode.ops)


@contextlib.contextmanager
def fused_policy() -> Iterator[None]:
    """RESNET_FUSED_AUTO=fused while measuring (read at each call), restored after."""
    old = os.environ.get("RESNET_FUSED_AUTO")
    os.environ["RESNET_FUSED_AUTO"] = "fused"
    try:
        yield
    finally:
        if old is None:
            del os.environ["RESNET_FUSED_AUTO"]
        else:
            os.environ["RESNET_FUSED_AUTO"] = old


def _act_kind(model: nn.Module, entry: str) -> str:
    """The class of the activation an "own pass" entry names (``path: left alone: ...``)."""
    try:
        return type(model.get_submodule(entry.split(":", 1)[0].strip())).__name__
    except AttributeError:
        return "?"


def measure(spec: Spec | str, size: int | None = None, seed: int = 0) -> dict:
    """One row of the table for ``spec`` (a :class:`Spec` or its key), at ``size`` (default
    the spec's)."""
    spec = spec_for(spec) if isinstance(spec, str) else spec
    size = size or spec.size
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    original = build(spec).double()
    randomise_bn(original, gen)
    bn_paths = batchnorm_paths(original)
    with fused_policy():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            converted = resnet_fused.convert(copy.deepcopy(original))
            convert_s = time.perf_counter() - t0
        report = resnet_fused.conversion_report(converted)
        x = torch.randn(BATCH, 3, size, size, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            original.eval()
            converted.eval()
            ref_eval = original(x)
            out_eval, ops_eval = counted_forward(converted, x)
            # fp64's own noise here: eager itself in the other memory layout, same state
            x_cl = x.to(memory_format=torch.channels_last)
            twin = copy.deepcopy(original).to(memory_format=torch.channels_last)
            noise_eval = _relative(float((twin(x_cl) - ref_eval).abs().max()), ref_eval)
            original.train()
            converted.train()
            twin.train()
            torch.manual_seed(seed)  # dropout and stochastic depth draw the same masks
            ref_train = original(x)
            torch.manual_seed(seed)
            noise_train = _relative(float((twin(x_cl) - ref_train).abs().max()), ref_train)
        torch.manual_seed(seed)
        out_train, ops_train = counted_forward(converted, x)  # with autograd, as in training
    max_eval = float((out_eval - ref_eval).abs().max())
    max_train = float((out_train.detach() - ref_train).abs().max())
    not_fused = report["not_fused"]
    acts = [e for e in not_fused if ACT_MARK in e]
    others = [e for e in not_fused if ACT_MARK not in e]
    kinds = Counter(_act_kind(original, e) for e in acts)
    return {
        "source": spec.source,
        "model": spec.name,
        "input": f"{BATCH}x3x{size}x{size}",
        "batchnorms": len(bn_paths),
        "bn_fused": len(fused_batchnorms(bn_paths, report["fused"])),
        "fused_sites": len(report["fused"]),
        "site_kinds": _counts(Counter(site_kind(e) for e in report["fused"])),
        "eager_bn_ops_train": ops_train,
        "eager_bn_ops_eval": ops_eval,
        "act_not_fused": len(acts),
        "act_kinds": _counts(kinds),
        "other_not_fused": len(others),
        "max_diff_eval": max_eval,
        "max_diff_train": max_train,
        "rel_diff_eval": _relative(max_eval, ref_eval),
        "rel_diff_train": _relative(max_train, ref_train),
        "noise_eval": noise_eval,
        "noise_train": noise_train,
        "convert_s": round(convert_s, 2),
        "measure_s": round(time.perf_counter() - start, 1),
        "convert_warnings": len(caught),
        "other_reasons": " | ".join(others),
        "error": "",
    }


def _relative(diff: float, ref: torch.Tensor) -> float:
    """``diff`` (a max |out - ref|) over max |ref| (``diff`` itself when ref is 0)."""
    scale = float(ref.abs().max())
    return diff / scale if scale > 0 else diff


def failed_row(spec: Spec, exc: BaseException) -> dict:
    row = {key: "" for key, _ in COLUMNS}
    row.update({k: "" for k in CSV_ONLY})
    row.update(source=spec.source, model=spec.name, error=f"{type(exc).__name__}: {exc}")
    return row


# ---------------------------------------------------------------------------------------
# Output


def _cell(key: str, value: object) -> str:
    if isinstance(value, float) and key.startswith(("max_diff", "rel_diff", "noise")):
        return f"{value:.1e}"
    return str(value)


def versions() -> dict[str, str]:
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = "not installed"
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm_version,
        "python": platform.python_version(),
        "resnet_fused": source_revision(),
    }


def source_revision() -> str:
    """The commit of the resnet_fused that was imported (``unknown`` outside a git
    checkout), and whether its package folder had uncommitted changes."""
    folder = os.path.dirname(os.path.abspath(resnet_fused.__file__))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", folder, *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" with uncommitted changes" if dirty else "")


def _models(n: int) -> str:
    return f"{n} model" if n == 1 else f"{n} models"


def summary(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if not r["error"]]
    all_fused = [r for r in ok if r["bn_fused"] == r["batchnorms"]]
    no_eager = [r for r in ok if r["eager_bn_ops_train"] == 0 and r["eager_bn_ops_eval"] == 0]
    worst = max(ok, key=lambda r: max(r["rel_diff_eval"], r["rel_diff_train"]), default=None)
    lines = [
        f"- {len(ok)} models measured ({len(rows) - len(ok)} failed to run), "
        f"{sum(r['batchnorms'] for r in ok)} BatchNorms, of them "
        f"{sum(r['bn_fused'] for r in ok)} in a fused site, "
        f"in {sum(r['fused_sites'] for r in ok)} fused sites.",
        f"- Every BatchNorm fused: {len(all_fused)} of {len(ok)} models; no eager "
        f"batch_norm op left in a training or eval forward: {len(no_eager)} of {len(ok)}.",
        f"- Activations after a fused BatchNorm that run as their own pass (those the "
        f"kernels do not apply): {sum(r['act_not_fused'] for r in ok)}, in "
        f"{_models(sum(1 for r in ok if r['act_not_fused']))}; other `not_fused` entries: "
        f"{sum(r['other_not_fused'] for r in ok)}.",
    ]
    beyond = [
        r for r in ok
        if any(r[f"rel_diff_{m}"] > 10 * max(r[f"noise_{m}"], 1e-15) for m in ("eval", "train"))
    ]  # fmt: skip
    lines.append(
        f"- Models whose relative output difference exceeds 10x eager's own layout noise "
        f"(floor 1e-15): {len(beyond)} of {len(ok)}"
        + (f" ({', '.join(r['source'] + ' ' + r['model'] for r in beyond)})." if beyond else ".")
    )
    if worst is not None:
        lines.append(
            f"- Largest output difference from the unconverted model (fp64), relative to the "
            f"output's largest magnitude: {max(worst['rel_diff_eval'], worst['rel_diff_train']):.1e} "
            f"({worst['source']} {worst['model']}, where eager itself differs by "
            f"{max(worst['noise_eval'], worst['noise_train']):.1e} between NCHW and "
            f"channels_last)."
        )
    return lines


def write_markdown(rows: list[dict], path: str, command: str, date: str) -> None:
    v = versions()
    lines = [
        "# Supported models",
        "",
        "What `resnet_fused.convert` fuses in common torchvision and timm CNNs with "
        "BatchNorm. **Generated, not written by hand**: every number below was measured by "
        f"`{command}` on {date} (resnet_fused at commit {v['resnet_fused']}, "
        f"torch {v['torch']}, torchvision {v['torchvision']}, "
        f"timm {v['timm']}, Python {v['python']}, CPU, `RESNET_FUSED_AUTO=fused`). "
        "Rerun it after changing the converter; the same rows are in "
        "[`supported_models.csv`](supported_models.csv).",
        "",
        "Per model (`pretrained=False`, 10 classes, BatchNorm weights, biases and running "
        "statistics set to random values, fp64, the input shown): *BatchNorms* counts the "
        "model's BatchNorm modules (timm's `BatchNormAct2d` included); *BN fused* those "
        "named by an entry of `conversion_report(model)['fused']` or inside one (a "
        "torchvision block fused whole is one entry); *fused sites* the number of those "
        "entries, *fused site kinds* their patterns (`block`: a torchvision block fused "
        "whole); *eager BN ops* the aten ops with `batch_norm` in their name dispatched by "
        "one training forward and one eval forward of the converted model (BatchNorms "
        "still run by PyTorch); *activations not fused* the activations after a fused "
        "BatchNorm that run as their own pass (those the kernels do not apply, e.g. "
        "Hardsigmoid, Mish, Tanh, ELU), with their "
        "classes; *other not fused* every other `not_fused` "
        "entry (listed below the table); *max abs diff* the largest difference between "
        "the converted and the original model's output in eval and in training mode; "
        "*relative diff* the same over the original output's largest magnitude (the random "
        "BatchNorm statistics make some outputs very large); *eager layout noise* fp64's "
        "own noise for the model: the unconverted model in channels_last against itself in "
        "NCHW, relative.",
        "",
        "## Summary",
        "",
        *summary(rows),
        "",
        "## Models",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        if r["error"]:
            continue
        lines.append("| " + " | ".join(_cell(k, r[k]) for k, _ in COLUMNS) + " |")
    others = [r for r in rows if r["other_reasons"]]
    if others:
        lines += ["", "## Other `not_fused` entries", ""]
        for r in others:
            lines.append(f"- {r['source']} {r['model']}:")
            lines += [f"  - {e}" for e in r["other_reasons"].split(" | ")]
    failed = [r for r in rows if r["error"]]
    if failed:
        lines += ["", "## Not measured", ""]
        lines += [f"- {r['source']} {r['model']}: {r['error']}" for r in failed]
    lines.append("")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_csv(rows: list[dict], path: str, date: str) -> None:
    v = versions()
    meta = ["resnet_fused", "torch", "torchvision", "timm"]
    fields = ["date", *meta] + [k for k, _ in COLUMNS] + CSV_ONLY
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({"date": date, **{k: v[k] for k in meta}, **r})


def run(
    specs: list[Spec], out: str, command: str, progress: Callable[[str], None] = print
) -> list[dict]:
    rows = []
    for i, spec in enumerate(specs, 1):
        try:
            row = measure(spec)
        except Exception as exc:  # a model that does not build or run: a row saying so
            row = failed_row(spec, exc)
        rows.append(row)
        if row["error"]:
            progress(f"[{i}/{len(specs)}] {spec.key}: FAILED {row['error']}")
        else:
            progress(
                f"[{i}/{len(specs)}] {spec.key}: BN {row['bn_fused']}/{row['batchnorms']} fused, "
                f"{row['fused_sites']} sites, eager BN ops {row['eager_bn_ops_train']}/"
                f"{row['eager_bn_ops_eval']}, acts left {row['act_not_fused']}, other "
                f"{row['other_not_fused']}, diff {row['max_diff_eval']:.1e}/"
                f"{row['max_diff_train']:.1e} ({row['measure_s']} s)"
            )
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    os.makedirs(out, exist_ok=True)
    write_markdown(rows, os.path.join(out, "supported_models.md"), command, date)
    write_csv(rows, os.path.join(out, "supported_models.csv"), date)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        help="comma-separated tv:<name>/timm:<name> (default: the list in this script)",
    )
    parser.add_argument("--out", default="docs", help="folder for supported_models.md/.csv")
    args = parser.parse_args(argv)
    specs = [spec_for(k) for k in args.models.split(",")] if args.models else MODELS
    command = "python benchmarks/supported_models.py" + (
        f" --models {args.models}" if args.models else ""
    )
    rows = run(specs, args.out, command)
    print("\n".join(summary(rows)))
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
