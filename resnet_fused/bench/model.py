"""Model-level benchmarks: whole ResNets, converted vs eager vs compile vs CUDA graphs.

Models (``--model``): torchvision names (``resnet50``), timm names (``timm:resnet50d``,
``pretrained=False``; needs timm) and ``tutorial_resnet18`` (the user-written ResNet of
:mod:`.tutorial`), all converted by the same ``resnet_fused.convert``.

Providers (``layout`` is a separate axis; every provider but ``eager`` runs channels_last):
    ``eager``          the torchvision model;
    ``compile``        ``torch.compile`` of the torchvision model (``compile-max``:
                       mode="max-autotune", which also captures CUDA graphs);
    ``fused``          ``resnet_fused.convert(model)`` (backend ``auto``), or
                       ``fused-<backend>``;
    ``fused-compile``  ``torch.compile`` (default mode) of the converted model;
    ``fused-graph``    the converted model's whole step captured once as a CUDA graph
                       (``torch.cuda.graphs``) and replayed (CUDA only); ``eager-graph``
                       the same for the torchvision model.
The training step compiles or captures the model only where named: ``compile`` and
``fused-compile`` compile the model (the loss, backward and SGD step run eagerly);
``*-graph`` capture everything (forward under autocast, loss, backward, SGD step).

Modes: ``train`` (forward, cross-entropy, backward, SGD step) and ``eval`` (inference
under ``torch.no_grad``). On CUDA the step runs under bf16 autocast when ``amp`` is set.
Per provider and case:

* ``first_step_s``: wall time of the provider's very first step, synchronised: compile,
  autotuning, ``auto``'s timing trials, kernel loading, the CUDA-graph warm-up and
  capture (``convert_s``, the conversion itself, is separate). Caches of the process
  carry over between providers, models and modes (``auto``'s picks, compiled Triton and
  Inductor kernels, and the on-disk caches of Inductor and Triton unless their cache
  folders are fresh): the first provider to need a kernel pays for it.
* images/s from the interleaved timing (:mod:`.harness`), against eager channels_last
  and (when timed) against ``compile``; every provider's first step is checked against
  eager's before timing (the step that ``first_step_s`` timed is undone first).
* ``peak_mb`` (CUDA): what ``torch.cuda.max_memory_allocated`` reads over one step in a
  process holding only this provider's model, gradients, optimizer state, caches and the
  batch (:func:`_resident_bytes`, exact allocator block sizes) -- the peak above
  everything allocated before the step is measured, this provider's own resident memory
  added; ``peak_step_mb`` is the measured part alone. For ``*-graph`` the step is the
  capture (a replay allocates nothing) and ``graph_pool_mb`` the memory the capture
  reserved for the graph's private pool. ``compile-max`` replays CUDA graphs of its own
  (torch.compile's cudagraph trees), whose pool its peak does not show. "n/a (CPU)"
  on a CPU.
* ``fused_op_calls``: resnet_fused and oneDNN fused-convolution ops one step dispatches
  (profiler); a ``fused*`` provider that runs none is refused (it would time eager maths
  under a fused name, e.g. a silent fallback under torch.compile).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision

import resnet_fused

from . import harness

MODELS = ("resnet18", "resnet50")
TUTORIAL = {"tutorial_resnet18": "tutorial_resnet18"}
GRAPH_PROVIDERS = ("eager-graph", "fused-graph")
GRAPH_WARMUP = 3  # eager steps on a side stream before the capture (PyTorch's CUDA-graph docs)
PEAK_NA = "n/a (CPU)"


def unknown_model(name: str) -> str | None:
    """Why ``name`` names no model this level can build; None when it does."""
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            return f"{name}: timm is not installed (pip install timm)"
        if name[5:] not in timm.list_models():
            return f"{name}: timm has no model {name[5:]!r}"
        return None
    if name in TUTORIAL or callable(getattr(torchvision.models, name, None)):
        return None
    return f"{name}: not a torchvision model, a timm:<name> or one of {sorted(TUTORIAL)}"


def build_model(name: str) -> torch.nn.Module:
    """A fresh, randomly initialised model (ImageNet classes) by benchmark name."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False)
    if name in TUTORIAL:
        from . import tutorial

        return getattr(tutorial, TUTORIAL[name])()
    return getattr(torchvision.models, name)()


