"""The graph-level converter: fuses Conv/BN/add/ReLU patterns wherever they occur.

:func:`convert_graphs` traces a module with ``torch.fx`` (standard layers as leaves),
finds the patterns on the graph and installs a generated ``forward`` on the module itself
(an instance attribute): the module tree, its parameters, buffers and ``state_dict`` keys
stay exactly as they were. Each fused site is one call of :func:`fused_conv_bn`,
:func:`fused_bn` or :func:`fused_add_relu` whose module arguments are looked up by path on
the module at call time (``get_attr`` nodes), so the fused call reads the original
``nn.Conv2d`` / ``nn.BatchNorm2d`` modules (their ``training`` flag, momentum, eps,
parameters and buffers) when it runs, as calling them would.

Rules:

* Spellings are normalised before matching: ``nn.ReLU`` (inplace or not, reused),
  ``F.relu``, ``torch.relu``, ``.relu()``, ``relu_``; ``+``, ``+=``, ``torch.add``,
  ``.add``/``.add_`` (either operand order); ``nn.Identity`` and empty ``nn.Sequential``
  pass through; the in-place forms are followed through their aliases. Augmented
  assignments (``a += b``) are traced as the in-place operators they are, and an in-place
  add runs out of place (fused) only when its target has storage of its own that no other
  value (a view taken before, the caller's tensor) can see; else it stays in place.
* Patterns, longest first: Conv2d->BN->add->act, Conv2d->BN->act, BN->add->act,
  BN->act, add->ReLU, then Conv2d->BN->add and BN->add (no activation after the add, or
  one the kernels do not apply), Conv2d->BN and, for every BatchNorm left, BN
  alone. A site
  is fused only when every interior value has one user and the modules are exactly
  ``nn.Conv2d`` (zeros padding) and a BatchNorm the kernels compute: ``nn.BatchNorm2d``
  / ``nn.SyncBatchNorm``; a norm-act BatchNorm (:func:`is_norm_act`: timm's
  ``BatchNormAct2d`` and ``SyncBatchNormAct``, a subclass whose only children are
  ``drop`` and ``act``), with its own activation fused when the kernels apply it (else
  run as a module after the fused BatchNorm; both read at call time); a frozen BatchNorm
  (:func:`is_frozen_bn`: torchvision's ``FrozenBatchNorm2d``, timm's
  ``FrozenBatchNormAct2d``), computed as an ``nn.BatchNorm2d`` in eval mode. These are
  recognised by structure (timm is not imported). Every BatchNorm appears in the report
  once (fused, or left alone with the reason), and so does every activation that reads a
  fused BatchNorm's output without being fused with it. The activation of a site is any
  of resnet_fused.activations (ReLU, ReLU6, LeakyReLU, SiLU, Hardswish, GELU, Sigmoid) in
  any spelling, after a residual add or not.
* A module that cannot be traced (data-dependent control flow, ...) runs as it is; its
  children are converted instead and the error is reported.
* Hooks: a module carrying hooks at conversion is not traced through (its hooks fire);
  a fused site whose modules carry hooks at call time runs through the modules themselves
  (hooks honoured) and is reported as running unfused; while a traced-through container
  carries hooks (or global module hooks exist), the module runs its original forward.
  With ``sync_bn``, running a plain ``nn.BatchNorm2d`` that computes batch statistics
  through the modules would not synchronise them: that raises (as the fused torchvision
  blocks do) instead of silently training on each rank's own statistics.
* Values a traced forward reads from ``self.training`` are baked into the graph: a
  module whose traced forwards read a ``training`` flag is traced in training and in eval
  mode and the generated forward picks the graph by the module's own ``training`` flag
  at call time (each graph with its own globals); one whose forwards read none is traced
  once (the eval graph would be the same).
* Operands the fused kernels do not take (integer add->ReLU, a residual of another dtype,
  e.g. fp32 under bf16 autocast, whose sum eager promotes) run as eager ops; the report
  counts such calls.
* What a traced graph cannot keep is detected while tracing, and the module whose
  forward does it runs that forward as written (its children converted alone; the report
  says "forward left as written" and why): entering or reading grad mode, inference mode
  or autocast (``torch.no_grad``, ``autocast(enabled=False)``, ``torch.is_grad_enabled()``),
  saved-tensor hooks (``torch.utils.checkpoint``), random numbers drawn outside the graph
  (``random``, NumPy, ``torch.rand`` of constant shape), tensors made from no input
  (they would be frozen as constants), and assignments to module attributes. Tracing
  leaves the random streams as it found them.
* What the trace read is checked on every call: optional arguments are traced at their
  defaults (a call passing one runs the module's own forward); every module the graph
  reaches by path must still be the one found at conversion, and every plain attribute
  the forwards read (numbers, flags, lists, dicts, config objects: by contents) must hold
  its traced value. A module replaced after conversion (surgery) or a changed attribute
  makes the module trace again (at most ``_MAX_RETRACES`` times, then its own forward
  runs, with a warning). A traced-through module's ``training`` flag that differs from
  the module's runs the module's own forward for that call. A fused site whose module
  was replaced by another kind (``nn.Identity``, ``GroupNorm``, ``SiLU``, ...) runs the
  modules as they are.
* Not checked: module-level globals and closures a forward reads.
"""

from __future__ import annotations

import copy
import itertools
import operator
import threading
import time
import warnings
import weakref
from types import BuiltinFunctionType

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ._validation import SUPPORTED_DTYPES
from .activations import ID_ACT, RELU, RELU_ACT, Act, act_of_call, act_of_module
from .functional.conv_bn_act import donated, mark_donated, undonate
from .modules import (
    FoldCache,
    adds_residual,
    bn_forward,
    conv_bn_forward,
    has_hooks,
    unit_dtype,
)
from .patterns import (
    ACT_FUNCTIONS,
    ACT_METHODS,
    ACT_MODULES,
    ADD_FUNCTIONS,
    BN_TYPES,
    KERNEL_ACTS,
    act_text,
    bn_modules,
    inner_act,
    is_batch_norm,
    is_frozen_bn,
    is_norm_act,
    num_features,
    own_classes,
    sync_hooks_error,
    why_not_bn,
    why_not_conv,
)

__all__ = [
    "convert_graphs",
    "fused_add_relu",
    "fused_bn",
    "fused_conv_bn",
    "is_frozen_bn",
    "is_norm_act",
]

_ATTR = "_resnet_fused_graph"


# --- the fused calls (what a rewritten graph calls) ---------------------------------------

_FOLD_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fold_cache(bn: nn.Module) -> FoldCache | None:
    """The eval-mode fold and the plan of ``bn``'s site (one per BatchNorm module; the
    fold's key names the conv tensors and the plan's signature the conv's shapes and
    geometry, so another conv with the same BatchNorm refolds and replans)."""
    if torch.compiler.is_compiling():
        return None
    cache = _FOLD_CACHES.get(bn)
    if cache is None:
        cache = _FOLD_CACHES.setdefault(bn, FoldCache())
    return cache


_RUNNING = threading.local()  # .conversion: the _GraphConversion whose forward runs now


def _note_eager(why: str) -> None:
    """Records, for conversion_report, that a fused site of the running converted forward
    ran as eager ops on its last call (operands the fused kernels do not take)."""
    if torch.compiler.is_compiling():
        return
    conversion = getattr(_RUNNING, "conversion", None)
    if conversion is not None:
        conversion.eager_calls[why] = conversion.eager_calls.get(why, 0) + 1


def _tracer_of(*values):
    for v in values:
        if isinstance(v, fx.Proxy):
            return v.tracer
    return None


def _refuse_unsynchronised(bns, what: str) -> None:
    """``sync_bn`` promised synchronised statistics: a plain ``nn.BatchNorm2d`` computing
    batch statistics must not run through the module (local statistics, silently)."""
    for bn in bns:
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        plain = isinstance(bn, nn.BatchNorm2d) and not isinstance(bn, nn.SyncBatchNorm)
        if plain and batch_stats:
            raise RuntimeError(sync_hooks_error(what))


def _relu(
    out: Tensor, relu: bool, relu_module: nn.Module | None, activation: Act | None = None
) -> Tensor:
    """The site's activation as written: its module (hooks fire), else the function."""
    if not relu:
        return out
    if relu_module is not None:
        return relu_module(out)
    return activation(out) if activation is not None else torch.relu(out)


def _site_act(relu: bool, relu_module: nn.Module | None, activation: Act | None) -> Act:
    """The activation a site fuses, read now: none unless ``relu``; else its module's
    (checked by :func:`_fusable`), or ``activation`` (a function's, fixed at conversion),
    or ReLU."""
    if not relu:
        return ID_ACT
    if relu_module is not None:
        return act_of_module(relu_module)
    return activation if activation is not None else RELU_ACT


def _as_activation(activation) -> Act | None:
    """A site's ``activation`` argument: an Act, or ``(code, parameter)`` as a rewritten
    graph passes it (plain values its generated code can spell)."""
    if activation is None or isinstance(activation, Act):
        return activation
    return Act(*activation)


def _plain_site_act(relu: bool, relu_module: nn.Module | None, activation) -> Act | None:
    """The activation of a site on the fast path of :func:`fused_conv_bn` and
    :func:`fused_bn`, read now as :func:`_site_act` reads it; None where the site's
    activation module is not one the kernels apply (replaced since conversion: the checked
    path runs it as the module it is)."""
    if not relu:
        return ID_ACT
    if relu_module is None:
        return RELU_ACT if activation is None else _as_activation(activation)
    act = act_of_module(relu_module)
    return act if act is not None and act.active else None


