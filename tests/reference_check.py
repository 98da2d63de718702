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
* The other activations' kinks (ReLU6 at 0 and 6, LeakyReLU at 0, Hardswish at -3 and
  3) are treated as ReLU's: the incoming gradient is zero where the fp64 pre-activation
  is within the pre-activation's error bound (:func:`kink_band`) of a kink
  (:func:`kink_free`), so the derivative's side there is not tested and everywhere else
  it is. The activations are continuous: outputs need no such care.
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


def kink_free(grad: torch.Tensor, kinks, pre64: torch.Tensor, band: float) -> torch.Tensor:
    """``grad`` with zeros where the fp64 pre-activation ``pre64`` is within ``band`` of
    one of ``kinks`` (pre-activation values where the derivative jumps)."""
    near = torch.zeros_like(pre64, dtype=torch.bool)
    for k in kinks:
        near |= (pre64 - k).abs() <= band
    return torch.where(near.to(grad.device), torch.zeros_like(grad), grad)


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


# --- eager's GPU BatchNorm arithmetic, for the Triton kernels under the interpreter ------
#
# The Triton kernels are GPU kernels: statistics and backward sums accumulate in fp32 (the
# CUDA rule of ``stats_dtype``), as eager's CUDA BatchNorm does. Without a GPU they run in
# Triton's interpreter on CPU tensors, where eager PyTorch is eager's *CPU* BatchNorm, which
# accumulates fp32 in fp64 (and whose own error differs between instruction sets: its
# fp32 reductions and FMA contraction follow the CPU's vector width). Measured against that,
# an fp32-accumulating kernel can fail where eager's GPU BatchNorm would fail as well, and
# pass or fail by the CPU model. So for interpreted Triton, "eager" in the tolerance rule is
# eager's GPU arithmetic evaluated here: gpu_eager_batch_norm.


def _tree_sum(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Sum over ``dims`` in ``t``'s dtype by a pairwise tree of elementwise adds: a fixed
    order, like a GPU's tree reductions, and the same rounding on every CPU (elementwise
    adds are correctly rounded; torch's CPU reductions round by the vector width)."""
    keep = [d for d in range(t.dim()) if d not in dims]
    t = t.permute(*keep, *dims).reshape(*[t.shape[d] for d in keep], -1)
    if t.shape[-1] == 0:
        return t.new_zeros(t.shape[:-1])
    while t.shape[-1] > 1:
        if t.shape[-1] % 2:
            t = torch.cat([t, torch.zeros_like(t[..., :1])], dim=-1)
        t = t[..., 0::2] + t[..., 1::2]
    return t[..., 0]


_DIMS = (0, 2, 3)


def _pc(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


class _GpuEagerBatchNorm(torch.autograd.Function):
    """y = gamma*(x - mean)*invstd + beta and its gradients, with the elementwise formulas
    of eager's native CUDA kernels (batch_norm_transform_input, batch_norm_backward_reduce
    and _elemt), each step a separate correctly rounded op in ``acc``."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, batch_stats, acc):
        xa = x.detach().to(acc)
        y = xa - _pc(mean)
        if weight is not None:
            y = _pc(weight.detach().to(acc)) * y
        y = y * _pc(invstd)
        if bias is not None:
            y = y + _pc(bias.detach().to(acc))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.batch_stats, ctx.acc = batch_stats, acc
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        acc = ctx.acc
        dy = grad.to(acc)
        xmu = x.to(acc) - _pc(mean)
        sum_dy = _tree_sum(dy, _DIMS)
        sum_dy_xmu = _tree_sum(dy * xmu, _DIMS)
        w = weight.to(acc) if weight is not None else torch.ones_like(invstd)
        grad_scale = invstd * w
        if ctx.batch_stats:
            norm = 1.0 / (x.numel() // x.shape[1])
            grad_mean = sum_dy * norm
            proj_scale = sum_dy_xmu * norm * invstd * invstd
            dx = (dy - _pc(grad_mean) - xmu * _pc(proj_scale)) * _pc(grad_scale)
        else:
            dx = dy * _pc(grad_scale)
        grad_w = None if weight is None else (sum_dy_xmu * invstd).to(weight.dtype)
        grad_b = None if ctx.bias_dtype is None else sum_dy.to(ctx.bias_dtype)
        return dx.to(x.dtype), grad_w, grad_b, None, None, None, None


def gpu_eager_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm`` with eager's GPU arithmetic (the native CUDA kernels), evaluated on
    any device with the same rounding on every CPU: statistics and backward sums in fp32
    for fp32/fp16/bf16 input (fp64 for fp64), by pairwise trees; the running statistics
    updated in place as eager does. Differentiable in input, weight and bias."""
    from resnet_fused._layout import stats_dtype

    acc = stats_dtype(input.dtype)  # the CUDA rule
    batch_stats = training or running_mean is None
    m = input.numel() // input.shape[1]
    with torch.no_grad():
        if batch_stats:
            xa = input.detach().to(acc)
            mean = _tree_sum(xa, _DIMS) / m
            d = xa - _pc(mean)
            var = _tree_sum(d * d, _DIMS) / m
            invstd = 1.0 / torch.sqrt(var + eps)
            if training and running_mean is not None:
                running_mean.copy_(running_mean.to(acc) * (1 - momentum) + mean * momentum)
                unbiased = var * (m / (m - 1))
                running_var.copy_(running_var.to(acc) * (1 - momentum) + unbiased * momentum)
        else:
            mean = running_mean.to(acc)
            invstd = 1.0 / torch.sqrt(running_var.to(acc) + eps)
    return _GpuEagerBatchNorm.apply(input, weight, bias, mean, invstd, batch_stats, acc)
