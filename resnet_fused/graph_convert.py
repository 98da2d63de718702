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
  pass through; the in-place forms are followed through their aliases.
* Patterns, longest first: Conv2d->BN->add->ReLU, Conv2d->BN->ReLU, BN->add->ReLU,
  BN->ReLU, add->ReLU, then Conv2d->BN. A site is fused only when every interior value
  has one user and the modules are exactly ``nn.Conv2d`` (zeros padding) and
  ``nn.BatchNorm2d`` / ``nn.SyncBatchNorm``.
* A module that cannot be traced (data-dependent control flow, ...) runs as it is; its
  children are converted instead and the error is reported.
* Hooks: a module carrying hooks at conversion is not traced through (its hooks fire);
  a fused site whose modules carry hooks at call time runs through the modules themselves
  (hooks honoured) and is reported as running unfused; while a traced-through container
  carries hooks (or global module hooks exist), the module runs its original forward.
  With ``sync_bn``, running a plain ``nn.BatchNorm2d`` that computes batch statistics
  through the modules would not synchronise them: that raises (as the fused torchvision
  blocks do) instead of silently training on each rank's own statistics.
* Values a traced forward reads from ``self.training`` are baked into the graph: the
  module is traced in training and in eval mode and the generated forward picks the
  graph by the module's own ``training`` flag at call time.
