"""Fused Conv -> BatchNorm -> (residual add) -> ReLU: :func:`conv_bn_act`.

Eval mode (running statistics): BatchNorm is folded into the convolution with
:func:`torch.nn.utils.fusion.fuse_conv_bn_weights` (``W' = W*s``, ``b' = (b_conv -
mean)*s + beta``, ``s = gamma/sqrt(var + eps)``) and the block tail is one epilogue:

* ``triton``: the implicit-GEMM convolution applies ``b'``, the residual and ReLU in its
  epilogue (one kernel);
* ``cuda``: cuDNN convolution (through aten) + one in-place bias/add/ReLU pass;
* ``cpu``: oneDNN's convolution with post-ops (``torch.ops.mkldnn._convolution_pointwise``),
  else aten convolution + the C++ bias/add/ReLU pass;
* ``torch``: unfused reference ops.

Training (batch statistics): ``y = conv2d(x, W)`` then the fused BatchNorm(+add)+ReLU.
On ``triton`` the convolution's epilogue also emits per-tile statistics, so the separate
statistics pass disappears. Backward: the fused BatchNorm backward, then
``aten.convolution_backward`` (cuDNN/oneDNN) for the input and weight gradients.

``backend="auto"`` times each fused path (on CUDA: Triton and cuDNN) and the eager ops once
per layer shape (like ``torch.backends.cudnn.benchmark``) and keeps the fastest
(:mod:`.auto_choice`).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops, reference
from .._compat import ONEDNN_BINARY_FAILS_AT_1X1, compose_reference_under_compile
from .._geometry import conv_output_hw, pair
from .._layout import bn_memory_format, conv_output_channels_last, stats_dtype
from .._validation import (
    act_argument,
    check_bn_input,
    check_bn_options,
    check_device_dtype,
    check_floating,
    check_optional_per_channel,
)
from ..activations import ID_ACT, IDENTITY, RELU, Act
from ..backends import resolve_backend, unavailable_reason
from ..ops import EAGER_UNIT
from ._common import (
    check_batch_size,
    distinct,
    needs_autograd,
    refuse_sync_when_eager,
    runs_eagerly,
)
from .auto_choice import EAGER, _resolve_conv_backend, make_trial
from .batch_norm_act import _BatchNormAct, _bn_kernels, native_bn_act

__all__ = ["conv_bn_act", "fold_conv_bn"]

# The CPU backend's eval unit without oneDNN's fused convolution: aten's convolution (with
# the folded bias for fp32/fp64), then ReLU / add+ReLU in place, or the C++ bias/add/ReLU
# pass for half precision (``auto`` times it against oneDNN's and eager on a CPU).
CPU_EPILOGUE = "cpu-epilogue"

_TRITON_CONV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HALF = (torch.float16, torch.bfloat16)


# --- arguments -----------------------------------------------------------------------


def _check_args(
    input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, stride,
    padding, dilation, groups, training, momentum, eps, residual, act,
):  # fmt: skip
    check_bn_input(input)
    check_floating(conv_weight, "conv_weight")
    if conv_weight.dim() != 4:
        raise ValueError(
            "conv_weight must be a 4-D tensor (C_out, C_in/groups, kH, kW), got "
            f"{conv_weight.dim()}-D with shape {tuple(conv_weight.shape)}"
        )
    check_device_dtype(conv_weight, "conv_weight", input, "input")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c_out, c_in_g = conv_weight.shape[0], conv_weight.shape[1]
    if input.shape[1] % groups or c_out % groups:
        raise ValueError(
            f"groups={groups} must divide the input channels ({input.shape[1]}) and the "
            f"output channels of conv_weight ({c_out})"
        )
    if c_in_g * groups != input.shape[1]:
        raise ValueError(
            f"conv_weight expects {c_in_g * groups} input channels (shape "
            f"{tuple(conv_weight.shape)}, groups={groups}), but input has {input.shape[1]}"
        )
    if c_out == 0 or conv_weight.shape[2] == 0 or conv_weight.shape[3] == 0:
        raise ValueError(f"conv_weight must not be empty, got shape {tuple(conv_weight.shape)}")
    stride = pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    dilation = pair(dilation, "dilation", 1)
    what = f"conv_weight with C_out = {c_out} output channels"
    if conv_bias is not None:
        check_optional_per_channel(conv_bias, "conv_bias", input, c_out, what)
        check_device_dtype(conv_bias, "conv_bias", input, "input")
    for t, name in (
        (bn_weight, "bn_weight"),
        (bn_bias, "bn_bias"),
        (running_mean, "running_mean"),
        (running_var, "running_var"),
    ):
        check_optional_per_channel(t, name, input, c_out, what)
    check_bn_options(running_mean, running_var, momentum, eps, training, act)
    p, q = conv_output_hw(
        input.shape[2], input.shape[3], conv_weight.shape[2:], stride, padding, dilation
    )
    if p <= 0 or q <= 0:
        raise ValueError(
            f"the convolution's output would be empty: input {tuple(input.shape[2:])}, kernel "
            f"{tuple(conv_weight.shape[2:])}, stride {stride}, padding {padding}, dilation "
            f"{dilation} give {p}x{q}"
        )
    if residual is not None:
        check_floating(residual, "residual")
        out_shape = (input.shape[0], c_out, p, q)
        if tuple(residual.shape) != out_shape:
            raise ValueError(
                f"residual must have the output's shape {out_shape}, got {tuple(residual.shape)}"
            )
        check_device_dtype(residual, "residual", input, "input")
    return stride, padding, dilation


# --- eval: BatchNorm folded into the convolution ---------------------------------------


def fold_conv_bn(
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float = 1e-5,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """BatchNorm folded into the convolution: ``(W', b')`` with ``W'`` in ``dtype``
    (default: conv_weight's) and ``b'`` in fp32 (fp64 for fp64), computed in that
    precision by :func:`torch.nn.utils.fusion.fuse_conv_bn_weights` and rounded once.
    Differentiable in every input (see ``resnet_fused::fold_conv_bn``)."""
    dtype = conv_weight.dtype if dtype is None else dtype
    return ops.fold_conv_bn(
        conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, float(eps), dtype
    )


def _relu_backward(impl: str):
    if impl == "torch":
        return reference.relu_backward
    if impl == "triton":
        return ops.relu_backward_triton
    return torch.ops.resnet_fused.relu_backward.default


_MKLDNN_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_convolution_pointwise"
)
# The op itself, looked up once (a module attribute: tests put a spy in its place).
_mkldnn_pointwise = torch.ops.mkldnn._convolution_pointwise if _MKLDNN_POINTWISE else None

# Its in-place form (the residual add written into the residual), for donated residuals.
_mkldnn_pointwise_ = torch.ops.mkldnn._convolution_pointwise_ if _MKLDNN_POINTWISE else None

_ONEDNN_DTYPES: dict[torch.dtype, bool] = {}


def _onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN's convolution runs ``dtype`` on this CPU, as torch itself decides
    for aten's convolution: fp32 always, bf16 only where the CPU has the instructions
    (AVX-512 BW/VL/DQ, AVX-512 BF16/AMX or AVX-NE-CONVERT: an AVX2-only x86 has none, and
    oneDNN raises there), asked of torch once per dtype."""
    supported = _ONEDNN_DTYPES.get(dtype)
    if supported is None:
        if dtype == torch.float32:
            supported = _MKLDNN_POINTWISE
        elif dtype == torch.bfloat16:
            supported = _MKLDNN_POINTWISE and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        else:
            supported = False
        _ONEDNN_DTYPES[dtype] = supported
    return supported


# Marks on tensors (id -> (weakref, version)), voided by an in-place change of the tensor
# (its version counter) and dropped with it. Inference tensors (made under
# torch.inference_mode) have no version counter: their marks hold the weakref alone, and
# are trusted only for values private to a generated forward (_DONATED below), which
# nothing but fused units reads.
#
# _KNOWN_FINITE: outputs of CPU eval units computed from finite inputs. The next unit's
# input is usually one, so the read that proves an input finite is paid once per chain of
# fused units (the network's input, after a pooling, ...), not per unit.
#
# _DONATED: values a converted model's generated forward gives up. The converter marks
# them where its graph shows that a value made by a fused site or block is read by fused
# units only (the producer marks its output where it ran fused without hooks, so no hook
# holds it; a site or block running through its modules voids the marks of what it reads).
# The unit that adds such a value last as its residual may write its result into the
# residual's memory (oneDNN's in-place fused convolution, as Inductor's freezing does),
# with no new output buffer (on ResNet-50 inference, 1-2 MB fresh pages per unit that the
# allocator had returned to the system).
_KNOWN_FINITE: dict[int, tuple[weakref.ref, int | None]] = {}
_DONATED: dict[int, tuple[weakref.ref, int | None]] = {}


def _mark(marks: dict, t: Tensor) -> None:
    key = id(t)
    version = None if t.is_inference() else t._version
    marks[key] = (weakref.ref(t, lambda _, key=key: marks.pop(key, None)), version)


def _marked(marks: dict, t: Tensor) -> bool:
    mark = marks.get(id(t))
    if mark is None or mark[0]() is not t:
        return False
    if mark[1] is None:  # an inference tensor's mark: trusted for private values only
        return marks is _DONATED or donated(t)
    return mark[1] == t._version


def _mark_finite(t: Tensor) -> None:
    _mark(_KNOWN_FINITE, t)


def _known_finite(t: Tensor) -> bool:
    return _marked(_KNOWN_FINITE, t)


def mark_donated(t: Tensor) -> None:
    """``t`` is private to a generated forward: only fused units read it, and the one
    adding it last as its residual may overwrite it (see _DONATED). Marked only where a
    mark can be used: autograd off, a CPU tensor, not while compiling."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or not t.is_cpu:
        return
    _mark(_DONATED, t)


def donated(t: Tensor | None) -> bool:
    """Whether ``t`` was given up by :func:`mark_donated` and not changed since."""
    return t is not None and _marked(_DONATED, t)


def undonate(*tensors) -> None:
    """Voids the marks of :func:`mark_donated` on ``tensors`` (about to be seen)."""
    if _DONATED:
        for t in tensors:
            _DONATED.pop(id(t), None)


def _non_finite(*tensors) -> bool:
    """True when any tensor may hold NaN or Inf: one vectorised read of each (a sum, which
    is NaN or infinite if any element is; finite values whose sum overflows also say
    True, which only costs the unfused path)."""
    return any(
        t is not None and not math.isfinite(t.sum(dtype=stats_dtype(t.dtype)).item())
        for t in tensors
    )


def _mkldnn_ok(x: Tensor, residual: Tensor | None = None, act: Act = ID_ACT) -> bool:
    """oneDNN's fused convolution for fp32, and bf16 where this CPU supports it (skipped
    when torch.backends.mkldnn is disabled, as aten's convolution would skip oneDNN). Not
    under torch.compile, whose CPU backend does its own oneDNN fusion: there the aten
    convolution + the C++ epilogue are traced instead. Not for add+ReLU on bf16 NCHW:
    there the binary op falls back to aten's add_relu, which has no bf16 kernel (an
    internal assert in torch). (The caller also leaves the ReLU post-op out where an
    input may be non-finite: oneDNN's ReLU post-op turns NaN into 0 where torch.relu
    keeps it.) On torch < 2.14 not with a ``residual`` whose map is 1x1, where the binary
    post-op fails (_compat.ONEDNN_BINARY_FAILS_AT_1X1)."""
    if torch.compiler.is_compiling():
        return False
    add_relu = residual is not None and act.active
    if add_relu and x.dtype == torch.bfloat16 and bn_memory_format(x) != torch.channels_last:
        return False
    if (
        ONEDNN_BINARY_FAILS_AT_1X1
        and residual is not None
        and residual.shape[-2] * residual.shape[-1] == 1
    ):
        return False
    return _onednn_supports(x.dtype) and torch._C._get_mkldnn_enabled()


_REORDER = getattr(torch.ops.mkldnn, "_reorder_convolution_weight", None)


def _onednn_weight(w: Tensor, x: Tensor, geometry, residual: Tensor | None, act) -> Tensor | None:
    """``w`` reordered once into the blocked layout oneDNN's convolution picks for input
    ``x``'s shape (an opaque mkldnn tensor, as Inductor's freezing keeps), where the CPU
    eval unit runs oneDNN's fused convolution; None elsewhere. Given a dense weight,
    oneDNN reorders it at every call: on ResNet-50's deep layers (weights of 1-9 MB,
    small images) that is 10-25% of the convolution. A planned eval unit keeps it
    beside the cached fold (see :class:`EvalPlan`).

    Only where eager's output is channels_last (:func:`conv_output_channels_last`):
    oneDNN's fused convolution given a reordered weight writes a channels_last output
    whatever the input's layout, where eager's convolution of an NCHW input with an NCHW
    weight writes NCHW (and ``out.view(n, -1)`` after it works); given the dense weight
    it follows eager's rule. An NCHW unit then keeps the dense weight, and its output the
    layout eager gives it."""
    if _REORDER is None or not _mkldnn_ok(x, residual, act) or not conv_output_channels_last(x, w):
        return None
    stride, padding, dilation, groups = geometry
    with torch.no_grad():
        return _REORDER(w, list(padding), list(stride), list(dilation), groups, list(x.shape))


def _kept_onednn_weight(kept, w: Tensor, x: Tensor, geometry, residual, act) -> tuple:
    """``kept`` = (W', W' reordered for oneDNN) while W' is the same tensor, else made
    anew for ``w`` (a remade fold is a new tensor)."""
    if kept is None or kept[0] is not w:
        kept = (w, _onednn_weight(w, x, geometry, residual, act))
    return kept


def _can_overwrite(residual: Tensor, x: Tensor, out_channels_last: bool) -> bool:
    """Whether oneDNN's convolution of ``x`` can write its output into ``residual``: not
    while autograd records (a tensor it saved must stay as it was, even where this unit
    records nothing), the output's dtype, dense in the memory format eager's output has
    (``out_channels_last``: :func:`conv_output_channels_last`; the shape the caller's
    checks have made the output's), in memory of its own."""
    fmt = torch.channels_last if out_channels_last else torch.contiguous_format
    return (
        not torch.is_grad_enabled()
        and residual.dtype == x.dtype
        and (not residual.is_inference() or torch.is_inference_mode_enabled())
        and type(residual) is Tensor
        and residual.is_contiguous(memory_format=fmt)
        and residual.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    )


def _eval_forward(
    impl, x, w, b, residual, stride, padding, dilation, groups, act, w_packed, w_finite=None,
    w_onednn=None, donate=False,
):  # fmt: skip
    """act(conv2d(x, w) + b [+ residual]) on backend ``impl`` (no autograd). ``w_finite``:
    whether w and b are known to be finite (a cached fold knows; None: look). ``w_onednn``:
    ``w`` reordered for oneDNN (:func:`_onednn_weight`), used by its fused convolution.
    ``donate``: the caller gives ``residual`` up (see _DONATED); oneDNN's fused
    convolution then writes the result into it where it can."""
    if (
        impl == "triton"
        and groups == 1
        and x.dtype in _TRITON_CONV_DTYPES
        and conv_output_channels_last(x, w)
    ):
        # (the Triton convolution writes channels_last: elsewhere aten's convolution and
        # the Triton epilogue below, so that the output has eager's layout)
        if w_packed is None:
            w_packed = _triton_pack(w)
        return ops.conv_bias_act_triton(
            x, w_packed, list(w.shape[2:]), list(stride), list(padding), list(dilation),
            b, residual, *act.args,
        )  # fmt: skip
    if impl == "cpu" and _mkldnn_ok(x, residual, act):
        # oneDNN's ReLU post-op maps NaN to 0 where torch.relu keeps NaN: the activation
        # post-ops are used only where the inputs are finite (a NaN cannot then arise
        # inside, short of overflowing fp32): known finite (marked outputs of such units;
        # an inference tensor, which has no version counter, only where it is private to
        # a generated forward), else read once. After a residual add oneDNN gets ReLU
        # only; the others run after it.
        finite = (w_finite if w_finite is not None else not _non_finite(w, b)) and not any(
            t is not None and not _known_finite(t) and _non_finite(t) for t in (x, residual)
        )
        if finite or not act.active:
            post = act.active and finite and (residual is None or act.kind == RELU)
            bias = b.to(x.dtype) if b is not None else None
            w_dense = w
            if w_onednn is not None:
                w = w_onednn
            if residual is None:
                attr, scalars, algorithm = act.onednn if post else ("none", [], "")
                out = _mkldnn_pointwise(
                    x, w, bias, list(padding), list(stride), list(dilation), groups,
                    attr, scalars, algorithm,
                )  # fmt: skip
            elif donate and _can_overwrite(residual, x, conv_output_channels_last(x, w_dense)):
                out = _mkldnn_pointwise_.binary(
                    residual, x, w, bias, list(padding), list(stride), list(dilation), groups,
                    "add", None, "relu" if post else None, [], "",
                )  # fmt: skip
                # (the op leaves the version counter as it was: bumped here, which voids
                # the marks on the tensor's old contents, such as _KNOWN_FINITE's; an
                # inference tensor has none, and loses its marks)
                if out.is_inference():
                    _KNOWN_FINITE.pop(id(out), None)
                    undonate(out)
                else:
                    torch.autograd.graph.increment_version(out)
            else:
                out = _mkldnn_pointwise.binary(
                    x, residual, w, bias, list(padding), list(stride), list(dilation), groups,
                    "add", None, "relu" if post else None, [], "",
                )  # fmt: skip
            if act.active and not post:
                out = act.eager_(out)
            if finite:
                _mark_finite(out)
            return out
    if impl in ("cpu", CPU_EPILOGUE) and x.dtype in (torch.float32, torch.float64):
        # The bias inside aten's convolution (free), then the activation or add+ReLU in
        # place: one pass over the output, as bias_act_ would be, with less fixed cost.
        # (Half precision keeps bias_act_: its fp32 bias is added before rounding once.)
        # Other activations after an add: bias_act_, one pass.
        if residual is None:
            return act.eager_(F.conv2d(x, w, b, stride, padding, dilation, groups))
        if act.kind in (IDENTITY, RELU):
            y = F.conv2d(x, w, b, stride, padding, dilation, groups)
            if act.active:
                torch.ops.resnet_fused.add_relu_(y, residual)
                return y
            return y.add_(residual)
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    if impl == "torch":
        return reference.bias_act(y, b, residual, *act.args)
    if impl == "triton":
        ops.bias_act_triton_(y, b, residual, *act.args)
    else:
        torch.ops.resnet_fused.bias_act_(y, b, residual, *act.args)
    return y


def _triton_pack(w: Tensor) -> Tensor:
    from ..triton import conv

    return conv.pack_weight(w)


class _ConvBiasAct(torch.autograd.Function):
    """out = act(conv2d(x, W') + b' [+ residual]); saves x, W' and out (SiLU, Hardswish,
    GELU: the pre-activation instead, computed in a pass of its own, as eager saves it)."""

    @staticmethod
    def forward(ctx, x, w, b, residual, geometry, act, impl, w_packed):
        stride, padding, dilation, groups = geometry
        if act.from_output:
            out = saved = _eval_forward(
                impl, x, w, b, residual, stride, padding, dilation, groups, act, w_packed
            )
        else:
            saved = _eval_forward(
                impl, x, w, b, residual, stride, padding, dilation, groups, ID_ACT, w_packed
            )
            out = act(saved)
        ctx.save_for_backward(x, w, saved if act.active else None)
        ctx.geometry, ctx.act, ctx.impl = geometry, act, impl
        ctx.b_dtype = None if b is None else b.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w, saved = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        need_x, need_w, need_b, need_res = ctx.needs_input_grad[:4]
        g = grad_out
        act = ctx.act
        if act.kind == RELU:
            g = _relu_backward(ctx.impl)(g.contiguous(memory_format=bn_memory_format(saved)), saved)
        elif act.from_output:
            g = act.backward_from_output(g, saved)
        elif act.active:
            g = act.backward(g, saved)
        grad_x = grad_w = None
        if need_x or need_w:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                g, x, w, None, list(stride), list(padding), list(dilation), False, [0, 0],
                groups, [need_x, need_w, False],
            )  # fmt: skip
        grad_b = (
            g.sum(dim=(0, 2, 3), dtype=stats_dtype(g.dtype)).to(ctx.b_dtype) if need_b else None
        )
        grad_res = g if need_res else None
        return grad_x, grad_w, grad_b, grad_res, None, None, None, None


