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

SIZES = [3, 2]  # images per rank: uneven on purpose


def _build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "block":
        down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        model = Bottleneck(16, 8, 2, down)
    else:
        model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model


def _data(kind: str):
    g = torch.Generator().manual_seed(1)
    shape = (sum(SIZES), 16, 8, 8) if kind == "block" else (sum(SIZES), 3, 32, 32)
    x = torch.randn(shape, generator=g)
    out_shape = (sum(SIZES), 32, 4, 4) if kind == "block" else (sum(SIZES), 10)
    return x, torch.randn(out_shape, generator=g)


def _running_stats(model):
    return [
        t.clone()
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
        for t in (m.running_mean, m.running_var)
    ]


def _worker(rank: int, world: int, init_file: str, kind: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = resnet_fused.convert(_build(kind), backend="cpu", sync_bn=True)
        ddp = nn.parallel.DistributedDataParallel(model)
        x, w = _data(kind)
        lo = sum(SIZES[:rank])
        xs, ws = x[lo : lo + SIZES[rank]], w[lo : lo + SIZES[rank]]
        for _ in range(2):  # two steps: statistics and gradients both move
            ddp.zero_grad(set_to_none=True)
            out = ddp(xs)
            (out * ws).sum().backward()
        result = {
            "out": out.detach(),
            "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
            "stats": _running_stats(model),
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_ranks(kind: str, tmp_path, timeout: float = 240.0) -> list[dict]:
    init_file = str(tmp_path / "init")
    ctx = mp.start_processes(
        _worker, args=(len(SIZES), init_file, kind, str(tmp_path)), nprocs=len(SIZES),
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
@pytest.mark.parametrize("kind", ["block", "resnet18"])
def test_sync_bn_ddp_matches_single_process(kind, tmp_path):
    results = _run_ranks(kind, tmp_path)

    reference = _build(kind)  # unfused torchvision, one process, the whole batch
    reference.train()
    x, w = _data(kind)
    for _ in range(2):
        reference.zero_grad(set_to_none=True)
        out = reference(x)
        (out * w).sum().backward()
    # DDP averages gradients over ranks; the single process sums over the whole batch.
    world = len(SIZES)
    lo = 0
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["out"], out[lo : lo + SIZES[rank]], rtol=1e-4, atol=1e-4)
        lo += SIZES[rank]
        errs = {
            k: ((res["grads"][k] * world - p.grad).norm() / p.grad.norm()).item()
            for k, p in reference.named_parameters()
        }
        worst = sorted(errs.items(), key=lambda kv: -kv[1])[:4]
        assert worst[0][1] < 1e-3, f"relative gradient errors: {worst}"
        for a, b in zip(res["stats"], _running_stats(reference), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sync_bn_without_process_group_warns_and_is_local():
    model = resnet_fused.convert(_build("block"), backend="cpu", sync_bn=True)
    plain = _build("block")
    x, _ = _data("block")
    with pytest.warns(UserWarning, match="torch.distributed is not initialised"):
        import resnet_fused.distributed as rd

        rd._warned = False
        out = model(x)
    torch.testing.assert_close(out, plain(x), rtol=1e-4, atol=1e-4)
