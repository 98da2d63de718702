"""Backend choice: which kernel implementation runs an op for given tensors.

Backends:
    ``"torch"``   the pure-PyTorch reference (always available, any device);
    ``"cpu"``     C++ kernels in ``resnet_fused._C`` (CPU tensors);
    ``"cuda"``    C++/CUDA kernels in ``resnet_fused._C`` (CUDA tensors, CUDA build);
    ``"triton"``  Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``);
    ``"auto"``    the best available for the tensors' device (see :func:`resolve_backend`).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import _extension

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
CONCRETE_BACKENDS = ("torch", "cpu", "cuda", "triton")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


class ReferenceFallbackWarning(RuntimeWarning):
    """``backend="auto"`` runs the pure-PyTorch reference because the compiled extension
    did not import (warned once per process)."""


_WARNED_FALLBACK = False


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run in its interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is defined, so once resnet_fused's Triton
    kernels are imported the mode they were imported in wins.
    """
    from . import triton as triton_pkg  # light: does not import triton itself

    if triton_pkg.kernels_imported():
        return triton_pkg.kernels_interpreted()
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "yes", "on"}


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device``; ``None`` when it can."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend in ("cpu", "cuda"):
        if not _extension.is_loaded():
            return (
                f"{backend} backend: the compiled extension resnet_fused._C did not import "
                f"({_extension.IMPORT_ERROR}); rebuild with `pip install --no-build-isolation -e .`"
            )
        if backend == "cuda" and not _extension.built_with_cuda():
            return "cuda backend: resnet_fused was built without CUDA"
        if device.type != backend:
            return f"{backend} backend: needs {backend.upper()} tensors, got tensors on {device}"
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton backend: triton is not installed"
        if device.type == "cuda":
            if triton_interpreter_enabled():
                return (
                    "triton backend: TRITON_INTERPRET=1 is set, so Triton runs in its CPU "
                    "interpreter; unset it to run on CUDA tensors"
                )
            return None
        if device.type == "cpu":
            if triton_interpreter_enabled():
                return None
            return (
                "triton backend: CPU tensors need the Triton interpreter "
                "(set TRITON_INTERPRET=1 before the first Triton kernel is used)"
            )
        return f"triton backend: tensors on {device} are not supported"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def is_available(backend: str, device: torch.device | str) -> bool:
    return unavailable_reason(backend, torch.device(device)) is None


def auto_backend(device: torch.device) -> tuple[str, str | None]:
    """What ``backend="auto"`` runs for tensors of ``device``, and why it is the
    reference when the compiled kernels would have run but could not (else ``None``).
    Warns nothing; :func:`resolve_backend` does."""
    device = torch.device(device)
    order = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}.get(device.type, ())
    for candidate in order:
        if unavailable_reason(candidate, device) is None:
            return candidate, None
    if order and not _extension.is_loaded():
        return "torch", (
            f"the compiled extension resnet_fused._C did not import "
            f"({_extension.IMPORT_ERROR}); rebuild it with "
            "`pip install --no-build-isolation -e .`"
        )
    return "torch", None


def _warn_fallback(reason: str) -> None:
    global _WARNED_FALLBACK
    if _WARNED_FALLBACK:
        return
    _WARNED_FALLBACK = True
    warnings.warn(
        f'resnet_fused: backend="auto" runs the slow pure-PyTorch reference ("torch") '
        f"because {reason}",
        ReferenceFallbackWarning,
        stacklevel=3,
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a user's ``backend=`` into a concrete, available backend for ``device``.

    ``"auto"`` picks the C++ kernels for the device when built (``"cpu"`` on CPU,
    ``"cuda"`` on CUDA), then Triton on CUDA, then the reference. It never picks
    Triton's interpreter, which is for tests only. When it falls back to the reference
    because the compiled extension did not import, it warns once
    (:class:`ReferenceFallbackWarning`, naming the import error and the fix).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        chosen, why = auto_backend(device)
        if why is not None:
            _warn_fallback(why)
        return chosen
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(reason)
    return backend