# --- training: convolution, then the fused BatchNorm ------------------------------------


class _TritonConvStats(torch.autograd.Function):
    """y, batch mean, batch var = Triton conv with statistics epilogue; d/dx, d/dW by
    aten.convolution_backward. mean and var are not differentiable here: the BatchNorm
    backward (batch-statistics formula) accounts for their dependence on y."""

    @staticmethod
    def forward(ctx, x, w, geometry, running_mean, running_var, momentum):
        stride, padding, dilation, _ = geometry
        y, mean, var = ops.conv_bn_stats_triton(
            x, _triton_pack(w), list(w.shape[2:]), list(stride), list(padding), list(dilation),
            running_mean, running_var, momentum,
        )  # fmt: skip
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, w)
        ctx.geometry = geometry
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _gm, _gv):
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_y.contiguous(memory_format=torch.channels_last), x, w, None, list(stride),
            list(padding), list(dilation), False, [0, 0], groups, [need_x, need_w, False],
        )  # fmt: skip
        return grad_x, grad_w, None, None, None, None


def _train_forward(
    impl, x, w, conv_b, bn_w, bn_b, rm, rv, geometry, momentum, eps, residual, act, update,
    bn_impl=None, group=None,
):  # fmt: skip
    """Training forward: the convolution on ``impl`` (Triton: with the statistics
    epilogue), BatchNorm(+add)+ReLU on ``bn_impl`` (default: ``impl``); with a process
    ``group`` the local statistics are synchronised before the apply."""
    bn_impl = impl if bn_impl is None else bn_impl
    stride, padding, dilation, groups = geometry
    rm_u, rv_u = (rm, rv) if update and group is None else (None, None)
    relayout = False
    if impl == "triton" and groups == 1 and conv_b is None and x.dtype in _TRITON_CONV_DTYPES:
        # The Triton convolution writes channels_last (see _eval_forward): where eager's
        # output is NCHW, the unit's output is copied to NCHW at the end, its statistics
        # (the convolution's epilogue, fp32 as eager's GPU BatchNorm) kept as they are.
        relayout = not conv_output_channels_last(x, w)
        if needs_autograd(x, w):
            y, mean, var = _TritonConvStats.apply(x, w, geometry, rm_u, rv_u, float(momentum))
        else:
            y, mean, var = ops.conv_bn_stats_triton(
                x, _triton_pack(w), list(w.shape[2:]), list(stride), list(padding),
                list(dilation), rm_u, rv_u, float(momentum),
            )  # fmt: skip
    else:
        y = F.conv2d(x, w, conv_b, stride, padding, dilation, groups)
        if group is None:
            check_batch_size(y)
            out = native_bn_act(
                bn_impl, y, bn_w, bn_b, residual, rm, rv, momentum, eps, act, True, update
            )
            if out is not NotImplemented:
                return out
        mean, var = _bn_kernels(bn_impl).stats(y.detach(), rm_u, rv_u, float(momentum))
    sync = None
    if group is not None:
        from ..distributed import finish_sync

        count = y.numel() // y.shape[1]
        rm_s, rv_s = (rm, rv) if update else (None, None)
        mean, var, sync = finish_sync(mean, var, count, rm_s, rv_s, momentum, group)
    kernels = _bn_kernels(bn_impl)
    if not needs_autograd(*(t for t in (y, bn_w, bn_b, residual) if t is not None)):
        out = kernels.forward(y, mean, var, bn_w, bn_b, residual, float(eps), *act.args)
    else:
        out = _BatchNormAct.apply(
            y, bn_w, bn_b, residual, mean, var, float(eps), act, True, bn_impl, sync
        )
    return out.contiguous() if relayout else out


