"""Synchronised BatchNorm across ranks: the fused path against PyTorch's.

Spawns ``world`` processes in one torch.distributed group and times a training step
(forward + backward, statistics synchronised over the group) on every rank:

* CPU: gloo; each rank gets ``cores // world`` threads.
* GPUs, at least ``world`` of them: NCCL, one device per rank.
* Fewer GPUs than ranks (a *simulated* group): gloo with every rank on device 0; the
  collectives go through host memory and the ranks share the GPU, alike for every provider.

Providers:

* ``SyncBatchNorm``: ``nn.SyncBatchNorm`` + ReLU (+ add); GPU only (PyTorch refuses CPU).
* ``eager``: the same statistics in eager torch ops, combined over the ranks with
  differentiable all_reduces (forward and backward), in the manner of
  ``torch.distributed.nn.functional.all_reduce`` (what runs on CPU).
* ``fused``: ``resnet_fused.batch_norm_act(..., sync=True)`` /
  ``resnet_fused.convert(block, sync_bn=True)``.
* ``fused-local``: the fused path without synchronisation, for what the communication costs.

Each provider's first step is checked against ``eager`` in fp64 (output and input
gradient) before timing.

Cases: BN+ReLU and BN+add+ReLU at ResNet-50 shapes, and two ResNet-50 bottleneck blocks.
A step's time is the slowest rank's; the median over the steps is reported.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .harness import (
    ROUNDS,
    TIMING_NOTE,
    MismatchError,
    Stats,
    interleave,
    ratio_columns,
    ratio_spread,
    rel_diff,
)

PROVIDERS = ("SyncBatchNorm", "eager", "fused", "fused-local")


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "bn_relu", "bn_add_relu" or "block"
    channels: int
    hw: int
    planes: int = 0  # block: bottleneck width


CASES = [
    Case("bn_relu c64", "bn_relu", 64, 56),
    Case("bn_add_relu c256", "bn_add_relu", 256, 56),
    Case("bn_relu c512", "bn_relu", 512, 28),
    Case("bn_add_relu c1024", "bn_add_relu", 1024, 14),
    Case("bn_add_relu c2048", "bn_add_relu", 2048, 7),
    Case("r50.layer1 block", "block", 256, 56, 64),
    Case("r50.layer3 block", "block", 1024, 14, 256),
]
QUICK_CASES = ["bn_relu c64", "bn_add_relu c1024", "r50.layer3 block"]


def cases(names: list[str] | None = None, quick: bool = False) -> list[Case]:
    from .report import select

    return select(CASES, names, quick, QUICK_CASES, "sync case(s)")


def providers_here(device: torch.device) -> list[str]:
    return [p for p in PROVIDERS if p != "SyncBatchNorm" or device.type == "cuda"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of every rank's input is the sum of the ranks'
    output gradients."""

    @staticmethod
    def forward(ctx, t, group):
        import torch.distributed as dist

        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class EagerSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are combined over a process group in eager
    torch ops: the baseline where nn.SyncBatchNorm cannot run. Each rank's mean and
    variance come from ``torch.var_mean``; the group's mean from one differentiable
    all_reduce of (n*mean, n), its variance from a second of n*var + n*(mean_rank -
    mean)^2 (Chan's combination: no E[x^2] - mean^2, whose cancellation in fp32 loses
    the variance where the mean is large against the spread), as nn.SyncBatchNorm's
    Welford statistics avoid it."""

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        xf = x.float()
        var_local, mean_local = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        count = torch.full_like(mean_local, x.numel() // x.shape[1])
        group = self.process_group or torch.distributed.group.WORLD
        total = _AllReduceSum.apply(torch.stack([mean_local * count, count]), group)
        n = total[1]
        mean = total[0] / n
        spread = var_local * count + count * (mean_local - mean) ** 2
        var = _AllReduceSum.apply(spread, group) / n
        with torch.no_grad():
            from ..reference import update_running_stats

            self.num_batches_tracked += 1
            update_running_stats(self.running_mean, self.running_var, mean, var, n, self.momentum)
        scale = torch.rsqrt(var + self.eps) * self.weight
        shift = self.bias - mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def _bottleneck(case: Case) -> nn.Module:
    from torchvision.models.resnet import Bottleneck

    model = Bottleneck(case.channels, case.planes)  # identity shortcut: the input's shape
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
    return model


def _swap_bn(module: nn.Module, make: Callable[[nn.BatchNorm2d], nn.Module]) -> nn.Module:
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = make(child)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            _swap_bn(child, make)
    return module


def _step_fn(case, provider, batch, device, dtype, seed):
    """This rank's training step (forward + backward) as a no-argument callable, and the
    first step's (output, input gradient) for checking the providers against each other.
    Every provider gets the same input (per rank), parameters and output gradient."""
    import resnet_fused

    g = torch.Generator().manual_seed(seed)
    shape = (batch, case.channels, case.hw, case.hw)

    def tensor(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    x = tensor(*shape).to(memory_format=torch.channels_last).requires_grad_()
    residual = None
    torch.manual_seed(0)
    if case.kind == "block":
        model = _bottleneck(case)
    else:
        model = nn.BatchNorm2d(case.channels)
        with torch.no_grad():
            model.weight.uniform_(0.5, 1.5)
            model.bias.normal_(0.0, 0.5)
        if case.kind == "bn_add_relu":
            residual = tensor(*shape).to(memory_format=torch.channels_last).requires_grad_()
    if provider == "SyncBatchNorm":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif provider == "eager":
        model = _swap_bn(nn.Sequential(model), lambda bn: EagerSyncBatchNorm2d(bn.num_features))[0]
    model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    sync = provider == "fused"
    if case.kind == "block":
        if provider.startswith("fused"):
            model = resnet_fused.convert(model, inplace=True, sync_bn=sync)

        def forward():
            return model(x)

    elif provider.startswith("fused"):
        bn = model

        def forward():
            return resnet_fused.batch_norm_act(
                x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum,
                bn.eps, residual=residual, sync=sync,
            )  # fmt: skip

    else:

        def forward():
            y = model(x)
            return F.relu(y + residual if residual is not None else y)

    leaves = [x, *model.parameters()] + ([residual] if residual is not None else [])
    # Every case keeps the input's shape (the blocks have no stride or downsample).
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1000))
    grad = grad.to(device=device, dtype=dtype, memory_format=torch.channels_last)

    def step():
        for t in leaves:
            t.grad = None
        out = forward()
        out.backward(grad)
        return out

    out = step().detach().float().clone()
    return step, (out, x.grad.detach().float().clone())


def _max_over_ranks(values: list[float], device) -> list[float]:
    """Elementwise maximum over the ranks (on ``device``: NCCL takes CUDA tensors only)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _rank_timer(device) -> Callable[[Callable[[], object], int], float]:
    """The harness's timer for a group: every step starts after a barrier and is the
    slowest rank's time; the median step (the same value on every rank, so every rank
    picks the same number of steps)."""
    import torch.distributed as dist

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timer(step, calls: int) -> float:
        times = []
        for _ in range(calls):
            sync()
            dist.barrier()
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(_max_over_ranks(times, device))

    return timer


