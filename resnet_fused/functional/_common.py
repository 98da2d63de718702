"""What the fused functions share."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from .. import _extension

K = TypeVar("K")

_tracing_state = torch._C._get_tracing_state  # (None unless torch.jit.trace records)
_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_mode = torch._C._get_dispatch_mode
_PROXY = torch._C._TorchDispatchModeKey.PROXY
_key_included = torch._C._dispatch_tls_is_dispatch_key_included
_PRE_DISPATCH = torch._C.DispatchKey.PreDispatch  # (make_fx(pre_dispatch=True): its own stack)


def _eager_only_context() -> bool:
    """The checks of :func:`runs_eagerly` after torch.compile's, with torch's queries."""
    return (
        _tracing_state() is not None
        or _functorch_active()
        or _dispatch_mode(_PROXY) is not None
        or _key_included(_PRE_DISPATCH)
    )


# The same checks in one call to the extension (csrc/unit.cpp: ~40 ns against ~250 ns for
# the four queries; every fused site reads them per call), or torch's without it.
_EAGER_ONLY_CONTEXT = getattr(_extension._C, "eager_only_context", None) or _eager_only_context


def runs_eagerly() -> bool:
    """True where the fused path must not run: a fused site then runs its modules
    themselves and the functional API the reference composition (eager's ops):

    * while ``torch.jit.trace`` records: its graph holds tensor ops only, while the fused
      path decides in Python (the cached fold and its fingerprint, plans, ``auto``'s
      timing trials, the finite and donation marks), which a trace would either fail on
      or freeze for the example input; the traced graph is then eager's;
    * under a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ``jvp``,
      ``functionalize``, ...): the fused ops have no batching or forward-mode rules;
    * while ``make_fx`` traces (its proxy mode, also with ``pre_dispatch=True``): the
      fold's fingerprint reads values, which a trace cannot, and the graph is then
      eager's, as jit.trace's.

    Other dispatch modes (``FakeTensorMode``, ``FlopCounterMode``, a user's mode counting
    ops) see the fused ops, which run there as anywhere. Not under ``torch.compile`` or
    ``torch.export`` either, which trace the fused ops through their fake kernels (checked
    first: Dynamo cannot trace the other queries); so ``torch.compile`` of a function that
    applies a ``torch.func`` transform to a converted model is not supported (compile the
    model itself, or call the transform outside the compiled function)."""
    if torch.compiler.is_compiling():
        return False
    return _EAGER_ONLY_CONTEXT()


def refuse_sync_when_eager(group, what: str) -> None:
    """Synchronised training statistics cannot run where :func:`runs_eagerly` (eager's
    BatchNorm has no process group): a clear error when there is a group to synchronise
    over (``distributed.sync_group``'s answer); without torch.distributed (None) the
    statistics are this process's, with sync_group's warning, as on the fused path."""
    if group is not None:
        raise RuntimeError(
            f"{what} cannot synchronise its statistics under a torch.func transform, "
            "make_fx or torch.jit.trace (they run eager's ops, which have no process "
            "group): call it outside the transform, or use nn.SyncBatchNorm"
        )


def cached_kernels(cache: dict[str, K], backend: str, make: Callable[[str], K]) -> K:
    """``make(backend)``, looked up once per backend (the op objects are needed per call);
    under torch.compile made directly (no cache for dynamo to guard)."""
    if torch.compiler.is_compiling():
        return make(backend)
    kernels = cache.get(backend)
    if kernels is None:
        kernels = cache[backend] = make(backend)
    return kernels


def needs_autograd(*tensors: Tensor) -> bool:
    """True when autograd must record the op: grad mode on and an input requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def distinct(residual: Tensor | None, input: Tensor) -> Tensor | None:
    """``residual``, or an alias of it (a view: no copy) where it is the very tensor
    passed as ``input`` to the same autograd.Function (``relu(bn(x) + x)``): Dynamo
    cannot trace a Function given one tensor twice (torch.compile with fullgraph=True
    and strict torch.export failed there). Autograd sums the gradients of the two uses
    through the view as it did through the one tensor."""
    if residual is input and residual is not None:
        return residual.view_as(residual)
    return residual


def check_batch_size(y_or_shape) -> None:
    """nn.BatchNorm2d's error for one value per channel in training."""
    shape = y_or_shape.shape if isinstance(y_or_shape, Tensor) else y_or_shape
    if shape[0] * shape[2] * shape[3] == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{torch.Size(shape)}"
        )