def _eager_unit(
    x, w, conv_b, bn_w, bn_b, rm, rv, geometry, training, momentum, eps, residual, act
):  # fmt: skip
    """The unit as eager PyTorch runs it unconverted (``backend="auto"``'s ``"eager"``
    pick): conv2d, batch_norm (cuDNN/oneDNN; updating the running statistics in
    training), in-place add and ReLU, as torchvision's blocks do. With the extension, these
    ops in one C++ call and one autograd node (:data:`ops.EAGER_UNIT`, bit-identical);
    without it, and under torch.compile (which traces the ops), one by one."""
    stride, padding, dilation, groups = geometry
    batch_stats = training or rm is None
    if EAGER_UNIT is not None and not torch.compiler.is_compiling():
        out = EAGER_UNIT(
            x, w, conv_b, bn_w, bn_b, rm, rv, None, stride, padding, dilation, groups,
            batch_stats, float(momentum), float(eps), residual, *act.args,
        )  # fmt: skip
        if out is not NotImplemented:
            return out
    y = F.conv2d(x, w, conv_b, stride, padding, dilation, groups)
    y = F.batch_norm(y, rm, rv, bn_w, bn_b, batch_stats, float(momentum), float(eps))
    if residual is not None:
        y = y.add_(residual)
    return act.eager_(y)