def fused_conv_bn(
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    input: Tensor,
    residual: Tensor | None = None,
    *,
    relu: bool = True,
    relu_module: nn.Module | None = None,
    activation: Act | None = None,
    backend: str = "auto",
    sync: bool = False,
    process_group=None,
    donate: bool = False,
    give: bool = False,
) -> Tensor:
    """``act(bn(conv(input)) + residual)`` through the fused kernels, reading ``conv``
    and ``bn`` now; through the modules themselves while any of them carries hooks.
    The activation (when ``relu``): the module ``relu_module`` (an ``nn.ReLU`` or any
    activation module the kernels apply, read now), else ``activation`` (an Act: a
    function call's), else ReLU. Under ``torch.fx`` tracing this records itself as one
    node (module arguments as ``get_attr`` nodes), so converted models stay traceable.
    ``donate`` / ``give``: set by the converter (:func:`_donations`), the residual is a
    value the generated forward gives up / the output is to be marked as one."""
    if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and type(input) is Tensor:
        # The common site (exact classes, no synchronisation), checked as below in a few
        # attribute reads: what a converted model's every call pays per site.
        act = _plain_site_act(relu, relu_module, activation)
        if (
            act is not None
            and not sync
            and conv.padding_mode == "zeros"
            and conv.out_channels == bn.num_features
            and not has_hooks(conv, bn, relu_module)
            and (residual is None or _unit_residual(conv, input, residual))
        ):
            if not (donate or give) or torch.compiler.is_compiling():
                return conv_bn_forward(conv, bn, input, residual, act, backend, _fold_cache(bn))
            out = conv_bn_forward(
                conv, bn, input, residual, act, backend, _fold_cache(bn),
                donate=donate and donated(residual),
            )  # fmt: skip
            if give:
                mark_donated(out)
            return out
    tracer = _tracer_of(input, residual)
    if tracer is not None:
        kwargs = _site_kwargs(relu, relu_module, activation, backend, sync, process_group)
        return tracer.create_proxy(
            "call_function", fused_conv_bn, (conv, bn, input, residual), kwargs
        )
    undonate(input, residual)  # (modules and their hooks may see them below)
    activation = _as_activation(activation)
    if has_hooks(conv, *bn_modules(bn), relu_module) or not _fusable(conv, bn, relu_module):
        # hooks, or modules replaced by others since conversion: the modules themselves
        if sync and has_hooks(conv, *bn_modules(bn), relu_module):
            _refuse_unsynchronised([bn], "a module of this fused conv-BN site")
        out = bn(conv(input))
        if residual is not None:
            out = out + residual
        return _relu(out, relu, relu_module, activation)
    dtype = unit_dtype(input) if isinstance(input, Tensor) and input.dim() == 4 else None
    return _bn_site(
        bn, dtype, residual, _site_act(relu, relu_module, activation),
        lambda out: _relu(out, relu, relu_module, activation),
        lambda r, act: _conv_bn(conv, bn, input, r, act, backend, sync, process_group),
        lambda: bn(conv(input)),
    )  # fmt: skip


def _site_kwargs(relu, relu_module, activation, backend, sync, process_group) -> dict:
    kwargs = {"relu": relu, "relu_module": relu_module, "backend": backend, "sync": sync}
    if activation is not None:
        kwargs["activation"] = activation.args if isinstance(activation, Act) else activation
    if process_group is not None:
        kwargs["process_group"] = process_group
    return kwargs


def _bn_site(bn, dtype, residual, act: Act, post, fused, modules) -> Tensor:
    """What every fused site with BatchNorm ``bn`` shares: ``fused(residual, act)`` is
    the fused kernel call and ``post(out)`` the site's activation as written (run when it
    is not fused). A frozen BatchNorm whose buffers have another dtype than the unit's
    (``dtype``; None: not a 4-d tensor) runs ``modules()`` (the module promotes, as under
    autocast). A norm-act BatchNorm's own activation, read now, comes before the residual
    and the site's activation: fused when the kernels apply it, else its ``drop``/``act``
    run as modules after the fused BatchNorm."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) and (
        dtype is None or dtype != bn._buffers["weight"].dtype
    ):
        _note_eager("a frozen BatchNorm's buffers have another dtype than its input")
        out = modules()
        return post(out if residual is None else out + residual)
    inner = inner_act(bn)
    if inner is None:
        return fused(residual, act)
    if residual is None and (not act.active or (inner == act and act.kind == RELU)):
        # (relu(relu(y)) == relu(y))
        return fused(None, inner) if inner != "module" else post(_norm_act_modules(bn, fused))
    out = _norm_act_modules(bn, fused) if inner == "module" else fused(None, inner)
    if residual is not None:
        out = out + residual
    return post(out)


def _norm_act_modules(bn, fused) -> Tensor:
    """A norm-act BatchNorm fused alone, then its own ``drop`` and ``act`` as modules."""
    return bn._modules["act"](bn._modules["drop"](fused(None, ID_ACT)))


def _unit_residual(conv, input: Tensor, residual) -> bool:
    """``residual`` is a tensor the fused unit adds (see :func:`adds_residual`; else
    eager's add, with its broadcasting and promotion)."""
    return isinstance(residual, Tensor) and adds_residual(residual, input, conv)


def _bn_residual(input, residual) -> bool:
    """The same for a BN site (or an add+ReLU site) of ``input``."""
    return isinstance(residual, Tensor) and adds_residual(residual, input)


def _conv_bn(conv, bn, input, residual, act: Act, backend, sync, process_group) -> Tensor:
    bn = _as_bn(bn)
    cache = _fold_cache(bn)
    if residual is not None and not _unit_residual(conv, input, residual):
        # a broadcasting, foreign or other-dtype residual: eager add (eager's promotion)
        _note_eager("the residual's shape, device or dtype differs from the unit's output")
        out = conv_bn_forward(conv, bn, input, None, ID_ACT, backend, cache, sync, process_group)
        return act(out + residual)
    return conv_bn_forward(conv, bn, input, residual, act, backend, cache, sync, process_group)


class _FrozenView:
    """A frozen BatchNorm as the fused calls read an ``nn.BatchNorm2d`` in eval mode (its
    buffers read live from the module)."""

    training = False
    momentum = 0.0
    track_running_stats = True
    affine = True

    def __init__(self, module: nn.Module) -> None:
        self._module = weakref.ref(module)

    def _m(self) -> nn.Module:
        return self._module()

    @property
    def _parameters(self):
        b = self._m()._buffers
        return {"weight": b["weight"], "bias": b["bias"]}

    @property
    def _buffers(self):
        b = self._m()._buffers
        return {"running_mean": b["running_mean"], "running_var": b["running_var"],
                "num_batches_tracked": None}  # fmt: skip

    weight = property(lambda self: self._m()._buffers["weight"])
    bias = property(lambda self: self._m()._buffers["bias"])
    running_mean = property(lambda self: self._m()._buffers["running_mean"])
    running_var = property(lambda self: self._m()._buffers["running_var"])
    num_batches_tracked = None
    eps = property(lambda self: self._m().eps)
    num_features = property(lambda self: self._m()._buffers["weight"].numel())

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


_FROZEN_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _as_bn(bn: nn.Module):
    """What the fused calls read: ``bn`` itself, or a frozen BatchNorm's eval view."""
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return bn
    view = _FROZEN_VIEWS.get(bn)
    if view is None:
        view = _FROZEN_VIEWS.setdefault(bn, _FrozenView(bn))
    return view


def _fusable(conv, bn, relu_module) -> bool:
    """The site's modules are still of the types that were fused (a module replaced
    after conversion by another kind runs as the module it is)."""
    bn_ok = bn is not None and (type(bn) in BN_TYPES or is_norm_act(bn) or is_frozen_bn(bn))
    if conv is not None and (
        type(conv) is not nn.Conv2d
        or conv.padding_mode != "zeros"
        or (bn_ok and conv.out_channels != num_features(bn))
    ):
        return False
    if bn is not None and not bn_ok:
        return False
    if relu_module is None:
        return True
    act = act_of_module(relu_module)
    return act is not None and act.active


def fused_bn(
    bn: nn.BatchNorm2d,
    input: Tensor,
    residual: Tensor | None = None,
    *,
    relu: bool = True,
    relu_module: nn.Module | None = None,
    activation: Act | None = None,
    backend: str = "auto",
    sync: bool = False,
    process_group=None,
) -> Tensor:
    """``act(bn(input) + residual)`` through the fused BatchNorm kernels, reading ``bn``
    now (as :class:`resnet_fused.FusedBatchNormAct2d` does); through the modules while
    any carries hooks. The activation as in :func:`fused_conv_bn`."""

    if type(bn) is nn.BatchNorm2d and type(input) is Tensor:
        # The common site, checked as below in a few reads (see fused_conv_bn).
        act = _plain_site_act(relu, relu_module, activation)
        if (
            act is not None
            and not sync
            and not has_hooks(bn, relu_module)
            and (residual is None or _bn_residual(input, residual))
        ):
            return bn_forward(bn, input, residual, act, backend, False, None, _fold_cache(bn))
    tracer = _tracer_of(input, residual)
    if tracer is not None:
        kwargs = _site_kwargs(relu, relu_module, activation, backend, sync, process_group)
        return tracer.create_proxy("call_function", fused_bn, (bn, input, residual), kwargs)
    undonate(input, residual)  # (modules and their hooks may see them below)
    activation = _as_activation(activation)
    hooked = has_hooks(*bn_modules(bn), relu_module)
    if hooked or not _fusable(None, bn, relu_module):
        # hooks, or modules replaced by others since conversion: the modules themselves
        if sync and hooked:
            _refuse_unsynchronised([bn], "a module of this fused BN site")
        out = bn(input)
        if residual is not None:
            out = out + residual
        return _relu(out, relu, relu_module, activation)

    def fused(r, act):
        if r is not None and not _bn_residual(input, r):
            _note_eager("the residual's shape, dtype or device differs from the input's")
            out = _bn(bn, input, None, ID_ACT, backend, sync, process_group)
            return act(out + r)
        return _bn(bn, input, r, act, backend, sync, process_group)

    dtype = input.dtype if isinstance(input, Tensor) and input.dim() == 4 else None
    return _bn_site(
        bn, dtype, residual, _site_act(relu, relu_module, activation),
        lambda out: _relu(out, relu, relu_module, activation), fused, lambda: bn(input),
    )  # fmt: skip


def _bn(bn, input, residual, act: Act, backend, sync, process_group) -> Tensor:
    bn = _as_bn(bn)
    if isinstance(bn, nn.SyncBatchNorm):
        sync, process_group = True, process_group or bn.process_group
    return bn_forward(bn, input, residual, act, backend, sync, process_group, _fold_cache(bn))


def fused_add_relu(
    x: Tensor, residual: Tensor, *, relu_module: nn.Module | None = None, backend: str = "auto"
) -> Tensor:
    """``relu(x + residual)`` through the fused kernel (eager ops for operands of
    different shapes, dtypes or devices, or while the ReLU module carries hooks)."""
    import resnet_fused

    tracer = _tracer_of(x, residual)
    if tracer is not None:
        kwargs = {"relu_module": relu_module, "backend": backend}
        return tracer.create_proxy("call_function", fused_add_relu, (x, residual), kwargs)
    if (
        has_hooks(relu_module)
        or not _fusable(None, None, relu_module)
        or (relu_module is not None and act_of_module(relu_module) != RELU_ACT)
    ):
        return _relu(x + residual, True, relu_module)
    if not _bn_residual(x, residual) or x.dtype not in SUPPORTED_DTYPES:
        # operands of other shapes, dtypes or devices, integer or complex ones: eager ops
        # (their promotion and results), as the unconverted model computes them
        _note_eager("operands of different shapes, dtypes or devices, or not floating-point")
        return _relu(x + residual, True, relu_module)
    return resnet_fused.add_relu(x, residual, backend=backend)


# --- tracing ------------------------------------------------------------------------------


def _is_standard_leaf(m: nn.Module) -> bool:
    module = type(m).__module__
    return module.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(m, nn.Sequential)


class _InplaceProxy(fx.Proxy):
    """A proxy that records augmented assignments (``a += b``, ``a *= b``, ...) as the
    in-place operators they are (``operator.iadd``, ...): ``torch.fx.Proxy`` has no
    ``__iadd__``, so Python would record ``a = a + b`` and every view or alias of ``a``
    would miss the update."""

    @classmethod
    def __torch_function__(cls, orig_method, types, args=None, kwargs=None):
        # A C function of torch's own namespace (torch.flatten, torch.relu, ...) is never
        # a Tensor method: recorded as FX records it, without asking
        # torch.overrides.is_tensor_method_or_property, whose first call builds a table
        # of every overridable function (about 12 ms, a third of converting a resnet18,
        # paid again in every new process).
        if (
            type(orig_method) is BuiltinFunctionType
            and getattr(torch, orig_method.__name__, None) is orig_method
        ):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            tracers = {a.tracer for a in leaves if isinstance(a, fx.Proxy)}
            if len(tracers) == 1:
                (tracer,) = tracers
                return tracer.create_proxy(
                    "call_function", orig_method, tuple(args or ()), dict(kwargs or {}),
                    name=tracer.graph._target_to_str(orig_method.__name__),
                )  # fmt: skip
        return super().__torch_function__(orig_method, types, args, kwargs)


def _inplace_operator(name: str):
    op = getattr(operator, name)

    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    method.__name__ = f"__{name}__"
    return method


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
              "iand", "ior", "ixor", "ilshift", "irshift"):  # fmt: skip
    setattr(_InplaceProxy, f"__{_name}__", _inplace_operator(_name))


