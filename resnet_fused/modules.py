"""Drop-in modules built on the fused functions."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from . import _extension
from ._env import encoded_name, env_mapping, read_env
from ._validation import act_argument
from .activations import ID_ACT, IDENTITY, RELU, Act, as_act
from .functional._common import runs_eagerly
from .functional.auto_choice import CONV_BACKEND_ENV, EAGER, POLICY_ENV
from .functional.batch_norm_act import batch_norm_act
from .ops import fingerprint as fingerprint_op

__all__ = ["FusedBatchNormAct2d", "FusedConvBNReLU2d"]


def bn_update_factor(bn: nn.BatchNorm2d, training: bool) -> float:
    """The running-statistics factor of this call, with nn.BatchNorm2d.forward's
    bookkeeping: in training, num_batches_tracked += 1, and momentum=None gives the
    cumulative average 1/num_batches_tracked."""
    momentum = bn.momentum
    factor = 0.0 if momentum is None else momentum
    if training and bn.track_running_stats:
        tracked = bn._buffers.get("num_batches_tracked")
        if tracked is not None:
            tracked.add_(1)
            if momentum is None:
                factor = 1.0 / float(tracked)
    return factor


def _get_activation(self) -> Act:
    act = self.__dict__.get("_activation")
    if act is None:  # (pickled before activations were a parameter: relu only)
        act = as_act(bool(self.__dict__.get("relu", True)))
    return act


def _set_activation(self, value) -> None:
    self.__dict__["_activation"] = as_act(value, "activation")


def _get_relu(self) -> bool:
    return _get_activation(self).kind == RELU


def _set_relu(self, value) -> None:
    _set_activation(self, act_argument(value, None))


# A fused module's activation (an Act; assigning a name, an Act or a bool converts it as
# ``activation=`` does), and ``relu``: whether it is ReLU (assigning a bool sets ReLU or
# identity). Modules pickled before activations were a parameter hold ``relu`` only.
_ACTIVATION = property(_get_activation, _set_activation, doc="The activation (an Act).")
_RELU = property(_get_relu, _set_relu, doc="Whether the activation is ReLU.")


def _act_repr(module) -> str:
    act = module.activation
    return f"relu={act.kind == RELU}" if act.kind in (IDENTITY, RELU) else f"activation={act!r}"


class FusedBatchNormAct2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by an optional residual add and ReLU, fused.

    A subclass of :class:`torch.nn.BatchNorm2d` with the same parameters, buffers and
    ``state_dict`` keys, and the same meaning of every option (``affine``,
    ``track_running_stats``, ``momentum=None`` for a cumulative average through
    ``num_batches_tracked``, ``eps``). ``forward(input, residual=None)`` computes
    ``act(bn(input) + residual)``: ReLU when ``relu=True``, or ``activation`` (a name, a
    module or a :class:`resnet_fused.activations.Act`; see
    :func:`resnet_fused.batch_norm_act`). ``activation`` holds the Act; ``relu`` says
    whether it is ReLU (setting it sets ReLU or identity).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        relu: bool = True,
        activation=None,
        backend: str = "auto",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = act_argument(relu, activation)
        self.backend = backend

    @classmethod
    def from_batch_norm(
        cls, bn: nn.BatchNorm2d, *, relu: bool = True, activation=None, backend: str = "auto"
    ) -> FusedBatchNormAct2d:
        """A fused module sharing ``bn``'s parameters and buffers (not copies)."""
        fused = cls(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            device="meta",
            relu=relu,
            activation=activation,
            backend=backend,
        )
        for name in ("weight", "bias"):
            setattr(fused, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            fused._buffers[name] = bn._buffers.get(name)
        fused.training = bn.training
        return fused

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if runs_eagerly():  # jit.trace, torch.func, make_fx: eager's ops
            out = super().forward(input)
            return self.activation(out if residual is None else out + residual)
        cache = None  # (a FoldCache: copies and pickles start empty)
        if not torch.compiler.is_compiling():  # made here: modules from older pickles
            cache = self.__dict__.get("_plan_cache")
            if cache is None:
                cache = self.__dict__["_plan_cache"] = FoldCache()
        if isinstance(residual, Tensor) and not adds_residual(residual, input):
            # eager's act(bn(input) + residual) broadcasts and promotes: so does the module
            out = bn_forward(self, input, None, ID_ACT, self.backend, cache=cache)
            return self.activation(out + residual)
        return bn_forward(self, input, residual, self.activation, self.backend, cache=cache)

    activation = _ACTIVATION
    relu = _RELU

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_act_repr(self)}, backend={self.backend!r}"


