"""The activations the fused ops apply after BatchNorm (+ residual add).

One table for every layer of the library: the codes the ops take (``int act, float
act_param``; the same numbers as ``csrc/act.h``), the torch function each one matches, how
to recognise it as a module or a function call, and its derivative (torch's own backward
ops, which define the conventions at kinks).

>>> from resnet_fused.activations import as_act
>>> as_act("silu"), as_act(torch.nn.LeakyReLU(0.2)), as_act(True)
(Act('silu'), Act('leaky_relu', 0.2), Act('relu'))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GELU",
    "GELU_TANH",
    "HARDSWISH",
    "IDENTITY",
    "LEAKY_RELU",
    "NAMES",
    "RELU",
    "RELU6",
    "SIGMOID",
    "SILU",
    "Act",
    "act_of_call",
    "act_of_module",
    "as_act",
]

# Codes (csrc/act.h's ActKind).
IDENTITY, RELU, RELU6, LEAKY_RELU, SILU, HARDSWISH, GELU, GELU_TANH, SIGMOID = range(9)
NAMES = (
    "identity", "relu", "relu6", "leaky_relu", "silu", "hardswish", "gelu", "gelu_tanh",
    "sigmoid",
)  # fmt: skip
_ALIASES = {"none": IDENTITY, "swish": SILU, "hard_swish": HARDSWISH, "relu_6": RELU6}

# Where the derivative at a kink is a jump, the points (pre-activation values) where the
# tolerance rule treats a flip within rounding as ReLU's is treated at 0.
_KINKS = {RELU: (0.0,), RELU6: (0.0, 6.0), LEAKY_RELU: (0.0,), HARDSWISH: (-3.0, 3.0)}


@dataclass(frozen=True)
class Act:
    """An activation: ``kind`` (one of the codes above) and ``param`` (LeakyReLU's negative
    slope; 0 for the others). Truthy unless it is the identity."""

    kind: int
    param: float = 0.0

    def __post_init__(self):
        if not isinstance(self.kind, int) or not 0 <= self.kind < len(NAMES):
            raise ValueError(f"act: unknown activation code {self.kind!r}")
        if self.kind != LEAKY_RELU and self.param != 0.0:
            raise ValueError(f"act: {NAMES[self.kind]} takes no parameter, got {self.param!r}")
        if not math.isfinite(self.param):
            raise ValueError(f"act: the LeakyReLU slope must be finite, got {self.param!r}")

    @property
    def name(self) -> str:
        return NAMES[self.kind]

    def __bool__(self) -> bool:
        return self.active

    @property
    def active(self) -> bool:
        """Not the identity (``bool(act)``). The library's own code spells it so: Dynamo
        in torch < 2.14 cannot trace ``bool()`` of a frozen dataclass, which broke
        ``torch.compile(fullgraph=True)`` of every fused op there."""
        return self.kind != IDENTITY

    def __repr__(self) -> str:
        return f"Act({self.name!r}" + (f", {self.param!r})" if self.kind == LEAKY_RELU else ")")

    @property
    def from_output(self) -> bool:
        """Whether the fused backward reads the derivative from the output (monotone,
        piecewise linear: identity, ReLU, ReLU6, LeakyReLU with a positive slope).
        Otherwise it recomputes the pre-activation; also for Sigmoid, whose s*(1 - s)
        from an output rounded to half precision loses most of 1 - s where s nears 1."""
        return self.kind in (IDENTITY, RELU, RELU6) or (self.kind == LEAKY_RELU and self.param > 0)

    @property
    def transcendental(self) -> bool:
        """Whether the derivative costs an exp or erf per element (SiLU, GELU, GELU tanh,
        Sigmoid): on the CPU, where that arithmetic rather than memory bounds the BatchNorm
        backward, it is computed once and stored instead of recomputed in a second pass."""
        return self.kind in (SILU, GELU, GELU_TANH, SIGMOID)

    @property
    def kinks(self) -> tuple[float, ...]:
        return _KINKS.get(self.kind, ())

    @property
    def args(self) -> tuple[int, float]:
        """What the ops take: ``(act, act_param)``."""
        return self.kind, float(self.param)

    def __call__(self, x: Tensor) -> Tensor:
        """The activation with torch's own functions (what eager runs)."""
        k = self.kind
        if k == IDENTITY:
            return x
        if k == RELU:
            return torch.relu(x)
        if k == RELU6:
            return F.hardtanh(x, 0.0, 6.0)
        if k == LEAKY_RELU:
            return F.leaky_relu(x, self.param)
        if k == SILU:
            return F.silu(x)
        if k == HARDSWISH:
            return F.hardswish(x)
        if k == SIGMOID:
            return torch.sigmoid(x)
        return F.gelu(x, approximate="tanh" if k == GELU_TANH else "none")

    def eager_(self, x: Tensor) -> Tensor:
        """What eager runs on a fresh tensor ``x``: in place where the derivative reads the
        output (ReLU, ReLU6, LeakyReLU with a positive slope: autograd saves the result),
        else out of place (autograd saves the input; Sigmoid's its result)."""
        k = self.kind
        if k == IDENTITY:
            return x
        if k == RELU:
            return x.relu_()
        if k == RELU6:
            return F.hardtanh_(x, 0.0, 6.0)
        if k == LEAKY_RELU and self.param > 0:
            return F.leaky_relu_(x, self.param)
        return self(x)

    def backward(self, grad: Tensor, pre: Tensor) -> Tensor:
        """``grad * act'(pre)`` with torch's backward ops."""
        k, aten = self.kind, torch.ops.aten
        if k == IDENTITY:
            return grad
        if k == RELU:
            return aten.threshold_backward(grad, pre, 0)
        if k == RELU6:
            return aten.hardtanh_backward(grad, pre, 0.0, 6.0)
        if k == LEAKY_RELU:
            return aten.leaky_relu_backward(grad, pre, self.param, False)
        if k == SILU:
            return aten.silu_backward(grad, pre)
        if k == HARDSWISH:
            return aten.hardswish_backward(grad, pre)
        if k == SIGMOID:
            return aten.sigmoid_backward(grad, torch.sigmoid(pre))
        return aten.gelu_backward(grad, pre, approximate="tanh" if k == GELU_TANH else "none")

    def backward_from_output(self, grad: Tensor, out: Tensor) -> Tensor:
        """``grad * act'`` read from the output (``from_output`` must hold)."""
        if not self.from_output:
            raise ValueError(f"act: the derivative of {self.name} is not a function of its output")
        if self.kind == LEAKY_RELU:
            return torch.where(out > 0, grad, grad * self.param)
        return self.backward(grad, out)

    @property
    def onednn(self) -> tuple[str, list, str] | None:
        """oneDNN's post-op (attr, scalars, algorithm) of torch.ops.mkldnn._convolution_pointwise."""
        k = self.kind
        return {
            RELU: ("relu", [], ""),
            RELU6: ("hardtanh", [0.0, 6.0], ""),
            LEAKY_RELU: ("leaky_relu", [self.param], ""),
            SILU: ("swish", [], ""),
            HARDSWISH: ("hardswish", [], ""),
            GELU: ("gelu", [], "none"),
            GELU_TANH: ("gelu", [], "tanh"),
            SIGMOID: ("sigmoid", [], ""),
        }.get(k)


