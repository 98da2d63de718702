"""Model-level benchmarks: whole torchvision ResNets, converted vs eager vs compile.

Providers (``layout`` is a separate axis):
    ``eager``     the torchvision model;
    ``compile``   ``torch.compile`` of the torchvision model;
    ``fused``     ``resnet_fused.convert(model)`` (backend ``auto``), or ``fused-<backend>``.

Modes: ``train`` (forward, cross-entropy, backward, SGD step) and ``eval`` (inference
under ``torch.no_grad``). Images/s and, on CUDA, peak memory of the step above the
model's own memory. On CUDA the step runs under bf16 autocast when ``amp`` is set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

import resnet_fused

from .timing import environment, keep_freed_host_memory, measure

MODELS = ("resnet18", "resnet50")


def _model(name: str, provider: str, device, fmt, training: bool):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().to(device=device, memory_format=fmt)
    model.train(training)
    if provider.startswith("fused"):
        backend = provider.split("-", 1)[1] if "-" in provider else "auto"
        model = resnet_fused.convert(model, backend=backend, inplace=True)
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
) -> list[dict]:
    if device.type == "cpu":
        keep_freed_host_memory()
    env = environment(device)
    rows = []
    for name in names:
        for mode in modes:
            training = mode == "train"
            base = {}
            for layout in layouts:
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                x = torch.randn(batch, 3, image_size, image_size, device=device)
                x = x.to(memory_format=fmt)
                y = torch.randint(0, 1000, (batch,), device=device)
                for provider in providers:
                    if provider != "eager" and layout != "channels_last":
                        continue  # the fused and compiled models are timed channels_last
                    if provider.startswith("compile"):
                        torch._dynamo.reset()
                    model = _model(name, provider, device, fmt, training)
                    step = _step(model, training, amp, device)
                    peak = ""
                    if device.type == "cuda":
                        step(x, y)
                        torch.cuda.synchronize()
                        before = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                        step(x, y)
                        torch.cuda.synchronize()
                        peak = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
                    t = measure(lambda s=step, a=x, b=y: s(a, b), device, min_run_time)
                    key = f"{provider}/{layout}"
                    base[key] = t.median_s
                    ref = base.get("eager/channels_last")
                    row = {
                        **env,
                        "model": name,
                        "mode": mode,
                        "layout": layout,
                        "provider": provider,
                        "batch": batch,
                        "image_size": image_size,
                        "amp": amp,
                        "median_ms": round(t.median_s * 1e3, 3),
                        "images_per_s": round(batch / t.median_s, 2),
                        "speedup_vs_eager_cl": round(ref / t.median_s, 3) if ref else "",
                        "peak_mb": peak,
                    }
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
                    progress(
                        f"{name:9s} {mode:5s} {layout:13s} {provider:14s} "
                        f"{row['median_ms']:10.2f} ms {row['images_per_s']:9.1f} img/s "
                        f"x{row['speedup_vs_eager_cl']} eager(cl) peak {peak} MB"
                    )
                    del model, step
    return rows


def summarise(rows: list[dict]) -> str:
    from . import report

    env = rows[0]
    lines = [
        "# Model benchmark: torchvision ResNets, converted vs eager vs compile",
        "",
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda'] or '-'}; {env['date']}; batch {env['batch']}, "
        f"{env['image_size']}x{env['image_size']} images, AMP {env['amp']}.",
        "train = forward + cross-entropy + backward + SGD step; eval = inference. "
        "×eager(cl) is the speed-up over the eager torchvision model in channels_last.",
        "",
    ]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines += [report.ratio_table(rows, ("model", "mode"), providers), ""]
    header = ["model", "mode", "provider", "layout", "ms", "images/s", "×eager(cl)", "peak MB"]
    table = [
        [
            r["model"],
            r["mode"],
            r["provider"],
            r["layout"],
            f"{r['median_ms']:.2f}",
            f"{r['images_per_s']:.1f}",
            f"{r['speedup_vs_eager_cl']}",
            str(r["peak_mb"]),
        ]
        for r in rows
    ]
    lines.append(report.markdown_table(header, table))
    lines.append("")
    return "\n".join(lines)
