"""Fused ResNet blocks, the one-call converter and its inverse.

:func:`convert` turns any torchvision ResNet (resnet18 ... resnet152, wide_resnet,
resnext, or a ``torchvision.models.resnet.ResNet`` with custom layer counts) into its
fused twin: every ``BasicBlock`` / ``Bottleneck`` becomes a :class:`FusedBasicBlock` /
:class:`FusedBottleneck`, and the graph pass (:mod:`resnet_fused.graph_convert`) fuses
the rest, the stem ``conv1 -> bn1 -> relu`` included: the ResNet's own forward is traced
(the blocks as leaves) and its fused site reads ``model.conv1``, ``model.bn1`` and
``model.relu`` when it runs, so those stay the user's plain modules (``model.conv1(x)``
is a convolution; ``torch.nn.utils.fusion`` and ``torch.ao.quantization.fuse_modules``
work on them). The fused blocks hold the very same ``nn.Conv2d`` / ``nn.BatchNorm2d``
modules under torchvision's names (``conv1``, ``bn1``, ..., ``downsample.0``,
``downsample.1``), so ``state_dict`` keys, parameters and buffers are unchanged.
:func:`unfuse` gives back plain torchvision modules (for export).

Each block runs (body) fused Conv+BN+ReLU units and (tail) Conv+BN+add+ReLU with the
identity or the downsample branch (itself a fused Conv+BN) as the residual; in eval mode
each unit is one convolution with BatchNorm folded in and a one-pass epilogue. A block
reads its submodules at call time: while one of them is no longer of the type the block
fuses (a ReLU replaced by SiLU, a BatchNorm by ``FrozenBatchNorm2d``, ``GroupNorm`` or
``nn.Identity``, a conv by a subclass or another padding mode, a downsample of another
form, ...), the block runs torchvision's forward over its modules as they are, warns
once, and :func:`conversion_report` says why.

:class:`FusedStemConv2d`, :class:`FoldedBatchNorm2d` and :class:`FoldedReLU` are what
``convert`` made of the stem before it became a graph site: still importable (models
pickled then hold them), no longer made; :func:`unfuse` undoes them.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .activations import ID_ACT, RELU_ACT
from .functional.conv_bn_act import mark_donated, undonate
from .graph_convert import _ATTR as _GRAPH_ATTR
from .graph_convert import convert_graphs, fused_conv_bn, graph_report, unfuse_graphs
from .modules import FoldCache, conv_bn_forward, has_hooks, own_hooks
from .patterns import (
    BN_TYPES,
    MISSING,
    SYNC_UNFUSED_ERROR,
    kind,
    register,
    sync_hooks_error,
    why_not_unit,
)

__all__ = [
    "FoldedBatchNorm2d",
    "FusedBasicBlock",
    "FusedBottleneck",
    "FusedStemConv2d",
    "conversion_report",
    "convert",
    "unfuse",
]


# --- helpers: modules sharing another module's parameters and buffers ------------------


def _share_conv(conv: nn.Conv2d, cls: type[nn.Conv2d] = nn.Conv2d) -> nn.Conv2d:
    new = cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
    )  # fmt: skip
    new.weight = conv.weight
    if conv.bias is not None:
        new.bias = conv.bias
    new.training = conv.training
    return new


def _share_bn(
    bn: nn.BatchNorm2d, cls: type[nn.BatchNorm2d] = nn.BatchNorm2d, process_group=None
) -> nn.BatchNorm2d:
    new = cls(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta"
    )
    if isinstance(new, nn.SyncBatchNorm):
        new.process_group = process_group
    for name in ("weight", "bias"):
        setattr(new, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = bn._buffers.get(name)
    new.training = bn.training
    return new


def _deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` sharing the process groups (of nn.SyncBatchNorm or synchronised
    fused modules), which cannot be copied."""
    memo = {}
    for module in model.modules():
        group = module.__dict__.get("process_group")
        if group is not None:
            memo[id(group)] = group
    copied = copy.deepcopy(model, memo)
    # Each module's own training flag as it was: a GraphModule's __deepcopy__ (torchvision's
    # feature extractors) builds the copy anew, in training mode throughout.
    flags = {name: m.training for name, m in model.named_modules(remove_duplicate=False)}
    for name, m in copied.named_modules(remove_duplicate=False):
        flag = flags.get(name)
        if flag is not None and m.training != flag:
            m.training = flag
    return copied


# What a fused unit's argument checks raise (before any statistics are touched): the block
# then runs eager's operations for the unit, which raise eager's exception.
_REFUSED = (ValueError, TypeError, NotImplementedError)