class _NotKept(RuntimeError):
    """Raised while tracing a forward that does what a traced graph cannot keep: the
    module then runs its forward as written (its children converted alone)."""


# While a thread traces: its _Tracer (the patched torch functions below ask it).
_TRACING = threading.local()


def _rng_state() -> tuple:
    """The random streams a forward may draw from: torch's CPU generator, CUDA's (when
    initialised), Python's ``random`` and NumPy's global one."""
    import random
    import sys

    state = [torch.default_generator.get_state(), random.getstate()]
    if torch.cuda.is_initialized():
        state.append(torch.cuda.get_rng_state_all())
    np = sys.modules.get("numpy")
    if np is not None:
        state.append(np.random.get_state())
    return tuple(state)


def _set_rng_state(state: tuple) -> None:
    import random
    import sys

    torch.default_generator.set_state(state[0])
    random.setstate(state[1])
    rest = list(state[2:])
    if torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(rest.pop(0))
    np = sys.modules.get("numpy")
    if np is not None and rest:
        np.random.set_state(rest.pop(0))


def _same_rng(a: tuple, b: tuple) -> bool:
    if len(a) != len(b) or not torch.equal(a[0], b[0]) or a[1] != b[1]:
        return False
    for x, y in zip(a[2:], b[2:], strict=True):
        if isinstance(x, list):  # CUDA: one state tensor per device
            if len(x) != len(y) or not all(map(torch.equal, x, y)):
                return False
        elif not (x[0] == y[0] and (x[1] == y[1]).all() and x[2:] == y[2:]):  # NumPy
            return False
    return True


# torch functions through which a forward changes what tracing does not record: grad
# mode (no_grad, enable_grad, set_grad_enabled), inference mode, autocast regions and
# saved-tensor hooks (checkpointing). Each is looked up on its module at call time by the
# context managers, so they are wrapped there while a thread traces.
_STATEFUL = (
    (torch._C, "_set_grad_enabled", "sets the grad mode (torch.no_grad, enable_grad or "
     "set_grad_enabled)"),
    (torch._C, "_InferenceMode", "enters torch.inference_mode"),
    (torch, "set_autocast_enabled", "enters or leaves an autocast region"),
    (torch._C._autograd, "_push_saved_tensors_default_hooks", "installs saved-tensor hooks "
     "(torch.utils.checkpoint or saved_tensors_hooks)"),
    # ... and reads of that state, whose answer a traced graph would bake in
    (torch, "is_grad_enabled", "reads the grad mode (torch.is_grad_enabled)"),
    (torch, "is_inference_mode_enabled", "reads the inference mode"),
    (torch, "is_autocast_enabled", "reads the autocast state"),
    (torch, "get_autocast_dtype", "reads the autocast dtype"),
)  # fmt: skip


def _refusing(fn, why: str):
    def wrapper(*args, **kwargs):
        tracer = getattr(_TRACING, "tracer", None)
        if tracer is not None and tracer.running:
            raise _NotKept(f"its forward {why}, which a traced graph would drop")
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = 0


class _Watch:
    """While tracing: the torch functions above refuse, every module of the tree records
    the plain attributes read from its ``__dict__`` (its class swapped for a subclass
    that does), and the random streams are restored afterwards."""

    def __init__(self, tracer, root: nn.Module) -> None:
        self.tracer, self.root = tracer, root
        self.swapped: list[tuple[nn.Module, type]] = []

    def __enter__(self):
        global _PATCH_DEPTH
        with _PATCH_LOCK:
            if _PATCH_DEPTH == 0:
                for owner, name, why in _STATEFUL:
                    setattr(owner, name, _refusing(getattr(owner, name), why))
            _PATCH_DEPTH += 1
        self.rng = _rng_state()
        for m in self.root.modules():
            cls = type(m)
            try:
                m.__class__ = _watching(cls)
            except TypeError:  # a class whose instances cannot change class
                continue
            self.swapped.append((m, cls))
        _TRACING.tracer = self.tracer
        return self

    def __exit__(self, *exc):
        global _PATCH_DEPTH
        _TRACING.tracer = None
        for m, cls in self.swapped:
            m.__class__ = cls
        _set_rng_state(self.rng)
        with _PATCH_LOCK:
            _PATCH_DEPTH -= 1
            if _PATCH_DEPTH == 0:
                for owner, name, _ in _STATEFUL:
                    setattr(owner, name, getattr(owner, name).__wrapped__)


# nn.Module's own bookkeeping, and what the converter itself stores on a module.
_INTERNAL = (frozenset(nn.Module().__dict__) - {"training"}) | {"forward", _ATTR}
_WATCHING: dict[type, type] = {}


def _watching(cls: type) -> type:
    """``cls`` with a ``__getattribute__`` that reports plain attributes read from an
    instance's ``__dict__`` to the tracing thread's tracer, and a ``__setattr__`` and
    ``__delattr__`` that refuse (``_NotKept``) while it traces."""
    sub = _WATCHING.get(cls)
    if sub is not None:
        return sub
    base_get = cls.__getattribute__

    def __getattribute__(self, name):
        value = base_get(self, name)
        tracer = getattr(_TRACING, "tracer", None)
        if (
            tracer is not None
            and tracer.running
            and name not in _INTERNAL
            and name[:2] != "__"
            and name in base_get(self, "__dict__")
        ):
            tracer.reads.append((self, name, value))
        return value

    def refuse_write(name: str, what: str):
        tracer = getattr(_TRACING, "tracer", None)
        if tracer is not None and tracer.running:
            raise _NotKept(
                f"its forward {what} an attribute ({name!r}), which a traced graph would not repeat"
            )

    def __setattr__(self, name, value):
        refuse_write(name, "sets")
        cls.__setattr__(self, name, value)

    def __delattr__(self, name):
        refuse_write(name, "deletes")
        cls.__delattr__(self, name)

    namespace = {
        "__getattribute__": __getattribute__,
        "__setattr__": __setattr__,
        "__delattr__": __delattr__,
        "__slots__": (),
    }
    sub = type(cls.__name__, (cls,), namespace)
    sub.__module__, sub.__qualname__ = cls.__module__, cls.__qualname__
    return _WATCHING.setdefault(cls, sub)