ID_ACT = Act(IDENTITY)
RELU_ACT = Act(RELU)
# (one instance each for the calls on the hot path: act_of_module runs at every call of
# a converted site, and a plan's signature compares identical items by identity)
_RELU6_ACT, _SILU_ACT, _HARDSWISH_ACT = Act(RELU6), Act(SILU), Act(HARDSWISH)
_SIGMOID_ACT = Act(SIGMOID)
_GELU_ACTS = {"none": Act(GELU), "tanh": Act(GELU_TANH)}


def as_act(spec, name: str = "activation") -> Act:
    """An :class:`Act` from what users write: ``None``/``False`` (identity), ``True``
    (ReLU), a name (``"relu"``, ``"relu6"``, ``"leaky_relu"`` (slope 0.01), ``"silu"``,
    ``"hardswish"``, ``"gelu"``, ``"gelu_tanh"``, ``"sigmoid"``, ``"identity"``), an
    ``Act``, or an activation module (``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh(0, 6)``,
    ``nn.LeakyReLU``, ``nn.SiLU``, ``nn.Hardswish``, ``nn.GELU``, ``nn.Sigmoid``,
    ``nn.Identity``)."""
    if isinstance(spec, Act):
        return spec
    if spec is None or spec is False:
        return ID_ACT
    if spec is True:
        return RELU_ACT
    if isinstance(spec, str):
        key = spec.lower()
        kind = _ALIASES.get(key, NAMES.index(key) if key in NAMES else None)
        if kind is None:
            raise ValueError(
                f"{name}: unknown activation {spec!r}; expected one of {', '.join(NAMES)}"
            )
        return Act(kind, 0.01 if kind == LEAKY_RELU else 0.0)
    if isinstance(spec, nn.Module):
        act = act_of_module(spec)
        if act is None:
            raise ValueError(
                f"{name}: {type(spec).__name__} is not an activation the fused ops apply "
                f"(they apply {', '.join(NAMES)})"
            )
        return act
    raise TypeError(
        f"{name} must be a bool, an activation name, an Act or an activation module, "
        f"got {type(spec).__name__}"
    )