def _why_not_downsample(ds: object) -> str | None:
    if ds is None:
        return None
    if type(ds) is not nn.Sequential or len(ds) != 2:
        return f"downsample: {kind(ds)} is not nn.Sequential(conv, bn)"
    (conv_key, conv), (bn_key, bn) = ds._modules.items()
    return why_not_unit(conv, bn, f"downsample.{conv_key}", f"downsample.{bn_key}")


def _why_not_parts(block: nn.Module, pairs: tuple[tuple[str, str], ...]) -> str | None:
    """Why the submodules of a torchvision block (or of a fused one, now) cannot run as
    the fused block's units: a module of another type or setting than the block fuses,
    or channel counts that no longer fit (naming the submodule); None when they can."""
    mods = block._modules
    for conv_name, bn_name in pairs:
        why = why_not_unit(
            mods.get(conv_name, MISSING), mods.get(bn_name, MISSING), conv_name, bn_name
        )
        if why:
            return why
    relu = mods.get("relu", MISSING)
    if type(relu) is not nn.ReLU:
        return f"relu: {kind(relu)} is not nn.ReLU"
    ds = mods.get("downsample", block.__dict__.get("downsample", MISSING))
    why = _why_not_downsample(ds)
    if why:
        return why
    convs = [(name, mods[name]) for name, _ in pairs]
    for (a_name, a), (b_name, b) in itertools.pairwise(convs):
        if a.out_channels != b.in_channels:
            return f"{a_name} has {a.out_channels} output channels, {b_name} takes {b.in_channels}"
    last_name, last = convs[-1]
    if ds is None:
        if last.out_channels != convs[0][1].in_channels:
            return (
                f"{last_name} has {last.out_channels} output channels, the identity "
                f"{convs[0][1].in_channels}"
            )
    else:
        ds_conv = ds[0]
        if ds_conv.in_channels != convs[0][1].in_channels:
            return (
                f"downsample takes {ds_conv.in_channels} channels, {convs[0][0]} "
                f"{convs[0][1].in_channels}"
            )
        if ds_conv.out_channels != last.out_channels:
            return (
                f"{last_name} has {last.out_channels} output channels, downsample "
                f"{ds_conv.out_channels}"
            )
    return None


# --- blocks ---------------------------------------------------------------------------------


