"""Comparison against the fp64 reference with an error bound relative to eager PyTorch.

The tolerance rule, written once here and used by every test that compares with the
reference:

* A fused result passes when its largest error to the fp64 reference is at most twice
  eager PyTorch's own largest error in the same dtype (eager: the plain PyTorch
  composition run in that dtype), plus a small floor scaled by the reference's magnitude
  (so exact eager results do not demand bit-exactness): :func:`error_bound`,
  :func:`assert_close_to_reference`.
* ReLU kinks: where the pre-activation is within rounding of zero, whether ReLU passes a
  value (and its gradient) legitimately differs between the fused result, eager and fp64.
  The fused output's ReLU mask may disagree with the fp64 pre-activation's sign only where
  |fp64 pre-activation| is within the same bound (:func:`assert_relu_mask`); reference and
  eager gradients are then taken through the fused output's mask
  (:func:`through_fused_mask`), so a flip within rounding of zero is not an error while a
  flip where the fp64 pre-activation is clearly away from zero is.
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
    return (a.detach().double() - ref64.detach()).abs().max().item()


def _max_abs(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def error_bound(
    eager: torch.Tensor,
    ref64: torch.Tensor,
    *,
    factor: float = 2.0,
    scale: float | None = None,
) -> float:
    """The largest error to ``ref64`` a result in ``eager.dtype`` may have: ``factor`` times
    eager's own error plus the dtype's floor times ``scale`` (default: max |ref64|; at
    least 1)."""
    scale = _max_abs(ref64) if scale is None else scale
    return factor * max_abs_err(eager, ref64) + FLOOR[eager.dtype] * max(scale, 1.0)


def assert_close_to_reference(
    actual: torch.Tensor,
    eager: torch.Tensor,
    ref64: torch.Tensor,
    *,
    name: str = "output",
    factor: float = 2.0,
    scale: float | None = None,
) -> None:
    """``actual`` (a fused result) is within :func:`error_bound` of ``ref64``."""
    assert actual.shape == ref64.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    )
    assert actual.dtype == eager.dtype, f"{name}: dtype {actual.dtype} != {eager.dtype}"
    assert torch.isfinite(actual).all() == torch.isfinite(ref64).all(), f"{name}: non-finite values"
    err = max_abs_err(actual, ref64)
    eager_err = max_abs_err(eager, ref64)
    bound = error_bound(eager, ref64, factor=factor, scale=scale)
    assert err <= bound, (
        f"{name}: max error {err:.3e} to the fp64 reference exceeds {bound:.3e} "
        f"(eager {eager.dtype} error {eager_err:.3e})"
    )


def kink_band(eager_pre: torch.Tensor, ref_pre64: torch.Tensor, *, factor: float = 2.0) -> float:
    """|fp64 pre-activation| up to which a ReLU in ``eager_pre.dtype`` may decide either
    way: the error bound of the pre-activation (twice eager's error, plus the dtype's
    floor, a few units of its last place times max |pre-activation|)."""
    return error_bound(eager_pre, ref_pre64, factor=factor)


def assert_relu_mask(
    out: torch.Tensor,
    eager_pre: torch.Tensor,
    ref_pre64: torch.Tensor,
    *,
    name: str = "output",
    factor: float = 2.0,
) -> None:
    """The fused output's ReLU mask (``out > 0``) agrees with the fp64 pre-activation's
    sign wherever that pre-activation is clearly away from zero (beyond
    :func:`kink_band`)."""
    fused_pass = out.detach() > 0
    ref_pass = ref_pre64.detach() > 0
    flips = fused_pass != ref_pass
    if not flips.any():
        return
    band = kink_band(eager_pre, ref_pre64, factor=factor)
    worst = ref_pre64.detach()[flips].abs().max().item()
    assert worst <= band, (
        f"{name}: ReLU mask differs from the fp64 pre-activation's sign at "
        f"{int(flips.sum())} positions, up to |pre-activation| = {worst:.3e} > {band:.3e} "
        "(beyond rounding of zero)"
    )


def through_fused_mask(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``grad`` masked by the fused output's ReLU (``out > 0``): the gradient to send
    through the reference's and eager's pre-activations."""
    return torch.where(out.detach() > 0, grad, torch.zeros_like(grad))


def assert_same_nonfinite(
    actual: torch.Tensor, eager: torch.Tensor, *, name: str = "output", kinds: bool = True
) -> None:
    """NaN, +Inf and -Inf at exactly the positions where eager has them (``kinds=False``:
    non-finite values at exactly eager's non-finite positions)."""
    assert actual.shape == eager.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(eager.shape)}"
    )
    tests = (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf))
    if not kinds:
        tests = (("non-finite", lambda t: ~torch.isfinite(t)),)
    for what, test in tests:
        got, want = test(actual.detach()), test(eager.detach())
        if not torch.equal(got, want):
            extra = (got & ~want).nonzero().tolist()[:4]
            missing = (want & ~got).nonzero().tolist()[:4]
            raise AssertionError(
                f"{name}: {what} positions differ from eager's: {int(got.sum())} vs "
                f"{int(want.sum())}; only fused at {extra}, only eager at {missing}"
            )
