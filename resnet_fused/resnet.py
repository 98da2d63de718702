"""Fused ResNet blocks, the one-call converter and its inverse.

:func:`convert` turns any torchvision ResNet (resnet18 ... resnet152, wide_resnet,
resnext, or a ``torchvision.models.resnet.ResNet`` with custom layer counts) into its
fused twin: every ``BasicBlock`` / ``Bottleneck`` becomes a :class:`FusedBasicBlock` /
:class:`FusedBottleneck` and the stem ``conv1 -> bn1 -> relu`` one fused Conv+BN+ReLU.
The fused modules hold the very same ``nn.Conv2d`` / ``nn.BatchNorm2d`` modules under
torchvision's names (``conv1``, ``bn1``, ..., ``downsample.0``, ``downsample.1``), so
``state_dict`` keys, parameters and buffers are unchanged. :func:`unfuse` gives back
plain torchvision modules (for export).

Each block runs (body) fused Conv+BN+ReLU units and (tail) Conv+BN+add+ReLU with the
identity or the downsample branch (itself a fused Conv+BN) as the residual; in eval mode
each unit is one convolution with BatchNorm folded in and a one-pass epilogue.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .graph_convert import convert_graphs, fused_conv_bn, graph_report, unfuse_graphs
from .modules import FoldCache, _conv_padding, conv_bn_forward, has_hooks, own_hooks

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
    return copy.deepcopy(model, memo)


def _why_not_unit(conv: object, bn: object, where: str) -> str | None:
    """Why (conv, bn) cannot run as one fused unit; None when it can."""
    if type(conv) is not nn.Conv2d:
        return f"{where}: {type(conv).__name__} is not a plain nn.Conv2d"
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return f"{where}: {type(bn).__name__} is not a plain nn.BatchNorm2d or nn.SyncBatchNorm"
    if conv.padding_mode != "zeros":
        return f"{where}: conv padding_mode={conv.padding_mode!r}"
    if conv.out_channels != bn.num_features:
        return f"{where}: conv has {conv.out_channels} outputs, bn {bn.num_features} features"
    try:
        _conv_padding(conv)
    except NotImplementedError as exc:
        return f"{where}: {exc}"
    return None


def _why_not_downsample(ds: object) -> str | None:
    if ds is None:
        return None
    if type(ds) is not nn.Sequential or len(ds) != 2:
        return "downsample is not nn.Sequential(conv, bn)"
    return _why_not_unit(ds[0], ds[1], "downsample")


_SYNC_HOOKS_ERROR = (
    "{what} carries hooks, so it runs unfused (so that the hooks fire), which cannot "
    "synchronise a plain nn.BatchNorm2d over a process group: convert the model with "
    "nn.SyncBatchNorm.convert_sync_batchnorm before resnet_fused.convert(sync_bn=True), or "
    "remove the hooks"
)


# --- blocks ---------------------------------------------------------------------------------


class _FusedBlock(nn.Module):
    """A torchvision block's submodules (same objects, same names) with a fused forward:
    each (conv, bn) pair runs through conv_bn_forward with its own fold cache.
    Subclasses name the torchvision class and the submodules they take over."""

    _torchvision: type[nn.Module]
    _children: tuple[str, ...]
    expansion: int

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
            setattr(block, name, getattr(self, name))
        block.stride = self.stride
        if self.sync_bn:  # new modules only: this fused block's own stay as they are

            def synced(bn):
                if type(bn) is not nn.BatchNorm2d:
                    return bn
                return _share_bn(bn, nn.SyncBatchNorm, self.process_group)

            for name in self._children:
                if name.startswith("bn"):
                    setattr(block, name, synced(getattr(block, name)))
            if block.downsample is not None:
                conv, bn = block.downsample
                ds = nn.Sequential(conv, synced(bn))
                ds.training = block.downsample.training
                block.downsample = ds
        block.training = self.training  # its own flag only: each child keeps its own
        return block

    def _unit(self, name: str, conv, bn, x, residual=None, relu=True) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # traced (feature extraction): one node per unit
            return fused_conv_bn(
                conv, bn, x, residual, relu=relu, backend=self.backend, sync=self.sync_bn,
                process_group=self.process_group,
            )  # fmt: skip
        cache = self._fold_caches.get(name)
        if cache is None:
            cache = self._fold_caches[name] = FoldCache()
        return conv_bn_forward(
            conv, bn, x, residual, relu, self.backend, cache, self.sync_bn, self.process_group
        )

    def _submodules(self) -> list[nn.Module]:
        children = self._modules  # (not nn.Module.__getattr__: this runs every forward)
        mods = [children.get(name) for name in self._children]
        ds = children.get("downsample")
        return mods + (list(ds._modules.values()) if ds is not None else [])

    def hooked(self) -> list[str]:
        """The submodules carrying hooks (while any do, the block runs unfused)."""
        names = [n for n in self._children if own_hooks(getattr(self, n))]
        if self.downsample is not None:
            names += [f"downsample.{i}" for i, m in enumerate(self.downsample) if own_hooks(m)]
        return names

    def forward(self, x: Tensor) -> Tensor:
        if has_hooks(*self._submodules()):
            # Hooks on a submodule (or global hooks): torchvision's own forward over the
            # same submodules, so that every hook fires with the values it expects.
            if self.sync_bn and any(type(m) is nn.BatchNorm2d for m in self._submodules()):
                raise RuntimeError(_SYNC_HOOKS_ERROR.format(what="a submodule of this block"))
            return self._torchvision.forward(self, x)
        return self._fused_forward(x)

    def _identity(self, x: Tensor) -> Tensor:
        if self.downsample is None:
            return x
        return self._unit("downsample", self.downsample[0], self.downsample[1], x, relu=False)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class FusedBasicBlock(_FusedBlock):
    """torchvision's ``BasicBlock``, fused: ``relu(bn2(conv2(relu(bn1(conv1(x))))) +
    identity)`` as two fused Conv+BN(+add)+ReLU units (plus the downsample unit).
    Constructor arguments as torchvision's, plus ``backend``."""

    expansion = 1
    _torchvision = BasicBlock
    _children = ("conv1", "bn1", "relu", "conv2", "bn2", "downsample")

    def _fused_forward(self, x: Tensor) -> Tensor:
        identity = self._identity(x)
        out = self._unit("1", self.conv1, self.bn1, x)
        return self._unit("2", self.conv2, self.bn2, out, residual=identity)