@register
class _FusedBlock(nn.Module):
    """A torchvision block's submodules (same objects, same names) with a fused forward:
    each (conv, bn) pair runs through conv_bn_forward with its own fold cache.
    Subclasses name the torchvision class, the submodules they take over and the
    (conv, bn) pairs they fuse.

    The submodules are read at every call. While one of them is not of the type the block
    fuses (see :meth:`why_unfused`), the block runs torchvision's forward over its modules
    as they are and warns once; so it does while any of them carries hooks."""

    _torchvision: type[nn.Module]
    _children: tuple[str, ...]
    _pairs: tuple[tuple[str, str], ...]
    expansion: int
    _name: str | None = None  # its path in the model it was converted in (for messages)

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        block = self._torchvision(
            inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer
        )
        self._adopt(block, backend)

    def _adopt(self, block: nn.Module, backend: str) -> None:
        for name in self._children:
            setattr(self, name, getattr(block, name))
        self.stride = block.stride
        self.backend = backend
        self.sync_bn, self.process_group = False, None
        # One fold cache per unit, made here and not on the first forward: a dict that
        # changes during a forward makes torch.compile recompile on the second call.
        self._fold_caches: dict[str, FoldCache] = {
            name: FoldCache() for name in ("1", "2", "3", "downsample")
        }

    @classmethod
    def from_block(cls, block: nn.Module, *, backend: str = "auto") -> _FusedBlock:
        """A fused block holding ``block``'s own submodules (shared, not copied)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._adopt(block, backend)
        fused.training = block.training  # its own flag only: each child keeps its own
        return fused

    def to_torchvision(self) -> nn.Module:
        """The torchvision block around the same submodules; a block synchronising its
        BatchNorm (``convert(..., sync_bn=True)``) gets ``nn.SyncBatchNorm`` layers over
        its group, sharing the parameters and buffers."""
        block = self._torchvision.__new__(self._torchvision)
        nn.Module.__init__(block)
        for name in self._children:
            value = self._modules.get(name, self.__dict__.get(name, MISSING))
            if value is not MISSING:
                setattr(block, name, value)
        block.stride = self.stride
        if self.sync_bn:  # new modules only: this fused block's own stay as they are

            def synced(bn):
                if type(bn) is not nn.BatchNorm2d:
                    return bn
                return _share_bn(bn, nn.SyncBatchNorm, self.process_group)

            for name in self._children:
                if name.startswith("bn") and name in block._modules:
                    setattr(block, name, synced(getattr(block, name)))
            ds = block._modules.get("downsample")
            if type(ds) is nn.Sequential and len(ds) == 2:
                conv, bn = ds
                new = nn.Sequential(conv, synced(bn))
                new.training = ds.training
                block.downsample = new
        block.training = self.training  # its own flag only: each child keeps its own
        return block

    def _unit(self, name: str, conv, bn, x, residual=None, relu=True, donate=False) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # traced (feature extraction): one node per unit
            return fused_conv_bn(
                conv, bn, x, residual, relu=relu, backend=self.backend, sync=self.sync_bn,
                process_group=self.process_group,
            )  # fmt: skip
        cache = self._fold_caches.get(name)
        if cache is None:
            cache = self._fold_caches[name] = FoldCache()
        return conv_bn_forward(
            conv, bn, x, residual, RELU_ACT if relu else ID_ACT, self.backend, cache,
            self.sync_bn, self.process_group, donate,
        )  # fmt: skip

    def _units(self, x: Tensor, donate: bool = False, give: bool = False) -> Tensor:
        """The fused units in torchvision's order (conv-bn-relu units, then the downsample
        branch, then the last unit with the residual added), so that a unit refusing its
        operands leaves the state eager leaves when it raises there. The last unit may
        write its result into the residual where it is the downsample branch's output
        (made here, seen by nothing else) or ``x`` given up (``donate``); ``give``: the
        output is marked as given up (see :meth:`_forward_donating`)."""
        pairs = self._pairs
        out = x
        for i, (conv_name, bn_name) in enumerate(pairs[:-1], 1):
            conv, bn = self._modules[conv_name], self._modules[bn_name]
            try:
                out = self._unit(str(i), conv, bn, out)
            except _REFUSED as exc:
                out = self._eager_unit(conv, bn, out, None, exc)
            _private(out)
        conv, bn = self._modules[pairs[-1][0]], self._modules[pairs[-1][1]]
        ds = self._modules.get("downsample")
        identity = x
        if ds is not None:
            ds_conv, ds_bn = ds._modules.values()
            try:
                identity = self._unit("downsample", ds_conv, ds_bn, x, relu=False)
                _private(identity)
                donate = True
            except _REFUSED as exc:
                # eager's order from here: the last conv and bn, the downsample, the add
                self._uncount(ds_bn, exc)
                out = bn(conv(out))
                out += ds(x)
                out = torch.relu(out)
                self._ran_eager(exc)
                return out
        try:
            out = self._unit(str(len(pairs)), conv, bn, out, residual=identity, donate=donate)
        except _REFUSED as exc:
            out = self._eager_unit(conv, bn, out, identity, exc)
        if give:
            mark_donated(out)
        return out

    def _uncount(self, bn, exc: Exception) -> None:
        """A fused unit refused its operands (channel counts or shapes that no longer fit,
        an input of another shape, ...): eager's operations run instead, which raise
        eager's exception, or give eager's result where eager accepts the operands (a
        residual that broadcasts, ...). The refused call counted the batch already (its
        checks come after the count and before any statistics); nn.BatchNorm2d.forward
        counts it again."""
        if self.sync_bn or isinstance(bn, nn.SyncBatchNorm) or torch.compiler.is_compiling():
            raise exc
        if bn.training and bn.track_running_stats:
            tracked = bn._buffers.get("num_batches_tracked")
            if tracked is not None:
                tracked.sub_(1)

    def _eager_unit(self, conv, bn, x, residual, exc: Exception) -> Tensor:
        self._uncount(bn, exc)
        out = bn(conv(x))
        if residual is not None:
            out += residual
        out = torch.relu(out)
        self._ran_eager(exc)
        return out

    def _ran_eager(self, exc: Exception) -> None:
        """Eager accepted what a fused unit refused: counted for conversion_report."""
        why = f"{type(exc).__name__}: {exc}"
        calls = self.__dict__.setdefault("_eager_calls", {})
        calls[why] = calls.get(why, 0) + 1
        self._warn(f"a fused unit refused operands that eager accepts ({why}); eager ops ran")

    def _modules_now(self) -> list[nn.Module | None]:
        mods = self._modules
        ds = mods.get("downsample")
        children = list(mods.values())
        return children + list(ds._modules.values()) if ds is not None else children

    def hooked(self) -> list[str]:
        """The submodules carrying hooks (while any do, the block runs unfused)."""
        names = [n for n, m in self._modules.items() if own_hooks(m)]
        ds = self._modules.get("downsample")
        if ds is not None:
            names += [f"downsample.{k}" for k, m in ds._modules.items() if own_hooks(m)]
        return names

    def why_unfused(self) -> str | None:
        """Why the block runs torchvision's forward instead of its fused units now: a
        submodule replaced or changed after conversion that the block does not fuse
        (named, with its type or setting), or channel counts that no longer fit; None
        while it runs fused. (Hooks: see :meth:`hooked`.)"""
        return _why_not_parts(self, self._pairs)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_donating(x, False, False)

    def _forward_donating(self, x: Tensor, donate: bool, give: bool) -> Tensor:
        """The forward; ``donate``: ``x`` is given up by the caller (a generated forward,
        see graph_convert._donations), the last unit may write its result into it where
        ``x`` is its residual; ``give``: the output is marked as given up where the units
        ran (no hook has seen it)."""
        # The checks of every call (type() and dict reads only: this runs every forward):
        # the exact types and settings of the modules the units read, then hooks. What
        # depends on the input (shapes) the units check; a unit refusing its operands runs
        # eager's operations (_units).
        mods = self._modules
        for conv_name, bn_name in self._pairs:
            conv, bn = mods.get(conv_name), mods.get(bn_name)
            if (
                type(conv) is not nn.Conv2d
                or type(bn) not in BN_TYPES
                or conv.padding_mode != "zeros"
                or type(conv.padding) is not tuple
            ):
                return self._checked_forward(x, donate, give)
        if type(mods.get("relu")) is not nn.ReLU:
            return self._checked_forward(x, donate, give)
        ds = mods.get("downsample", MISSING)
        if ds is MISSING:  # torchvision keeps downsample=None in __dict__
            ds = self.__dict__.get("downsample", MISSING)
        if ds is None:
            if has_hooks(*mods.values()):
                return self._unfused_forward(x, None)
            return self._units(x, donate, give)
        if type(ds) is not nn.Sequential or len(ds._modules) != 2:
            return self._checked_forward(x, donate, give)
        ds_conv, ds_bn = ds._modules.values()
        if (
            type(ds_conv) is not nn.Conv2d
            or type(ds_bn) not in BN_TYPES
            or ds_conv.padding_mode != "zeros"
            or type(ds_conv.padding) is not tuple
            # the downsample unit runs before the last unit: that one's channel counts
            # are checked first, as eager would fail there before the downsample ran
            or conv.out_channels != bn.num_features
            or conv.in_channels != mods[self._pairs[-2][0]].out_channels
        ):
            return self._checked_forward(x, donate, give)
        if has_hooks(*mods.values(), ds_conv, ds_bn):
            return self._unfused_forward(x, None)
        return self._units(x, donate, give)

    def _checked_forward(self, x: Tensor, donate: bool = False, give: bool = False) -> Tensor:
        """A module of another type or setting than the last check expected: the full
        check says whether the units can run fused (``padding='same'``, ...) or why not."""
        why = self.why_unfused()
        if why is None and not has_hooks(*self._modules_now()):
            return self._units(x, donate, give)
        return self._unfused_forward(x, why)

    def _unfused_forward(self, x: Tensor, why: str | None) -> Tensor:
        """torchvision's own forward over the submodules as they are: hooks (``why`` None)
        fire with the values they expect; replaced modules do what the user put there."""
        undonate(x)  # (the modules and their hooks see it)
        hooks = has_hooks(*self._modules_now())
        if self.sync_bn:
            bns = [m for m in self._modules_now() if type(m) is nn.BatchNorm2d]
            if hooks and bns:
                raise RuntimeError(sync_hooks_error("a submodule of this block"))
            if any(bn.training or (bn.running_mean is None and bn.running_var is None)
                   for bn in bns):  # fmt: skip
                raise RuntimeError(
                    SYNC_UNFUSED_ERROR.format(what=self._label(), why=why or "hooks")
                )
        if why is not None:
            self._warn(why)
        return self._torchvision.forward(self, x)

    def _label(self) -> str:
        name = self._name
        return f"{name} ({type(self).__name__})" if name else type(self).__name__

    def _warn(self, why: str) -> None:
        """One warning per block and reason."""
        if torch.compiler.is_compiling() or self.__dict__.get("_warned") == why:
            return
        self.__dict__["_warned"] = why
        warnings.warn(
            f"resnet_fused: {self._label()} runs unfused, as torchvision's "
            f"{self._torchvision.__name__}.forward over its modules as they are: {why}",
            RuntimeWarning,
            stacklevel=4,
        )

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def _private(t) -> None:
    """A value made inside a fused block's units and read by its next unit only: marked
    as private (functional.conv_bn_act._DONATED), which inference tensors need for their
    finite marks to count (they have no version counter; elsewhere the marks hold)."""
    if type(t) is Tensor and not torch.compiler.is_compiling() and t.is_inference():
        mark_donated(t)


# What graph_convert._call_block may call _forward_donating for: a class whose forward is
# still this one (not a subclass's override or a patched class).
_FusedBlock._DONATING_FORWARD = _FusedBlock.forward


class FusedBasicBlock(_FusedBlock):
    """torchvision's ``BasicBlock``, fused: ``relu(bn2(conv2(relu(bn1(conv1(x))))) +
    identity)`` as two fused Conv+BN(+add)+ReLU units (plus the downsample unit).
    Constructor arguments as torchvision's, plus ``backend``."""

    expansion = 1
    _torchvision = BasicBlock
    _children = ("conv1", "bn1", "relu", "conv2", "bn2", "downsample")
    _pairs = (("conv1", "bn1"), ("conv2", "bn2"))


