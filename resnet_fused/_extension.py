"""Loads the compiled extension ``resnet_fused._C`` (which registers the C++/CUDA ops).

The package still imports without it: the ``"torch"`` and ``"triton"`` backends need no
compiled code, and the backend chooser explains why ``"cpu"``/``"cuda"`` are missing.
"""

from __future__ import annotations

import torch  # noqa: F401  (the extension links against torch's libraries)

try:
    from resnet_fused import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: Exception | None = None
    _BUILD_INFO: dict = {"loaded": True, **_C.build_info(), "cpu_isa": _C.cpu_isa()}
except ImportError as exc:  # not built, or built against another torch
    _C = None
    IMPORT_ERROR = exc
    _BUILD_INFO = {"loaded": False, "error": str(exc)}


def is_loaded() -> bool:
    """True when the compiled extension imported (its ops are in the dispatcher)."""
    return _C is not None


def build_info() -> dict:
    """How ``_C`` was built (CUDA or not, CUDA arch list, compiler, torch version) and
    the instruction set its CPU kernels use here."""
    return dict(_BUILD_INFO)


def built_with_cuda() -> bool:
    return bool(_BUILD_INFO.get("with_cuda", False))