torch.serialization.add_safe_globals([FusedBatchNormAct2d])


def bn_forward(
    bn: nn.modules.batchnorm._BatchNorm, input: Tensor, residual: Tensor | None, act: Act,
    backend: str, sync: bool = False, process_group=None, cache: FoldCache | None = None,
) -> Tensor:  # fmt: skip
    """``relu(bn(input) + residual)`` through the fused kernels with ``bn``'s settings as
    nn.BatchNorm2d reads them at call time (training flag, momentum or cumulative
    average, eps, tracked or not). With a ``cache``, plan once, run many, as
    :func:`conv_bn_forward` (the plan in ``cache.bn_plan``)."""
    signature = None
    if cache is not None and not sync:
        signature = _bn_signature(bn, input, residual, act, backend)
        planned = cache.bn_plan
        if signature is not None and planned is not None and planned[0] == signature:
            bp, bb = bn._parameters, bn._buffers
            training = bn.training
            factor = bn_update_factor(bn, training)
            rm, rv = bb.get("running_mean"), bb.get("running_var")
            bn_training = training or (rm is None and rv is None)
            if training and not bn.track_running_stats:
                rm = rv = None
            return planned[1].run(
                input, rm, rv, bp.get("weight"), bp.get("bias"), bn_training, factor, bn.eps,
                residual, act,
            )  # fmt: skip
    bn._check_input_dim(input)
    factor = bn_update_factor(bn, bn.training)
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not bn.training or bn.track_running_stats
    record = [] if signature is not None else None
    out = batch_norm_act(
        input,
        bn.running_mean if use_running else None,
        bn.running_var if use_running else None,
        bn.weight,
        bn.bias,
        bn_training,
        factor,
        bn.eps,
        residual=residual,
        activation=act,
        backend=backend,
        sync=sync,
        process_group=process_group,
        _record=record,
    )
    if record:
        cache.bn_plan = (signature, record[0])
    return out


def _bn_signature(bn, input, residual, act, backend) -> tuple | None:
    """What a BatchNorm(+add)+ReLU call's checks and choice depend on (see
    :func:`_unit_signature`); None under torch.compile and for synchronised BN."""
    if _is_compiling() or isinstance(bn, nn.SyncBatchNorm):
        return None
    if _PLAN_SIGNATURE is not None:
        return _PLAN_SIGNATURE(
            _ENV, _POLICY_KEY, _CONV_BACKEND_KEY, None, bn, input, residual, act, backend
        )
    return _bn_signature_py(bn, input, residual, act, backend)


def _bn_signature_py(bn, input, residual, act, backend) -> tuple | None:
    """:func:`_bn_signature` in Python (without the extension; tests compare the two)."""
    amp = None
    if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(input.device.type):
        amp = torch.get_autocast_dtype(input.device.type)
    return _call_signature(bn, input, residual, act, backend, amp)


_AMP = 2  # where the signatures put the autocast dtype


def _tensors_signature(*tensors) -> tuple:
    """Shape, dtype, device, ``requires_grad`` and strides of each tensor (None kept)."""
    return tuple(
        None if t is None else (t.shape, t.dtype, t.device, t.requires_grad, t.stride())
        for t in tensors
    )


# The tensor part of a signature, in one call: resnet_fused._C.tensor_signature (the same
# facts as one bytes object; None when an argument is not a tensor, csrc/unit.cpp), or
# _tensors_signature without the extension.
_TENSORS = getattr(_extension._C, "tensor_signature", None) or _tensors_signature

# _unit_signature and _bn_signature in one call to the extension (csrc/unit.cpp:
# plan_signature, the same tuple; about 0.4 us against 1.3 us, read at every call of every
# fused site), given os.environ's mapping and the encoded names of the variables they read.
_ENV = env_mapping()
_is_compiling = torch.compiler.is_compiling  # (Dynamo knows the function, not the name)
_PLAN_SIGNATURE = getattr(_extension._C, "plan_signature", None) if isinstance(_ENV, dict) else None
_POLICY_KEY, _CONV_BACKEND_KEY = encoded_name(POLICY_ENV), encoded_name(CONV_BACKEND_ENV)
# conv_bn_forward's planned eager units in one call (csrc/unit.cpp: planned_unit).
_PLANNED_UNIT = _PLAN_SIGNATURE and getattr(_extension._C, "planned_unit", None)