# --- plans: what the first call of a unit decided, for the calls after it ----------------------


class TrainPlan:
    """A training unit's decisions (batch statistics): the backend of the convolution
    (or eager), of the BatchNorm, the normalised geometry and whether the running
    statistics are updated. :meth:`run` is the unit without re-checking or re-choosing:
    the caller (``modules.conv_bn_forward``) runs it only for calls whose signature
    (shapes, dtypes, devices, layouts, grad mode, the modules' flags and settings, the
    policy) equals the one this plan was made for."""

    __slots__ = ("bn_impl", "geometry", "impl", "unit", "update")
    batch_stats = True  # (F.batch_norm's training flag)

    def __init__(self, impl, bn_impl, geometry, update) -> None:
        self.impl, self.bn_impl, self.geometry, self.update = impl, bn_impl, geometry, update
        # The eager unit as one C++ call (modules._run_planned_ops calls it with the
        # module's own bookkeeping), else None.
        self.unit = EAGER_UNIT if impl == EAGER else None

    def run(self, x, w, conv_b, bn_w, bn_b, rm, rv, momentum, eps, residual, act):
        if self.impl == EAGER:
            return _eager_unit(
                x, w, conv_b, bn_w, bn_b, rm, rv, self.geometry, True, momentum, eps, residual,
                act,
            )  # fmt: skip
        return _train_forward(
            self.impl, x, w, conv_b, bn_w, bn_b, rm, rv, self.geometry, momentum, eps,
            residual, act, self.update, self.bn_impl,
        )  # fmt: skip


