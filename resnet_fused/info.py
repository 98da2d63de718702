"""Build and backend report: ``resnet_fused.info()`` / ``python -m resnet_fused info``."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import _extension
from .backends import CONCRETE_BACKENDS, auto_backend, unavailable_reason


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict:
    """Versions, the extension's build information, each backend's availability per
    device type (``None`` = usable, otherwise the reason it is not), and what
    ``backend="auto"`` runs per device type (``{"backend": ..., "fallback": reason}``,
    the reason set when it runs the reference because the extension did not import)."""
    devices = ["cpu"]
    gpus = []
    if torch.cuda.is_available():
        devices.append("cuda")
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    from . import __version__

    return {
        "resnet_fused": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "gpus": gpus,
        "build": _extension.build_info(),
        "backends": {
            device: {b: unavailable_reason(b, torch.device(device)) for b in CONCRETE_BACKENDS}
            for device in devices
        },
        "auto": {
            device: dict(
                zip(("backend", "fallback"), auto_backend(torch.device(device)), strict=True)
            )
            for device in devices
        },
        "tuning_table": {device: _table_path(device) for device in devices},
    }


def _table_path(device: str) -> str | None:
    from .functional.tuning_cache import table_path

    try:
        return table_path(device)
    except Exception as exc:  # the report must not fail on the table
        return f"unavailable ({exc!r})"


def format_info(report: dict | None = None) -> str:
    report = info() if report is None else report
    build = report["build"]
    lines = [
        f"resnet_fused {report['resnet_fused']}",
        f"  python {report['python']}, torch {report['torch']} (CUDA {report['torch_cuda']}), "
        f"triton {report['triton']}",
        f"  cpu: {report['cpu']} ({report['cpu_capability']}, {report['threads']} threads)",
        f"  gpus: {', '.join(report['gpus']) if report['gpus'] else 'none'}",
    ]
    if build.get("loaded"):
        cuda = (
            f"CUDA {build['cuda_version']}, archs {build['cuda_arch_list']}"
            if build["with_cuda"]
            else "without CUDA"
        )
        lines.append(
            f"  extension _C: built {cuda}, {build['compiler']}, torch {build['torch_version']}; "
            f"CPU kernels use {build['cpu_isa']}"
        )
    else:
        lines.append(f"  extension _C: not loaded ({build['error']})")
    for device, table in report["backends"].items():
        lines.append(f"  backends for {device} tensors:")
        for backend, reason in table.items():
            lines.append(f"    {backend:7s} {'usable' if reason is None else 'no: ' + reason}")
        auto = report.get("auto", {}).get(device)
        if auto is not None:
            line = f"    auto -> {auto['backend']}"
            if auto["fallback"]:
                line += f" (the pure-PyTorch reference, because {auto['fallback']})"
            lines.append(line)
        if device in report.get("tuning_table", {}):
            path = report["tuning_table"][device]
            lines.append(
                f"    auto's tuning table: {path or 'off (RESNET_FUSED_CACHE_DIR is empty)'}"
            )
    return "\n".join(lines)