def _call_signature(bn, input, residual, act, backend, amp) -> tuple | None:
    """The signature of a BatchNorm(+add)+ReLU call (see :func:`_unit_signature`), read
    from the module's own dicts (nn.Module.__getattr__ costs more than the rest of a
    read). None when an argument is not a tensor (the checked path says what is wrong)."""
    bp, bb = bn._parameters, bn._buffers
    tensors = _TENSORS(
        input, residual, bp.get("weight"), bp.get("bias"), bb.get("running_mean"),
        bb.get("running_var"),
    )  # fmt: skip
    if tensors is None:
        return None
    return (
        tensors, torch.is_grad_enabled(), amp, bn.training, bn.momentum, bn.eps,
        bn.track_running_stats, type(bn), act, backend, read_env(POLICY_ENV),
    )  # fmt: skip


def unit_dtype(input: Tensor) -> torch.dtype:
    """The dtype of a Conv+BN unit's output without residual: autocast's dtype while
    autocast is on for the input's device (the convolution runs in it; autocast leaves
    float64 alone), else the input's."""
    device = input.device.type
    eligible = input.is_floating_point() and input.dtype != torch.float64
    if eligible and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return input.dtype


def adds_residual(residual: Tensor, input: Tensor, conv: nn.Conv2d | None = None) -> bool:
    """Whether a fused unit adds the tensor ``residual`` itself: it has the shape, dtype
    and device of the unit's output (Conv+BN+act with ``conv``, else BN+act of
    ``input``). Any other residual, one that eager's out-of-place ``out + residual``
    broadcasts (a (1, C, 1, 1) tensor) or promotes (an fp32 residual under bf16
    autocast: eager's result is fp32), or one on another device, the fused modules and
    the converted models' sites add as eager does, after the unit ran without it; the
    functional ops refuse it. True where the output's shape cannot be told (a conv's
    input that is not a 4-d tensor): the unit's own checks then say what is wrong."""
    if not isinstance(input, Tensor):
        return True
    if conv is None:
        shape, dtype = input.shape, input.dtype
    elif input.dim() != 4:
        return True
    else:
        shape, dtype = conv_out_shape(conv, input), unit_dtype(input)
    return residual.shape == shape and residual.dtype == dtype and residual.device == input.device


def conv_out_shape(conv: nn.Conv2d, input: Tensor) -> torch.Size:
    """The shape of ``conv``'s output for the 4-d ``input``."""
    n, _, h, w = input.shape
    pad = _conv_padding(conv)
    hw = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(
            (h, w), pad, conv.dilation, conv.kernel_size, conv.stride, strict=True
        )
    ]
    return torch.Size((n, conv.out_channels, *hw))


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise NotImplementedError(
                "conv padding='same' with an even effective kernel size pads asymmetrically, "
                "which FusedConvBNReLU2d does not support"
            )
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)


class FoldCache:
    """The eval-mode fold (W', b', packed W') of one conv + BN pair and the key it was
    made for, as ONE attribute ``entry = (key, value)``, so that a reader on another
    thread never pairs one fold's key with another fold's value. Not state: copies and
    pickles start empty."""

    __slots__ = ("bn_plan", "entry", "plan")

    def __init__(self) -> None:
        self.entry = None
        self.plan = None  # (signature, plan) of the unit's last call: see conv_bn_forward
        self.bn_plan = None  # the same for a BatchNorm(+add)+ReLU site: see bn_forward

    def __deepcopy__(self, memo) -> FoldCache:
        return FoldCache()

    def __reduce__(self):
        return (FoldCache, ())


# The key of a cached fold (resnet_fused._C.fold_key(*inputs), csrc/fold_key.cpp): each
# input's tensor object (by address: a replaced parameter is not kept alive), its storage
# and version counter (held, and compared by identity), data pointer, version, dtype,
# shape, strides and device; None for tensors it cannot key (subclasses, inference). ``_FOLD_KEY_CHECK(key, contents,
# *inputs)`` is None when any of these differ, else the inputs' fingerprint now (0 when not
# ``contents``): one C call per eval call of a unit (the same check in Python cost ~4 us).
# Their contents are in the entry's fingerprint: writes through ``.data`` or numpy bump no
# version counter of these tensors. None without the compiled functions: nothing is cached.
_FOLD_KEY = getattr(_extension._C, "fold_key", None)
_FOLD_KEY_CHECK = getattr(_extension._C, "fold_key_check", None)