class _Tracer(fx.Tracer):
    """Standard layers, the classes the user names, resnet_fused's modules, torchvision
    blocks, modules carrying hooks and modules found untraceable are leaves. Records the
    innermost traced-through module in which tracing failed, and refuses (``_NotKept``)
    a forward that draws random numbers, makes tensors from no input or changes the grad
    mode, autocast or saved-tensor hooks; records the plain attributes the forwards read."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_modules: set[int]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_ids = leaf_modules
        self.failed_in: tuple[str, BaseException] | None = None
        self.inlined: dict[str, nn.Module] = {}
        self.reads: list[tuple[nn.Module, str, object]] = []
        self.running = False

    def trace(self, root, concrete_args=None):
        with _Watch(self, root) as watch:
            self.running = True
            try:
                graph = super().trace(root, concrete_args)
                if not _same_rng(watch.rng, _rng_state()):
                    raise _NotKept(_RANDOM)
            finally:
                self.running = False
        return graph

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InplaceProxy(node, self)

    def get_fresh_qualname(self, prefix: str) -> str:
        if prefix == "_tensor_constant":
            raise _NotKept(
                "its forward makes a tensor from no input (torch.tensor, torch.zeros, "
                "random numbers, ...), which a traced graph would freeze as a constant"
            )
        return super().get_fresh_qualname(prefix)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .modules import own_hooks

        return (
            super().is_leaf_module(m, qualname)
            or isinstance(m, self.leaf_types)
            or id(m) in self.leaf_ids
            or own_hooks(m)
            or is_norm_act(m)
            or is_frozen_bn(m)
        )

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        leaf = self.is_leaf_module(m, path)
        if not leaf:
            self.inlined[path] = m
            rng = _rng_state()
        try:
            out = super().call_module(m, forward, args, kwargs)
            if not leaf and not _same_rng(rng, _rng_state()):
                raise _NotKept(_RANDOM)
            return out
        except Exception as exc:
            if self.failed_in is None and not leaf:
                self.failed_in = (path, exc)
            raise


_RANDOM = (
    "its forward draws random numbers outside the graph (torch.rand*, random, numpy), "
    "which a traced graph would freeze"
)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, _NotKept):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# --- pattern matching ---------------------------------------------------------------------


def _module_of(root: nn.Module, node: fx.Node) -> nn.Module | None:
    return root.get_submodule(node.target) if node.op == "call_module" else None


# The activation functions a site may end with: for each, its parameters after the input
# (name, default) and whether it writes its input in place.
_ACT_CALLS = {
    torch.relu: ((), False),
    torch.relu_: ((), True),
    F.relu: ((("inplace", False),), False),
    F.relu_: ((), True),
    F.relu6: ((("inplace", False),), False),
    F.hardtanh: ((("min_val", -1.0), ("max_val", 1.0), ("inplace", False)), False),
    F.hardtanh_: ((("min_val", -1.0), ("max_val", 1.0)), True),
    F.leaky_relu: ((("negative_slope", 0.01), ("inplace", False)), False),
    F.leaky_relu_: ((("negative_slope", 0.01),), True),
    F.silu: ((("inplace", False),), False),
    F.hardswish: ((("inplace", False),), False),
    F.gelu: ((("approximate", "none"),), False),
    torch.sigmoid: ((), False),
    torch.sigmoid_: ((), True),
}
# Tensor methods taking no parameter (act_of_call knows what each computes)
_ACT_METHODS = ("relu", "relu_", "sigmoid", "sigmoid_")
_ACT_INPLACE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.SiLU, nn.Hardswish)


def _act_of(root: nn.Module, node: fx.Node):
    """(input node, inplace, module path or None, Act) when ``node`` applies an activation
    the fused kernels apply (any spelling: a module, a function, a method)."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        act = act_of_module(m)
        if act is None or not act.active or len(node.args) != 1 or node.kwargs:
            return None
        inplace = bool(getattr(m, "inplace", False)) and isinstance(m, _ACT_INPLACE_MODULES)
        return node.args[0], inplace, node.target, act
    if node.op == "call_function" and node.target in _ACT_CALLS:
        params, inplace = _ACT_CALLS[node.target]
        args, kwargs = list(node.args), dict(node.kwargs)
        inp = args.pop(0) if args else kwargs.pop("input", None)
        if not isinstance(inp, fx.Node) or len(args) > len(params):
            return None
        values = dict(params)
        values.update(zip((name for name, _ in params), args, strict=False))
        for key, value in kwargs.items():
            if key not in values:
                return None
            values[key] = value
        if any(isinstance(v, fx.Node) for v in values.values()):
            return None
        inplace = values.pop("inplace", inplace)
        act = act_of_call(node.target, (inp, *values.values()), {})
        if act is None or not act.active or not isinstance(inplace, bool):
            return None
        return inp, inplace, None, act
    if (
        node.op == "call_method"
        and node.target in _ACT_METHODS
        and len(node.args) == 1
        and not node.kwargs
        and isinstance(node.args[0], fx.Node)
    ):
        act = act_of_call(node.target, node.args, {})
        return node.args[0], node.target.endswith("_"), None, act
    return None


def _add_of(node: fx.Node):
    """(a, b, inplace) when ``node`` adds two graph values (no alpha, no out)."""
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        inplace = node.target is operator.iadd
    elif node.op == "call_method" and node.target in ("add", "add_"):
        inplace = node.target == "add_"
    else:
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    return a, b, inplace


# Values known to have storage of their own (never a view or alias of an input).
_FRESH_MODULES = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Linear,
)
_FRESH_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add,
    torch.sub, torch.mul, torch.cat, torch.relu, torch.clone, F.conv2d, F.batch_norm,
}  # fmt: skip
_FRESH_METHODS = {"add", "sub", "mul", "div", "clone", "relu", "float", "double"}


def _inplace_target(root: nn.Module, node: fx.Node) -> fx.Node | None:
    """The value an in-place activation or add writes into (None for other nodes)."""
    act = _act_of(root, node)
    if act is not None:
        return act[0] if act[1] else None
    add = _add_of(node)
    return add[0] if add is not None and add[2] else None


def _fresh(root: nn.Module, node: fx.Node, depth: int = 0) -> bool:
    """``node``'s value has its own storage, seen through no other graph value (an in-place
    op's result counts when its target is private to it)."""
    if depth > 16:
        return False
    target = _inplace_target(root, node)
    if target is not None:
        return _private(root, target, node, depth + 1)
    if _act_of(root, node) is not None or _add_of(node) is not None:
        return True  # out of place
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _FRESH_MODULES)
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return False


def _private(root: nn.Module, target: fx.Node, op: fx.Node, depth: int = 0) -> bool:
    """Writing into ``target`` in place at ``op`` is seen by nothing else: ``target`` has
    its own storage and no other user of it makes a view or alias of it (later uses of
    ``target`` use ``op`` after :func:`_normalise`). Only then may ``op`` run out of place."""
    if not _fresh(root, target, depth):
        return False
    return all(user is op or _fresh(root, user, depth + 1) for user in target.users)


