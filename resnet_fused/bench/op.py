"""Op-level benchmark: fused elementwise ops against eager PyTorch (and torch.compile).

Every provider is charged the fused op's minimal traffic (add+ReLU forward: read x and
residual, write out; backward: read grad and out, write one gradient), so GB/s compare
directly and the ratio of two GB/s is the ratio of their speeds.
"""

from __future__ import annotations

import torch

import resnet_fused
from resnet_fused.backends import is_available

from .timing import (
    copy_bandwidth,
    environment,
    keep_freed_host_memory,
    measure,
    rotating,
    rotation_count,
)

# Block outputs of torchvision ResNet-50 (C, H, W): where the residual add + ReLU runs.
RESNET50_BLOCK_OUTPUTS = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]


def fused_providers(device: torch.device) -> list[str]:
    """The fused backends worth timing here (never Triton's interpreter)."""
    out = []
    for backend in ("cpu", "cuda", "triton"):
        if is_available(backend, device) and not (backend == "triton" and device.type == "cpu"):
            out.append(backend)
    return out


def _add_relu_fn(provider: str):
    if provider == "eager":
        return lambda x, r: torch.relu(x + r)
    if provider == "compile":
        return torch.compile(lambda x, r: torch.relu(x + r), dynamic=False)
    return lambda x, r: resnet_fused.add_relu(x, r, backend=provider)


def bench_add_relu(
    device: torch.device,
    batch: int,
    dtype: torch.dtype = torch.float32,
    layouts: tuple[str, ...] = ("channels_last", "nchw"),
    providers: list[str] | None = None,
    min_run_time: float = 0.5,
    shapes: list[tuple[int, int, int]] | None = None,
    progress=print,
) -> list[dict]:
    if device.type == "cpu":
        keep_freed_host_memory()
    env = environment(device)
    copy_gbps = copy_bandwidth(device)
    providers = providers or ["eager", "compile", *fused_providers(device)]
    rows = []
    for c, h, w in shapes or RESNET50_BLOCK_OUTPUTS:
        shape = (batch, c, h, w)
        numel = batch * c * h * w
        elsize = torch.empty((), dtype=dtype).element_size()
        for layout in layouts:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            nsets = rotation_count(5 * numel * elsize, device)

            def fresh(requires_grad: bool, shape=shape, fmt=fmt):
                x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt)
                r = torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt)
                g = torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt)
                return x.requires_grad_(requires_grad), r.requires_grad_(requires_grad), g

            fwd_sets = [fresh(False)[:2] for _ in range(nsets)]
            bwd_sets = [fresh(True) for _ in range(nsets)]
            eager_times = {}
            for provider in providers:
                f = _add_relu_fn(provider)
                for mode, nbytes in (("forward", 3), ("forward+backward", 6)):
                    if mode == "forward":
                        with torch.no_grad():
                            t = measure(rotating(f, fwd_sets), device, min_run_time)
                    else:

                        def step(x, r, g, f=f):
                            return torch.autograd.grad(f(x, r), (x, r), g)

                        t = measure(rotating(step, bwd_sets), device, min_run_time)
                    gbps = nbytes * numel * elsize / t.median_s / 1e9
                    if provider == "eager":
                        eager_times[mode] = t.median_s
                    row = {
                        **env,
                        "op": "add_relu",
                        "shape": "x".join(map(str, shape)),
                        "dtype": str(dtype).replace("torch.", ""),
                        "layout": layout,
                        "mode": mode,
                        "provider": provider,
                        "median_ms": round(t.median_s * 1e3, 4),
                        "iqr_ms": round(t.iqr_s * 1e3, 4),
                        "gbps": round(gbps, 2),
                        "copy_gbps": round(copy_gbps, 2),
                        "fraction_of_copy": round(gbps / copy_gbps, 3),
                        "speedup_vs_eager": round(eager_times[mode] / t.median_s, 3)
                        if mode in eager_times
                        else "",
                    }
                    rows.append(row)
                    progress(
                        f"add_relu {row['shape']:>16s} {layout:13s} {mode:16s} {provider:8s} "
                        f"{row['median_ms']:9.3f} ms {gbps:8.1f} GB/s "
                        f"({100 * gbps / copy_gbps:5.1f}% of copy) x{row['speedup_vs_eager']}"
                    )
    return rows