# The contents of a fold's inputs, as one 64-bit hash of their bytes (resnet_fused::
# fingerprint, csrc/cpu/fingerprint.cpp: CPU tensors; any change of one 32-bit word changes
# it, other changes collide by coincidence only). None without the compiled op: then
# nothing is cached.
_FINGERPRINT = fingerprint_op.FINGERPRINT

# RESNET_FUSED_FOLD_CHECK=versions: the cached folds trust the inputs' identities, data
# pointers and version counters alone, without the fingerprint of their contents (read at
# every planned call; anything else, or unset: "contents"). It saves one read of every
# weight per eval call (ResNet-50: 94 MB, about 4.5 ms on one core, 5% of a batch-1
# inference); writes that bump no version counter (through ``.data``, numpy) then go unseen
# by the fold until something else changes.
FOLD_CHECK_ENV = "RESNET_FUSED_FOLD_CHECK"
_VERSIONS_VALUES = ("versions", b"versions")  # (read_env's token: encoded on POSIX)


def _contents_checked() -> bool:
    """False where RESNET_FUSED_FOLD_CHECK=versions (no fingerprint of the contents)."""
    return read_env(FOLD_CHECK_ENV) not in _VERSIONS_VALUES


def _fingerprint(present) -> int:
    """The contents' fingerprint, or 0 where RESNET_FUSED_FOLD_CHECK=versions."""
    return _FINGERPRINT(present) if _contents_checked() else 0


def _fold_inputs(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    """(conv weight, conv bias, running mean, running var, BN weight, BN bias), read from
    the modules' own dicts (nn.Module.__getattr__ costs more than the fold check)."""
    cp, bp, bb = conv._parameters, bn._parameters, bn._buffers
    return (
        cp["weight"], cp.get("bias"), bb.get("running_mean"), bb.get("running_var"),
        bp.get("weight"), bp.get("bias"),
    )  # fmt: skip


def _cached_fold(
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    dtype: torch.dtype,
    cache: FoldCache,
    pack: bool,
    fingerprint: int | None = None,
):
    """(W', b', packed W' or None, whether W' and b' are finite, or None: unknown) from
    ``cache``, refolded when any input changed: the tensor object, its storage or version
    counter, eps, dtype, or its contents. None while autograd needs the fold (conv_bn_act
    then folds differentiably) and under torch.compile (which traces the fold op instead).

    The contents: writes through ``.data``, ``.detach()`` or numpy (an EMA's
    ``p.data.mul_``) go to an alias with its own version counter, so the key also holds a
    fingerprint of the inputs' bytes (``fingerprint``: one the caller just took of the same
    tensors), compared at every call; it costs about one read of the inputs, like
    ``w.sum()``. Only CPU inputs are cached: elsewhere the fingerprint would cost a
    device-to-host sync per unit, more than the fold it saves, so other devices refold at
    every call (no sync: finite is None, Triton packs the weight itself), as do inference
    tensors (no version counter) and builds without the fingerprint op.

    Thread-safe: the key is taken before folding, so a parameter changed during the fold
    only makes the next call refold."""
    if torch.compiler.is_compiling():
        return None
    tensors = _fold_inputs(conv, bn)
    grad = torch.is_grad_enabled()
    keep = _FINGERPRINT is not None and _FOLD_KEY is not None and _FOLD_KEY_CHECK is not None
    cpu = True
    for t in tensors:
        if t is not None:
            if grad and t.requires_grad:
                cache.entry = None
                return None
            # Parameters made under torch.inference_mode are inference tensors, which have
            # no version counter: an in-place change could not be seen, so their fold is
            # not kept.
            if t.is_inference():
                keep = False
            if not t.is_cpu:
                cpu = keep = False
    if keep:
        entry = cache.entry  # read once
        if entry is not None:
            k_key, k_eps, k_dtype, k_fingerprint = entry[0]
            if fingerprint is None and k_eps == bn.eps and k_dtype == dtype:
                # (the same tensors: their fingerprint now, else None)
                fingerprint = _FOLD_KEY_CHECK(k_key, _contents_checked(), *tensors)
                if fingerprint == k_fingerprint:
                    return entry[1]
            elif (
                fingerprint == k_fingerprint
                and k_eps == bn.eps
                and k_dtype == dtype
                and _FOLD_KEY_CHECK(k_key, False, *tensors) is not None
            ):
                return entry[1]
        fold_key = _FOLD_KEY(*tensors)  # (None: a tensor it cannot key, see fold_key.cpp)
        keep = fold_key is not None
        if keep and fingerprint is None:  # (taken after the key: a write between the two
            # bumps a version counter the key holds, and the next call refolds)
            fingerprint = _fingerprint([t for t in tensors if t is not None])
        key = (fold_key, bn.eps, dtype, fingerprint)
    from .functional.conv_bn_act import fold_conv_bn

    with torch.no_grad():
        w, b = fold_conv_bn(*tensors[:2], *tensors[2:], bn.eps, dtype=dtype)
    finite = None  # (only the CPU's oneDNN path asks; elsewhere it would be a sync)
    if cpu:
        finite = bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())
    if not keep:
        cache.entry = None
        return (w, b, None, finite)  # (used once: Triton packs W' itself if it runs)
    value = (w, b, _maybe_pack(w, conv.groups) if pack else None, finite)
    cache.entry = (key, value)
    return value