def _worker(rank, world, init_file, device_type, dtype, batch, case_list, providers,
            min_run_time, out_dir, rounds=ROUNDS):  # fmt: skip
    import torch.distributed as dist

    ngpu = torch.cuda.device_count() if device_type == "cuda" else 0
    backend = "nccl" if device_type == "cuda" and ngpu >= world else "gloo"
    if device_type == "cuda":
        device = torch.device("cuda", rank if backend == "nccl" else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
        **({"device_id": device} if backend == "nccl" else {}),
    )  # fmt: skip
    try:
        results = []
        for case in case_list:
            steps, checks = {}, {}
            for provider in providers:
                steps[provider], checks[provider] = _step_fn(
                    case, provider, batch, device, dtype, seed=rank
                )
            # Every provider's first step against the same case in fp64 (eager's
            # synchronised BatchNorm on fp64 tensors, same inputs): output and input
            # gradient, worst over the ranks. (Against the fp32 baseline itself the check
            # measured the baseline's own error: its input gradient, autograd through
            # the batch statistics in fp32, was 3e-4 off fp64 on an AVX-512 CPU where
            # the fused one was 8e-7.)
            _, checks_64 = _step_fn(case, "eager", batch, device, torch.float64, seed=rank)
            errs = {p: rel_diff(checks[p], checks_64) for p in providers}
            del checks_64
            errs = dict(zip(errs, _max_over_ranks(list(errs.values()), device), strict=True))
            del checks
            per_round = interleave(steps, device, min_run_time, rounds, _rank_timer(device))
            for provider in providers:
                results.append((case, provider, per_round[provider], errs[provider]))
                if rank == 0:
                    med = 1e3 * statistics.median(per_round[provider])
                    print(f"  {case.name:20s} {provider:13s} {med:9.3f} ms  "
                          f"(rel. difference {errs[provider]:.1e})", flush=True)  # fmt: skip
            del steps
        if rank == 0:
            torch.save({"results": results, "dist_backend": backend, "gpus": ngpu},
                       os.path.join(out_dir, "sync_results.pt"))  # fmt: skip
        dist.barrier()  # every rank tears the group down together
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without interpreter finalisation. Once in a CI run a rank
    # aborted there ("terminate called without an active exception", after the group was
    # destroyed and the results written), which would fail a finished benchmark.
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_sync(
    selected: list[Case],
    batch: int,
    world: int,
    device: torch.device,
    dtype: torch.dtype,
    providers: list[str],
    min_run_time: float = 0.5,
    on_row: Callable[[dict], None] | None = None,
    timeout: float = 1200.0,
    rounds: int = ROUNDS,
) -> list[dict]:
    """Times every (case, provider) with ``world`` ranks, the providers of a case
    interleaved (:mod:`.harness`); a row per measurement. ``fused-local`` differs by
    design; any other provider that differs from the first beyond the harness's
    tolerance is refused (:class:`~.harness.MismatchError`)."""
    import torch.multiprocessing as mp

    from .harness import default_tolerance, start, timing_columns

    if "fused" in providers:
        from .harness import refuse_reference

        refuse_reference(["fused"], device)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _worker,
            args=(world, os.path.join(tmp, "init"), device.type, dtype, batch, selected,
                  providers, min_run_time, tmp, rounds),
            nprocs=world, join=False, start_method="spawn",
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"the {world} benchmark ranks did not finish in {timeout} s")
        saved = torch.load(os.path.join(tmp, "sync_results.pt"), weights_only=False)
    env = start(device)
    backend = saved["dist_backend"]
    if device.type == "cuda" and saved["gpus"] < world:
        backend += f" (simulated: {world} ranks on 1 GPU)"
    tolerance = default_tolerance(dtype, device)
    stats: dict[tuple[str, str], Stats] = {}
    base_err = {c.name: e for c, p, _t, e in saved["results"] if p == providers[0]}
    for case, provider, times, err in saved["results"]:
        stats[case.name, provider] = Stats(times, err)
        # (the tolerance rule: twice the baseline's own error, or the harness's bound)
        bound = max(2 * base_err[case.name], tolerance)
        if provider not in (providers[0], "fused-local") and not err <= bound:
            raise MismatchError(
                f"sync case {case.name!r}: provider {provider!r} is {err:.2e} (relative "
                f"norm) from the fp64 reference, over the bound {bound:.1e} (twice "
                f"{providers[0]!r}'s own {base_err[case.name]:.1e}, at least {tolerance:.0e})"
            )
    rows = []
    for case, provider, _times, err in saved["results"]:
        t = stats[case.name, provider]
        ref = "SyncBatchNorm" if (case.name, "SyncBatchNorm") in stats else "eager"
        row = {
            **env,
            "case": case.name,
            "shape": f"{batch}x{case.channels}x{case.hw}x{case.hw}",
            "world": world,
            "dist_backend": backend,
            "dtype": str(dtype).replace("torch.", ""),
            "mode": "train forward+backward",
            "provider": provider,
            **timing_columns(t),
            "rel_diff": f"{err:.1e}",
            **ratio_columns("speedup_vs_eager", t, stats.get((case.name, "eager"))),
            **ratio_columns("speedup_vs_baseline", t, stats.get((case.name, ref))),
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def summarise(rows: list[dict]) -> str:
    from . import report

    env = rows[0]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    baseline = "SyncBatchNorm" if "SyncBatchNorm" in providers else "eager"
    lines = [
        "# Synchronised BatchNorm benchmark: fused vs PyTorch",
        "",
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda'] or '-'}; {env['date']}; dtype {env['dtype']}; channels_last.",
        f"{env['world']} ranks over {env['dist_backend']}; a training step (forward + "
        "backward) per measurement, the slowest rank's time after a barrier. "
        "Shapes are per rank. " + TIMING_NOTE.format(rounds=env.get("rounds", ROUNDS)),
        "",
        "Providers: `SyncBatchNorm` = nn.SyncBatchNorm + ReLU (+ add) (GPU only); `eager` = "
        "the same statistics in eager torch ops combined with differentiable all_reduces "
        "(forward and backward); `fused` = resnet_fused with sync; "
        "`fused-local` = resnet_fused without synchronisation (what communication costs).",
        "",
        "Before timing, every provider's first step is compared with `eager` run in fp64 "
        "(output and input gradient, same inputs and parameters, worst rank; a provider "
        "passes within twice the first provider's own difference, at least the harness's "
        "tolerance): `diff` is "
        "‖a − b‖ / ‖b‖, the worse of the two, leaving out the largest 0.1% of the element "
        "differences. Elements whose pre-activation lies within "
        "rounding of zero may take the other side of the ReLU, so a few gradient elements "
        "of millions differ by a whole value (~1e-4 at 25M elements); one rank's statistics "
        "instead of the group's give 5e-2 to 2e-1 on these inputs. "
        "`fused-local` uses this rank's statistics only, so it differs by design.",
        "",
        f"## Geometric-mean speed-up of `fused` against `{baseline}`",
        "",
    ]
    table = []
    for kind, is_block in (("ops", False), ("blocks", True)):
        sel = [r for r in rows
               if r["case"].endswith("block") == is_block and r["provider"] == "fused"]  # fmt: skip
        if sel:
            g = report.geomean(r["speedup_vs_baseline"] for r in sel)
            table.append([kind, f"{g:.2f}×"])
    lines.append(report.markdown_table(["cases", f"fused ×{baseline}"], table))
    lines += ["", "## Every measurement", ""]
    header = ["case", "shape/rank", *[f"{p} ms" for p in providers], f"fused ×{baseline}"]
    header_diff = [f"{p} diff" for p in providers[1:]]
    if "eager" in providers and baseline != "eager":
        header.append("fused ×eager")
    table = []
    for key in dict.fromkeys((r["case"], r["shape"]) for r in rows):
        by = {r["provider"]: r for r in rows if (r["case"], r["shape"]) == key}
        cells = [*key, *[f"{by[p]['median_ms']:.3f}" if p in by else "-" for p in providers]]
        f = by.get("fused")
        cells.append(ratio_spread(f, "speedup_vs_baseline") if f else "-")
        if "eager" in providers and baseline != "eager":
            cells.append(ratio_spread(f, "speedup_vs_eager") if f else "-")
        cells += [by[p]["rel_diff"] if p in by else "-" for p in providers[1:]]
        table.append(cells)
    lines.append(report.markdown_table(header + header_diff, table))
    lines.append("")
    return "\n".join(lines)