# ---------------------------------------------------------------------------------------
# Providers


@dataclass(frozen=True)
class Provider:
    """What a provider name means: the fused backend (None: not converted), the
    torch.compile provider name of :func:`.op.compiled` (None: not compiled), and whether
    the whole step is captured as a CUDA graph."""

    name: str
    backend: str | None = None
    compile: str | None = None
    graph: bool = False


def parse_provider(name: str) -> Provider:
    if name in ("eager", "eager-graph"):
        return Provider(name, graph=name == "eager-graph")
    if name in ("compile", "compile-max"):
        return Provider(name, compile=name)
    if name == "fused-compile":
        return Provider(name, backend="auto", compile="compile")
    if name == "fused-graph":
        return Provider(name, backend="auto", graph=True)
    if name == "fused" or name.startswith("fused-"):
        return Provider(name, backend=name.split("-", 1)[1] if "-" in name else "auto")
    raise ValueError(f"unknown model-level provider {name!r}")


def providers_here(device: torch.device) -> list[str]:
    """Every provider the model level can time on ``device``."""
    from .op import fused_providers

    fused = ["fused", *(f"fused-{b}" for b in fused_providers(device)), "fused-compile"]
    graphs = list(GRAPH_PROVIDERS) if device.type == "cuda" else []
    return ["eager", "compile", "compile-max", *fused, *graphs]


def default_providers(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["eager", "compile", "fused", "fused-compile", "eager-graph", "fused-graph"]
    return ["eager", "fused"]


def refuse_graphs(providers, device: torch.device) -> None:
    """A ``ValueError`` naming the CUDA-graph providers asked for off a CUDA device."""
    asked = [p for p in providers if p in GRAPH_PROVIDERS]
    if asked and device.type != "cuda":
        raise ValueError(
            f"provider(s) {asked} capture the step as a CUDA graph (torch.cuda.graphs) and "
            f"need a CUDA GPU; this run is on {device.type}"
        )


def _model(name: str, provider: Provider, device, fmt, training: bool):
    """(model, convert seconds or None)."""
    torch.manual_seed(0)
    model = build_model(name).to(device=device, memory_format=fmt)
    model.train(training)
    convert_s = None
    if provider.backend is not None:
        start = time.perf_counter()
        model = resnet_fused.convert(model, backend=provider.backend, inplace=True)
        convert_s = time.perf_counter() - start
    if provider.compile is not None:
        from .op import compiled

        model = compiled(model, provider.compile)
    return model, convert_s


def _step(model, training: bool, amp: bool, device, autocast_cache: bool = True):
    """(run(x, y) -> loss or output, the optimizer or None)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9) if training else None

    def run(x, y):
        with torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=autocast_cache
        ):
            if not training:
                with torch.no_grad():
                    return model(x)
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return run, opt


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------
# State snapshot (the CUDA-graph warm-up must not advance the model)


def _state_tensors(model, opt) -> list[torch.Tensor]:
    """Every tensor a step updates in place: parameters, buffers (running statistics,
    num_batches_tracked) and the optimizer's state."""
    out = list(model.parameters()) + list(model.buffers())
    if opt is not None:
        out += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def snapshot_state(model, opt) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, copy) of every parameter and buffer; the optimizer has no state yet or
    its state is snapshot too."""
    with torch.no_grad():
        return [(t, t.detach().clone()) for t in _state_tensors(model, opt)]


def restore_state(saved, model, opt) -> None:
    """Back to ``saved`` in place (the same tensors, so a captured graph stays valid).
    Optimizer state created since the snapshot (SGD's momentum buffers) is zeroed: SGD's
    first step sets the buffer to the gradient, which ``0.9 * 0 + g`` equals exactly
    (dampening 0), so the next step is the model's first step again."""
    known = {id(t) for t, _ in saved}
    with torch.no_grad():
        for t, v in saved:
            t.copy_(v)
        for t in _state_tensors(model, opt):
            if id(t) not in known:
                t.zero_()


# ---------------------------------------------------------------------------------------
# Memory and fused-op evidence


def _fold_tensors(model) -> list[torch.Tensor]:
    """The tensors of the converted model's eval-fold caches (folded weights, packed
    weights): memory the model keeps besides its parameters."""
    from resnet_fused import graph_convert
    from resnet_fused.modules import FoldCache

    caches = []
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, FoldCache):
                caches.append(v)
            elif isinstance(v, dict):
                caches += [c for c in v.values() if isinstance(c, FoldCache)]
        site = graph_convert._FOLD_CACHES.get(m) if isinstance(m, torch.nn.Module) else None
        if site is not None:
            caches.append(site)
    out = []
    for cache in caches:
        entry = cache.entry
        if entry is not None:
            out += [t for t in entry[1] if isinstance(t, torch.Tensor)]
    return out