def _planned_fold(conv, bn, dtype, cache: FoldCache, backend: str):
    """The cached fold for a planned call: the plan's signature already fixed every fold
    input's dtype, shape, device and ``requires_grad`` (and every plan starts with a full
    :func:`_cached_fold`, so the entry's key holds those), so the same tensor objects at
    the same address and version counter, with the same fingerprint of their contents,
    mean the same fold: one op call reads them all. Anything else: the full check (and
    refold)."""
    pack = backend in ("auto", "triton")
    entry = cache.entry
    if entry is not None:
        key, k_eps, k_dtype, k_fingerprint = entry[0]
        if k_eps == bn.eps and k_dtype == dtype:
            cp, bp, bb = conv._parameters, bn._parameters, bn._buffers
            fingerprint = _FOLD_KEY_CHECK(
                key, _contents_checked(), cp["weight"],
                cp.get("bias"), bb.get("running_mean"), bb.get("running_var"),
                bp.get("weight"), bp.get("bias"),
            )  # fmt: skip
            if fingerprint == k_fingerprint:
                return entry[1]
            if fingerprint is not None:  # the same tensors, other contents
                return _cached_fold(conv, bn, dtype, cache, pack, fingerprint)
    return _cached_fold(conv, bn, dtype, cache, pack)


def own_hooks(m: nn.Module | None) -> bool:
    """True when ``m`` carries forward, forward-pre or backward hooks of its own."""
    return m is not None and bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    )


def _has_hooks(*modules: nn.Module | None) -> bool:
    """:func:`has_hooks` in Python (under torch.compile, which traces it, and without the
    extension)."""
    if runs_eagerly():
        return True
    if (
        _nn_module._global_forward_hooks
        or _nn_module._global_forward_pre_hooks
        or _nn_module._global_backward_hooks
        or _nn_module._global_backward_pre_hooks
    ):
        return True
    return any(own_hooks(m) for m in modules)


# The same checks in one call to the extension (csrc/unit.cpp: about 0.2 us against
# 0.6 us; every fused site asks per call).
_ANY_MODULE_HOOKS = getattr(_extension._C, "any_module_hooks", None)


def has_hooks(*modules: nn.Module | None) -> bool:
    """True when calling any of ``modules`` would run hooks: their own, or a global module
    hook. A fused unit does not call its modules, so where hooks exist it runs them
    unfused instead (hooks honoured).

    Also True wherever the fused path must not run at all (:func:`runs_eagerly`: tracing
    by ``torch.jit.trace``, ``torch.func`` transforms, ``make_fx``): its
    callers then run the modules themselves."""
    if _ANY_MODULE_HOOKS is None or _is_compiling():
        return _has_hooks(*modules)
    return _ANY_MODULE_HOOKS(_nn_module, *modules)


def unfused_unit(
    conv: nn.Module, bn: nn.Module, input: Tensor, residual: Tensor | None, act: Act
) -> Tensor:
    """``relu(bn(conv(input)) + residual)`` through the modules themselves (their hooks
    run), for units whose modules carry hooks."""
    out = bn(conv(input))
    if residual is not None:
        out = out + residual
    return act(out)