class EvalPlan:
    """An eval unit's decisions (running statistics folded into the convolution): the
    backend, the normalised geometry and whether autograd records the call. :meth:`run`
    takes the fold from the caller: the cached one without autograd, a differentiable
    one (:func:`fold_conv_bn`) with it (see :class:`TrainPlan` for when it may run)."""

    __slots__ = ("geometry", "grad", "impl", "onednn", "unit")
    batch_stats = False

    def __init__(self, impl, geometry, grad, onednn=None) -> None:
        self.impl, self.geometry, self.grad = impl, geometry, grad
        self.unit = EAGER_UNIT if impl == EAGER else None  # (see TrainPlan)
        # (W', W' reordered for oneDNN at this plan's input shape) or None: the CPU's
        # fused convolution's weight, made again when the cached fold is remade (a new W')
        self.onednn = onednn

    def run(self, x, w, conv_b, bn_w, bn_b, rm, rv, eps, residual, act, folded, donate=False):
        if self.impl == EAGER:
            return _eager_unit(
                x, w, conv_b, bn_w, bn_b, rm, rv, self.geometry, False, 0.0, eps, residual,
                act,
            )  # fmt: skip
        if self.grad:
            w_f, b_f = folded
            return _ConvBiasAct.apply(
                x, w_f, b_f, distinct(residual, x), self.geometry, act, self.impl, None
            )
        stride, padding, dilation, groups = self.geometry
        w_f, b_f, w_packed, w_finite = folded
        w_onednn = None
        if self.impl == "cpu":
            # (self.onednn read once: another thread may replace it)
            self.onednn = kept = _kept_onednn_weight(
                self.onednn, w_f, x, self.geometry, residual, act
            )
            w_onednn = kept[1]
        return _eval_forward(
            self.impl, x, w_f, b_f, residual, stride, padding, dilation, groups, act,
            w_packed if self.impl == "triton" else None, w_finite, w_onednn, donate,
        )  # fmt: skip