def act_of_module(m: nn.Module) -> Act | None:
    """The Act that the module ``m`` computes, or None. Exact classes only: a subclass may
    compute something else."""
    t = type(m)
    if t is nn.Identity:
        return ID_ACT
    if t is nn.ReLU:
        return RELU_ACT
    if t is nn.ReLU6 or (t is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0)):
        return _RELU6_ACT
    if t is nn.LeakyReLU:
        return _leaky(m.negative_slope)
    if t is nn.SiLU:
        return _SILU_ACT
    if t is nn.Hardswish:
        return _HARDSWISH_ACT
    if t is nn.GELU:
        return _GELU_ACTS.get(m.approximate)
    if t is nn.Sigmoid:
        return _SIGMOID_ACT
    return None


def _leaky(slope) -> Act | None:
    if isinstance(slope, bool) or not isinstance(slope, (int, float)):
        return None
    return Act(LEAKY_RELU, float(slope)) if math.isfinite(slope) else None


def _arg(args, kwargs, i, key, default):
    if len(args) > i:
        return args[i]
    return kwargs.get(key, default)


def act_of_call(fn, args: tuple, kwargs: dict) -> Act | None:
    """The Act that the call ``fn(*args, **kwargs)`` (a function or a tensor method name;
    its first argument is the input) computes, or None."""
    if fn in (torch.relu, torch.relu_, F.relu, F.relu_, "relu", "relu_"):
        return RELU_ACT
    if fn in (F.relu6,):
        return Act(RELU6)
    if fn in (F.hardtanh, F.hardtanh_, "hardtanh", "hardtanh_"):
        lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
        return Act(RELU6) if (lo, hi) == (0.0, 6.0) else None
    if fn in (F.leaky_relu, F.leaky_relu_, "leaky_relu", "leaky_relu_"):
        return _leaky(_arg(args, kwargs, 1, "negative_slope", 0.01))
    if fn in (F.silu, "silu", "silu_"):
        return Act(SILU)
    if fn in (F.hardswish, "hardswish", "hardswish_"):
        return Act(HARDSWISH)
    if fn in (torch.sigmoid, F.sigmoid, torch.sigmoid_, "sigmoid", "sigmoid_"):
        return _SIGMOID_ACT
    if fn in (F.gelu, "gelu"):
        return {"none": Act(GELU), "tanh": Act(GELU_TANH)}.get(
            _arg(args, kwargs, 1, "approximate", "none")
        )
    return None