def _unit_signature(conv, bn, input, residual, act, backend) -> tuple | None:
    """Everything a unit's checks and choices depend on, read now: the tensors' shapes,
    strides, dtypes, devices and ``requires_grad`` (one ``bytes`` value from the
    extension, see ``_TENSORS``); grad mode; the autocast dtype (item
    ``_AMP``, which :func:`_run_plan` reads); the BatchNorm's flags and settings; the
    convolution's geometry; the ``auto`` policy and the oneDNN/TF32 switches. None where
    no plan applies (torch.compile, fp64 or integer input under autocast, arguments that
    are not tensors): those calls take the checked path every time (so do synchronised
    units: the caller asks for no plan)."""
    if _is_compiling():
        return None
    if _PLAN_SIGNATURE is not None:
        return _PLAN_SIGNATURE(
            _ENV, _POLICY_KEY, _CONV_BACKEND_KEY, conv, bn, input, residual, act, backend
        )
    return _unit_signature_py(conv, bn, input, residual, act, backend)


def _unit_signature_py(conv, bn, input, residual, act, backend) -> tuple | None:
    """:func:`_unit_signature` in Python (without the extension; tests compare the two)."""
    amp = None
    if torch._C._is_any_autocast_enabled():
        device_type = input.device.type
        if torch.is_autocast_enabled(device_type):
            if input.dtype == torch.float64 or not input.is_floating_point():
                return None  # (autocast leaves these alone: the checked path says how)
            amp = torch.get_autocast_dtype(device_type)
    bp, bb, cp = bn._parameters, bn._buffers, conv._parameters  # (as _call_signature)
    tensors = _TENSORS(
        input, residual, bp.get("weight"), bp.get("bias"), bb.get("running_mean"),
        bb.get("running_var"), cp["weight"], cp.get("bias"),
    )  # fmt: skip
    if tensors is None:
        return None
    return (
        tensors, torch.is_grad_enabled(), amp, bn.training, bn.momentum, bn.eps,
        bn.track_running_stats, type(bn), act, backend, read_env(POLICY_ENV), conv.stride,
        conv.padding, conv.dilation, conv.groups, conv.padding_mode, read_env(CONV_BACKEND_ENV),
        torch._C._get_mkldnn_enabled(), torch._C._get_cudnn_allow_tf32(),
    )  # fmt: skip


def conv_bn_forward(
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    input: Tensor,
    residual: Tensor | None,
    act: Act,
    backend: str,
    cache: FoldCache | None = None,
    sync: bool = False,
    process_group=None,
    donate: bool = False,
) -> Tensor:
    """``relu(bn(conv(input)) + residual)`` with ``conv`` and ``bn`` used as modules,
    exactly as calling them would: ``bn``'s own ``training`` flag, ``momentum``, ``eps``,
    ``track_running_stats`` and buffers are read now, with the bookkeeping of
    ``nn.BatchNorm2d.forward`` (num_batches_tracked, momentum=None); in eval mode the
    cached fold. Training statistics are synchronised over ``process_group`` when
    ``sync`` (or when ``bn`` is an ``nn.SyncBatchNorm``, over its group). Callers check
    for hooks first (:func:`has_hooks`): this never calls the modules.

    Plan once, run many: with a ``cache``, the first call with a new signature
    (:func:`_unit_signature`) goes through :func:`resnet_fused.conv_bn_act` (argument
    checks, backend resolution, ``auto``'s choice) and keeps what it decided; later calls
    with the same signature run that plan directly. The modules are still read at every
    call (flags, momentum, eps, parameters, buffers, the fold's freshness).

    ``donate``: the caller gives ``residual`` up (a generated forward's dead value, see
    ``functional.conv_bn_act._DONATED``); a planned eval unit without autograd may write
    its result into it."""
    if isinstance(bn, nn.SyncBatchNorm):
        sync, process_group = True, process_group or bn.process_group
    signature = None
    if cache is not None and not sync:
        if _PLANNED_UNIT is not None and not _is_compiling():
            # A planned eager unit runs in this one call (csrc/unit.cpp: the reads and the
            # call of _run_plan); other calls get their signature back.
            signature = _PLANNED_UNIT(
                cache, _ENV, _POLICY_KEY, _CONV_BACKEND_KEY, conv, bn, input, residual, act,
                backend,
            )  # fmt: skip
            if isinstance(signature, Tensor):
                return signature
        else:
            signature = _unit_signature(conv, bn, input, residual, act, backend)
        planned = cache.plan
        if signature is not None and planned is not None and planned[0] == signature:
            return _run_plan(
                planned[1], conv, bn, input, residual, act, backend, cache, signature[_AMP],
                donate,
            )  # fmt: skip
    from .functional.conv_bn_act import conv_bn_act

    training = bn.training
    factor = bn_update_factor(bn, training)
    bn_training = training or (bn.running_mean is None and bn.running_var is None)
    use_running = not training or bn.track_running_stats
    folded = fold_check = None
    if not bn_training and cache is not None:
        dtype = unit_dtype(input)
        folded = _cached_fold(conv, bn, dtype, cache, pack=backend in ("auto", "triton"))
        if folded is not None and signature is not None:
            # What each planned call of a folded path adds (auto's trials time it too).
            fold_check = functools.partial(_planned_fold, conv, bn, dtype, cache, backend)
    record = [] if signature is not None else None
    out = conv_bn_act(
        input,
        conv.weight,
        bn.weight,
        bn.bias,
        bn.running_mean if use_running else None,
        bn.running_var if use_running else None,
        conv_bias=conv.bias,
        stride=conv.stride,
        padding=_conv_padding(conv),
        dilation=conv.dilation,
        groups=conv.groups,
        training=bn_training,
        momentum=factor,
        eps=bn.eps,
        residual=residual,
        activation=act,
        backend=backend,
        sync_bn=sync,
        process_group=process_group,
        _folded=folded,
        _fold_check=fold_check,
        _record=record,
    )
    if record:
        cache.plan = (signature, record[0])
        if not record[0].batch_stats and record[0].impl == EAGER:
            # the plan runs eager's unfolded unit: no fold to keep (nor, through its key,
            # the storage of a parameter replaced later)
            cache.entry = None
    return out