# --- public function ------------------------------------------------------------------------


def conv_bn_act(
    input: Tensor,
    conv_weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    conv_bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    relu: bool = True,
    activation=None,
    backend: str = "auto",
    sync_bn: bool = False,
    process_group=None,
    _folded: tuple[Tensor, Tensor, Tensor | None, bool | None] | None = None,
    _fold_check=None,
    _record: list | None = None,
) -> Tensor:
    """Fused ``act(batch_norm(conv2d(input, conv_weight, conv_bias)) + residual)``.

    Arguments mean what they mean in :func:`torch.nn.functional.conv2d` and
    :func:`torch.nn.functional.batch_norm`:

    Args:
        input: Tensor[N, C_in, H, W], float32/float16/bfloat16/float64; channels_last
            (NHWC) is the fast layout.
        conv_weight: Tensor[C_out, C_in/groups, kH, kW], input's dtype.
        bn_weight, bn_bias: Tensor[C_out] or None (affine=False).
        running_mean, running_var: Tensor[C_out] or None. Eval mode folds them into the
            convolution; training updates them in place like ``nn.BatchNorm2d``; ``None``
            means batch statistics in eval too.
        conv_bias: Tensor[C_out] or None.
        stride, padding, dilation: int or pair; groups: int.
        training: batch statistics (and running-statistics update) instead of folding.
        momentum, eps: as in ``nn.BatchNorm2d``.
        residual: Tensor like the output, added after BatchNorm, before the activation.
        relu: apply ReLU at the end (when ``activation`` is not given).
        activation: the activation at the end, instead of ``relu`` (as in
            :func:`resnet_fused.batch_norm_act`: a name, a module or an ``Act``).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        sync_bn, process_group: in training, synchronise the BatchNorm statistics over
            the group (default: world), like ``nn.SyncBatchNorm``.

    Returns:
        Tensor[N, C_out, H_out, W_out] in input's dtype. Differentiable in input,
        conv_weight, conv_bias, bn_weight, bn_bias and residual. Under autocast the
        convolution runs in the autocast dtype, as ``F.conv2d`` would.
    """
    act = act_argument(relu, activation)
    eager = runs_eagerly()  # torch.func transforms, make_fx, jit.trace: eager's ops
    if eager and sync_bn and training:
        from ..distributed import sync_group

        refuse_sync_when_eager(sync_group(process_group, True), "conv_bn_act(sync_bn=True)")
    if isinstance(input, Tensor) and torch.is_autocast_enabled(input.device.type):
        if eager:  # (autocast casts eager's ops as it casts them in the unconverted code)
            return reference.conv_bn_act(
                input, conv_weight, bn_weight, bn_bias, running_mean, running_var,
                conv_bias=conv_bias, stride=stride, padding=padding, dilation=dilation,
                groups=groups, training=training, momentum=momentum, eps=eps,
                residual=residual, activation=act,
            )  # fmt: skip
        return _conv_bn_act_autocast(
            input, conv_weight, bn_weight, bn_bias, running_mean, running_var,
            conv_bias=conv_bias, stride=stride, padding=padding, dilation=dilation,
            groups=groups, training=training, momentum=momentum, eps=eps,
            residual=residual, activation=act, backend=backend, sync_bn=sync_bn,
            process_group=process_group, _folded=_folded, _fold_check=_fold_check,
            _record=_record,
        )  # fmt: skip
    stride, padding, dilation = _check_args(
        input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, stride,
        padding, dilation, groups, training, momentum, eps, residual, act,
    )  # fmt: skip
    geometry = (stride, padding, dilation, groups)
    batch_stats = training or running_mean is None
    tensors = (input, conv_weight, conv_bias, bn_weight, bn_bias, residual)
    if eager or (
        not (sync_bn and training)
        and compose_reference_under_compile(backend, input.device, *tensors)
    ):
        return reference.conv_bn_act(
            input, conv_weight, bn_weight, bn_bias, running_mean, running_var,
            conv_bias=conv_bias, stride=stride, padding=padding, dilation=dilation,
            groups=groups, training=training, momentum=momentum, eps=eps, residual=residual,
            activation=act,
        )  # fmt: skip

    half_bn_grad = input.dtype in _HALF and needs_autograd(
        *(t for t in (bn_weight, bn_bias) if t is not None)
    )
    if batch_stats:
        p, q = conv_output_hw(
            input.shape[2], input.shape[3], conv_weight.shape[2:], stride, padding, dilation
        )
        from ..distributed import sync_group

        group = sync_group(process_group, sync_bn and training)
        if group is None:
            check_batch_size((input.shape[0], conv_weight.shape[0], p, q))
        update = training and running_mean is not None

        # "auto" times the unit once per shape (forward, and backward when autograd
        # records the call) on each fused backend and as eager ops, and keeps the fastest.
        # On CUDA the fused candidates are the cuDNN and the Triton convolution (with the
        # statistics epilogue); BatchNorm then always runs on the CUDA kernels.
        bn_impl = None
        if (
            backend == "auto"
            and input.device.type == "cuda"
            and unavailable_reason("cuda", input.device) is None
        ):
            bn_impl = "cuda"

        def unit(impl, x, w, cb, bw, bb, res, rm, rv):
            if impl == EAGER:
                return _eager_unit(
                    x, w, cb, bw, bb, rm, rv, geometry, True, momentum, eps, res, act
                )
            return _train_forward(
                impl, x, w, cb, bw, bb, rm, rv, geometry, momentum, eps, res, act, update,
                bn_impl if bn_impl is not None and impl in ("cuda", "triton") else None,
                group,
            )  # fmt: skip

        if group is not None:  # no timing trials: they would run collectives
            impl = resolve_backend(backend, input.device)
            return unit(impl, *tensors, running_mean, running_var)

        def trial_unit(impl, *args):
            # Trial runs (timing for "auto") must leave the running statistics alone.
            rm, rv = (running_mean.clone(), running_var.clone()) if update else (None, None)
            return unit(impl, *args, rm, rv)

        grad = needs_autograd(*(t for t in tensors if t is not None))
        impl = _resolve_conv_backend(
            backend, input, conv_weight, geometry, True, residual, act,
            make_trial(trial_unit, tensors, grad), conv_bias, grad=grad,
        )  # fmt: skip
        if _record is not None:
            fused_bn_impl = bn_impl if bn_impl is not None and impl in ("cuda", "triton") else None
            _record.append(TrainPlan(impl, fused_bn_impl, geometry, update))
        return unit(impl, *tensors, running_mean, running_var)

    if half_bn_grad:
        # BatchNorm parameters that need gradients with half-precision activations (e.g.
        # fine-tuning the affine of a frozen BN under autocast): BN applied to the
        # convolution's output, whose backward sums Σg, Σg·x̂ in fp32 as eager's does. The
        # fold would give them through the folded weight's gradient, rounded to half
        # precision before its C_in·kH·kW-term sums (about 2x eager's error).
        impl = resolve_backend(backend, input.device)
        y = F.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
        return _BatchNormAct.apply(
            y, bn_weight, bn_bias, residual, running_mean, running_var, float(eps), act,
            False, impl, None,
        )  # fmt: skip

    if _folded is not None:
        w_f, b_f, w_packed, w_finite = _folded
    else:
        w_f, b_f = fold_conv_bn(
            conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps
        )
        w_packed = w_finite = None

    grad = needs_autograd(*(t for t in (input, w_f, b_f, residual) if t is not None))
    # A module's cached fold without autograd: its plan keeps W' reordered for oneDNN
    # (made here once, for the trials and this call, and handed to the plan).
    onednn = None

    def run_eval(impl, packed=None):
        nonlocal onednn
        if not grad:
            w_onednn = None
            if impl == "cpu" and _folded is not None:
                onednn = _kept_onednn_weight(onednn, w_f, input, geometry, residual, act)
                w_onednn = onednn[1]
            return _eval_forward(
                impl, input, w_f, b_f, residual, stride, padding, dilation, groups, act, packed,
                w_finite, w_onednn,
            )  # fmt: skip
        return _ConvBiasAct.apply(
            input, w_f, b_f, distinct(residual, input), geometry, act, impl, packed
        )

    def trial(impl):
        # Time what the real call runs: with the packed weight it will be given (a
        # module's cached fold), packing once here for a trial that has none.
        nonlocal w_packed
        if impl == EAGER:
            return _eager_unit(
                input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                geometry, False, momentum, eps, residual, act,
            )  # fmt: skip
        if (
            impl == "triton"
            and w_packed is None
            and groups == 1
            and w_f.dtype in _TRITON_CONV_DTYPES
        ):
            w_packed = _triton_pack(w_f)
        return run_eval(impl, w_packed if impl == "triton" else None)

    def no_grad_trial(impl):
        # Eval units time the forward (inference is what they run), with what a module's
        # planned call adds to a folded path (``_fold_check``: the check that its cached
        # fold is fresh), so that the pick is the cheaper call, not the cheaper kernel.
        with torch.no_grad():
            if _fold_check is not None and impl != EAGER:
                _fold_check()
            return trial(impl)

    # On a CPU, oneDNN's fused convolution costs a fixed ~0.1-0.2 ms per call (it builds
    # its primitive each time), which small units do not earn back: aten's convolution
    # with the folded bias + the epilogue is timed against it.
    alternative = None
    if not grad and input.device.type == "cpu" and _mkldnn_ok(input, residual, act):
        alternative = CPU_EPILOGUE
    impl = _resolve_conv_backend(
        backend, input, conv_weight, geometry, False, residual, act, no_grad_trial,
        conv_bias, grad=grad, alternative=alternative,
    )  # fmt: skip
    out = trial(EAGER) if impl == EAGER else run_eval(impl, w_packed if impl == "triton" else None)
    if _record is not None and (_folded is not None or grad):
        _record.append(EvalPlan(impl, geometry, grad, onednn if impl == "cpu" else None))
    return out