class FusedBottleneck(_FusedBlock):
    """torchvision's ``Bottleneck`` (v1.5: stride on the 3x3), fused: three fused
    Conv+BN+ReLU units, the last with the identity or downsample branch added.
    Constructor arguments as torchvision's, plus ``backend``."""

    expansion = 4
    _torchvision = Bottleneck
    _children = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample")
    _pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


# --- the stem -------------------------------------------------------------------------------
# ``convert`` leaves a ResNet's conv1, bn1 and relu as they are: the graph pass fuses them as
# a site of the ResNet's forward (see _why_not_stem). The three classes below are what
# earlier versions made of the stem; they stay importable, so that models pickled then
# load and run, and ``unfuse`` turns them back into plain modules.


@register
class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A ResNet stem's ``bn1`` whose work the preceding :class:`FusedStemConv2d` does:
    it keeps the parameters and buffers (same ``state_dict`` keys) and passes its input
    through unchanged, except while the stem's modules carry hooks: then the stem runs
    unfused and this is an ordinary ``nn.BatchNorm2d``."""

    def forward(self, input: Tensor) -> Tensor:
        stem = self.__dict__.get("_stem")
        if stem is not None and stem.hooked():
            if stem.sync_bn:
                raise RuntimeError(sync_hooks_error("the stem"))
            return super().forward(input)
        return input


@register
class FoldedReLU(nn.Identity):
    """A ResNet stem's ``relu``, done by the preceding :class:`FusedStemConv2d` (an
    ordinary ReLU while the stem's modules carry hooks)."""

    def forward(self, input: Tensor) -> Tensor:
        stem = self.__dict__.get("_stem")
        if stem is not None and stem.hooked():
            return torch.relu(input)
        return input


