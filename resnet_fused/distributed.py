"""Synchronised BatchNorm statistics over a torch.distributed process group.

The fused BatchNorm path stays fused around the communication: the local statistics
kernel, then one ``all_gather`` of (count, mean, var) per channel merged in rank order
(count-weighted, so ranks with different batch sizes combine exactly), then the fused
apply. The backward all-reduces the two per-channel sums the input gradient needs.
Plain ``torch.distributed`` (gloo, NCCL, ...); no ``nn.SyncBatchNorm`` at run time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

_warned = False


@dataclass
class SyncInfo:
    """What the backward needs: the group, and local count / global count per channel."""

    group: object
    scale: Tensor


def sync_group(process_group, sync: bool):
    """The group to synchronise over; None (local statistics) when ``sync`` is off, or,
    with a warning, when torch.distributed is not initialised (as a single process)."""
    global _warned
    if not sync:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if not _warned:
            warnings.warn(
                "synchronised BatchNorm requested but torch.distributed is not initialised: "
                "using this process's batch statistics",
                stacklevel=3,
            )
            _warned = True
        return None
    return process_group if process_group is not None else dist.group.WORLD


def gather_stats(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, Tensor]:
    """Global (mean, biased var, total count) from every rank's local ones; deterministic
    (merged in rank order) and exact for uneven per-rank counts. The total is a float64
    tensor (exact: counts are integers far below 2^53)."""
    import torch.distributed as dist

    local = local_stats(mean, var, count)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return merge_rank_stats(torch.stack(gathered), mean.dtype)


def local_stats(mean: Tensor, var: Tensor, count: int) -> Tensor:
    """What one rank contributes to the gather: [3, C] float64 = (count, mean, biased var).
    float64, so that counts stay exact beyond 2^24 values per channel (fp32 would round
    them) and the merge is done in float64."""
    f64 = torch.float64
    return torch.stack([torch.full_like(mean, float(count), dtype=f64), mean.to(f64), var.to(f64)])


def merge_rank_stats(gathered: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var) in ``dtype`` and the float64 total count per channel from the
    gathered [ranks, 3, C] float64 local statistics, merged in rank order."""
    n, mean, var = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    mu = torch.where(n > 0, mean, torch.zeros_like(mean))
    v = torch.where(n > 0, var, torch.zeros_like(var))
    total = n.sum(0)
    mean_g = (n * mu).sum(0) / total
    var_g = ((n * v).sum(0) + (n * (mu - mean_g) ** 2).sum(0)) / total
    return mean_g.to(dtype), var_g.to(dtype), total


def synchronise(kernels, input: Tensor, running_mean, running_var, momentum: float, group):
    """Local statistics of ``input`` (no running update), gathered over ``group``; updates
    the running statistics with the global ones. Returns (mean, var, SyncInfo)."""
    mean, var = kernels.stats(input.detach(), None, None, float(momentum))
    return finish_sync(mean, var, input.numel() // input.shape[1], running_mean, running_var,
                       momentum, group)  # fmt: skip


def finish_sync(mean, var, count, running_mean, running_var, momentum, group):
    from .reference import update_running_stats

    mean_g, var_g, total = gather_stats(mean, var, count, group)
    update_running_stats(running_mean, running_var, mean_g, var_g, total, momentum)
    return mean_g, var_g, SyncInfo(group, count / total)


def all_reduce_sums(sum_dy: Tensor, sum_dy_xhat: Tensor, info: SyncInfo):
    """(Σg, Σg·x̂) over the group, scaled by local/global count: the elementwise kernel
    divides by the local count, so this gives the global means it needs."""
    import torch.distributed as dist

    both = torch.stack([sum_dy, sum_dy_xhat])
    dist.all_reduce(both, group=info.group)
    both = both * info.scale.to(both.dtype)
    return both[0], both[1]