def _conv_bn_act_autocast(input, conv_weight, *args, **kwargs) -> Tensor:
    """Under autocast: the convolution in the autocast dtype (as F.conv2d), BatchNorm
    parameters as given; in eval mode the fold is computed from the full-precision
    weights and rounded once to the autocast dtype."""
    device_type = input.device.type
    dtype = torch.get_autocast_dtype(device_type)
    if not input.is_floating_point() or input.dtype == torch.float64:
        with torch.autocast(device_type, enabled=False):
            return conv_bn_act(input, conv_weight, *args, **kwargs)

    def cast(t):
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

    bn_weight, bn_bias, running_mean, running_var = args
    eval_fold = (
        not kwargs["training"]
        and running_mean is not None
        and kwargs["_folded"] is None
        and isinstance(conv_weight, Tensor)
        and not needs_autograd(*(t for t in (bn_weight, bn_bias) if isinstance(t, Tensor)))
        # (see conv_bn_act: BN parameters needing gradients in half precision)
    )
    conv_bias = kwargs["conv_bias"]
    kwargs["conv_bias"] = cast(conv_bias)
    kwargs["residual"] = cast(kwargs["residual"])
    with torch.autocast(device_type, enabled=False):
        if eval_fold:
            # Validate on the cast arguments first, then fold the originals.
            _check_args(
                cast(input), cast(conv_weight), kwargs["conv_bias"], bn_weight, bn_bias,
                running_mean, running_var, kwargs["stride"], kwargs["padding"],
                kwargs["dilation"], kwargs["groups"], kwargs["training"], kwargs["momentum"],
                kwargs["eps"], kwargs["residual"], kwargs["activation"],
            )  # fmt: skip
            w_f, b_f = fold_conv_bn(
                conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias,
                kwargs["eps"], dtype=dtype,
            )  # fmt: skip
            kwargs["_folded"] = (w_f, b_f, None, None)
        return conv_bn_act(cast(input), cast(conv_weight), *args, **kwargs)