def _block_sizes(device) -> dict[int, int]:
    """Address -> size of every allocated block of the CUDA caching allocator."""
    sizes = {}
    index = torch.cuda.current_device() if device.index is None else device.index
    for seg in torch.cuda.memory_snapshot():
        if seg.get("device", index) != index:
            continue
        addr = seg["address"]
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                sizes[block.get("address", addr)] = block["size"]
            addr = block.get("address", addr) + block["size"]
    return sizes


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` is on ``device`` (``cuda`` without an index: the current one)."""
    if t.device.type != device.type:
        return False
    if device.type != "cuda":
        return True
    index = torch.cuda.current_device() if device.index is None else device.index
    return t.device.index == index


def _resident_bytes(model, opt, tensors, device) -> int:
    """Bytes the allocator holds for this provider's own tensors: parameters, gradients,
    buffers, optimizer state, fold caches and ``tensors`` (the batch), each storage once,
    at its allocator block's size (512-byte rounding where the block is not found)."""
    storages: dict[int, int] = {}
    candidates = [*model.parameters(), *model.buffers(), *_fold_tensors(model), *tensors]
    candidates += [p.grad for p in model.parameters()]
    if opt is not None:
        candidates += [v for s in opt.state.values() for v in s.values()]
    for t in candidates:
        if isinstance(t, torch.Tensor) and _on(t, device):
            s = t.untyped_storage()
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
    blocks = _block_sizes(device) if device.type == "cuda" else {}
    return sum(blocks.get(ptr, -(-n // 512) * 512) for ptr, n in storages.items())


# resnet_fused's op that runs eager's own kernels (auto's "eager" pick, as one call): not
# a fused op for this count.
_EAGER_UNIT_OP = "resnet_fused::conv_bn_act_eager"


def fused_op_calls(fn: Callable[[], object]) -> int:
    """resnet_fused ops (but the eager unit) and oneDNN fused convolutions (the CPU eval
    path) dispatched by one call of ``fn``, counted with the profiler (ops inside compiled
    code are dispatched too; Inductor's own kernels are not ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        (e.name.startswith("resnet_fused::") and e.name != _EAGER_UNIT_OP)
        or e.name.startswith("mkldnn::_convolution_pointwise")
        for e in prof.events()
    )


def check_fused_ran(provider: str, calls: int, auto_decided: bool = False) -> None:
    """A :class:`harness.MismatchError` for a ``fused*`` provider whose step ran no fused
    op and made no choice of ``backend="auto"``: its time would be eager maths under a
    fused name. (Where ``auto`` timed the units and picked eager ops or aten's
    convolution with the folded bias, the step is what a converted model runs: the
    fused-ops column then says how much of it ran resnet_fused's kernels.)"""
    if provider.startswith("fused") and calls == 0 and not auto_decided:
        raise harness.MismatchError(
            f"provider {provider!r} dispatched no resnet_fused op in a step (profiler): it "
            "runs the unfused model (a fallback under torch.compile?), so timing it as "
            "fused would be wrong"
        )


# ---------------------------------------------------------------------------------------
# Steps


class _Case:
    """One provider's model, optimizer, step and the measurements beside its timing."""

    def __init__(self, provider: Provider, model, opt, call, device, inputs) -> None:
        self.provider, self.model, self.opt, self.call = provider, model, opt, call
        self.device, self.inputs = device, inputs
        self.graph = None
        self.graph_ops = self.graph_peak = self.graph_pool_mb = None

    def capture(self) -> None:
        """Warm up on a side stream, capture one step as a CUDA graph; ``call`` then
        replays the graph (static input and target: the benchmark's batch; the returned
        value is the graph's static output). The warm-up's updates are undone by
        :meth:`first_step`, in place, so the graph's tensors stay the model's."""
        device, model, opt, step = self.device, self.model, self.opt, self.call
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP - 1):
                step()
            self.graph_ops = fused_op_calls(step)  # the eager step the capture records
        torch.cuda.current_stream(device).wait_stream(side)
        if opt is not None:  # as PyTorch's example: the capture allocates the gradients
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        before, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        own = _resident_bytes(model, opt, self.inputs, device)
        torch.cuda.reset_peak_memory_stats(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        self.graph_peak = (peak - before + own, peak - before)
        self.graph_pool_mb = round((torch.cuda.memory_reserved(device) - reserved) / 2**20, 1)
        self.graph = graph

        def replay():
            graph.replay()
            return static_out

        self.call = replay

    def first_step(self) -> float:
        """Seconds of the first step (with the capture for a graph provider), synchronised.
        A training step's updates are then undone (:func:`restore_state`), so that the
        harness checks every provider on the same first step."""
        saved = snapshot_state(self.model, self.opt) if self.opt is not None else None
        _sync(self.device)
        start = time.perf_counter()
        if self.provider.graph:
            self.capture()
        self.call()
        _sync(self.device)
        seconds = time.perf_counter() - start
        if saved is not None:
            restore_state(saved, self.model, self.opt)
        return seconds

    def fused_ops(self) -> int:
        return self.graph_ops if self.provider.graph else fused_op_calls(self.call)

    def peak_mb(self) -> tuple[float, float] | tuple[str, str]:
        """(peak_mb, peak_step_mb): see the module docstring; PEAK_NA on a CPU."""
        device = self.device
        if device.type != "cuda":
            return PEAK_NA, PEAK_NA
        if self.graph_peak is not None:
            peak, step = self.graph_peak
        else:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            own = _resident_bytes(self.model, self.opt, self.inputs, device)
            torch.cuda.reset_peak_memory_stats(device)
            self.call()
            torch.cuda.synchronize(device)
            peak_now = torch.cuda.max_memory_allocated(device)
            peak, step = peak_now - before + own, peak_now - before
        return round(peak / 2**20, 1), round(step / 2**20, 1)


def run_models(
    names,
    batch: int,
    image_size: int,
    device: torch.device,
    providers: list[str],
    layouts=("channels_last", "nchw"),
    amp: bool = False,
    min_run_time: float = 1.0,
    progress: Callable[[str], None] = print,
    on_row: Callable[[dict], None] | None = None,
    modes=("train", "eval"),
    rounds: int = harness.ROUNDS,
    failures: list[str] | None = None,
) -> list[dict]:
    """Time every provider per model and mode. A graph provider whose capture fails is
    left out of its case with the reason appended to ``failures`` (and printed)."""
    refuse_graphs(providers, device)
    parsed = {p: parse_provider(p) for p in providers}
    # fused-compile and fused-graph run backend "auto" too.
    harness.refuse_reference(
        [p if parsed[p].backend != "auto" else "fused" for p in providers], device
    )
    env = {**harness.start(device), "device_type": device.type}
    rows = []
    # The fused, compiled and captured models are timed channels_last; eager in every layout.
    keys = [(p, layout) for layout in layouts for p in providers
            if p == "eager" or layout == "channels_last"]  # fmt: skip
    base, ref_compile = ("eager", "channels_last"), ("compile", "channels_last")
    for name in names:
        for mode in modes:
            training = mode == "train"
            gen = torch.Generator().manual_seed(0)
            x0 = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
            y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
            xs = {
                layout: x0.to(memory_format=torch.channels_last if layout == "channels_last"
                              else torch.contiguous_format)
                for layout in layouts
            }  # fmt: skip
            if any(parsed[p].compile for p in providers):
                torch._dynamo.reset()
            cases: dict[tuple, _Case] = {}
            convert_s, first_s = {}, {}
            skip_mode = False
            for provider, layout in keys:
                spec = parsed[provider]
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                model, convert_s[provider] = _model(name, spec, device, fmt, training)
                run, opt = _step(model, training, amp, device, autocast_cache=not spec.graph)
                x = xs[layout]
                case = _Case(spec, model, opt, lambda run=run, x=x, y=y: run(x, y), device, (x, y))
                try:
                    first_s[provider, layout] = case.first_step()
                except Exception as exc:  # a capture hazard: report it, time the others
                    if provider == "eager":
                        # The model itself cannot take this step (nn.BatchNorm2d in
                        # training needs more than one value per channel: batch 1 at
                        # 32x32 reaches 1x1 maps): this mode is not timed, the others are.
                        why = (f"{name} {mode}: not timed, eager's own step fails at batch "
                               f"{batch}, {image_size}x{image_size}: {exc}")  # fmt: skip
                        progress(why)
                        if failures is not None:
                            failures.append(why)
                        del case, model, opt, run
                        cases.clear()
                        _free(device)
                        skip_mode = True
                        break
                    if not spec.graph:
                        raise
                    why = f"{name} {mode} {provider}: not timed, capture failed: {exc!r}"
                    progress(why)
                    if failures is not None:
                        failures.append(why)
                    del case, model, opt, run
                    _free(device)
                    continue
                cases[provider, layout] = case
            if skip_mode:
                continue
            steps = {key: c.call for key, c in cases.items()}
            measured = harness.measure_case(
                steps, device, min_run_time,
                baseline=base if base in steps else (next(iter(steps)) if steps else None),
                tolerance=1e-1 if amp else harness.default_tolerance(torch.float32, device),
                rounds=rounds,
            )  # fmt: skip
            extra = {key: (c.fused_ops(), c.peak_mb()) for key, c in cases.items()}
            decided = bool(resnet_fused.auto_choices())
            for (provider, _), (calls, _) in extra.items():
                check_fused_ran(provider, calls, decided)
            for provider, layout in cases:
                t = measured[provider, layout]
                calls, (peak, peak_step) = extra[provider, layout]
                row = {
                    **env,
                    "model": name,
                    "mode": mode,
                    "layout": layout,
                    "provider": provider,
                    "batch": batch,
                    "image_size": image_size,
                    "amp": amp,
                    **harness.timing_columns(t, digits=3),
                    "images_per_s": round(batch / t.median_s, 2),
                    **harness.ratio_columns("speedup_vs_eager_cl", t, measured.get(base)),
                    **harness.ratio_columns("speedup_vs_compile", t, measured.get(ref_compile)),
                    "first_step_s": round(first_s[provider, layout], 3),
                    "peak_mb": peak if peak != PEAK_NA else "",
                    "peak_step_mb": peak_step if peak_step != PEAK_NA else "",
                    "graph_pool_mb": _blank(cases[provider, layout].graph_pool_mb),
                    "fused_op_calls": calls,
                    "convert_s": round(convert_s[provider], 3)
                    if convert_s.get(provider) is not None
                    else "",
                }
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                peak_text = f"{peak} MB" if peak != PEAK_NA else PEAK_NA
                progress(
                    f"{name:9s} {mode:5s} {layout:13s} {provider:14s} "
                    f"{row['median_ms']:10.2f} ms {row['images_per_s']:9.1f} img/s "
                    f"x{harness.ratio_spread(row, 'speedup_vs_eager_cl')} eager(cl) "
                    f"first step {row['first_step_s']:.2f} s peak {peak_text}"
                )
            del cases, steps, measured
            _free(device)
    return rows


def _free(device) -> None:
    """Give the memory of a finished case (graphs' private pools) back before the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Goals and the summary

# Issue 14's goals for this level (H200/H100, bf16 autocast, channels_last, batch 256):
# (what, model, mode, provider, column, goal); a ratio column must reach the goal.
GOALS = [
    ("ResNet-50 training ≥ 1.15× eager channels_last", "resnet50", "train", "fused",
     "speedup_vs_eager_cl", 1.15),
    ("ResNet-50 inference ≥ 1.4× eager channels_last", "resnet50", "eval", "fused",
     "speedup_vs_eager_cl", 1.4),
    ("ResNet-50 training: fused under torch.compile ≥ torch.compile", "resnet50", "train",
     "fused-compile", "speedup_vs_compile", 1.0),
    ("ResNet-50 inference: fused under torch.compile ≥ torch.compile", "resnet50", "eval",
     "fused-compile", "speedup_vs_compile", 1.0),
]  # fmt: skip
GOAL_SETTING = "CUDA, bf16 autocast, batch 256"


def _row(rows, model, mode, provider, layout="channels_last") -> dict | None:
    return next(
        (r for r in rows if (r["model"], r["mode"], r["provider"], r["layout"])
         == (model, mode, provider, layout)),
        None,
    )  # fmt: skip


def verdicts(rows: list[dict], failures=()) -> list[list[str]]:
    """[goal, measured, verdict] for each of issue 14's model-level goals this run's
    rows can judge (goals without their rows are left out)."""
    table = []
    for what, model, mode, provider, column, goal in GOALS:
        r = _row(rows, model, mode, provider)
        if r is None or str(r.get(column, "")) == "":
            continue
        value = float(r[column])
        table.append([what, harness.ratio_spread(r, column),
                      "met" if value >= goal else "missed"])  # fmt: skip
    fused, eager = (
        _row(rows, "resnet50", "train", "fused"),
        _row(rows, "resnet50", "train", "eager"),
    )
    if (
        fused
        and eager
        and str(fused.get("peak_mb", "")) != ""
        and str(eager.get("peak_mb", "")) != ""
    ):
        f, e = float(fused["peak_mb"]), float(eager["peak_mb"])
        table.append(["ResNet-50 training: fused peak memory ≤ eager channels_last",
                      f"{f:.0f} MB vs {e:.0f} MB", "met" if f <= e else "missed"])  # fmt: skip
    for model in dict.fromkeys(r["model"] for r in rows):
        graph = _row(rows, model, "train", "fused-graph")
        failed = [f for f in failures if f.startswith(f"{model} train fused-graph")]
        if graph is not None or failed:
            table.append([f"{model} training step captured as a CUDA graph and timed",
                          f"{graph['images_per_s']:.1f} images/s" if graph else "capture failed",
                          "met" if graph else "missed"])  # fmt: skip
    return table


def summarise(rows: list[dict], failures=()) -> str:
    from . import report
    from .timing import allocator_text

    env = rows[0]
    lines = [
        "# Model benchmark: whole ResNets, converted vs eager vs compile",
        "",
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda'] or '-'}; {env['date']}; batch {env['batch']}, "
        f"{env['image_size']}x{env['image_size']} images, AMP {env['amp']}"
        + allocator_text(env)
        + ".",
        "train = forward + cross-entropy + backward + SGD step; eval = inference. "
        "×eager(cl) is the speed-up over the same eager model in channels_last, ×compile "
        "over torch.compile of it. First step: the first step's wall time (compile, "
        "autotuning, auto's trials, CUDA-graph capture), convert s apart. Peak MB: "
        "torch.cuda.max_memory_allocated over a step with only this provider's model, "
        "gradients, optimizer state and batch resident (*-graph: over the capture). "
        + harness.TIMING_NOTE.format(rounds=env.get("rounds", harness.ROUNDS)),
        "",
    ]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines += [report.ratio_table(rows, ("model", "mode"), providers), ""]
    judged = verdicts(rows, failures)
    if judged:
        setting = ""
        if (
            env.get("device_type", "cuda") != "cuda"
            or str(env["batch"]) != "256"
            or str(env["amp"]) != "True"
        ):
            setting = f" This run is not the goals' setting ({GOAL_SETTING}): indicative only."
        lines += [
            "## Goals (issue 14), from this run's rows",
            "",
            "Ratios are medians of per-round ratios (range in brackets)." + setting,
            "",
            report.markdown_table(["goal", "measured", "verdict"], judged),
            "",
        ]
    header = [
        "model", "mode", "provider", "layout", "ms", "images/s", "×eager(cl)", "×compile",
        "first step s", "convert s", "fused ops", "peak MB",
    ]  # fmt: skip
    table = [
        [
            r["model"],
            r["mode"],
            r["provider"],
            r["layout"],
            f"{r['median_ms']:.2f}",
            f"{r['images_per_s']:.1f}",
            harness.ratio_spread(r, "speedup_vs_eager_cl"),
            harness.ratio_spread(r, "speedup_vs_compile"),
            _text(r.get("first_step_s", "")),
            _text(r.get("convert_s", "")),
            _text(r.get("fused_op_calls", "")),
            str(r["peak_mb"]) if r["peak_mb"] != "" else PEAK_NA,
        ]
        for r in rows
    ]
    lines += ["## Every measurement", "", report.markdown_table(header, table), ""]
    if failures:
        lines += ["Not timed:", "", *[f"- {f}" for f in failures], ""]
    return "\n".join(lines)


def _blank(value) -> object:
    return "" if value is None else value


def _text(value) -> str:
    return str(value) if str(value) != "" else "-"
