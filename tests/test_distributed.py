"""Synchronised fused BatchNorm under DistributedDataParallel on CPU (gloo, 2 ranks).

Each rank trains the converted model (``convert(..., sync_bn=True)``) under DDP on its
share of a batch, with uneven shares (3 and 2 images); the outputs, gradients and running
statistics must equal a single process running the unfused torchvision model on the
whole batch. PyTorch's own nn.SyncBatchNorm cannot do this on CPU.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

import resnet_fused
from resnet_fused.bench.tutorial import TutorialResNet

SIZES = [3, 2]  # images per rank: uneven on purpose


class _ActsNet(nn.Module):
    """A MobileNet-like stack with every activation family the kernels fuse after a
    BatchNorm: Conv->BN->SiLU, a depthwise Conv->BN->ReLU6, Conv->BN->Hardswish,
    Conv->BN->add->LeakyReLU, BN->GELU (tanh) and BN->GELU, in module and function
    spellings."""

    def __init__(self) -> None:
        super().__init__()
        c = 8
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU()
        )
        self.dw = nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6()
        )
        self.pw = nn.Sequential(
            nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.Hardswish()
        )
        self.conv, self.bn = nn.Conv2d(2 * c, 2 * c, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * c)
        self.bn_gelu = nn.BatchNorm2d(2 * c)
        self.bn_last = nn.BatchNorm2d(2 * c)
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        x = self.pw(self.dw(self.stem(x)))
        x = nn.functional.leaky_relu(self.bn(self.conv(x)) + x, 0.1)
        x = nn.functional.gelu(self.bn_gelu(x), approximate="tanh")
        x = nn.functional.gelu(self.bn_last(x))
        return self.head(x.mean((2, 3)))


def _build(kind: str) -> nn.Module:
    """``block``: a torchvision Bottleneck; ``resnet18``: torchvision's; ``tutorial``: the
    user-written tutorial ResNet (graph-level converter), ``tutorial_syncbn`` the same with
    nn.SyncBatchNorm.convert_sync_batchnorm applied (before resnet_fused.convert);
    ``acts``: :class:`_ActsNet` (graph-level converter, activations other than ReLU)."""
    torch.manual_seed(0)
    if kind == "acts":
        model = _ActsNet()
    elif kind == "block":
        down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        model = Bottleneck(16, 8, 2, down)
    elif kind.startswith("tutorial"):
        model = TutorialResNet((1, 1, 1, 1), (8, 16, 32, 64), num_classes=10, small_input=True)
    else:
        model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    if kind == "tutorial_syncbn":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _data(kind: str):
    g = torch.Generator().manual_seed(1)
    # the tutorial ResNet at 16x16: its last stage's BatchNorm sees 2x2 values per image
    side = 16 if kind.startswith("tutorial") or kind == "acts" else 32
    shape = (sum(SIZES), 16, 8, 8) if kind == "block" else (sum(SIZES), 3, side, side)
    x = torch.randn(shape, generator=g)
    out_shape = (sum(SIZES), 32, 4, 4) if kind == "block" else (sum(SIZES), 10)
    return x, torch.randn(out_shape, generator=g)


def _running_stats(model):
    return [
        t.clone()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)  # nn.SyncBatchNorm too
        for t in (m.running_mean, m.running_var)
    ]


def _average_gradients(model: nn.Module) -> None:
    """What DDP does to the gradients, for the model compiled without DDP."""
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def _dist_setup(rank: int, world: int, init_file: str, device: str) -> torch.device:
    """CPU: gloo. GPU: NCCL with a device per rank, or, with fewer GPUs than ranks, gloo
    with every rank on GPU 0. TF32 off: fp32 results are compared at fp32 accuracy."""
    torch.set_num_threads(1)
    backend, dev = "gloo", torch.device("cpu")
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        nccl = torch.cuda.device_count() >= world and dist.is_nccl_available()
        backend, dev = (
            ("nccl", torch.device("cuda", rank)) if nccl else ("gloo", torch.device("cuda", 0))
        )
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    return dev


def _worker(rank, world, init_file, kind, out_dir, mode, device="cpu", backend="cpu") -> None:
    dev = _dist_setup(rank, world, init_file, device)
    try:
        # a model holding nn.SyncBatchNorm is synchronised over their group without sync_bn
        sync_bn = kind != "tutorial_syncbn"
        group = dist.new_group(list(range(world))) if mode == "group" else None
        model = resnet_fused.convert(
            _build(kind), backend=backend, sync_bn=sync_bn, process_group=group
        ).to(dev)
        if mode == "allreduce":
            # DDP refuses any nn.SyncBatchNorm module on CPU ("SyncBatchNorm layers only work
            # with GPU modules", in its constructor): the model itself, gradients averaged
            # by hand as DDP would
            ddp = model
        elif mode == "fullgraph":
            # One graph per direction, collectives included (an error on any graph break).
            ddp = torch.compile(model, fullgraph=True)
        else:
            ids = [dev.index] if dev.type == "cuda" else None
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            if mode == "ddp+compile":
                ddp = torch.compile(ddp)
        x, w = _data(kind)
        x, w = x.to(dev), w.to(dev)
        lo = sum(SIZES[:rank])
        xs, ws = x[lo : lo + SIZES[rank]], w[lo : lo + SIZES[rank]]
        for _ in range(2):  # two steps: statistics and gradients both move
            ddp.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, torch.bfloat16, enabled=mode == "autocast"):
                out = ddp(xs)
            (out.float() * ws).sum().backward()
            if mode in ("fullgraph", "allreduce"):
                _average_gradients(model)
        result = {
            "out": out.detach().cpu(),
            "grads": {k: p.grad.cpu() for k, p in model.named_parameters()},
            "stats": [t.cpu() for t in _running_stats(model)],
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # every rank tears the group down together
    finally:
        dist.destroy_process_group()


def _run_ranks(
    kind: str, tmp_path, mode: str = "eager", device="cpu", backend="cpu", timeout=240.0
) -> list[dict]:
    init_file = str(tmp_path / "init")
    ctx = mp.start_processes(
        _worker, args=(len(SIZES), init_file, kind, str(tmp_path), mode, device, backend),
        nprocs=len(SIZES),
        join=False, start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(SIZES))]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize(
    "kind,mode",
    [
        ("block", "eager"),
        ("resnet18", "eager"),
        ("block", "ddp+compile"),
        ("block", "fullgraph"),
        ("block", "autocast"),
        ("tutorial", "eager"),
        ("tutorial", "group"),
        ("tutorial_syncbn", "allreduce"),
        ("acts", "eager"),
        ("acts", "fullgraph"),
    ],
)
def test_sync_bn_ddp_matches_single_process(kind, mode, tmp_path):
    """DDP (eager or torch.compile'd, or under bf16 autocast), or the model compiled with
    fullgraph=True (the all_gather / all_reduce traced into the graphs) with the
    gradients averaged by hand. The tutorial ResNet goes through the graph-level
    converter: ``convert(sync_bn=True)`` under DDP (over the world group, and over a
    group passed as ``process_group``), and with nn.SyncBatchNorm layers
    (which DDP does not accept on CPU) run directly with the gradients averaged by hand."""
    if kind == "acts":  # every BatchNorm and its activation fused: synchronised by the kernels
        report = resnet_fused.conversion_report(resnet_fused.convert(_build(kind)))
        assert len(report["fused"]) == 6 and not report["not_fused"], report
        for act in ("silu", "relu6", "hardswish", "leaky_relu", "gelu"):
            assert any(act in site.lower() for site in report["fused"]), (act, report)
    _check_against_single_process(kind, _run_ranks(kind, tmp_path, mode), mode == "autocast")


_GPU_CASES = [("block", "auto"), ("block", "triton"), ("resnet18", "auto")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind,backend", _GPU_CASES)
def test_sync_bn_ddp_on_gpu(kind, backend, tmp_path):
    """On GPUs: NCCL with one GPU per rank, or with a single GPU both ranks on it over
    gloo (a simulated group); the fused CUDA/Triton kernels around the collectives."""
    results = _run_ranks(kind, tmp_path, "eager", "cuda", backend)
    _check_against_single_process(kind, results)


def _check_against_single_process(kind: str, results: list[dict], autocast=False) -> None:
    # unfused (plain BatchNorm2d), one process, the whole batch
    reference = _build("tutorial" if kind == "tutorial_syncbn" else kind)
    if autocast:
        # bf16 rounding differs between eager and fused (both are ~5% from fp64 in the
        # gradients at this tiny batch), so under autocast the reference is the fused
        # model in one process: the comparison isolates the synchronisation.
        reference = resnet_fused.convert(reference, backend="cpu")
    reference.train()
    x, w = _data(kind)
    for _ in range(2):
        reference.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = reference(x)
        (out.float() * w).sum().backward()

    # DDP averages gradients over ranks; the single process sums over the whole batch.
    world = len(SIZES)
    # Stated tolerances; under bf16 autocast the gradients see bf16 rounding on a split
    # batch (measured 2.5e-3 relative) and the outputs one bf16 step at most.
    tol_out, tol_grad, tol_stats = (1e-2, 1e-2, 1e-4) if autocast else (1e-4, 1e-3, 1e-5)
    lo = 0
    for rank, res in enumerate(results):
        ref_out = out[lo : lo + SIZES[rank]].to(res["out"].dtype)
        torch.testing.assert_close(res["out"], ref_out, rtol=tol_out, atol=tol_out)
        lo += SIZES[rank]
        errs = {
            k: ((res["grads"][k] * world - p.grad).norm() / p.grad.norm()).item()
            for k, p in reference.named_parameters()
        }
        worst = sorted(errs.items(), key=lambda kv: -kv[1])[:4]
        assert worst[0][1] < tol_grad, f"relative gradient errors: {worst}"
        for a, b in zip(res["stats"], _running_stats(reference), strict=True):
            torch.testing.assert_close(a, b, rtol=tol_stats, atol=tol_stats / 10)


def test_sync_bn_without_process_group_warns_and_is_local():
    model = resnet_fused.convert(_build("block"), backend="cpu", sync_bn=True)
    plain = _build("block")
    x, _ = _data("block")
    with pytest.warns(UserWarning, match="torch.distributed is not initialised"):
        import resnet_fused.distributed as rd

        rd._warned = False
        out = model(x)
    torch.testing.assert_close(out, plain(x), rtol=1e-4, atol=1e-4)


def test_graph_sync_bn_refuses_to_run_hooked_batch_norm_unsynchronised():
    """A graph-converted model (the tutorial ResNet) with ``sync_bn=True`` runs a site
    whose modules carry hooks through the modules, and a module whose traced-through
    container carries hooks through its original forward: a plain nn.BatchNorm2d there
    would train on local statistics, silently. It raises instead (as the fused
    torchvision blocks do); eval mode, nn.SyncBatchNorm layers (which synchronise
    themselves) and models without sync_bn run with the hooks honoured."""
    x, _ = _data("tutorial")
    fired = []
    for path in ("layer1.0.bn1", "layer2.0"):  # a fused BN; a traced-through block
        fired.clear()
        synced = resnet_fused.convert(_build("tutorial"), backend="cpu", sync_bn=True)
        synced.get_submodule(path).register_forward_hook(lambda *a: fired.append(1))
        synced.eval()
        plain = _build("tutorial").eval()
        torch.testing.assert_close(synced(x), plain(x), rtol=1e-4, atol=1e-4)
        assert fired
        synced.train()
        with pytest.raises(RuntimeError, match="carries hooks.*convert_sync_batchnorm"):
            synced(x)
        for model in (
            resnet_fused.convert(_build("tutorial_syncbn"), backend="cpu"),
            resnet_fused.convert(_build("tutorial"), backend="cpu"),
        ):
            fired.clear()
            model.get_submodule(path).register_forward_hook(lambda *a: fired.append(1))
            torch.testing.assert_close(model(x), _build("tutorial")(x), rtol=1e-4, atol=1e-4)
            assert fired


def _unfuse_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        report = {}
        # convert(sync_bn=True) over a group, and a model already holding nn.SyncBatchNorm.
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(_build("resnet18"), group)
        ref = _build("resnet18").state_dict()
        for name, fused in (
            (
                "sync_bn",
                resnet_fused.convert(_build("resnet18"), sync_bn=True, process_group=group),
            ),
            ("SyncBatchNorm", resnet_fused.convert(synced)),
        ):
            for inplace in (False, True):
                plain = resnet_fused.unfuse(fused, inplace=inplace)
                bns = [m for m in plain.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
                report[name, inplace] = {
                    "n_bn": len(bns),
                    "all_sync": all(type(m) is nn.SyncBatchNorm for m in bns),
                    "same_group": all(m.process_group is group for m in bns),
                    "torchvision": type(plain.layer1[0]) is torchvision.models.resnet.BasicBlock
                    and type(plain.conv1) is nn.Conv2d,
                    "state_dict": list(sd := plain.state_dict()) == list(ref)
                    and all(torch.equal(sd[k], ref[k]) for k in ref),
                }
        torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_unfuse_gives_sync_batchnorm_back(tmp_path):
    ctx = mp.start_processes(
        _unfuse_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
        join=False, start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish within 120 s")
    for rank in range(2):
        report = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(report) == 4
        for key, r in report.items():
            assert r == {
                "n_bn": 20, "all_sync": True, "same_group": True, "torchvision": True,
                "state_dict": True,
            }, key  # fmt: skip


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_train_ddp_example_runs_under_torchrun():
    """examples/train_ddp.py as the README launches it (2 CPU ranks, one epoch): it
    trains, synchronised, to a useful held-out accuracy."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(root / "examples" / "train_ddp.py"), "--epochs", "1", "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    match = re.search(r"2 ranks: held-out accuracy ([\d.]+)%", proc.stdout)
    assert match, proc.stdout[-2000:]
    assert float(match.group(1)) > 75.0, proc.stdout[-2000:]


def test_to_torchvision_leaves_the_fused_block_alone():
    """A synchronised fused block's to_torchvision() gives nn.SyncBatchNorm layers
    (sharing parameters and buffers) without changing the fused block's own modules."""
    fused = resnet_fused.convert(_build("block"), backend="cpu", sync_bn=True)
    before = {name: type(m) for name, m in fused.named_modules()}
    plain = fused.to_torchvision()
    assert {name: type(m) for name, m in fused.named_modules()} == before
    bns = {n: m for n, m in plain.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert sorted(bns) == ["bn1", "bn2", "bn3", "downsample.1"]
    assert all(type(m) is nn.SyncBatchNorm for m in bns.values())
    assert plain.bn1.weight is fused.bn1.weight and plain.bn1.running_mean is fused.bn1.running_mean
    assert plain.downsample[0] is fused.downsample[0]
    assert plain.downsample[1].weight is fused.downsample[1].weight


def test_gather_merge_counts_exact_beyond_fp32():
    """Per-rank counts above 2^24 (8 ranks x 256 images at 112^2 exceed it) merge exactly:
    the total count, and mean/var as the fp64 merge of the same (rounded) local stats."""
    import resnet_fused.distributed as rd

    counts = [2**24 + 1, 2**24 + 2, 3]
    means = torch.tensor([[0.25, -1.0], [1.0, 2.0], [7.0, 0.5]], dtype=torch.float32)
    variances = torch.tensor([[1.0, 0.5], [2.0, 0.25], [0.0, 3.0]], dtype=torch.float32)
    gathered = torch.stack(
        [rd.local_stats(m, v, c) for m, v, c in zip(means, variances, counts, strict=True)]
    )
    mean_g, var_g, total = rd.merge_rank_stats(gathered, torch.float32)
    assert mean_g.dtype == torch.float32 and var_g.dtype == torch.float32
    assert total.tolist() == [float(sum(counts))] * 2  # 2^25 + 6: not an fp32 number
    n = torch.tensor(counts, dtype=torch.float64)[:, None]
    m64, v64 = means.double(), variances.double()
    mean_ref = (n * m64).sum(0) / n.sum()
    var_ref = ((n * v64).sum(0) + (n * (m64 - mean_ref) ** 2).sum(0)) / n.sum()
    torch.testing.assert_close(mean_g, mean_ref.float(), rtol=0, atol=0)
    torch.testing.assert_close(var_g, var_ref.float(), rtol=0, atol=0)