@register
class FusedStemConv2d(nn.Conv2d):
    """A ResNet stem's ``conv1`` computing ``relu(bn1(conv1(x)))`` in one fused unit; the
    model's ``bn1`` (a :class:`FoldedBatchNorm2d` holding the statistics) and ``relu``
    then pass through. Same ``state_dict`` keys as the torchvision stem. While ``conv1``,
    ``bn1`` or ``relu`` carries hooks, each of the three does its own part instead, so
    every hook sees the values it would see in the unconverted model. (No longer made by
    :func:`convert`, which fuses the stem as a site of the ResNet's forward.)"""

    @classmethod
    def from_modules(
        cls,
        conv: nn.Conv2d,
        bn: FoldedBatchNorm2d,
        relu: FoldedReLU | None = None,
        *,
        backend: str = "auto",
    ) -> FusedStemConv2d:
        stem = _share_conv(conv, cls)
        # Not submodules: bn and relu stay registered as model.bn1 and model.relu.
        stem.__dict__["_bn"] = bn
        stem.__dict__["_relu"] = relu
        bn.__dict__["_stem"] = stem
        if relu is not None:
            relu.__dict__["_stem"] = stem
        stem.backend = backend
        stem._fold_cache = FoldCache()
        stem.sync_bn, stem.process_group = False, None
        return stem

    def hooked(self) -> bool:
        """True while the stem runs unfused because conv1, bn1 or relu carries hooks."""
        return has_hooks(self, self._bn, self.__dict__.get("_relu"))

    def forward(self, input: Tensor) -> Tensor:
        if self.hooked():
            return super().forward(input)  # the convolution alone; bn1 and relu follow
        if isinstance(input, torch.fx.Proxy):  # traced (feature extraction): one node
            return fused_conv_bn(
                self, self._bn, input, relu=True, backend=self.backend, sync=self.sync_bn,
                process_group=self.process_group,
            )  # fmt: skip
        return conv_bn_forward(
            self, self._bn, input, None, RELU_ACT, self.backend, self._fold_cache, self.sync_bn,
            self.process_group,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused with bn1 and relu, backend={self.backend!r}"


def _why_not_stem(model: ResNet) -> str | None:
    """Why a ResNet's stem ``conv1 -> bn1 -> relu`` cannot be a fused site (the graph
    pass fuses it in the ResNet's forward, reading the three modules at call time)."""
    mods = model._modules
    relu = mods.get("relu", MISSING)
    if type(relu) is not nn.ReLU:
        return f"relu: {kind(relu)} is not nn.ReLU"
    return why_not_unit(mods.get("conv1", MISSING), mods.get("bn1", MISSING), "conv1", "bn1")


# --- convert / unfuse ------------------------------------------------------------------------


_BLOCKS = {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


def _why_not_block(block: nn.Module) -> str | None:
    if own_hooks(block):
        return "the block carries hooks (converting would replace the module)"
    return _why_not_parts(block, _BLOCKS[type(block)]._pairs)


def conversion_report(model: nn.Module) -> dict[str, list[str]]:
    """What :func:`convert` fused in ``model`` and what it left alone, with the reason.

    ``fused``: each torchvision block converted to its fused class (its module name),
    then each site fused on a traced graph (``"layer1.0.conv1, layer1.0.bn1,
    layer1.0.relu (conv-bn-relu)"``; a ResNet's stem is the site ``"conv1, bn1, relu
    (conv-bn-relu)"``). ``not_fused``: each torchvision part left as it was, each
    Conv/BatchNorm/ReLU candidate left alone (multiple users, unsupported settings, ...),
    each module that could not be traced (with the error), each fused block running
    torchvision's forward because a submodule was replaced by one it does not fuse
    (naming it), and each part running unfused now because hooks are registered."""
    graph_fused, graph_skipped = graph_report(model)
    fused, skipped = [], []
    for name, module in model.named_modules():
        where = name or "<model>"
        if isinstance(module, _FusedBlock):
            why = module.why_unfused()
            if why:
                skipped.append(
                    f"{where}: runs torchvision's {module._torchvision.__name__}.forward "
                    f"unfused: {why}"
                )
            elif has_hooks(*module._modules_now()):
                hooked = ", ".join(module.hooked()) or "global module hooks"
                skipped.append(f"{where}: runs unfused while hooks are registered ({hooked})")
            else:
                fused.append(where)
            for why, calls in module.__dict__.get("_eager_calls", {}).items():
                skipped.append(f"{where}: a fused unit ran as eager ops on {calls} call(s): {why}")
        elif isinstance(module, FusedStemConv2d):  # converted by an earlier version
            if module.hooked():
                skipped.append(f"{where} (stem): runs unfused while conv1, bn1 or relu has hooks")
            else:
                fused.append(where)
        elif isinstance(module, (BasicBlock, Bottleneck)):
            if type(module) not in _BLOCKS:
                skipped.append(f"{where}: {type(module).__name__} subclasses a torchvision block")
            else:
                why = _why_not_block(module) or "not converted (convert the model again to fuse it)"
                skipped.append(f"{where}: {why}")
    skipped += _stem_entries(model, graph_fused + graph_skipped)
    return {"fused": fused + graph_fused, "not_fused": skipped + graph_skipped}


def _stem_entries(model: nn.Module, graph_entries: list[str]) -> list[str]:
    """Each ResNet stem that is no site of the graph pass (fused or running unfused),
    with the reason."""
    entries = []
    for name, module in model.named_modules():
        if not isinstance(module, ResNet):
            continue
        if isinstance(module._modules.get("conv1"), FusedStemConv2d):
            continue  # converted by an earlier version: reported as its own module
        conv1 = f"{name}.conv1" if name else "conv1"
        if not any(e.startswith(conv1 + ",") for e in graph_entries):
            why = _why_not_stem(module) or "not a fused site of the traced forward"
            entries.append(f"{conv1} (stem): {why}")
    return entries


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def convert(
    model: nn.Module,
    *,
    backend: str = "auto",
    inplace: bool = False,
    sync_bn: bool = False,
    process_group=None,
    leaf_modules=(),
) -> nn.Module:
    """The fused twin of ``model``: every Conv2d->BatchNorm2d->(add)->act, Conv2d->
    BatchNorm2d, BatchNorm2d->(add)->act, BatchNorm2d and add->ReLU of its computation
    fused (act: ReLU, ReLU6, LeakyReLU, SiLU, Hardswish, GELU or Sigmoid, in any
    spelling, after an add too). timm's norm-act layers (``BatchNormAct2d``,
    ``SyncBatchNormAct``) and frozen BatchNorms (torchvision's ``FrozenBatchNorm2d``,
    timm's ``FrozenBatchNormAct2d``) count as BatchNorms, their own activation fused
    with them; other activations run as before and are listed in the report.

    Two mechanisms, one set of rules (see :func:`conversion_report`):

    * torchvision's blocks keep their fused classes: every torchvision ``BasicBlock`` /
      ``Bottleneck`` (exact classes) becomes its fused block. Parameters, buffers and
      ``state_dict`` keys are unchanged; outputs, gradients and running statistics match
      the original. A block that cannot be fused as a whole (another norm layer or
      activation, a subclass with its own forward, padding_mode other than zeros, ...)
      is left untouched, and a warning lists each with the reason (see
      :func:`conversion_report`). A fused block reads its submodules at call time: one
      replaced later by a module it does not fuse makes it run torchvision's forward
      over the modules as they are (one warning).
    * Everything else (a ResNet's own forward with its stem ``conv1 -> bn1 -> relu``,
      user-written blocks, timm's ResNets, VGG-style stacks, ...) is traced with
      ``torch.fx`` and gets a generated ``forward`` calling the fused kernels on the
      original modules, read at call time (see :mod:`resnet_fused.graph_convert`): the
      module tree, ``state_dict`` keys and the very parameter and buffer objects are
      unchanged; ``model.conv1`` stays the user's ``nn.Conv2d``.

    Warns when parts are left unfused, and when nothing was fused (with the reasons,
    also for a model with nothing to fuse).

    Args:
        model: any nn.Module; typically a torchvision ResNet.
        backend: the backend of the fused kernels (see resnet_fused.backends).
        inplace: modify ``model`` itself; by default a deep copy is converted.
        sync_bn: synchronise every fused BatchNorm's training statistics over
            ``process_group`` (default: the world group) through torch.distributed, like
            ``nn.SyncBatchNorm`` (works on CPU with gloo too). ``nn.SyncBatchNorm`` layers
            in the model are synchronised over their own group either way.
        process_group: the group for ``sync_bn`` (default: the world group).
        leaf_modules: module classes the graph converter does not trace through (each
            such module is then converted on its own, from its own forward).
    """
    from .backends import BACKENDS

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _refuse_lazy(model, inplace)
    if not inplace:
        model = _deepcopy(model)

    def configure(fused):
        fused.sync_bn, fused.process_group = sync_bn, process_group
        return fused

    if type(model) in _BLOCKS and not _why_not_block(model):
        block = configure(_BLOCKS[type(model)].from_block(model, backend=backend))  # bare block
        return _scriptable(block)
    skipped = []
    for name, module in list(model.named_modules()):
        if type(module) in _BLOCKS:
            why = _why_not_block(module)
            if why:
                skipped.append(f"{name}: {why}")
                continue
            fused = _BLOCKS[type(module)].from_block(module, backend=backend)
            fused._name = name
            _set_child(model, name, configure(fused))
        elif isinstance(module, (BasicBlock, Bottleneck)):
            skipped.append(f"{name}: {type(module).__name__} subclasses a torchvision block")
    leaf_modules = tuple(leaf_modules)
    if not all(isinstance(c, type) and issubclass(c, nn.Module) for c in leaf_modules):
        raise TypeError(f"leaf_modules must be nn.Module classes, got {leaf_modules!r}")
    convert_graphs(
        model, backend=backend, sync_bn=sync_bn, process_group=process_group,
        leaf_modules=leaf_modules,
    )  # fmt: skip
    graph_fused, graph_skipped = graph_report(model)
    skipped += graph_skipped + _stem_entries(model, graph_fused + graph_skipped)
    fused_any = graph_fused or any(
        isinstance(m, (_FusedBlock, FusedStemConv2d)) for m in model.modules()
    )
    if not fused_any:
        warnings.warn(_nothing_fused_text(model, skipped), stacklevel=2)
        return model
    if skipped:
        warnings.warn(
            "resnet_fused.convert left these parts unfused (they run as before):\n  "
            + "\n  ".join(skipped),
            stacklevel=2,
        )
    return _scriptable(model)


# --- torch.jit.script ------------------------------------------------------------------------

# torch.jit.script calls a module's ``__prepare_scriptable__`` before compiling it (and its
# submodules', putting what they return in their parents' place).
_SCRIPTABLE = "__prepare_scriptable__"

NOT_SCRIPTABLE = (
    "torch.jit.script cannot compile a model converted by resnet_fused: its fused path "
    "decides in Python at each call (plans, cached folds, auto's picks), which TorchScript "
    "cannot hold. Script resnet_fused.unfuse(model) (the same modules unfused, with a copy "
    "of the parameters and buffers), or use torch.compile or torch.export instead"
)


class _NotScriptable:
    """A converted model's ``__prepare_scriptable__``, held in its instance dict (the
    model's class is the user's or torchvision's): a clear error instead of TorchScript's
    own about the fused modules' annotations or the generated forward. Raising (rather
    than handing torch.jit an unfused copy) leaves the model alone also where it is a
    submodule of what is scripted: torch.jit puts the returned module into its parent."""

    def __call__(self) -> nn.Module:
        raise RuntimeError(NOT_SCRIPTABLE)


def _scriptable(model: nn.Module) -> nn.Module:
    """``model`` with the clear torch.jit.script error, unless its class has a
    ``__prepare_scriptable__`` of its own."""
    if not hasattr(type(model), _SCRIPTABLE):
        model.__dict__[_SCRIPTABLE] = _NotScriptable()
    return model


def _refuse_lazy(model: nn.Module, inplace: bool) -> None:
    """A clear error for lazy modules whose parameters are not made yet: copying them
    fails (torch's deepcopy refuses uninitialized parameters), and in place a lazy
    convolution or BatchNorm becomes Conv2d / BatchNorm2d only at the first forward,
    after the conversion would have left it unfused. (In place, other lazy modules, a
    LazyLinear head say, are no obstacle.)"""
    fusable = (nn.LazyConv2d, nn.LazyConvTranspose2d, nn.LazyBatchNorm2d)
    lazy = [
        f"{name or '<model>'} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.lazy.LazyModuleMixin)
        and m.has_uninitialized_params()
        and (not inplace or isinstance(m, fusable))
    ]
    if lazy:
        shown = ", ".join(lazy[:5]) + (f" and {len(lazy) - 5} more" if len(lazy) > 5 else "")
        raise ValueError(
            f"model has lazy modules whose parameters are not initialized yet: {shown}; "
            "run one forward pass (or initialize them) before resnet_fused.convert"
        )


def _nothing_fused_text(model: nn.Module, skipped: list[str]) -> str:
    """The "fused nothing" warning, with the reasons."""
    text = "resnet_fused.convert fused nothing in this model: "
    if skipped:
        return text + "every candidate was left alone:\n  " + "\n  ".join(skipped)
    norms = [name for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # fmt: skip
    if norms:  # (left alone inside modules it could not see into)
        return text + f"its BatchNorm layers ({', '.join(norms[:5])}) are in no fusable pattern"
    return text + (
        "it has no BatchNorm layer and no add followed by ReLU (resnet_fused fuses "
        "Conv2d->BatchNorm2d->(add)->ReLU, BatchNorm2d->(add)->ReLU, BatchNorm2d and "
        "add->ReLU); it runs as before"
    )


def unfuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Plain torchvision modules again (for export): the inverse of :func:`convert`,
    sharing (or, without ``inplace``, copying) the same parameters and buffers.
    Synchronised BatchNorm (``nn.SyncBatchNorm`` in the original model, or ``convert(...,
    sync_bn=True)``) comes back as ``nn.SyncBatchNorm`` over the same process group."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = _deepcopy(model)
    if isinstance(model.__dict__.get(_SCRIPTABLE), _NotScriptable):
        del model.__dict__[_SCRIPTABLE]
    _synchronised_graph_sites_back(model)
    unfuse_graphs(model)
    if isinstance(model, (FusedBasicBlock, FusedBottleneck)):
        return model.to_torchvision()
    for name, module in list(model.named_modules()):
        if isinstance(module, (FusedBasicBlock, FusedBottleneck)):
            _set_child(model, name, module.to_torchvision())
    for _name, module in list(model.named_modules()):
        if isinstance(module, ResNet) and isinstance(module.conv1, FusedStemConv2d):
            # a stem converted by an earlier version (FusedStemConv2d, FoldedBatchNorm2d,
            # FoldedReLU), from a pickled model
            stem = module.conv1
            module.conv1 = _share_conv(stem)
            if stem.sync_bn:
                module.bn1 = _share_bn(module.bn1, nn.SyncBatchNorm, stem.process_group)
            else:
                module.bn1 = _share_bn(module.bn1)
            relu = nn.ReLU(inplace=getattr(module.relu, "inplace", True))
            relu.training = module.relu.training
            module.relu = relu
    return model


def _synchronised_graph_sites_back(model: nn.Module) -> None:
    """The plain ``nn.BatchNorm2d`` of each site the graph pass fused with ``sync_bn``
    (a ResNet's stem, ...) becomes an ``nn.SyncBatchNorm`` over the same group, sharing
    the parameters and buffers: what those sites computed."""
    for module in list(model.modules()):
        conversion = module.__dict__.get(_GRAPH_ATTR)
        if not getattr(conversion, "sync_bn", False):
            continue
        for site in conversion.sites:
            if site.bn is None:
                continue
            try:
                bn = module.get_submodule(site.bn)
            except AttributeError:  # removed since
                continue
            if type(bn) is nn.BatchNorm2d:
                _set_child(
                    module, site.bn, _share_bn(bn, nn.SyncBatchNorm, conversion.process_group)
                )


for _cls in (FusedBasicBlock, FusedBottleneck, FusedStemConv2d, FoldedBatchNorm2d, FoldedReLU):
    torch.serialization.add_safe_globals([_cls])
