"""``batch_norm_act``: fused BatchNorm -> (residual add) -> activation (argument checks, backend
choice, synchronisation, autograd wiring). The four ops (bn_stats, bn_act_forward,
bn_act_backward_reduce, bn_act_backward_elemt) are in :mod:`resnet_fused.ops.batch_norm_act`,
the maths in :mod:`resnet_fused.reference`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _extension, ops, reference
from .._compat import compose_reference_under_compile
from .._layout import stats_dtype
from .._validation import (
    act_argument,
    check_bn_input,
    check_bn_options,
    check_like,
    check_optional_per_channel,
)
from ..activations import ID_ACT
from ..backends import resolve_backend
from ._common import (
    cached_kernels,
    distinct,
    needs_autograd,
    refuse_sync_when_eager,
    runs_eagerly,
)
from .auto_choice import EAGER, batch_bucket, choose, layout_class, make_trial

__all__ = ["batch_norm_act"]


@dataclass(frozen=True)
class _BatchNormKernels:
    stats: Callable
    forward: Callable
    backward_reduce: Callable
    backward_elemt: Callable


_KERNELS: dict[str, _BatchNormKernels] = {}


def _bn_kernels(backend: str) -> _BatchNormKernels:
    return cached_kernels(_KERNELS, backend, _make_bn_kernels)


def _make_bn_kernels(backend: str) -> _BatchNormKernels:
    if backend == "torch":
        return _BatchNormKernels(
            reference.bn_stats,
            reference.bn_act_forward,
            reference.bn_act_backward_reduce,
            reference.bn_act_backward_elemt,
        )
    if backend == "triton":
        return _BatchNormKernels(
            ops.bn_stats_triton,
            ops.bn_act_forward_triton,
            ops.bn_act_backward_reduce_triton,
            ops.bn_act_backward_elemt_triton,
        )
    lib = torch.ops.resnet_fused
    return _BatchNormKernels(
        lib.bn_stats.default,
        lib.bn_act_forward.default,
        lib.bn_act_backward_reduce.default,
        lib.bn_act_backward_elemt.default,
    )


# The "cpu" and "cuda" backends' statistics, forward and autograd node in one extension call
# (csrc/bn_act_autograd.cpp: bn_act_train, the calls of this module's Python path, with
# _BatchNormAct.backward's in C++), outside torch.compile and without synchronisation.
# NotImplemented for tensors with __torch_function__: the Python path then runs.
_BN_ACT_TRAIN = getattr(_extension._C, "bn_act_train", None)
_NATIVE = ("cpu", "cuda")
_is_compiling = torch.compiler.is_compiling  # (Dynamo knows the function, not the name)


def native_bn_act(impl: str, input, weight, bias, residual, running_mean, running_var,
                  momentum, eps, act, batch_stats: bool, update: bool):  # fmt: skip
    """:data:`_BN_ACT_TRAIN`'s output for backend ``impl``, or NotImplemented where the
    Python path must run (no extension, a backend without C++ ops, torch.compile)."""
    if _BN_ACT_TRAIN is None or impl not in _NATIVE or _is_compiling():
        return NotImplemented
    return _BN_ACT_TRAIN(
        input, weight, bias, residual, running_mean, running_var, float(momentum), float(eps),
        *act.args, batch_stats, update,
    )  # fmt: skip


class _BatchNormAct(torch.autograd.Function):
    """out = act(BN(input) [+ residual]) given the statistics (mean, var) to normalise with.

    Saves input, the statistics and weight; and what act' needs. Without a residual: bias
    (act' at the pre-activation recomputed from input). With a residual: ``out`` where act'
    is a function of the output (ReLU, ReLU6, LeakyReLU with a positive slope), else bias
    and the residual itself (SiLU, Hardswish, GELU, Sigmoid, LeakyReLU with a negative
    slope: the pre-activation BN(input) + residual recomputed in the backward's reduction
    pass).
    Eager BN + ReLU saves input and out; eager BN + add + SiLU saves the sum as well; the
    residual saved here is a tensor the caller holds (a block's input or its shortcut's
    output), not a new one. So, unlike eager's add, the residual must not be changed in
    place before the backward: autograd then raises its "modified by an inplace
    operation" error. (An inference tensor, which autograd cannot save, is copied.)
    """

    @staticmethod
    def forward(
        ctx, input, weight, bias, residual, mean, var, eps, act, batch_stats, backend, sync
    ):
        kernels = _bn_kernels(backend)
        out = kernels.forward(input, mean, var, weight, bias, residual, eps, *act.args)
        # act' from `out` (a residual and an activation that allows it), else at the
        # pre-activation recomputed from input, bias [and the residual].
        keep_out = act.active and residual is not None and act.from_output
        keep_bias = act.active and not keep_out
        keep_residual = keep_bias and residual is not None
        if keep_residual and not _is_compiling() and residual.is_inference():
            # (made under inference_mode, which autograd cannot save: eager saves the sum
            # instead, a tensor of its own; this saves a copy)
            residual = residual.clone()
        ctx.save_for_backward(
            input,
            mean,
            var,
            weight,
            bias if keep_bias else None,
            out if keep_out else None,
            residual if keep_residual else None,
        )
        ctx.eps, ctx.act, ctx.batch_stats, ctx.backend = eps, act, batch_stats, backend
        ctx.sync = sync  # distributed.SyncInfo or None
        ctx.has_residual = residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, mean, var, weight, bias, out, residual = ctx.saved_tensors
        need_input, need_weight, need_bias, need_residual = ctx.needs_input_grad[:4]
        bias_dtype = ctx.bias_dtype
        kernels = _bn_kernels(ctx.backend)
        eps, act, batch_stats = ctx.eps, ctx.act, ctx.batch_stats
        # With residual + act the reduction pass also writes the gradient through act, which
        # is d_residual and the gradient the elementwise pass normalises.
        write_masked = act.active and ctx.has_residual and (need_input or need_residual)
        need_sums = (batch_stats and need_input) or need_weight or need_bias
        # SiLU/GELU on the CPU: the reduction pass, which runs anyway, also writes
        # g = grad_out * act'(pre), and the elementwise pass reads it instead of evaluating
        # act' a second time (one more pass over memory against one exp/erf per element:
        # the exp is the dearer on a CPU; on a GPU the recomputation is the cheaper).
        masked_once = act.transcendental and need_sums and need_input and input.device.type == "cpu"
        write_masked = write_masked or masked_once
        sum_dy = sum_dy_xhat = None
        masked = grad_out
        if need_sums or write_masked:
            sum_dy, sum_dy_xhat, masked_grad = kernels.backward_reduce(
                grad_out, input, mean, var, weight, bias, out, eps, *act.args, write_masked,
                residual,
            )  # fmt: skip
            if write_masked:
                masked = masked_grad
        grad_input = None
        if need_input:
            if sum_dy is None:  # running statistics, no parameter gradients: sums unused
                sum_dy = sum_dy_xhat = torch.zeros_like(mean, dtype=stats_dtype(input.dtype))
            act_from_input = ID_ACT if ctx.has_residual or masked_once else act
            # Synchronised BN: the input gradient needs the sums over every rank; the
            # parameter gradients stay local (DDP averages them).
            sum_dy_e, sum_dy_xhat_e = sum_dy, sum_dy_xhat
            if ctx.sync is not None and batch_stats:
                from ..distributed import all_reduce_sums

                sum_dy_e, sum_dy_xhat_e = all_reduce_sums(sum_dy, sum_dy_xhat, ctx.sync)
            grad_input = kernels.backward_elemt(
                masked,
                input,
                mean,
                var,
                weight,
                bias,
                sum_dy_e,
                sum_dy_xhat_e,
                eps,
                *act_from_input.args,
                batch_stats,
            )
        grad_weight = sum_dy_xhat.to(weight.dtype) if need_weight else None
        grad_bias = sum_dy.to(bias_dtype) if need_bias else None
        grad_residual = masked if need_residual else None
        return grad_input, grad_weight, grad_bias, grad_residual, *([None] * 7)


def _check_batch_norm_act_args(
    input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act
):
    check_bn_input(input)
    for t, name in (
        (running_mean, "running_mean"),
        (running_var, "running_var"),
        (weight, "weight"),
        (bias, "bias"),
    ):
        check_optional_per_channel(t, name, input)
    if residual is not None:
        check_like(residual, "residual", input, "input")
    check_bn_options(running_mean, running_var, momentum, eps, training, act)


def _eager_batch_norm_act(
    input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act
):  # fmt: skip
    """What eager PyTorch runs: batch_norm (cuDNN/oneDNN), in-place add and the activation.
    (The aten call of F.batch_norm, whose checks batch_norm_act has made.)"""
    batch_stats = training or running_mean is None
    out = torch.batch_norm(
        input, weight, bias, running_mean, running_var, batch_stats, float(momentum),
        float(eps), torch.backends.cudnn.enabled,
    )  # fmt: skip
    if residual is not None:
        out = out.add_(residual)
    return act.eager_(out)


def _resolve_auto(
    impl, input, running_mean, running_var, weight, bias, training, momentum, eps, residual,
    act,
) -> str:  # fmt: skip
    """``"auto"``: the faster of the fused kernels (``impl``) and eager at this shape,
    timed once per key (forward, and backward when autograd records the call)."""
    tensors = (input, weight, bias, residual)
    grad = needs_autograd(*(t for t in tensors if t is not None))
    update = training and running_mean is not None

    def key():
        return (
            "batch_norm_act",
            batch_bucket(input.shape[0]),
            tuple(input.shape[1:]),
            input.dtype,
            None if weight is None else weight.dtype,
            layout_class(input),
            None if residual is None else layout_class(residual),
            training or running_mean is None,
            update,
            act.args,
            grad,
            input.device,
        )

    def forward(c, x, w, b, res):
        # Trial runs leave the running statistics alone.
        rm, rv = (running_mean.clone(), running_var.clone()) if update else (
            running_mean, running_var)  # fmt: skip
        if c == EAGER:
            return _eager_batch_norm_act(x, rm, rv, w, b, training, momentum, eps, res, act)
        return batch_norm_act(
            x, rm, rv, w, b, training, momentum, eps, residual=res, activation=act, backend=c
        )

    return choose(key, [impl, EAGER], make_trial(forward, tensors, grad), input.device)


class BatchNormPlan:
    """A BatchNorm(+add)+activation call's decisions: the backend (or eager), whether batch
    statistics are used and whether the running statistics are updated.
    :meth:`run` is the call without re-checking or re-choosing; the caller
    (``modules.bn_forward``) runs it only for calls whose signature (shapes, dtypes,
    devices, layouts, grad mode, the module's flags and settings, the policy) equals the
    one it was made for."""

    __slots__ = ("batch_stats", "impl", "update")

    def __init__(self, impl, batch_stats, update) -> None:
        self.impl, self.batch_stats, self.update = impl, batch_stats, update

    def run(self, input, running_mean, running_var, weight, bias, training, momentum, eps,
            residual, act):  # fmt: skip
        if self.impl == EAGER:
            return _eager_batch_norm_act(
                input, running_mean, running_var, weight, bias, training, momentum, eps,
                residual, act,
            )  # fmt: skip
        out = native_bn_act(
            self.impl, input, weight, bias, residual, running_mean, running_var, momentum, eps,
            act, self.batch_stats, self.update,
        )  # fmt: skip
        if out is not NotImplemented:
            return out
        kernels = _bn_kernels(self.impl)
        if self.batch_stats:
            mean, var = kernels.stats(
                input.detach(),
                running_mean if self.update else None,
                running_var if self.update else None,
                float(momentum),
            )
        else:
            mean, var = running_mean, running_var
        if not needs_autograd(*(t for t in (input, weight, bias, residual) if t is not None)):
            return kernels.forward(input, mean, var, weight, bias, residual, float(eps), *act.args)
        return _BatchNormAct.apply(
            input, weight, bias, distinct(residual, input), mean, var, float(eps), act,
            self.batch_stats, self.impl, None,
        )  # fmt: skip


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    relu: bool = True,
    activation=None,
    backend: str = "auto",
    sync: bool = False,
    process_group=None,
    _record: list | None = None,
) -> Tensor:
    """Fused ``act(batch_norm(input) + residual)`` (residual and activation optional).

    Arguments mean what they mean in :func:`torch.nn.functional.batch_norm`:

    Args:
        input: Tensor[N, C, H, W], float32/float16/bfloat16/float64, NCHW or channels_last.
        running_mean, running_var: Tensor[C] or None. In training they are updated in
            place (``running_var`` with the unbiased variance) with factor ``momentum``;
            in eval they normalise. ``None`` (no tracking): batch statistics in eval too.
        weight, bias: Tensor[C] or None (affine=False). May be float32 with half input.
        training: use batch statistics (and update the running ones).
        momentum: the running-statistics update factor.
        eps: added to the variance.
        residual: Tensor like ``input``, added after the affine transform.
        relu: apply ReLU at the end (when ``activation`` is not given).
        activation: the activation at the end, instead of ``relu``: a name (``"relu"``,
            ``"relu6"``, ``"leaky_relu"``, ``"silu"``, ``"hardswish"``, ``"gelu"``,
            ``"gelu_tanh"``, ``"sigmoid"``, ``"identity"``), an activation module
            (``nn.SiLU()``, ``nn.LeakyReLU(0.2)``, ...) or a
            :class:`resnet_fused.activations.Act`, applied after the residual add.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        sync: in training, synchronise the batch statistics over ``process_group``
            (default: the world group) like ``nn.SyncBatchNorm``; a warning and local
            statistics when torch.distributed is not initialised.

    Returns:
        Tensor like ``input`` (channels_last input gives channels_last output).
        Differentiable in input, weight, bias and residual.
    """
    act = act_argument(relu, activation)
    _check_batch_norm_act_args(
        input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act
    )
    impl = resolve_backend(backend, input.device)
    kernels = _bn_kernels(impl)
    batch_stats = training or running_mean is None
    from ..distributed import sync_group, synchronise

    group = sync_group(process_group, sync and training)
    eager = runs_eagerly()  # torch.func transforms, make_fx, jit.trace: eager's ops
    if eager:
        refuse_sync_when_eager(group, "batch_norm_act(sync=True)")
    if group is None and (
        eager or compose_reference_under_compile(impl, input.device, input, weight, bias, residual)
    ):
        return reference.batch_norm_act(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            residual=residual, activation=act,
        )  # fmt: skip
    size_per_channel = input.numel() // input.shape[1] if input.shape[1] else 0
    if batch_stats and group is None and size_per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )
    if backend == "auto" and impl != "torch" and group is None:
        impl = _resolve_auto(
            impl, input, running_mean, running_var, weight, bias, training, momentum, eps,
            residual, act,
        )  # fmt: skip
        if impl == EAGER:
            if _record is not None:
                _record.append(BatchNormPlan(EAGER, batch_stats, False))
            return _eager_batch_norm_act(
                input, running_mean, running_var, weight, bias, training, momentum, eps,
                residual, act,
            )  # fmt: skip
        kernels = _bn_kernels(impl)
    if _record is not None and group is None:
        _record.append(
            BatchNormPlan(impl, batch_stats, training and size_per_channel > 1 and batch_stats)
        )
    if group is None:
        out = native_bn_act(
            impl, input, weight, bias, residual, running_mean, running_var, momentum, eps, act,
            batch_stats, training and size_per_channel > 1,
        )  # fmt: skip
        if out is not NotImplemented:
            return out
    sync_info = None
    if group is not None:
        mean, var, sync_info = synchronise(
            kernels, input, running_mean, running_var, momentum, group
        )
    elif batch_stats:
        update = training and size_per_channel > 1
        mean, var = kernels.stats(
            input.detach(),
            running_mean if update else None,
            running_var if update else None,
            float(momentum),
        )
    else:
        mean, var = running_mean, running_var
    tensors = (input, weight, bias, residual)
    if not needs_autograd(*(t for t in tensors if t is not None)):
        return kernels.forward(input, mean, var, weight, bias, residual, float(eps), *act.args)
    return _BatchNormAct.apply(
        input, weight, bias, distinct(residual, input), mean, var, float(eps), act,
        batch_stats, impl, sync_info,
    )  # fmt: skip