"""

from __future__ import annotations

import operator
import time
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .modules import FoldCache, _conv_padding, bn_forward, conv_bn_forward, has_hooks

__all__ = ["convert_graphs", "fused_add_relu", "fused_bn", "fused_conv_bn"]

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


def _tracer_of(*values):
    for v in values:
        if isinstance(v, fx.Proxy):
            return v.tracer
    return None


def _refuse_unsynchronised(bns, what: str) -> None:
    """``sync_bn`` promised synchronised statistics: a plain ``nn.BatchNorm2d`` computing
    batch statistics must not run through the module (local statistics, silently)."""
    from .resnet import _SYNC_HOOKS_ERROR

    for bn in bns:
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        if type(bn) is nn.BatchNorm2d and batch_stats:
            raise RuntimeError(_SYNC_HOOKS_ERROR.format(what=what))


def _relu(out: Tensor, relu: bool, relu_module: nn.Module | None) -> Tensor:
    if not relu:
        return out
    return relu_module(out) if relu_module is not None else torch.relu(out)


def _same_shape(a, b) -> bool:
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
    )


def fused_conv_bn(
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    input: Tensor,
    residual: Tensor | None = None,
    *,
    relu: bool = True,
    relu_module: nn.Module | None = None,
    backend: str = "auto",
    sync: bool = False,
    process_group=None,
) -> Tensor:
    """``relu(bn(conv(input)) + residual)`` through the fused kernels, reading ``conv``
    and ``bn`` now; through the modules themselves while any of them carries hooks.
    Under ``torch.fx`` tracing this records itself as one node (module arguments as
    ``get_attr`` nodes), so converted models stay traceable."""
    tracer = _tracer_of(input, residual)
    if tracer is not None:
        kwargs = {"relu": relu, "relu_module": relu_module, "backend": backend, "sync": sync}
        if process_group is not None:
            kwargs["process_group"] = process_group
        return tracer.create_proxy(
            "call_function", fused_conv_bn, (conv, bn, input, residual), kwargs
        )
    if has_hooks(conv, bn, relu_module):
        if sync:
            _refuse_unsynchronised([bn], "a module of this fused conv-BN site")
        out = bn(conv(input))
        if residual is not None:
            out = out + residual
        return _relu(out, relu, relu_module)
    cache = _fold_cache(bn)
    if residual is not None and not (
        isinstance(residual, Tensor)
        and residual.device == input.device
        and residual.shape == _conv_out_shape(conv, input)
    ):  # a broadcasting (or foreign) residual: eager add
        out = conv_bn_forward(conv, bn, input, None, False, backend, cache, sync, process_group)
        return _relu(out + residual, relu, None)
    return conv_bn_forward(conv, bn, input, residual, relu, backend, cache, sync, process_group)


def _conv_out_shape(conv: nn.Conv2d, input: Tensor) -> torch.Size:
    n, _, h, w = input.shape
    pad = _conv_padding(conv)
    hw = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(
            (h, w), pad, conv.dilation, conv.kernel_size, conv.stride, strict=True
        )
    ]
    return torch.Size((n, conv.out_channels, *hw))


def fused_bn(
    bn: nn.BatchNorm2d,
    input: Tensor,
    residual: Tensor | None = None,
    *,
    relu: bool = True,
    relu_module: nn.Module | None = None,
    backend: str = "auto",
    sync: bool = False,
    process_group=None,
) -> Tensor:
    """``relu(bn(input) + residual)`` through the fused BatchNorm kernels, reading ``bn``
    now (as :class:`resnet_fused.FusedBatchNormAct2d` does); through the modules while
    any carries hooks."""

    tracer = _tracer_of(input, residual)
    if tracer is not None:
        kwargs = {"relu": relu, "relu_module": relu_module, "backend": backend, "sync": sync}
        if process_group is not None:
            kwargs["process_group"] = process_group
        return tracer.create_proxy("call_function", fused_bn, (bn, input, residual), kwargs)
    if has_hooks(bn, relu_module) or (residual is not None and not _same_shape(input, residual)):
        if sync and has_hooks(bn, relu_module):
            _refuse_unsynchronised([bn], "a module of this fused BN site")
        out = bn(input)
        if residual is not None:
            out = out + residual
        return _relu(out, relu, relu_module)
    if isinstance(bn, nn.SyncBatchNorm):
        sync, process_group = True, process_group or bn.process_group
    return bn_forward(bn, input, residual, relu, backend, sync, process_group)


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
    if has_hooks(relu_module) or not _same_shape(x, residual):
        return _relu(x + residual, True, relu_module)
    return resnet_fused.add_relu(x, residual, backend=backend)


# --- tracing ------------------------------------------------------------------------------


def _class_domain() -> tuple[type, ...]:
    """Modules the converter never traces into: resnet_fused's own modules and the
    torchvision block classes (handled by resnet_fused.resnet's block classes)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from . import resnet
    from .modules import FusedBatchNormAct2d, FusedConvBNReLU2d

    return (
        resnet._FusedBlock,
        resnet.FusedStemConv2d,
        resnet.FoldedBatchNorm2d,
        resnet.FoldedReLU,
        FusedBatchNormAct2d,
        FusedConvBNReLU2d,
        BasicBlock,
        Bottleneck,
    )


def _is_standard_leaf(m: nn.Module) -> bool:
    module = type(m).__module__
    return module.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(m, nn.Sequential)


class _Tracer(fx.Tracer):
    """Standard layers, the classes the user names, resnet_fused's modules, torchvision
    blocks, modules carrying hooks and modules found untraceable are leaves. Records the
    innermost traced-through module in which tracing failed."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_modules: set[int]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_ids = leaf_modules
        self.failed_in: tuple[str, BaseException] | None = None
        self.inlined: dict[str, nn.Module] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .modules import own_hooks

        return (
            super().is_leaf_module(m, qualname)
            or isinstance(m, self.leaf_types)
            or id(m) in self.leaf_ids
            or own_hooks(m)
        )

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        leaf = self.is_leaf_module(m, path)
        if not leaf:
            self.inlined[path] = m
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if self.failed_in is None and not leaf:
                self.failed_in = (path, exc)
            raise


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# --- pattern matching ---------------------------------------------------------------------

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def _module_of(root: nn.Module, node: fx.Node) -> nn.Module | None:
    return root.get_submodule(node.target) if node.op == "call_module" else None


def _relu_of(root: nn.Module, node: fx.Node):
    """(input node, inplace, ReLU module path or None) when ``node`` is a ReLU."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if type(m) is nn.ReLU and len(node.args) == 1 and not node.kwargs:
            return node.args[0], m.inplace, node.target
        return None
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        args, kwargs = list(node.args), dict(node.kwargs)
        inp = args.pop(0) if args else kwargs.pop("input", None)
        inplace = node.target in (torch.relu_, F.relu_)
        if node.target is F.relu:
            inplace = args.pop(0) if args else kwargs.pop("inplace", False)
        if args or kwargs or not isinstance(inp, fx.Node) or not isinstance(inplace, bool):
            return None
        return inp, inplace, None
    if (
        node.op == "call_method"
        and node.target in ("relu", "relu_")
        and len(node.args) == 1
        and not node.kwargs
        and isinstance(node.args[0], fx.Node)
    ):
        return node.args[0], node.target == "relu_", None
    return None


def _add_of(node: fx.Node):
    """(a, b, inplace) when ``node`` adds two graph values (no alpha, no out)."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
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


def _normalise(root: nn.Module, graph: fx.Graph) -> list[nn.Module]:
    """Follows in-place ops through their aliases (later uses of an in-place op's first
    operand use the op's result, which is the same tensor) and removes ``nn.Identity``
    calls. Returns the removed Identity modules (their hooks are checked at call time)."""
    removed = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        relu = _relu_of(root, node)
        add = _add_of(node)
        target = None
        if relu is not None and relu[1]:
            target = relu[0]
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


def _why_not_conv(conv: nn.Module) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is fused)"
    try:
        _conv_padding(conv)
    except NotImplementedError as exc:
        return str(exc)
    return None


def _why_not_bn(bn: nn.Module) -> str | None:
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return f"{type(bn).__name__} is not a plain nn.BatchNorm2d or nn.SyncBatchNorm"
    return None


class _Site:
    """One fused site: the pattern, the module paths it reads and the rewritten node."""

    def __init__(self, pattern, conv=None, bn=None, relu=None, names=()):
        self.pattern, self.conv, self.bn, self.relu = pattern, conv, bn, relu
        self.names = list(names)

    def modules(self) -> list[str]:
        return [p for p in (self.conv, self.bn, self.relu) if p is not None]

    def describe(self, prefix: str) -> str:
        return f"{', '.join(prefix + n for n in self.names)} ({self.pattern})"


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
        why = _why_not_bn(_module_of(root, bn_node))
        if why:
            return None, why
        if len(bn_node.args) != 1 or bn_node.kwargs:
            return None, "called with extra arguments"
        src = bn_node.args[0]
        conv = _module_of(root, src) if isinstance(src, fx.Node) else None
        if isinstance(conv, nn.Conv2d):
            why = _why_not_conv(conv)
            if why is None and conv.out_channels != _module_of(root, bn_node).num_features:
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

    def is_bn(node):
        m = _module_of(root, node)
        return isinstance(m, nn.modules.batchnorm._BatchNorm) and node not in claimed

    for node in list(graph.nodes):
        relu = _relu_of(root, node)
        if relu is None or node in claimed:
            continue
        x, _, relu_path = relu
        add = _add_of(x) if x not in claimed else None
        if add is not None and _single_user(x, node):
            a, b, inplace = add
            done = False
            for operand, other in ((a, b), (b, a)):
                if not (is_bn(operand) and _single_user(operand, x)):
                    continue
                if inplace and other is a and other.op in ("placeholder", "get_attr"):
                    continue  # `input += bn(...)` mutates the caller's tensor: leave it
                conv, why = bn_unit(operand, x)
                if why:
                    left.append((name(operand), why))
                    continue
                nodes = [n for n in (conv, operand, x, node) if n is not None]
                bn_path = operand.target
                if conv is not None:
                    site = _Site("conv-bn-add-relu", conv.target, bn_path, relu_path,
                                 [name(n) for n in nodes if n is not x])  # fmt: skip
                    sites.append((site, nodes, conv.args[0], other))
                else:
                    site = _Site("bn-add-relu", None, bn_path, relu_path,
                                 [name(n) for n in nodes if n is not x])  # fmt: skip
                    sites.append((site, nodes, operand.args[0], other))
                claimed.update(nodes)
                done = True
                break
            if not done:
                if inplace and a.op in ("placeholder", "get_attr"):
                    left.append((name(node), "adds into the module's input in place"))
                    continue
                site = _Site("add-relu", None, None, relu_path, [name(x), name(node)])
                sites.append((site, [x, node], a, b))
                claimed.update((x, node))
            continue
        if is_bn(x) and _single_user(x, node):
            conv, why = bn_unit(x, node)
            if why:
                left.append((name(x), why))
                continue
            nodes = [n for n in (conv, x, node) if n is not None]
            if conv is not None:
                site = _Site("conv-bn-relu", conv.target, x.target, relu_path, map(name, nodes))
                sites.append((site, nodes, conv.args[0], None))
            else:
                site = _Site("bn-relu", None, x.target, relu_path, map(name, nodes))
                sites.append((site, nodes, x.args[0], None))
            claimed.update(nodes)
        elif is_bn(x) or add is not None:
            left.append((name(node), f"not fused with {name(x)}: {_users_text(x)}"))
    for node in list(graph.nodes):
        m = _module_of(root, node)
        if node in claimed or not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if isinstance(m, _class_domain()):  # resnet_fused's own (a fused stem's bn1)
            continue
        if _why_not_bn(m):
            left.append((name(node), _why_not_bn(m)))
            continue
        src = node.args[0] if node.args else None
        conv = _module_of(root, src) if isinstance(src, fx.Node) else None
        if not isinstance(conv, nn.Conv2d):
            left.append((name(node), "its input is not a convolution and no ReLU follows"))
            continue
        conv_node, why = bn_unit(node, None)
        if conv_node is None:
            if why:
                left.append((name(node), why))
            elif src in claimed:
                left.append((name(node), f"{name(src)} is fused elsewhere"))
            else:
                left.append((name(node), "its convolution cannot be fused (see above)"))
            continue
        site = _Site("conv-bn", conv_node.target, node.target, None, [name(src), name(node)])
        sites.append((site, [conv_node, node], conv_node.args[0], None))
        claimed.update((conv_node, node))
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
                kwargs = {"relu": site.relu is not None or site.pattern.endswith("relu"),
                          "relu_module": relu_mod, "backend": backend, "sync": sync}  # fmt: skip
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


# --- the converted forward ------------------------------------------------------------------


class _GraphConversion:
    """What the converter did to one module: its generated forward (the callable stored as
    the module's ``forward``), the sites fused, the candidates left alone, or the tracing
    error. Pickles as source code (recompiled on load); copies share nothing."""

    def __init__(self, module, sources, import_block, watched, sites, left, error=None):
        self.module = module
        self.sources = sources  # {"train": src, "eval": src} or {} (nothing fused)
        self.import_block = import_block
        self.watched = watched  # traced-through containers and removed Identity modules
        self.sites, self.left, self.error = sites, left, error
        self.process_group = None
        self.sync_bn = False
        self._compile()

    def _compile(self) -> None:
        from torch.fx.graph_module import _forward_from_src

        self._fns = {k: _forward_from_src(self.import_block + src, {}) for k, src in
                     self.sources.items()}  # fmt: skip

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_fns"]
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._compile()

    def __call__(self, *args, **kwargs):
        module = self.module
        if has_hooks(*self.watched):
            # hooks on a traced-through container (or global hooks): the original forward,
            # which calls every module (converted children stay converted)
            if getattr(self, "sync_bn", False):
                bns = [module.get_submodule(s.bn) for s in self.sites if s.bn is not None]
                _refuse_unsynchronised(
                    bns, "a module the converter traced through (or a global hook)"
                )
            return type(module).forward(module, *args, **kwargs)
        fn = self._fns["train" if module.training else "eval"]
        return fn(module, *args, **kwargs)

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
            if has_hooks(*mods):
                out.append(site)
        return out


def _trace(module: nn.Module, leaf_types, leaf_ids: set[int]):
    """(train graph, eval graph, inlined modules) or raises; on failure the innermost
    module that failed is returned to be made a leaf instead: (None, None, (path, exc))."""
    modes = {m: m.training for m in module.modules()}
    graphs, inlined = {}, {}
    try:
        for tag, flag in (("train", True), ("eval", False)):
            module.train(flag)
            tracer = _Tracer(leaf_types, leaf_ids)
            try:
                graphs[tag] = tracer.trace(module)
            except Exception as exc:
                return None, None, tracer.failed_in or ("", exc)
            inlined.update(tracer.inlined)
    finally:
        for m, flag in modes.items():
            m.training = flag
    return graphs["train"], graphs["eval"], inlined


def convert_graphs(
    model: nn.Module,
    *,
    backend: str = "auto",
    sync_bn: bool = False,
    process_group=None,
    leaf_modules=(),
) -> None:
    """Converts ``model`` in place (see the module docstring)."""
    leaf_types = (*_class_domain(), *tuple(leaf_modules))
    _convert_module(model, leaf_types, backend, sync_bn, process_group, set())


def _convert_module(module, leaf_types, backend, sync_bn, process_group, seen) -> None:
    if id(module) in seen or _is_standard_leaf(module) or isinstance(module, _class_domain()):
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
    inlined = info
    sources, sites, left, watched = {}, None, None, list(inlined.values())
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    import_block = ""
    has_group = sync_bn and process_group is not None
    for tag, graph in (("train", train), ("eval", evalg)):
        watched += _normalise(module, graph)
        found, alone = _find_sites(module, graph)
        if sites is None:
            sites, left = [s for s, *_ in found], alone
        _rewrite(graph, found, backend, sync_bn, has_group)
        graph.lint()
        code = graph.python_code(root_module="self")
        sources[tag] = code.src
        import_block = _format_import_block(code.globals, sys_importer)
    if sources["train"] == sources["eval"]:
        sources["eval"] = sources["train"]
    conversion = _GraphConversion(
        module, sources if sites else {}, import_block, watched, sites, left
    )
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
    for path in {n.target for g in (train, evalg) for n in g.nodes if n.op == "call_module"}:
        child = module.get_submodule(path)
        _convert_module(child, leaf_types, backend, sync_bn, process_group, seen)
    for path in errors:
        child = module.get_submodule(path)
        _convert_module(child, leaf_types, backend, sync_bn, process_group, seen)


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
            skipped.append(f"{where}: not traced ({conv.error}); its children converted alone")
            for child_name, child in module.named_children():
                if isinstance(child, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.ReLU)):
                    skipped.append(f"{prefix}{child_name}: left alone: its parent {where} "
                                   "could not be traced")  # fmt: skip
            continue
        for path, err in getattr(conv, "errors", {}).items():
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