def _run_plan(plan, conv, bn, input, residual, act, backend, cache, amp, donate=False) -> Tensor:
    """One call of a planned unit: the parameters and buffers as they are now, then the
    planned op calls (with the bookkeeping of nn.BatchNorm2d.forward). Under autocast
    (``amp``: its dtype) the convolution's operands are cast as ``conv_bn_act`` casts
    them, the fold is made in that dtype, and the ops run with autocast off."""
    bb = bn._buffers
    if not bn.training:
        rm, rv, tracked = bb.get("running_mean"), bb.get("running_var"), None
    elif bn.track_running_stats:  # (nn.BatchNorm2d counts these calls)
        rm, rv = bb.get("running_mean"), bb.get("running_var")
        tracked = bb.get("num_batches_tracked")
    else:
        rm = rv = tracked = None
    cp = conv._parameters
    w, conv_b = cp["weight"], cp.get("bias")
    unit = plan.unit
    if unit is not None:
        # Eager's ops in one C++ call and one autograd node (ops.EAGER_UNIT), which also
        # does the bookkeeping of nn.BatchNorm2d.forward: given the counter it adds one,
        # and momentum=None averages cumulatively; under autocast its Autocast kernel makes
        # the casts below (csrc/unit.cpp). NotImplemented (tensors with
        # __torch_function__): the ops one by one, below.
        bp = bn._parameters
        stride, padding, dilation, groups = plan.geometry
        out = unit(
            input, w, conv_b, bp.get("weight"), bp.get("bias"), rm, rv, tracked, stride,
            padding, dilation, groups, plan.batch_stats, bn.momentum, bn.eps, residual, *act.args,
        )  # fmt: skip
        if out is not NotImplemented:
            return out
    if amp is None:
        return _run_planned_ops(
            plan, conv, bn, input, w, conv_b, rm, rv, residual, act, backend, cache, input.dtype,
            donate,
        )  # fmt: skip
    # Autocast off for the ops, as ``torch.autocast(device, enabled=False)`` would, by the
    # thread-local flag alone (the context manager costs ~3 us per unit in Python; inside
    # an enabled region it only flips the flag: the nesting depth and the cast cache stay).
    device_type = input.device.type
    torch.set_autocast_enabled(device_type, False)
    try:
        input, w = input.to(amp), w.to(amp)
        conv_b = None if conv_b is None else conv_b.to(amp)
        residual = None if residual is None else residual.to(amp)
        return _run_planned_ops(
            plan, conv, bn, input, w, conv_b, rm, rv, residual, act, backend, cache, amp
        )
    finally:
        torch.set_autocast_enabled(device_type, True)