class FusedBottleneck(_FusedBlock):
    """torchvision's ``Bottleneck`` (v1.5: stride on the 3x3), fused: three fused
    Conv+BN+ReLU units, the last with the identity or downsample branch added.
    Constructor arguments as torchvision's, plus ``backend``."""

    expansion = 4
    _torchvision = Bottleneck
    _children = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample")

    def _fused_forward(self, x: Tensor) -> Tensor:
        identity = self._identity(x)
        out = self._unit("1", self.conv1, self.bn1, x)
        out = self._unit("2", self.conv2, self.bn2, out)
        return self._unit("3", self.conv3, self.bn3, out, residual=identity)


# --- the stem -------------------------------------------------------------------------------


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A ResNet stem's ``bn1`` whose work the preceding :class:`FusedStemConv2d` does:
    it keeps the parameters and buffers (same ``state_dict`` keys) and passes its input
    through unchanged, except while the stem's modules carry hooks: then the stem runs
    unfused and this is an ordinary ``nn.BatchNorm2d``."""

    def forward(self, input: Tensor) -> Tensor:
        stem = self.__dict__.get("_stem")
        if stem is not None and stem.hooked():
            if stem.sync_bn:
                raise RuntimeError(_SYNC_HOOKS_ERROR.format(what="the stem"))
            return super().forward(input)
        return input


class FoldedReLU(nn.Identity):
    """A ResNet stem's ``relu``, done by the preceding :class:`FusedStemConv2d` (an
    ordinary ReLU while the stem's modules carry hooks)."""

    def forward(self, input: Tensor) -> Tensor:
        stem = self.__dict__.get("_stem")
        if stem is not None and stem.hooked():
            return torch.relu(input)
        return input


class FusedStemConv2d(nn.Conv2d):
    """A ResNet stem's ``conv1`` computing ``relu(bn1(conv1(x)))`` in one fused unit; the
    model's ``bn1`` (a :class:`FoldedBatchNorm2d` holding the statistics) and ``relu``
    then pass through. Same ``state_dict`` keys as the torchvision stem. While ``conv1``,
    ``bn1`` or ``relu`` carries hooks, each of the three does its own part instead, so
    every hook sees the values it would see in the unconverted model."""

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
            self, self._bn, input, None, True, self.backend, self._fold_cache, self.sync_bn,
            self.process_group,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused with bn1 and relu, backend={self.backend!r}"


