"""Comparison against the fp64 reference with an error bound relative to eager PyTorch.

A fused result passes when its largest error to the fp64 reference is at most twice
eager PyTorch's own largest error in the same dtype, plus a small floor scaled by the
reference's magnitude (so exact eager results do not demand bit-exactness).
"""

from __future__ import annotations

import torch

# Floor: a few units of the dtype's last place, relative to max |reference|.
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_abs_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - ref64).abs().max().item()


def assert_close_to_reference(
    actual: torch.Tensor,
    eager: torch.Tensor,
    ref64: torch.Tensor,
    *,
    name: str = "output",
    factor: float = 2.0,
) -> None:
    assert actual.shape == ref64.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    )
    assert actual.dtype == eager.dtype, f"{name}: dtype {actual.dtype} != {eager.dtype}"
    assert torch.isfinite(actual).all() == torch.isfinite(ref64).all(), f"{name}: non-finite values"
    err = max_abs_err(actual, ref64)
    eager_err = max_abs_err(eager, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = factor * eager_err + FLOOR[eager.dtype] * max(scale, 1.0)
    assert err <= bound, (
        f"{name}: max error {err:.3e} to the fp64 reference exceeds {bound:.3e} "
        f"(eager {eager.dtype} error {eager_err:.3e})"
    )
