"""Data-parallel training with synchronised fused BatchNorm.

Launch with torchrun; on CPU it uses gloo (PyTorch's nn.SyncBatchNorm cannot run there),
on GPUs NCCL:

    torchrun --nproc-per-node 2 examples/train_ddp.py [--epochs 3] [--backend auto]

Each rank trains on its shard of scikit-learn's digits (the model of
examples/train_digits.py), converted with ``resnet_fused.convert(model, sync_bn=True)``
so that BatchNorm uses the statistics of the whole global batch, and wrapped in
DistributedDataParallel. Rank 0 prints the loss and the held-out accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import resnet_fused

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import accuracy, load_data, make_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--backend", default="auto", help="resnet_fused backend")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="auto: a GPU per rank when there are GPUs, else CPU",
    )  # fmt: skip
    args = parser.parse_args(argv)

    if "RANK" not in os.environ:
        parser.error("launch with torchrun, e.g. torchrun --nproc-per-node 2 " + sys.argv[0])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and local_rank >= torch.cuda.device_count():
        parser.error(
            f"local rank {local_rank} needs a GPU of its own, but this machine has "
            f"{torch.cuda.device_count()}: use --nproc-per-node {torch.cuda.device_count()} "
            "or --device cpu"
        )
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    try:
        x_train, y_train, x_test, y_test = load_data()
        model = resnet_fused.convert(make_model(), backend=args.backend, sync_bn=True)
        model = model.to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if use_cuda else None
        )
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(0)  # the same order on every rank
        step = 0
        for epoch in range(args.epochs):
            order = torch.randperm(len(x_train), generator=gen)
            global_batch = args.batch_size * world
            for i in range(0, len(order), global_batch):
                idx = order[i : i + global_batch][rank::world]  # this rank's share
                if len(idx) == 0:
                    continue
                xb, yb = x_train[idx].to(device), y_train[idx].to(device)
                loss = F.cross_entropy(ddp(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if rank == 0 and step % 10 == 0:
                    print(f"epoch {epoch} step {step}: loss {loss.item():.4f}", flush=True)
        if rank == 0:
            acc = accuracy(model, x_test.to(device), y_test.to(device))
            print(f"{world} ranks: held-out accuracy {100 * acc:.2f}%")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