def _why_not_stem(model: ResNet) -> str | None:
    cls = type(model)
    if cls.forward is not ResNet.forward or cls._forward_impl is not ResNet._forward_impl:
        return "stem: the model overrides ResNet.forward"
    if type(model.relu) is not nn.ReLU:
        return f"stem: relu is {type(model.relu).__name__}, not nn.ReLU"
    hooked = [n for n in ("conv1", "bn1", "relu") if own_hooks(getattr(model, n))]
    if hooked:
        return f"stem: {', '.join(hooked)} carries hooks (converting would replace the module)"
    return _why_not_unit(model.conv1, model.bn1, "stem")


# --- convert / unfuse ------------------------------------------------------------------------


_BLOCKS = {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


def _why_not_block(block: nn.Module) -> str | None:
    if own_hooks(block):
        return "the block carries hooks (converting would replace the module)"
    names = ["1", "2"] if type(block) is BasicBlock else ["1", "2", "3"]
    for n in names:
        why = _why_not_unit(getattr(block, f"conv{n}"), getattr(block, f"bn{n}"), f"conv{n}/bn{n}")
        if why:
            return why
    return _why_not_downsample(block.downsample)


def conversion_report(model: nn.Module) -> dict[str, list[str]]:
    """What :func:`convert` fused in ``model`` and what it left alone, with the reason.

    ``fused``: each torchvision block and stem converted to its fused class (its module
    name), then each site fused on a traced graph (``"layer1.0.conv1, layer1.0.bn1,
    layer1.0.relu (conv-bn-relu)"``). ``not_fused``: each torchvision part left as it was,
    each Conv/BatchNorm/ReLU candidate left alone (multiple users, unsupported settings,
    ...), each module that could not be traced (with the error), and each part running
    unfused now because hooks are registered."""
    graph_fused, graph_skipped = graph_report(model)
    fused, skipped = [], []
    for name, module in model.named_modules():
        where = name or "<model>"
        if isinstance(module, (FusedBasicBlock, FusedBottleneck)) and has_hooks(
            *module._submodules()
        ):
            why = ", ".join(module.hooked()) or "global module hooks"
            skipped.append(f"{where}: runs unfused while hooks are registered ({why})")
        elif isinstance(module, FusedStemConv2d) and module.hooked():
            skipped.append(f"{where} (stem): runs unfused while conv1, bn1 or relu has hooks")
        elif isinstance(module, (FusedBasicBlock, FusedBottleneck, FusedStemConv2d)):
            fused.append(where)
        elif isinstance(module, (BasicBlock, Bottleneck)):
            if type(module) not in _BLOCKS:
                skipped.append(f"{where}: {type(module).__name__} subclasses a torchvision block")
            else:
                skipped.append(f"{where}: {_why_not_block(module) or 'not converted'}")
        if isinstance(module, ResNet) and not isinstance(module.conv1, FusedStemConv2d):
            conv1 = f"{name}.conv1" if name else "conv1"
            if not any(entry.startswith(conv1 + ",") for entry in graph_fused):
                skipped.append(f"{where}.conv1 (stem): {_why_not_stem(module) or 'not converted'}")
    return {"fused": fused + graph_fused, "not_fused": skipped + graph_skipped}


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
    """The fused twin of ``model``: every Conv2d->BatchNorm2d->(add)->ReLU, Conv2d->
    BatchNorm2d, BatchNorm2d->(add)->ReLU and add->ReLU of its computation fused.

    Two mechanisms, one set of rules (see :func:`conversion_report`):

    * torchvision's ResNet parts keep their fused classes: every torchvision
      ``BasicBlock`` / ``Bottleneck`` (exact classes) becomes its fused block and, in
      every ``torchvision.models.resnet.ResNet`` (custom layer counts too), the stem
      ``conv1 -> bn1 -> relu`` one fused unit. Parameters, buffers and ``state_dict``
      keys are unchanged; outputs, gradients and running statistics match the original.
      A block or stem that cannot be fused as a whole (another norm layer, a subclass
      with its own forward, padding_mode other than zeros, ...) is left untouched, and a
      warning lists each with the reason (see :func:`conversion_report`).
    * Everything else (user-written blocks, timm's ResNets, VGG-style stacks, ...) is
      traced with ``torch.fx`` and gets a generated ``forward`` calling the fused kernels
      on the original modules (see :mod:`resnet_fused.graph_convert`): the module tree,
      ``state_dict`` keys and the very parameter and buffer objects are unchanged.

    Warns when parts are left unfused, and when the model has BatchNorm layers but
    nothing was fused.

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
    if not inplace:
        model = _deepcopy(model)

    def configure(fused):
        fused.sync_bn, fused.process_group = sync_bn, process_group
        return fused

    if type(model) in _BLOCKS and not _why_not_block(model):
        return configure(_BLOCKS[type(model)].from_block(model, backend=backend))  # bare block
    skipped = []
    for name, module in list(model.named_modules()):
        if type(module) in _BLOCKS:
            why = _why_not_block(module)
            if why:
                skipped.append(f"{name}: {why}")
                continue
            fused = _BLOCKS[type(module)].from_block(module, backend=backend)
            _set_child(model, name, configure(fused))
        elif isinstance(module, (BasicBlock, Bottleneck)):
            skipped.append(f"{name}: {type(module).__name__} subclasses a torchvision block")
    for name, module in list(model.named_modules()):
        if isinstance(module, ResNet) and not isinstance(module.conv1, FusedStemConv2d):
            why = _why_not_stem(module)
            if why:
                skipped.append(f"{name or '<model>'}: {why}")
                continue
            bn = _share_bn(module.bn1, FoldedBatchNorm2d)
            relu = FoldedReLU()
            relu.training = module.relu.training
            relu.inplace = module.relu.inplace  # given back by unfuse
            stem = configure(FusedStemConv2d.from_modules(module.conv1, bn, relu, backend=backend))
            if isinstance(module.bn1, nn.SyncBatchNorm):
                stem.sync_bn, stem.process_group = True, module.bn1.process_group
            module.conv1 = stem
            module.bn1 = bn
            module.relu = relu
    leaf_modules = tuple(leaf_modules)
    if not all(isinstance(c, type) and issubclass(c, nn.Module) for c in leaf_modules):
        raise TypeError(f"leaf_modules must be nn.Module classes, got {leaf_modules!r}")
    convert_graphs(
        model, backend=backend, sync_bn=sync_bn, process_group=process_group,
        leaf_modules=leaf_modules,
    )  # fmt: skip
    graph_fused, graph_skipped = graph_report(model)
    skipped += graph_skipped
    if skipped:
        warnings.warn(
            "resnet_fused.convert left these parts unfused (they run as before):\n  "
            + "\n  ".join(skipped),
            stacklevel=2,
        )
    fused_any = graph_fused or any(
        isinstance(m, (_FusedBlock, FusedStemConv2d)) for m in model.modules()
    )
    if not fused_any and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        warnings.warn(
            "resnet_fused.convert fused nothing in this model (see "
            "resnet_fused.conversion_report for the reasons)",
            stacklevel=2,
        )
    return model


def unfuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Plain torchvision modules again (for export): the inverse of :func:`convert`,
    sharing (or, without ``inplace``, copying) the same parameters and buffers.
    Synchronised BatchNorm (``nn.SyncBatchNorm`` in the original model, or ``convert(...,
    sync_bn=True)``) comes back as ``nn.SyncBatchNorm`` over the same process group."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = _deepcopy(model)
    unfuse_graphs(model)
    if isinstance(model, (FusedBasicBlock, FusedBottleneck)):
        return model.to_torchvision()
    for name, module in list(model.named_modules()):
        if isinstance(module, (FusedBasicBlock, FusedBottleneck)):
            _set_child(model, name, module.to_torchvision())
    for _name, module in list(model.named_modules()):
        if isinstance(module, ResNet) and isinstance(module.conv1, FusedStemConv2d):
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


for _cls in (FusedBasicBlock, FusedBottleneck, FusedStemConv2d, FoldedBatchNorm2d, FoldedReLU):
    torch.serialization.add_safe_globals([_cls])
