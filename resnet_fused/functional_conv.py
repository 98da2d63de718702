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

On CUDA, ``backend="auto"`` times the Triton and the cuDNN path once per layer shape
(like ``torch.backends.cudnn.benchmark``) and keeps the faster one.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from . import conv_ops, ops, reference
from ._compat import compose_reference_under_compile
from ._layout import stats_dtype
from ._validation import (
    check_bn_input,
    check_bn_options,
    check_device_dtype,
    check_floating,
    check_optional_per_channel,
)
from .backends import resolve_backend, unavailable_reason
from .functional import _BatchNormAct, _bn_kernels, _needs_autograd

__all__ = ["conv_bn_act", "fold_conv_bn"]

_TRITON_CONV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --- arguments -----------------------------------------------------------------------


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _check_args(
    input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, stride,
    padding, dilation, groups, training, momentum, eps, residual, relu,
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
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
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
    check_bn_options(running_mean, running_var, momentum, eps, training, relu)
    p, q = conv_ops.conv_output_hw(
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
    return conv_ops.fold_conv_bn(
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


def _mkldnn_ok(x: Tensor, add_relu: bool = False) -> bool:
    """oneDNN's fused convolution for fp32/bf16 (skipped when torch.backends.mkldnn is
    disabled, as aten's convolution would skip oneDNN). Not under torch.compile, whose
    CPU backend does its own oneDNN fusion: there the aten convolution + the C++ epilogue
    are traced instead. Not for add+ReLU on bf16 NCHW: there the binary op falls back to
    aten's add_relu, which has no bf16 kernel (an internal assert in torch)."""
    if torch.compiler.is_compiling():
        return False
    if add_relu and x.dtype == torch.bfloat16 and _conv_format(x) != torch.channels_last:
        return False
    return (
        _MKLDNN_POINTWISE
        and x.dtype in (torch.float32, torch.bfloat16)
        and torch._C._get_mkldnn_enabled()
    )


def _eval_forward(impl, x, w, b, residual, stride, padding, dilation, groups, relu, w_packed):
    """act(conv2d(x, w) + b [+ residual]) on backend ``impl`` (no autograd)."""
    if impl == "triton" and groups == 1 and x.dtype in _TRITON_CONV_DTYPES:
        if w_packed is None:
            w_packed = _triton_pack(w)
        return conv_ops.conv_bias_act_triton(
            x, w_packed, list(w.shape[2:]), list(stride), list(padding), list(dilation),
            b, residual, relu,
        )  # fmt: skip
    if impl == "cpu" and _mkldnn_ok(x, residual is not None and relu):
        bias = b.to(x.dtype) if b is not None else None
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, w, bias, list(padding), list(stride), list(dilation), groups,
                "relu" if relu else "none", [], "",
            )  # fmt: skip
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, w, bias, list(padding), list(stride), list(dilation), groups,
            "add", None, "relu" if relu else None, [], "",
        )  # fmt: skip
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    if impl == "torch":
        return reference.bias_act(y, b, residual, relu)
    if impl == "triton":
        ops.bias_act_triton_(y, b, residual, relu)
    else:
        torch.ops.resnet_fused.bias_act_(y, b, residual, relu)
    return y


def _conv_format(x: Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _triton_pack(w: Tensor) -> Tensor:
    from .triton import conv

    return conv.pack_weight(w)


class _ConvBiasAct(torch.autograd.Function):
    """out = act(conv2d(x, W') + b' [+ residual]); saves x, W' and out."""

    @staticmethod
    def forward(ctx, x, w, b, residual, geometry, relu, impl, w_packed):
        stride, padding, dilation, groups = geometry
        out = _eval_forward(
            impl, x, w, b, residual, stride, padding, dilation, groups, relu, w_packed
        )
        ctx.save_for_backward(x, w, out if relu else None)
        ctx.geometry, ctx.relu, ctx.impl = geometry, relu, impl
        ctx.b_dtype = None if b is None else b.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w, out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        need_x, need_w, need_b, need_res = ctx.needs_input_grad[:4]
        g = grad_out
        if ctx.relu:
            g = _relu_backward(ctx.impl)(g.contiguous(memory_format=_conv_format(out)), out)
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
        y, mean, var = conv_ops.conv_bn_stats_triton(
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
    impl, x, w, conv_b, bn_w, bn_b, rm, rv, geometry, momentum, eps, residual, relu, update,
    bn_impl=None, group=None,
):  # fmt: skip
    """Training forward: the convolution on ``impl`` (Triton: with the statistics
    epilogue), BatchNorm(+add)+ReLU on ``bn_impl`` (default: ``impl``); with a process
    ``group`` the local statistics are synchronised before the apply."""
    bn_impl = impl if bn_impl is None else bn_impl
    stride, padding, dilation, groups = geometry
    rm_u, rv_u = (rm, rv) if update and group is None else (None, None)
    if impl == "triton" and groups == 1 and conv_b is None and x.dtype in _TRITON_CONV_DTYPES:
        if _needs_autograd(x, w):
            y, mean, var = _TritonConvStats.apply(x, w, geometry, rm_u, rv_u, float(momentum))
        else:
            y, mean, var = conv_ops.conv_bn_stats_triton(
                x, _triton_pack(w), list(w.shape[2:]), list(stride), list(padding),
                list(dilation), rm_u, rv_u, float(momentum),
            )  # fmt: skip
    else:
        y = F.conv2d(x, w, conv_b, stride, padding, dilation, groups)
        if group is None:
            _check_batch_size(y)
        mean, var = _bn_kernels(bn_impl).stats(y.detach(), rm_u, rv_u, float(momentum))
    sync = None
    if group is not None:
        from .distributed import finish_sync

        count = y.numel() // y.shape[1]
        rm_s, rv_s = (rm, rv) if update else (None, None)
        mean, var, sync = finish_sync(mean, var, count, rm_s, rv_s, momentum, group)
    kernels = _bn_kernels(bn_impl)
    if not _needs_autograd(*(t for t in (y, bn_w, bn_b, residual) if t is not None)):
        return kernels.forward(y, mean, var, bn_w, bn_b, residual, float(eps), relu)
    return _BatchNormAct.apply(
        y, bn_w, bn_b, residual, mean, var, float(eps), relu, True, bn_impl, sync
    )


def _check_batch_size(y_or_shape) -> None:
    shape = y_or_shape.shape if isinstance(y_or_shape, Tensor) else y_or_shape
    if shape[0] * shape[2] * shape[3] == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{torch.Size(shape)}"
        )


# --- backend choice for "auto" on CUDA ----------------------------------------------------


class _AutoChoices:
    """The per-layer picks of ``backend="auto"``: a bounded LRU map (key -> backend),
    safe to use from several threads. Timing happens outside the lock; two threads that
    time the same new key at once both store the same kind of answer."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._picks: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> str | None:
        with self._lock:
            choice = self._picks.get(key)
            if choice is not None:
                self._picks.move_to_end(key)
            return choice

    def put(self, key: tuple, choice: str) -> None:
        with self._lock:
            self._picks[key] = choice
            self._picks.move_to_end(key)
            while len(self._picks) > self.capacity:
                self._picks.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._picks.clear()

    def snapshot(self) -> dict[tuple, str]:
        with self._lock:
            return dict(self._picks)

    def __len__(self) -> int:
        return len(self._picks)


_AUTO_CHOICES = _AutoChoices()


def _batch_bucket(n: int) -> int:
    """Batch sizes share a pick within a power of two (a last, smaller batch of an epoch
    does not time the layer again)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _auto_key(x, w, geometry, training, residual, relu, conv_bias=None) -> tuple:
    """What a layer's timing depends on: shapes (batch bucketed), dtype, layout,
    geometry, mode, epilogue, conv bias, TF32 mode (fp32 convolutions on cuDNN and
    Triton follow ``torch.backends.cudnn.allow_tf32``) and device."""
    return (
        _batch_bucket(x.shape[0]),
        tuple(x.shape[1:]),
        x.dtype,
        _conv_format(x),
        tuple(w.shape),
        geometry,
        training,
        residual is not None,
        relu,
        conv_bias is not None,
        bool(torch.backends.cudnn.allow_tf32) if x.dtype == torch.float32 else None,
        x.device,
    )


def _measure(fn, device: torch.device, repeats: int = 5) -> float:
    """Median time of ``fn`` in ms, with events recorded on ``device``'s current stream."""
    with torch.cuda.device(device):
        fn()  # warm-up: compiles and autotunes
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def auto_choices() -> dict[tuple, str]:
    """The per-shape picks ``backend="auto"`` made so far on CUDA (key -> backend)."""
    return _AUTO_CHOICES.snapshot()


def _choose(key: tuple, candidates, time_one) -> str:
    """The cached pick for ``key``, else the fastest candidate by ``time_one(c)``."""
    choice = _AUTO_CHOICES.get(key)
    if choice is None:
        times = {c: time_one(c) for c in candidates}
        choice = min(times, key=times.get)
        _AUTO_CHOICES.put(key, choice)
    return choice


def _resolve_conv_backend(
    backend, x, w, geometry, training, residual, relu, run, conv_bias=None
) -> str:
    """Like resolve_backend, but on CUDA "auto" times the cuDNN ("cuda") and Triton paths
    for this layer once and keeps the faster (override: RESNET_FUSED_CONV_BACKEND)."""
    impl = resolve_backend(backend, x.device)
    if backend != "auto" or x.device.type != "cuda":
        return impl
    forced = os.environ.get("RESNET_FUSED_CONV_BACKEND", "").strip()
    if forced:
        return resolve_backend(forced, x.device)
    candidates = [c for c in ("cuda", "triton") if unavailable_reason(c, x.device) is None]
    if len(candidates) < 2 or torch.compiler.is_compiling():
        return impl
    key = _auto_key(x, w, geometry, training, residual, relu, conv_bias)

    def time_one(c):
        with torch.no_grad():
            return _measure(lambda: run(c), x.device)

    return _choose(key, candidates, time_one)


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
    backend: str = "auto",
    sync_bn: bool = False,
    process_group=None,
    _folded: tuple[Tensor, Tensor, Tensor | None] | None = None,
) -> Tensor:
    """Fused ``relu(batch_norm(conv2d(input, conv_weight, conv_bias)) + residual)``.

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
        residual: Tensor like the output, added after BatchNorm, before ReLU.
        relu: apply ReLU at the end.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        sync_bn, process_group: in training, synchronise the BatchNorm statistics over
            the group (default: world), like ``nn.SyncBatchNorm``.

    Returns:
        Tensor[N, C_out, H_out, W_out] in input's dtype. Differentiable in input,
        conv_weight, conv_bias, bn_weight, bn_bias and residual. Under autocast the
        convolution runs in the autocast dtype, as ``F.conv2d`` would.
    """
    if isinstance(input, Tensor) and torch.is_autocast_enabled(input.device.type):
        return _conv_bn_act_autocast(
            input, conv_weight, bn_weight, bn_bias, running_mean, running_var,
            conv_bias=conv_bias, stride=stride, padding=padding, dilation=dilation,
            groups=groups, training=training, momentum=momentum, eps=eps,
            residual=residual, relu=relu, backend=backend, sync_bn=sync_bn,
            process_group=process_group, _folded=_folded,
        )  # fmt: skip
    stride, padding, dilation = _check_args(
        input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, stride,
        padding, dilation, groups, training, momentum, eps, residual, relu,
    )  # fmt: skip
    geometry = (stride, padding, dilation, groups)
    batch_stats = training or running_mean is None
    tensors = (input, conv_weight, conv_bias, bn_weight, bn_bias, residual)
    if not (sync_bn and training) and compose_reference_under_compile(
        resolve_backend(backend, input.device), *tensors
    ):
        return reference.conv_bn_act(
            input, conv_weight, bn_weight, bn_bias, running_mean, running_var,
            conv_bias=conv_bias, stride=stride, padding=padding, dilation=dilation,
            groups=groups, training=training, momentum=momentum, eps=eps, residual=residual,
            relu=relu,
        )  # fmt: skip

    if batch_stats:
        p, q = conv_ops.conv_output_hw(
            input.shape[2], input.shape[3], conv_weight.shape[2:], stride, padding, dilation
        )
        from .distributed import sync_group

        group = sync_group(process_group, sync_bn and training)
        if group is None:
            _check_batch_size((input.shape[0], conv_weight.shape[0], p, q))
        update = training and running_mean is not None

        # "auto" on CUDA chooses the convolution (cuDNN or Triton with the statistics
        # epilogue) by timing; BatchNorm then always runs on the CUDA kernels, so the
        # backward (aten convolution_backward + BN backward) is the same for both and the
        # forward decides.
        bn_impl = None
        if backend == "auto" and unavailable_reason("cuda", input.device) is None:
            bn_impl = "cuda"

        def run(impl, trial=False):
            # Trial runs (timing for "auto") must leave the running statistics alone.
            rm, rv = running_mean, running_var
            if trial and update:
                rm, rv = rm.clone(), rv.clone()
            return _train_forward(
                impl, input, conv_weight, conv_bias, bn_weight, bn_bias, rm, rv, geometry,
                momentum, eps, residual, relu, update,
                bn_impl if bn_impl is not None and impl in ("cuda", "triton") else None,
                group,
            )  # fmt: skip

        if group is not None:  # no timing trials: they would run collectives
            return run(resolve_backend(backend, input.device))

        impl = _resolve_conv_backend(
            backend, input, conv_weight, geometry, True, residual, relu,
            lambda c: run(c, trial=True), conv_bias,
        )  # fmt: skip
        return run(impl)

    if _folded is not None:
        w_f, b_f, w_packed = _folded
    else:
        w_f, b_f = fold_conv_bn(
            conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps
        )
        w_packed = None

    def run_eval(impl, packed=None):
        if not _needs_autograd(*(t for t in (input, w_f, b_f, residual) if t is not None)):
            return _eval_forward(
                impl, input, w_f, b_f, residual, stride, padding, dilation, groups, relu, packed
            )
        return _ConvBiasAct.apply(input, w_f, b_f, residual, geometry, relu, impl, packed)

    def trial(impl):
        # Time what the real call runs: with the packed weight it will be given (a
        # module's cached fold), packing once here for a trial that has none.
        nonlocal w_packed
        if (
            impl == "triton"
            and w_packed is None
            and groups == 1
            and w_f.dtype in _TRITON_CONV_DTYPES
        ):
            w_packed = _triton_pack(w_f)
        return run_eval(impl, w_packed if impl == "triton" else None)

    impl = _resolve_conv_backend(
        backend, input, conv_weight, geometry, False, residual, relu, trial, conv_bias
    )
    return run_eval(impl, w_packed if impl == "triton" else None)


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
                kwargs["eps"], kwargs["residual"], kwargs["relu"],
            )  # fmt: skip
            w_f, b_f = fold_conv_bn(
                conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias,
                kwargs["eps"], dtype=dtype,
            )  # fmt: skip
            kwargs["_folded"] = (w_f, b_f, None)
        return conv_bn_act(cast(input), cast(conv_weight), *args, **kwargs)
