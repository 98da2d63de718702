"""Model-level benchmarks: whole ResNets, converted vs eager vs compile.

Models (``--model``): torchvision names (``resnet50``), timm names (``timm:resnet50d``,
``pretrained=False``; needs timm) and ``tutorial_resnet18`` (the user-written ResNet of
:mod:`.tutorial`), all converted by the same ``resnet_fused.convert``.

Providers (``layout`` is a separate axis):
    ``eager``     the torchvision model;
    ``compile``   ``torch.compile`` of the torchvision model;
    ``fused``     ``resnet_fused.convert(model)`` (backend ``auto``), or ``fused-<backend>``.

Modes: ``train`` (forward, cross-entropy, backward, SGD step) and ``eval`` (inference
under ``torch.no_grad``). Images/s and, on CUDA, peak memory of the step above the
model's own memory (not measured on a CPU: "n/a (CPU)"). On CUDA the step runs under
bf16 autocast when ``amp`` is set. Every provider and layout of one model and mode is
timed interleaved (:mod:`.harness`), against eager channels_last.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

import resnet_fused

from . import harness

MODELS = ("resnet18", "resnet50")
TUTORIAL = {"tutorial_resnet18": "tutorial_resnet18"}


def unknown_model(name: str) -> str | None:
    """Why ``name`` names no model this level can build; None when it does."""
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            return f"{name}: timm is not installed (pip install timm)"
        if name[5:] not in timm.list_models():
            return f"{name}: timm has no model {name[5:]!r}"
        return None
    if name in TUTORIAL or callable(getattr(torchvision.models, name, None)):
        return None
    return f"{name}: not a torchvision model, a timm:<name> or one of {sorted(TUTORIAL)}"


def build_model(name: str) -> torch.nn.Module:
    """A fresh, randomly initialised model (ImageNet classes) by benchmark name."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False)
    if name in TUTORIAL:
        from . import tutorial

        return getattr(tutorial, TUTORIAL[name])()
    return getattr(torchvision.models, name)()


def _model(name: str, provider: str, device, fmt, training: bool, convert_s: dict):
    torch.manual_seed(0)
    model = build_model(name).to(device=device, memory_format=fmt)
    model.train(training)
    if provider.startswith("fused"):
        backend = provider.split("-", 1)[1] if "-" in provider else "auto"
        start = time.perf_counter()
        model = resnet_fused.convert(model, backend=backend, inplace=True)
        convert_s[provider] = time.perf_counter() - start
    if provider.startswith("compile"):
        from .op import compiled

        model = compiled(model, provider)
    return model


def _step(model, training: bool, amp: bool, device) -> Callable:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9) if training else None

    def run(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if not training:
                with torch.no_grad():
                    return model(x)
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return run


def _peak_mb(step, x, y, device) -> float | str:
    """Peak memory of a step above what is allocated before it (MB); "n/a (CPU)" where
    it is not measured."""
    if device.type != "cuda":
        return PEAK_NA
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(x, y)
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)


PEAK_NA = "n/a (CPU)"


def run_models(
    names,
    batch: int,
    image_size: int,
    device: torch.device,
    providers: list[str],
    layouts=("channels_last", "nchw"),
    amp: bool = False,
    min_run_time: float = 1.0,
    progress: Callable[[str], None] = print,
    on_row: Callable[[dict], None] | None = None,
    modes=("train", "eval"),
    rounds: int = harness.ROUNDS,
) -> list[dict]:
    harness.refuse_reference(providers, device)
    env = harness.start(device)
    rows = []
    # The fused and compiled models are timed channels_last; eager in every layout.
    keys = [(p, layout) for layout in layouts for p in providers
            if p == "eager" or layout == "channels_last"]  # fmt: skip
    for name in names:
        for mode in modes:
            training = mode == "train"
            gen = torch.Generator().manual_seed(0)
            x0 = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
            y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
            xs = {
                layout: x0.to(memory_format=torch.channels_last if layout == "channels_last"
                              else torch.contiguous_format)
                for layout in layouts
            }  # fmt: skip
            if any(p.startswith("compile") for p in providers):
                torch._dynamo.reset()
            fns, steps, convert_s = {}, {}, {}
            for provider, layout in keys:
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                model = _model(name, provider, device, fmt, training, convert_s)
                fns[provider, layout] = fn = _step(model, training, amp, device)
                steps[provider, layout] = lambda fn=fn, x=xs[layout], y=y: fn(x, y)
            base = ("eager", "channels_last")
            measured = harness.measure_case(
                steps, device, min_run_time,
                baseline=base if base in steps else (keys[0] if keys else None),
                tolerance=1e-1 if amp else harness.default_tolerance(torch.float32, device),
                rounds=rounds,
            )  # fmt: skip
            for provider, layout in keys:
                t = measured[provider, layout]
                peak = _peak_mb(fns[provider, layout], xs[layout], y, device)
                row = {
                    **env,
                    "model": name,
                    "mode": mode,
                    "layout": layout,
                    "provider": provider,
                    "batch": batch,
                    "image_size": image_size,
                    "amp": amp,
                    **harness.timing_columns(t, digits=3),
                    "images_per_s": round(batch / t.median_s, 2),
                    **harness.ratio_columns("speedup_vs_eager_cl", t, measured.get(base)),
                    "peak_mb": peak if peak != PEAK_NA else "",
                    "convert_s": round(convert_s[provider], 3) if provider in convert_s else "",
                }
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                peak_text = f"{peak} MB" if peak != PEAK_NA else PEAK_NA
                progress(
                    f"{name:9s} {mode:5s} {layout:13s} {provider:14s} "
                    f"{row['median_ms']:10.2f} ms {row['images_per_s']:9.1f} img/s "
                    f"x{harness.ratio_spread(row, 'speedup_vs_eager_cl')} eager(cl) "
                    f"peak {peak_text}"
                )
            del fns, steps
    return rows


def summarise(rows: list[dict]) -> str:
    from . import report

    env = rows[0]
    lines = [
        "# Model benchmark: whole ResNets, converted vs eager vs compile",
        "",
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda'] or '-'}; {env['date']}; batch {env['batch']}, "
        f"{env['image_size']}x{env['image_size']} images, AMP {env['amp']}.",
        "train = forward + cross-entropy + backward + SGD step; eval = inference. "
        "×eager(cl) is the speed-up over the same eager model in channels_last. "
        + harness.TIMING_NOTE.format(rounds=env.get("rounds", harness.ROUNDS)),
        "",
    ]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines += [report.ratio_table(rows, ("model", "mode"), providers), ""]
    header = [
        "model", "mode", "provider", "layout", "ms", "images/s", "×eager(cl)", "convert s",
        "peak MB",
    ]  # fmt: skip
    table = [
        [
            r["model"],
            r["mode"],
            r["provider"],
            r["layout"],
            f"{r['median_ms']:.2f}",
            f"{r['images_per_s']:.1f}",
            harness.ratio_spread(r, "speedup_vs_eager_cl"),
            str(r.get("convert_s", "")) or "-",
            str(r["peak_mb"]) if r["peak_mb"] != "" else PEAK_NA,
        ]
        for r in rows
    ]
    lines.append(report.markdown_table(header, table))
    lines.append("")
    return "\n".join(lines)
