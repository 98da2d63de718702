"""Per-channel counts of the Triton statistics merges stay exact beyond 2^24 values per
channel. Synthetic partials: one split/tile of 3*2^24 values at mean 0, then many small
ones of 1 or 2 values at mean 1, so that the running count is not an fp32 number (fp32
counts round at each merge: the merged mean and var then drift by ~2e-6 relative; with
exact counts they are within a few fp32 ulps of the fp64 merge)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from resnet_fused.triton import bn_stats, conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BIG = 3 * 2**24
SMALLS = ([2] * 63 + [1]) * 3  # odd sums per block of 16/32/64 partials


def _exact(counts: list[int], means: list[float]) -> tuple[float, float, int]:
    """fp64 mean and biased var of groups of values all equal to their group mean."""
    n = torch.tensor(counts, dtype=torch.float64)
    mu = torch.tensor(means, dtype=torch.float64)
    total = n.sum()
    mean = (n * mu).sum() / total
    var = (n * (mu - mean) ** 2).sum() / total
    return mean.item(), var.item(), int(total.item())


def _check(mean, var, rm, rv, momentum, ref_mean, ref_var, m):
    # fp32 results of an fp64-exact merge: a few ulps (measured <= 2.5e-7) of rounding, not
    # the 1.4e-6 .. 2.7e-6 relative error that fp32 counts give here.
    tol = dict(rtol=6e-7, atol=0)
    torch.testing.assert_close(
        mean.double().cpu(), torch.full((2,), ref_mean, dtype=torch.float64), **tol
    )
    torch.testing.assert_close(
        var.double().cpu(), torch.full((2,), ref_var, dtype=torch.float64), **tol
    )
    torch.testing.assert_close(
        rm.double().cpu(), torch.full((2,), momentum * ref_mean, dtype=torch.float64), **tol
    )
    unbiased = momentum * ref_var * m / (m - 1)
    torch.testing.assert_close(
        rv.double().cpu(), torch.full((2,), unbiased, dtype=torch.float64), **tol
    )


def test_bn_stats_merge_counts_beyond_fp32():
    counts_l = [BIG, *SMALLS]
    means_l = [0.0] + [1.0] * len(SMALLS)
    ref_mean, ref_var, m = _exact(counts_l, means_l)
    C = 2
    counts = torch.tensor(counts_l, dtype=torch.int64, device=DEVICE)[:, None].expand(-1, C)
    mu = torch.tensor(means_l, dtype=torch.float32, device=DEVICE)[:, None].expand(-1, C)
    part = torch.stack([mu, torch.zeros_like(mu), counts.float() * mu])  # mean-piv, M2, sum
    x = torch.zeros(C, device=DEVICE)  # pivot 0 at stride 1
    rm = torch.zeros(C, device=DEVICE)
    rv = torch.zeros(C, device=DEVICE)
    mean, var = bn_stats.merge_partials(
        counts.contiguous(), part.contiguous(), x, 1, m, rm, rv, 0.5
    )
    _check(mean, var, rm, rv, 0.5, ref_mean, ref_var, m)


# two_pass: the tiles merged in splits of 16 first (int64 counts in the intermediate).
@pytest.mark.parametrize("tiles_per_prog", [256, 16], ids=["one_pass", "two_pass"])
def test_conv_finalize_counts_beyond_fp32(monkeypatch, tiles_per_prog):
    monkeypatch.setattr(conv, "_MERGE_TILES_PER_PROG", tiles_per_prog)
    counts_l = [BIG, *SMALLS]
    means_l = [0.0] + [1.0] * len(SMALLS)
    ref_mean, ref_var, m = _exact(counts_l, means_l)
    C = 2
    n = torch.tensor(counts_l, dtype=torch.float32, device=DEVICE)[:, None].expand(-1, C)
    mu = torch.tensor(means_l, dtype=torch.float32, device=DEVICE)[:, None].expand(-1, C)
    partials = torch.stack([n, mu, torch.zeros_like(mu)]).contiguous()  # count, mean, M2
    rm = torch.zeros(C, device=DEVICE)
    rv = torch.zeros(C, device=DEVICE)
    mean, var = conv.finalize_stats(partials, rm, rv, 0.5)
    _check(mean, var, rm, rv, 0.5, ref_mean, ref_var, m)