def _normalise(root: nn.Module, graph: fx.Graph) -> list[nn.Module]:
    """Follows in-place ops through their aliases (later uses of an in-place op's first
    operand use the op's result, which is the same tensor) and removes ``nn.Identity``
    calls. Returns the removed Identity modules (their hooks are checked at call time)."""
    removed = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        act = _act_of(root, node)
        add = _add_of(node)
        target = None
        if act is not None and act[1]:
            target = act[0]
        elif add is not None and add[2]:
            target = add[0]
        if target is not None:
            for user in list(target.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(target, node)
        m = _module_of(root, node)
        if type(m) is nn.Identity and len(node.args) == 1 and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed.append(m)
    return removed


def _activation_of(root: nn.Module, node: fx.Node) -> str | None:
    """The activation ``node`` applies (a name for the report), or None."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        return f"{node.target} ({act_text(m)})" if isinstance(m, ACT_MODULES) else None
    if node.op == "call_function" and node.target in ACT_FUNCTIONS:
        return f"{node.name} ({getattr(node.target, '__name__', node.target)})"
    if node.op == "call_method" and node.target in ACT_METHODS:
        return f"{node.name} (.{node.target}())"
    return None


class _Site:
    """One fused site: the pattern, the module paths it reads and the rewritten node."""

    act_inside = False  # the BatchNorm is a norm-act one: its own drop and act included
    has_act = False  # the site ends with an activation of the graph (module or function)
    activation = None  # a function's activation, as (code, parameter): fixed at conversion

    def __init__(self, pattern, conv=None, bn=None, relu=None, names=()):
        self.pattern, self.conv, self.bn, self.relu = pattern, conv, bn, relu
        self.names = list(names)

    def modules(self) -> list[str]:
        return [p for p in (self.conv, self.bn, self.relu) if p is not None]

    mode = None  # "training only" / "eval only": a site of one of the two graphs

    def describe(self, prefix: str) -> str:
        mode = f", {self.mode}" if self.mode else ""
        return f"{', '.join(prefix + n for n in self.names)} ({self.pattern}{mode})"


def _single_user(node: fx.Node, user: fx.Node) -> bool:
    return len(node.users) == 1 and user in node.users


def _users_text(node: fx.Node) -> str:
    return f"its output has {len(node.users)} users"


def _find_sites(root: nn.Module, graph: fx.Graph):
    """The sites to fuse (site, node list, input, residual) and the candidates left
    alone (name, reason)."""
    claimed: set[fx.Node] = set()
    sites, left = [], []

    def name(node):
        return node.target if node.op == "call_module" else node.name

    def bn_unit(bn_node, user):
        """(conv node or None, reason) for a BN node feeding ``user``."""
        why = why_not_bn(_module_of(root, bn_node))
        if why:
            return None, why
        if len(bn_node.args) != 1 or bn_node.kwargs:
            return None, "called with extra arguments"
        src = bn_node.args[0]
        conv = _module_of(root, src) if isinstance(src, fx.Node) else None
        if isinstance(conv, nn.Conv2d):
            why = why_not_conv(conv)
            if why is None and conv.out_channels != num_features(_module_of(root, bn_node)):
                why = "conv outputs and BatchNorm features differ"
            if why is None and (len(src.args) != 1 or src.kwargs):
                why = "conv called with extra arguments"
            if why is None and not _single_user(src, bn_node):
                why = f"conv {_users_text(src)}"
            if why is None and src not in claimed:
                return src, None
            if why:
                left.append((name(src), f"not fused with {name(bn_node)}: {why}"))
        return None, None

    def is_bn(node):  # a BatchNorm whose output is its normalised input (no own act)
        m = _module_of(root, node)
        return is_batch_norm(m) and node not in claimed and inner_act(m) is None

    def bn_of_add(a, b, add):
        """(BatchNorm operand, the other operand, its conv node or None) of ``add`` (of
        ``a`` and ``b``) when the BatchNorm can be fused with the add, else None."""
        for operand, other in ((a, b), (b, a)):
            if not (is_bn(operand) and _single_user(operand, add)):
                continue
            conv, why = bn_unit(operand, add)
            if not why:  # (else the BatchNorm's own entry comes from the loop below)
                return operand, other, conv
        return None

    def act_site(site, found):
        site.has_act = True
        if found[2] is None and found[3] != RELU_ACT:
            site.activation = found[3].args
        return site

    for node in list(graph.nodes):
        found = _act_of(root, node)
        if found is None or node in claimed:
            continue
        x, _, act_path, act = found
        tag = "relu" if act.kind == RELU else act.name
        add = _add_of(x) if x not in claimed else None
        # After an add: BN + add + the activation, or add + ReLU alone.
        if add is not None and _single_user(x, node):
            a, b, inplace = add
            bn_operand = any(is_bn(o) and _single_user(o, x) for o in (a, b))
            if inplace and not _private(root, a, x):
                # `a += ...` must stay in place: the caller's tensor, or a value that
                # another one may alias (a view taken before), sees the update
                if a.op in ("placeholder", "get_attr"):
                    why = "adds into the module's input in place"
                else:
                    why = (f"adds into {name(a)} in place, which another value may alias "
                           "(kept in place)")  # fmt: skip
                if act.kind == RELU or bn_operand:
                    left.append((name(node), f"not fused with {name(x)}: {why}"))
                continue
            found_bn = bn_of_add(a, b, x)
            if found_bn is not None:
                operand, other, conv = found_bn
                nodes = [n for n in (conv, operand, x, node) if n is not None]
                bn_path = operand.target
                names = [name(n) for n in nodes if n is not x]
                if conv is not None:
                    site = _Site(f"conv-bn-add-{tag}", conv.target, bn_path, act_path, names)
                    sites.append((act_site(site, found), nodes, conv.args[0], other))
                else:
                    site = _Site(f"bn-add-{tag}", None, bn_path, act_path, names)
                    sites.append((act_site(site, found), nodes, operand.args[0], other))
                claimed.update(nodes)
            elif act.kind == RELU:
                site = _Site("add-relu", None, None, act_path, [name(x), name(node)])
                sites.append((site, [x, node], a, b))
                claimed.update((x, node))
            continue
        if is_bn(x) and _single_user(x, node):
            conv, why = bn_unit(x, node)
            if why:  # (the BatchNorm's own entry comes from the loop below)
                left.append((name(node), f"not fused with {name(x)}: {why}"))
                continue
            nodes = [n for n in (conv, x, node) if n is not None]
            if conv is not None:
                site = _Site(f"conv-bn-{tag}", conv.target, x.target, act_path, map(name, nodes))
                sites.append((act_site(site, found), nodes, conv.args[0], None))
            else:
                site = _Site(f"bn-{tag}", None, x.target, act_path, map(name, nodes))
                sites.append((act_site(site, found), nodes, x.args[0], None))
            claimed.update(nodes)
        elif is_bn(x) or (add is not None and act.kind == RELU):
            left.append((name(node), f"not fused with {name(x)}: {_users_text(x)}"))
    # A BatchNorm and the add after it, with no activation the kernels can take after the
    # add (MobileNet's and EfficientNet's inverted residuals: BN -> add): BN + add fused.
    for node in list(graph.nodes):
        add = _add_of(node) if node not in claimed else None
        if add is None:
            continue
        a, b, inplace = add
        found_bn = None if inplace and not _private(root, a, node) else bn_of_add(a, b, node)
        if found_bn is None:  # (an in-place add that must stay in place: see above)
            continue
        operand, other, conv = found_bn
        nodes = [n for n in (conv, operand, node) if n is not None]
        pattern = "conv-bn-add" if conv is not None else "bn-add"
        site = _Site(pattern, conv.target if conv is not None else None, operand.target,
                     None, map(name, nodes))  # fmt: skip
        sites.append((site, nodes, (conv or operand).args[0], other))
        claimed.update(nodes)
    # Every other BatchNorm: with its convolution when that can be fused, else alone (a
    # norm-act BatchNorm with its own ReLU fused, any other activation of its own run as
    # a module after the fused BatchNorm).
    for node in list(graph.nodes):
        m = _module_of(root, node)
        if node in claimed or not is_batch_norm(m):
            continue
        if isinstance(m, own_classes()):  # resnet_fused's own (a fused stem's bn1)
            continue
        why = why_not_bn(m)
        if why is None and (len(node.args) != 1 or node.kwargs):
            why = "called with extra arguments"
        if why:
            left.append((name(node), why))
            continue
        src = node.args[0]
        conv_node = None
        if isinstance(_module_of(root, src) if isinstance(src, fx.Node) else None, nn.Conv2d):
            conv_node, _ = bn_unit(node, None)  # (a conv that cannot be fused is listed)
        inner = inner_act(m)
        fused_inner = isinstance(inner, Act)
        pattern = ("conv-bn" if conv_node is not None else "bn") + (
            ("-relu" if inner.kind == RELU else f"-{inner.name}") if fused_inner else ""
        )
        nodes = [n for n in (conv_node, node) if n is not None]
        names = [name(n) for n in nodes] + ([f"{node.target}.act"] if fused_inner else [])
        site = _Site(pattern, conv_node.target if conv_node is not None else None,
                     node.target, None, names)  # fmt: skip
        site.act_inside = inner is not None
        sites.append((site, nodes, (conv_node or node).args[0], None))
        claimed.update(nodes)
        if inner == "module":
            act = m._modules["act"]
            why = KERNEL_ACTS
            if type(m._modules["drop"]) is not nn.Identity:
                why = f"its drop, {act_text(m._modules['drop'])}, comes first"
            left.append((f"{node.target}.act", f"{act_text(act)} after {name(node)} runs as "
                         f"its own pass ({why})"))  # fmt: skip
    # Every activation that reads a fused BatchNorm's output: in its site, or listed here
    # (once: one the loop above listed already keeps its entry).
    listed = {entry[0] for entry in left}
    for site, nodes, *_ in sites:
        if site.has_act or site.pattern == "add-relu":
            continue
        for user in nodes[-1].users:
            act = _activation_of(root, user)
            if act is None or name(user) in listed:
                continue
            left.append((name(user), f"{act} after {name(nodes[-1])} runs as its own "
                         f"pass ({KERNEL_ACTS})"))  # fmt: skip
    seen = set()
    left = [e for e in left if not (e in seen or seen.add(e))]
    return sites, left


def _rewrite(graph: fx.Graph, sites, backend: str, sync: bool, has_group: bool) -> None:
    replaced: dict[fx.Node, fx.Node] = {}
    for site, nodes, inp, residual in sites:
        inp, residual = replaced.get(inp, inp), replaced.get(residual, residual)
        last = nodes[-1]
        with graph.inserting_before(last):

            def attr(path):
                return None if path is None else graph.get_attr(path)

            conv, bn, relu_mod = attr(site.conv), attr(site.bn), attr(site.relu)
            group = graph.get_attr(f"{_ATTR}.process_group") if has_group else None
            if site.pattern == "add-relu":
                new = graph.call_function(
                    fused_add_relu, (inp, residual), {"relu_module": relu_mod, "backend": backend}
                )
            else:
                # (a norm-act BatchNorm applies its own act, read at call time)
                kwargs = {"relu": site.has_act, "relu_module": relu_mod, "backend": backend,
                          "sync": sync}  # fmt: skip
                if site.activation is not None:
                    kwargs["activation"] = site.activation
                if group is not None:
                    kwargs["process_group"] = group
                if conv is not None:
                    new = graph.call_function(fused_conv_bn, (conv, bn, inp, residual), kwargs)
                else:
                    new = graph.call_function(fused_bn, (bn, inp, residual), kwargs)
        last.replace_all_uses_with(new)
        replaced[last] = new
        for node in reversed(nodes):
            graph.erase_node(node)


def _donating_block(root: nn.Module, node: fx.Node) -> bool:
    """``node`` calls a fused ResNet block (resnet.py's, which can take its input as its
    last unit's residual buffer: ``_forward_donating``) with one tensor argument."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    return _plain_block_forward(root.get_submodule(node.target))


def _plain_block_forward(block: nn.Module) -> bool:
    """``block``'s class runs the fused block's own forward (``_DONATING_FORWARD``, set
    by resnet.py), not an override of a subclass or a patch of the class."""
    forward = getattr(type(block), "_DONATING_FORWARD", None)
    return forward is not None and type(block).forward is forward


def _donations(root: nn.Module, graph: fx.Graph) -> None:
    """Marks the values private to the generated forward and where they die (see
    functional.conv_bn_act._DONATED): a value made by a fused conv-BN site or fused block
    and read by fused units only (sites reading it as their input or residual, or one
    block taking it as its input) is marked by its producer (``give``), and the unit
    that adds it as its residual at its last use may overwrite it (``donate``). Fused
    units read such a value without exposing it while they run fused (a site or block
    running through its modules voids the mark) and return new tensors. The marks are
    checked at call time: the producer marks its output only where it ran fused without
    hooks."""
    order = {n: i for i, n in enumerate(graph.nodes)}

    def producer(value) -> bool:
        if not isinstance(value, fx.Node):
            return False
        return (value.op == "call_function" and value.target is fused_conv_bn) or (
            _donating_block(root, value)
        )

    def fused_user(user: fx.Node, value: fx.Node) -> bool:
        if user.op == "call_function" and user.target in (fused_conv_bn, fused_bn):
            first = 2 if user.target is fused_conv_bn else 1  # (input, residual) follow
            others = list(user.args[:first]) + list(user.args[first + 2 :])
            return value not in others and value not in user.kwargs.values()
        return _donating_block(root, user) and len(value.users) == 1

    private = set()
    for node in graph.nodes:
        if producer(node) and node.users and all(fused_user(u, node) for u in node.users):
            private.add(node)
            if node.op == "call_function":
                node.kwargs = {**node.kwargs, "give": True}
            else:
                node.meta["give"] = True
    for node in graph.nodes:
        if node.op == "call_function" and node.target is fused_conv_bn:
            residual = node.args[3]
            if (
                residual in private
                and residual is not node.args[2]
                and all(u is node or order[u] < order[node] for u in residual.users)
            ):
                node.kwargs = {**node.kwargs, "donate": True}
        elif _donating_block(root, node) and node.args[0] in private:
            node.meta["donate"] = True


def _call_block(block: nn.Module, input, *, donate: bool = False, give: bool = False):
    """A fused ResNet block's call in a generated forward (see :func:`_donations`): its
    forward, as ``nn.Module.__call__`` calls it when there are no hooks, with ``input``
    given up (``donate``: where its producer marked it) and its output marked for the
    next block (``give``: where its units ran fused); a plain call otherwise (hooks, a
    forward set on the instance, ``Module.compile``, tracing and compiling)."""
    d = block.__dict__
    if (
        type(input) is not Tensor
        or has_hooks(block)
        or "forward" in d
        or not _plain_block_forward(block)
        or d.get("_compiled_call_impl") is not None
        or torch.compiler.is_compiling()
    ):
        undonate(input)  # (hooks may see it)
        return block(input)
    return block._forward_donating(input, donate and donated(input), give)


# --- the converted forward ------------------------------------------------------------------


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _plain(value, depth: int = 0) -> bool:
    """Numbers, strings, dtypes and containers of them (what a snapshot can compare)."""
    if type(value) in _PLAIN:
        return True
    if depth > 4:
        return False
    if type(value) in (tuple, list, set, frozenset):
        return all(_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _contents(value):
    """What a snapshot compares: a list's, dict's or set's items; a plain object's
    attributes (a config object, a dataclass); None where neither is plain."""
    if type(value) in (list, dict, set):
        return copy.deepcopy(value) if _plain(value) else None
    if isinstance(value, (nn.Module, Tensor, type)) or callable(value):
        return None
    attrs = getattr(value, "__dict__", None)
    if type(attrs) is dict and attrs and _plain(attrs):
        return copy.deepcopy(attrs)
    return None


class _Snapshot:
    """A mutable attribute value read while tracing: the same object, with the same
    contents (an item or field changed in place changes the graph's constants too)."""

    __slots__ = ("contents", "obj")

    def __init__(self, obj, contents) -> None:
        self.obj, self.contents = obj, contents

    def __eq__(self, other) -> bool:
        if other is not self.obj:
            return False
        now = other.__dict__ if type(self.contents) is dict and not isinstance(
            other, dict
        ) else other  # fmt: skip
        return type(now) is type(self.contents) and now == self.contents

    __hash__ = None


def _guard_value(value):
    if type(value) in _PLAIN or (type(value) is tuple and _plain(value)):
        return value
    contents = _contents(value)
    return value if contents is None else _Snapshot(value, contents)


def _same_value(now, then) -> bool:
    """A guarded attribute still holds what tracing read: equal plain values (numbers,
    strings, dtypes, tuples of them), the same object with the same contents (lists,
    dicts, plain objects: :class:`_Snapshot`), else the same object."""
    if now is then:
        return True
    if type(then) is _Snapshot:
        return then == now
    if type(now) is not type(then):
        return False
    if type(then) is tuple:
        return len(now) == len(then) and all(map(_same_value, now, then))
    return type(then) in _PLAIN and now == then


_MISSING = object()
_MAX_RETRACES = 8


class _Guards:
    """What one traced graph assumed, checked on every call: each module the graph reaches
    by path is still the module found there at conversion (``edges``), each plain
    attribute its forwards read still holds the value read (``values``), and each module
    whose ``training`` flag they read still has the graph's mode (``flags``)."""

    def __init__(self, edges, values, flags, containers=()) -> None:
        self.edges = edges  # [(parent module, child name, child module)]
        self.values = values  # [(module, attribute name, value read)]
        self.flags = flags  # [module] (not the converted module itself)
        self.containers = containers  # [(traced-through module, its children's names)]
        self._lists = None
        self._compiled()  # (now, not on the first call: torch.compile guards on it)

    def __getstate__(self):
        return {"edges": self.edges, "values": self.values, "flags": self.flags,
                "containers": self.containers}  # fmt: skip

    def __setstate__(self, state) -> None:
        state.setdefault("containers", [])
        self.__dict__.update(state)
        self._lists = None  # (built on first use: the modules may not be restored yet)

    def _compiled(self):
        # Built on first use (and again after copying or unpickling): the modules' own
        # dicts, so that a check is dict lookups only.
        lists = self._lists
        if lists is None:
            lists = self._lists = (
                [p.__dict__["_modules"] for p, _, _ in self.edges],
                [name for _, name, _ in self.edges],
                tuple(c for _, _, c in self.edges),
                [m.__dict__ for m, _, _ in self.values],
                [name for _, name, _ in self.values],
                tuple(v for _, _, v in self.values),
                [m.__dict__ for m in self.flags],
                [m.__dict__["_modules"] for m, _ in self.containers],
                tuple(names for _, names in self.containers),
            )
        return lists

    def failing(self, flag: bool) -> str | None:
        """None while every assumption holds, else "structure", "attribute" or "flag"."""
        e_dicts, e_names, e_mods, v_dicts, v_names, v_vals, f_dicts, c_dicts, c_names = (
            self._compiled()
        )
        # (tuple equality compares identical items by identity: modules compare by
        # identity only, so this is the identity check, at C speed)
        if tuple(map(dict.get, e_dicts, e_names)) != e_mods:
            return "structure"
        if tuple(map(tuple, c_dicts)) != c_names:  # a child added to a traced container
            return "structure"
        if v_dicts:
            now = tuple(map(dict.get, v_dicts, v_names, itertools.repeat(_MISSING)))
            try:
                same = bool(now == v_vals)  # identical items: identity, at C speed
            except Exception:  # (a tensor's elementwise comparison)
                same = False
            if not same and not all(map(_same_value, now, v_vals)):
                return "attribute"
        for d in f_dicts:
            if d.get("training") != flag:
                return "flag"
        return None

    def describe(self, module: nn.Module, flag: bool) -> str:
        for parent, name, child in self.edges:
            if parent._modules.get(name) is not child:
                return f"its submodule {name!r} was replaced"
        for m, names in self.containers:
            if tuple(m._modules) != names:
                return "a traced-through module's children changed"
        for m, name, value in self.values:
            if not _same_value(m.__dict__.get(name, _MISSING), value):
                return f"attribute {name!r} changed since it was traced"
        return "a module's training flag differs from its own (its forward reads it)"


class _GraphConversion:
    """What the converter did to one module: its generated forward (the callable stored as
    the module's ``forward``), the sites fused, the candidates left alone, or the tracing
    error. Pickles as source code (recompiled on load); copies share nothing.

    Each call checks what the graph assumed (:class:`_Guards`): a module replaced after
    conversion or a changed attribute makes the module trace again (at most
    ``_MAX_RETRACES`` times, then its own forward runs); a traced-through module's
    training flag that differs from the module's, a call passing optional arguments, hooks
    on a traced-through container: the module's own forward for that call."""

    def __init__(self, module, sources, import_block, watched, sites, left, error=None, inlined=()):
        self.module = module
        self.sources = sources  # {"train": src, "eval": src} or {} (nothing fused)
        self.import_block = import_block  # {"train": imports, "eval": imports} (or one str)
        self.watched = watched  # traced-through containers and removed Identity modules
        self.sites, self.left, self.error = sites, left, error
        self.inlined = list(inlined)  # (kept for pickles of earlier versions)
        self.guards: dict[str, _Guards] = {}
        self.n_args: int | None = None  # positional arguments a traced call takes
        self.options = None  # convert_graphs' arguments, for a retrace
        self.retraces = 0
        self.eager_calls: dict[str, int] = {}  # call-time fallbacks to eager ops, by reason
        self.own_forward: dict[str, int] = {}  # calls that ran the module's own forward
        self.process_group = None
        self.sync_bn = False
        self._compile()

    def _compile(self) -> None:
        from torch.fx.graph_module import _forward_from_src

        blocks = self.import_block
        if not isinstance(blocks, dict):
            blocks = dict.fromkeys(self.sources, blocks)
        self._fns = {k: _forward_from_src(blocks[k] + src, {}) for k, src in
                     self.sources.items()}  # fmt: skip

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_fns"]
        return state

    def __setstate__(self, state) -> None:
        for name, default in (("inlined", []), ("eager_calls", {}), ("own_forward", {}),
                              ("guards", {}), ("n_args", None), ("options", None),
                              ("retraces", 0)):  # fmt: skip
            state.setdefault(name, default)
        self.__dict__.update(state)
        self._compile()

    def mixed_flags(self) -> bool:
        """True while a traced-through module's training flag, which the graphs baked
        in, differs from the module's own (the original forward runs then)."""
        flag = self.module.training
        guards = self.guards.get("train" if flag else "eval")
        if guards is not None:
            return any(m.training != flag for m in guards.flags)
        return any(m.training != flag for m in self.inlined)

    def _own_forward(self, why: str | None, args, kwargs):
        module = self.module
        if getattr(self, "sync_bn", False):
            bns = [module.get_submodule(s.bn) for s in self.sites if s.bn is not None]
            _refuse_unsynchronised(bns, "a module the converter traced through (or a global hook)")
        if why is not None and not torch.compiler.is_compiling():
            self.own_forward[why] = self.own_forward.get(why, 0) + 1
        return type(module).forward(module, *args, **kwargs)

    def _bind(self, args, kwargs):
        """The positional arguments for the graph when the call leaves every optional
        argument at its default (which the graph was traced with), else None."""
        import inspect

        sig = inspect.signature(type(self.module).forward)
        try:
            bound = sig.bind(self.module, *args, **kwargs)
        except TypeError:
            return None  # the module's own forward raises as eager does
        params = list(sig.parameters.values())[1:]
        out = []
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                if bound.arguments.get(p.name):
                    return None
            elif p.default is p.empty:
                out.append(bound.arguments[p.name])
            elif p.name in bound.arguments and not _same_value(bound.arguments[p.name], p.default):
                return None
        return out

    def __call__(self, *args, **kwargs):
        module = self.module
        if has_hooks(*self.watched):
            # hooks on a traced-through container (or global hooks): the original
            # forward, which calls every module (converted children stay converted)
            return self._own_forward(None, args, kwargs)  # (reported while hooked)
        flag = module.training
        tag = "train" if flag else "eval"
        if self.n_args is not None and (kwargs or len(args) != self.n_args):
            bound = self._bind(args, kwargs)
            if bound is None:
                return self._own_forward("called with optional arguments", args, kwargs)
            args, kwargs = bound, {}
        guards = self.guards.get(tag)
        if guards is not None:
            failing = guards.failing(flag)
            if failing is not None:
                return self._after_change(failing, args, kwargs)
        elif self.inlined and self.mixed_flags():  # (a conversion pickled before guards)
            return self._own_forward(None, args, kwargs)  # (reported while flags differ)
        fn = self._fns[tag]
        if torch.compiler.is_compiling():
            return fn(module, *args, **kwargs)
        previous = getattr(_RUNNING, "conversion", None)
        _RUNNING.conversion = self
        try:
            return fn(module, *args, **kwargs)
        finally:
            _RUNNING.conversion = previous

    def _after_change(self, failing: str, args, kwargs):
        """A guard failed: a traced-through module's flag differs (the own forward), or a
        module or attribute changed since tracing (trace again, at most _MAX_RETRACES
        times; then, and under torch.compile, the own forward)."""
        if failing == "flag":
            return self._own_forward(None, args, kwargs)  # (reported while flags differ)
        module = self.module
        why = self.guards["train" if module.training else "eval"].describe(module, module.training)
        if torch.compiler.is_compiling() or self.options is None:
            return self._own_forward(why, args, kwargs)
        if self.retraces >= _MAX_RETRACES:
            if not self.own_forward:
                warnings.warn(
                    f"resnet_fused: {type(module).__name__} changed after conversion "
                    f"{self.retraces} times ({why}); it runs its own forward from now on "
                    "(convert it again to fuse it)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return self._own_forward(f"changed after conversion more than {_MAX_RETRACES} "
                                     f"times ({why})", args, kwargs)  # fmt: skip
        retrace(module)
        return module(*args, **kwargs)

    @property
    def __code__(self):
        """The module's own forward's code object: torch.export (non-strict) reads
        ``module.forward.__code__`` for the argument names, which the generated forward
        shares (its graph's placeholders are named after them)."""
        return type(self.module).forward.__code__

    def hooked_sites(self) -> list[_Site]:
        out = []
        for site in self.sites:
            mods = [self.module.get_submodule(p) for p in site.modules()]
            if site.bn is not None:
                mods += bn_modules(self.module.get_submodule(site.bn))
            if has_hooks(*mods):
                out.append(site)
        return out


def retrace(module: nn.Module) -> None:
    """Converts ``module`` again (after surgery): traced anew, with the arguments of its
    first conversion; its children keep their conversions, new children are converted."""
    conversion = module.__dict__.get(_ATTR)
    if not isinstance(conversion, _GraphConversion) or conversion.options is None:
        return
    del module.__dict__[_ATTR]
    if module.__dict__.get("forward") is conversion:
        del module.__dict__["forward"]
    leaf_types, backend, sync_bn, process_group = conversion.options
    _convert_module(module, leaf_types, backend, sync_bn, process_group, set())
    new = module.__dict__.get(_ATTR)
    if isinstance(new, _GraphConversion):
        new.retraces = conversion.retraces + 1


def _merge_modes(sites, left, eval_sites, eval_left):
    """The train graph's sites and candidates left alone, with the eval graph's that differ
    (tagged with the mode in which they exist)."""

    def key(site):  # node names may differ between the graphs, module paths do not
        return (site.pattern, *site.modules()) if site.modules() else site.describe("")

    train_keys, eval_keys = set(map(key, sites)), set(map(key, eval_sites))
    merged = []
    for site in sites:
        if key(site) not in eval_keys:
            site.mode = "training only"
        merged.append(site)
    for site in eval_sites:
        if key(site) not in train_keys:
            site.mode = "eval only"
            merged.append(site)
    merged_left = list(left) + [entry for entry in eval_left if entry not in left]
    return merged, merged_left


def _optional_arguments(module: nn.Module):
    """(the forward's required positional argument count or None, concrete_args): each
    optional argument with a plain default is traced at its default (calls passing it run
    the module's own forward); None when the signature has keyword-only arguments
    without defaults."""
    import inspect

    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None, None
    required, concrete = 0, {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            required = None  # (traced as fx traces them; calls are not checked)
            continue
        if p.default is p.empty:
            if p.kind is p.KEYWORD_ONLY:
                return None, None
            if required is not None:
                required += 1
        elif type(p.default) in _PLAIN:
            concrete[p.name] = p.default
    return required, concrete or None


def _trace(module: nn.Module, leaf_types, leaf_ids: set[int]):
    """(train graph, eval graph, {tag: tracer}) or raises; on failure the innermost module
    that failed is returned to be made a leaf instead: (None, None, (path, exc)). The
    module is traced in eval mode too only where its traced forwards read a ``training``
    flag."""
    modes = {m: m.training for m in module.modules()}
    graphs, tracers = {}, {}
    _, concrete = _optional_arguments(module)
    try:
        for tag, flag in (("train", True), ("eval", False)):
            if tag == "eval" and not any(
                name == "training" for _, name, _ in tracers["train"].reads
            ):
                # No traced forward read a training flag, and only such a read can make
                # the two traces differ (leaves are not traced into): eval's graph is
                # the same graph, copied (each mode's graph is rewritten on its own).
                graphs[tag], tracers[tag] = copy.deepcopy(graphs["train"]), tracers["train"]
                break
            module.train(flag)
            tracer = _Tracer(leaf_types, leaf_ids)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (fx's notes on concrete arguments)
                    graphs[tag] = tracer.trace(module, concrete)
            except Exception as exc:
                return None, None, tracer.failed_in or ("", exc)
            tracers[tag] = tracer
    finally:
        for m, flag in modes.items():
            m.training = flag
    return graphs["train"], graphs["eval"], tracers


def _edges(root: nn.Module, paths) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, child) for every step of every module path in ``paths``."""
    out, seen = [], set()
    for path in sorted(paths):
        parent = root
        for name in path.split(".") if path else ():
            child = parent._modules.get(name)
            if child is None:  # a parameter or buffer (get_attr), or a missing module
                break
            if (id(parent), name) not in seen:
                seen.add((id(parent), name))
                out.append((parent, name, child))
            parent = child
    return out


def _call_module(module: nn.Module, *args, **kwargs):
    """A leaf module's call in a generated forward (``module`` looked up as below)."""
    return module(*args, **kwargs)


def _modules_by_dict(root: nn.Module, graph: fx.Graph) -> None:
    """Changes ``graph`` in place: every module it reaches looked up through the
    ``_modules`` dicts, once per path prefix per call, at the top of the forward:
    ``self._modules["features"]._modules["1"]`` (dict lookups at C speed) instead of
    FX's ``getattr(self.features, "1")`` at every use (``nn.Module.__getattr__``, about
    0.7 us per step of a path; a MobileNetV2 took over 600 of them per call). The same
    modules: the guards have checked, before the forward runs, that every module on these
    paths is still the one found at conversion, through the same dicts. Parameters and
    buffers a forward reads stay ``get_attr`` nodes. For code generation only: the
    analysis is done on the graph before this."""
    first = next(iter(graph.nodes), None)
    if first is None:
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(first):
        root_dict = graph.get_attr("_modules")
    dicts: dict[str, fx.Node] = {"": root_dict}
    nodes: dict[str, fx.Node] = {}
    cursor = [root_dict]  # the last lookup: each new one goes after it

    def add(target, args, name=None) -> fx.Node:
        with graph.inserting_after(cursor[0]):
            node = graph.create_node("call_function", target, args, name=name)
        cursor[0] = node
        return node

    def module_at(path: str) -> fx.Node:
        node = nodes.get(path)
        if node is None:
            parent, _, name = path.rpartition(".")
            owner = dicts.get(parent)
            if owner is None:
                owner = dicts[parent] = add(getattr, (module_at(parent), "_modules"))
            node = nodes[path] = add(operator.getitem, (owner, name), path.replace(".", "_"))
        return node

    def is_module(path: str) -> bool:
        m = root
        for name in path.split("."):
            m = m._modules.get(name) if isinstance(m, nn.Module) else None
            if m is None:
                return False
        return True

    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target and is_module(node.target):
            node.replace_all_uses_with(module_at(node.target))
            graph.erase_node(node)
        elif node.op == "call_module" and is_module(node.target):
            kwargs = dict(node.kwargs)
            fn = _call_module
            if node.meta.get("donate") or node.meta.get("give"):  # (see _donations)
                fn = _call_block
                kwargs.update(
                    donate=bool(node.meta.get("donate")), give=bool(node.meta.get("give"))
                )
            with graph.inserting_before(node):
                call = graph.call_function(fn, (module_at(node.target), *node.args), kwargs)
            call.meta = node.meta
            node.replace_all_uses_with(call)
            graph.erase_node(node)
    if not root_dict.users:
        graph.erase_node(root_dict)
    graph.lint()


def _guards(root: nn.Module, graph: fx.Graph, tracer: _Tracer, flag: bool, extra) -> _Guards:
    paths = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    paths |= set(tracer.inlined) | set(extra)
    values, flags, seen = [], [], set()
    for m, name, value in tracer.reads:
        if (id(m), name) in seen:
            continue
        seen.add((id(m), name))
        if name == "training":
            if m is not root and value == flag:
                flags.append(m)
        else:
            values.append((m, name, _guard_value(value)))
    containers = [(root, tuple(root._modules))]
    containers += [(m, tuple(m._modules)) for m in tracer.inlined.values() if m is not root]
    return _Guards(_edges(root, paths), values, flags, containers)


def convert_graphs(
    model: nn.Module,
    *,
    backend: str = "auto",
    sync_bn: bool = False,
    process_group=None,
    leaf_modules=(),
) -> None:
    """Converts ``model`` in place (see the module docstring)."""
    leaf_types = (*own_classes(), *tuple(leaf_modules))
    _convert_module(model, leaf_types, backend, sync_bn, process_group, set())


def _convert_module(module, leaf_types, backend, sync_bn, process_group, seen) -> None:
    if id(module) in seen or _is_standard_leaf(module) or isinstance(module, own_classes()):
        return
    seen.add(id(module))
    if isinstance(module.__dict__.get(_ATTR), _GraphConversion):
        return  # converted already
    leaf_ids: set[int] = set()
    errors: dict[str, str] = {}
    while True:
        train, evalg, info = _trace(module, leaf_types, leaf_ids)
        if train is not None:
            break
        path, exc = info
        if not path:  # the module's own forward cannot be traced: convert its children
            for child in module.children():
                _convert_module(child, leaf_types, backend, sync_bn, process_group, seen)
            module.__dict__[_ATTR] = _GraphConversion(
                module, {}, "", [], [], [], error=_error_text(exc)
            )
            return
        leaf_ids.add(id(module.get_submodule(path)))
        errors[path] = _error_text(exc)
    tracers = info
    inlined = {**tracers["train"].inlined, **tracers["eval"].inlined}
    sources, sites, left, watched = {}, None, None, list(inlined.values())
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    import_blocks, guards, leaves = {}, {}, set()
    has_group = sync_bn and process_group is not None
    for tag, graph in (("train", train), ("eval", evalg)):
        called = {n.target for n in graph.nodes if n.op == "call_module"}
        watched += _normalise(module, graph)
        found, alone = _find_sites(module, graph)
        if sites is None:
            sites, left = [s for s, *_ in found], alone
        else:  # the eval graph's own sites and candidates (a forward reading self.training)
            sites, left = _merge_modes(sites, left, [s for s, *_ in found], alone)
        guards[tag] = _guards(module, graph, tracers[tag], tag == "train", called)
        _rewrite(graph, found, backend, sync_bn, has_group)
        if tag == "eval" and not isinstance(module, fx.GraphModule):
            # (a GraphModule's graph is the user's to edit after conversion: marks made
            # for the graph as it was would then be wrong)
            _donations(module, graph)
        graph.lint()
        leaves |= {n.target for n in graph.nodes if n.op == "call_module"}
        if not isinstance(module, fx.GraphModule):  # (its graph is kept: see below)
            _modules_by_dict(module, graph)
        code = graph.python_code(root_module="self")
        sources[tag] = code.src
        # each graph its own globals: a function only one graph calls (a site fused only
        # in training, say) is named in that graph's imports only
        import_blocks[tag] = _format_import_block(code.globals, sys_importer)
    differ = sources["train"] != sources["eval"] or import_blocks["train"] != import_blocks["eval"]
    if not differ:
        sources["eval"], import_blocks["eval"] = sources["train"], import_blocks["train"]
    conversion = _GraphConversion(
        module, sources if sites else {}, import_blocks, watched, sites, left
    )
    conversion.guards = guards
    conversion.n_args = _optional_arguments(module)[0]
    conversion.options = (leaf_types, backend, sync_bn, process_group)
    conversion.process_group = process_group if has_group else None
    conversion.sync_bn = sync_bn
    conversion.errors = errors
    module.__dict__[_ATTR] = conversion
    if sites and isinstance(module, fx.GraphModule):
        # A GraphModule (an FX-extracted backbone, ...) gets the rewritten graph itself, which
        # its own copying and pickling keep (torchvision's feature extractors hold one graph
        # per mode).
        if hasattr(module, "train_graph") and hasattr(module, "eval_graph"):
            module.train_graph, module.eval_graph = train, evalg
        module.graph = train if module.training else evalg
        module.recompile()
    elif sites:
        module.__dict__["forward"] = conversion
    # Leaves that are not standard layers (hooked modules, untraceable ones, the user's
    # leaf classes): converted on their own.
    for path in leaves:
        child = module.get_submodule(path)
        _convert_module(child, leaf_types, backend, sync_bn, process_group, seen)
    for path in errors:
        child = module.get_submodule(path)
        _convert_module(child, leaf_types, backend, sync_bn, process_group, seen)


def _kept(error: str) -> bool:
    """The error is a _NotKept refusal (a forward tracing would change), not a failure."""
    return error.startswith("its forward")


def graph_report(model: nn.Module):
    """(fused, not_fused) entries of the graph-level conversion of ``model``."""
    fused, skipped = [], []
    for name, module in model.named_modules():
        conv = module.__dict__.get(_ATTR)
        if not isinstance(conv, _GraphConversion):
            continue
        prefix = f"{name}." if name else ""
        where = name or "<model>"
        if conv.error is not None:
            if _kept(conv.error):
                skipped.append(f"{where}: forward left as written ({conv.error}); its "
                               "children converted alone")  # fmt: skip
            else:
                skipped.append(f"{where}: not traced ({conv.error}); its children converted alone")
            for child_name, child in module.named_children():
                if isinstance(child, (nn.Conv2d, nn.ReLU)) or is_batch_norm(child):
                    skipped.append(f"{prefix}{child_name}: left alone: its parent {where} "
                                   "could not be traced")  # fmt: skip
            continue
        for path, err in getattr(conv, "errors", {}).items():
            if _kept(err):
                skipped.append(f"{prefix}{path}: forward left as written ({err}); converted "
                               "on its own")  # fmt: skip
            else:
                skipped.append(f"{prefix}{path}: not traced ({err}); runs as a module")
        hooked = set(map(id, conv.hooked_sites()))
        for site in conv.sites:
            if id(site) in hooked:
                skipped.append(f"{site.describe(prefix)}: runs unfused while hooks are registered")
            else:
                fused.append(site.describe(prefix))
        for node_name, why in conv.left:
            skipped.append(f"{prefix}{node_name}: left alone: {why}")
        if conv.sites and has_hooks(*conv.watched):
            skipped.append(f"{where}: runs its original forward while a traced-through "
                           "module carries hooks")  # fmt: skip
        for why, calls in conv.own_forward.items():
            skipped.append(f"{where}: ran its own forward on {calls} call(s): {why}")
        if conv.retraces:
            skipped.append(f"{where}: traced again {conv.retraces} time(s) after its modules "
                           "or attributes changed")  # fmt: skip
        if conv.sites and conv.mixed_flags():
            skipped.append(f"{where}: runs its original forward while a traced-through "
                           "module's training flag differs from its own (its forward "
                           "reads self.training)")  # fmt: skip
        for why, calls in getattr(conv, "eager_calls", {}).items():
            skipped.append(f"{where}: a fused site ran as eager ops on {calls} call(s): {why}")
    return fused, skipped


def unfuse_graphs(model: nn.Module) -> None:
    """Removes the generated forwards (a converted GraphModule keeps its rewritten graph:
    unfuse it by converting the unconverted model again)."""
    for module in model.modules():
        if isinstance(module.__dict__.get(_ATTR), _GraphConversion):
            del module.__dict__[_ATTR]
            if isinstance(module.__dict__.get("forward"), _GraphConversion):
                del module.__dict__["forward"]


def timed_convert(model: nn.Module, **kwargs) -> float:
    """Seconds :func:`convert_graphs` takes on ``model`` (for the benchmarks)."""
    start = time.perf_counter()
    convert_graphs(model, **kwargs)
    return time.perf_counter() - start
