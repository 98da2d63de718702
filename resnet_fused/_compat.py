"""The torch versions resnet_fused supports, and what differs between them.

Supported: torch >= 2.11 (the test suite has run on 2.11 on a GPU machine and on 2.14 on
the CPU). Older torch is refused at import with a clear message.

On torch < 2.14, ``torch.compile`` (seen with aot_eager on 2.11) returned all-zero
gradients for the pure-PyTorch ("torch") backend's autograd.Functions; there, under
compile, that backend runs the reference composition with plain autograd instead
(:func:`compose_reference_under_compile`).
"""

from __future__ import annotations

import torch

MIN_TORCH = (2, 11)


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as ``"2.14.1+cu130"``."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        raise ValueError(f"cannot read the torch version {version!r}") from None


def check_torch_version(version: str) -> None:
    if parse_version(version) < MIN_TORCH:
        raise ImportError(
            f"resnet_fused needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (tested on 2.11 and "
            f"2.14), found torch {version}; upgrade torch (pip install -U torch) and rebuild "
            "resnet_fused (pip install --no-build-isolation -e .)"
        )


TORCH_VERSION = parse_version(torch.__version__)
# torch < 2.14: compiled gradients of the "torch" backend's autograd.Functions were zero.
OLD_COMPILED_AUTOGRAD = TORCH_VERSION < (2, 14)
# torch < 2.14 (seen on 2.11): oneDNN's fused convolution with a binary (add) post-op fails
# with "could not create a memory" when the output is 1x1 (resnet18's last block at 32x32
# inputs); the unary post-ops work there.
ONEDNN_BINARY_FAILS_AT_1X1 = TORCH_VERSION < (2, 14)


def compose_reference_under_compile(backend: str, device, *tensors) -> bool:
    """True where the "torch" backend must run the reference composition (plain autograd
    ops) rather than its autograd.Function: under torch.compile on torch < 2.14, when a
    gradient is needed. ``backend`` may be "auto" (resolved only once the cheap checks
    pass: nothing is done per call on a current torch)."""
    if not (OLD_COMPILED_AUTOGRAD and torch.compiler.is_compiling()):
        return False
    from .backends import resolve_backend

    return (
        resolve_backend(backend, device) == "torch"
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in tensors)
    )