def _run_planned_ops(
    plan, conv, bn, x, w, conv_b, rm, rv, residual, act, backend, cache, fold_dtype,
    donate=False,
) -> Tensor:  # fmt: skip
    bp = bn._parameters
    bn_w, bn_b = bp.get("weight"), bp.get("bias")
    if plan.batch_stats:  # a TrainPlan
        factor = bn_update_factor(bn, bn.training)
        return plan.run(x, w, conv_b, bn_w, bn_b, rm, rv, factor, bn.eps, residual, act)
    folded = None
    if plan.impl == EAGER:
        pass
    elif plan.grad:  # autograd records the call: the fold is differentiable, made per call
        from .functional.conv_bn_act import fold_conv_bn

        folded = fold_conv_bn(
            conv._parameters["weight"], conv._parameters.get("bias"), rm, rv, bn_w, bn_b,
            bn.eps, dtype=fold_dtype,
        )  # fmt: skip
    else:
        folded = _planned_fold(conv, bn, fold_dtype, cache, backend)
        return plan.run(x, w, conv_b, bn_w, bn_b, rm, rv, bn.eps, residual, act, folded, donate)
    return plan.run(x, w, conv_b, bn_w, bn_b, rm, rv, bn.eps, residual, act, folded)


class FusedConvBNReLU2d(nn.Module):
    """``nn.Conv2d`` -> ``nn.BatchNorm2d`` -> (residual add) -> ReLU, fused.

    Holds the original modules as ``conv`` and ``bn``, so its ``state_dict`` has the keys
    of ``nn.Sequential(conv, bn, relu)`` with ``0.``/``1.`` replaced by ``conv.``/``bn.``.
    ``forward(input, residual=None)`` computes ``act(bn(conv(input)) + residual)`` (ReLU
    when ``relu=True``, or ``activation``, as :class:`FusedBatchNormAct2d`) with
    :func:`resnet_fused.conv_bn_act`.

    In eval mode the folded weight and bias are cached (CPU), and refolded whenever a
    parameter or buffer of ``conv`` or ``bn`` changes (an optimizer step, an in-place
    edit, a write through ``.data`` or numpy, ``load_state_dict``, moving the module): the
    cache is keyed on each tensor's identity, storage and version counter and on a
    fingerprint of their contents. On other devices, and while gradients are needed, the
    fold is recomputed each call (it is cheap; with gradients it is differentiable).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        relu: bool = True,
        activation=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            **factory,
        )  # fmt: skip
        self.bn = nn.BatchNorm2d(
            out_channels, eps, momentum, affine, track_running_stats, **factory
        )
        self.activation = act_argument(relu, activation)
        self.backend = backend
        self._fold_cache = FoldCache()

    @classmethod
    def from_modules(
        cls,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        relu: bool = True,
        *,
        activation=None,
        backend: str = "auto",
    ) -> FusedConvBNReLU2d:
        """A fused module holding ``conv`` and ``bn`` themselves (shared, not copied)."""
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, nn.ConvTranspose2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
        if conv.out_channels != bn.num_features:
            raise ValueError(
                f"bn.num_features ({bn.num_features}) must equal conv.out_channels "
                f"({conv.out_channels})"
            )
        if conv.padding_mode != "zeros":
            raise NotImplementedError(
                f"conv.padding_mode={conv.padding_mode!r}: only 'zeros' is supported"
            )
        _conv_padding(conv)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.conv, fused.bn = conv, bn
        fused.activation, fused.backend = act_argument(relu, activation), backend
        fused._fold_cache = FoldCache()
        fused.training = conv.training  # its own flag only: conv and bn keep theirs
        return fused

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        conv, bn = self._modules["conv"], self._modules["bn"]
        if has_hooks(conv, bn):  # run the modules themselves: their hooks fire
            return unfused_unit(conv, bn, input, residual, self.activation)
        if isinstance(residual, Tensor) and not adds_residual(residual, input, conv):
            # eager's act(bn(conv(input)) + residual) broadcasts and promotes: so does the
            # module
            out = conv_bn_forward(conv, bn, input, None, ID_ACT, self.backend,
                                  self._fold_cache)  # fmt: skip
            return self.activation(out + residual)
        return conv_bn_forward(
            conv, bn, input, residual, self.activation, self.backend, self._fold_cache
        )

    activation = _ACTIVATION
    relu = _RELU

    def extra_repr(self) -> str:
        return f"{_act_repr(self)}, backend={self.backend!r}"


def _maybe_pack(w: Tensor, groups: int) -> Tensor | None:
    """The Triton layout of a folded weight, when Triton could use it."""
    from .backends import triton_installed

    if groups != 1 or w.dtype == torch.float64 or not triton_installed():
        return None
    if w.device.type == "cpu":
        from .backends import triton_interpreter_enabled

        if not triton_interpreter_enabled():
            return None
    from .triton import conv

    return conv.pack_weight(w)


torch.serialization.add_safe_globals([FusedConvBNReLU2d])
