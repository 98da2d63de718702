"""The bench harness: interleaved rounds, per-round ratios, the check before timing,
and the suite's verdicts (one run's rows, the default provider only)."""

from __future__ import annotations

import pytest
import torch

from resnet_fused import backends
from resnet_fused.bench import goals, harness

CPU = torch.device("cpu")


def test_rounds_alternate_the_providers_and_rotate_their_order():
    order = []

    def timer(step, calls):
        order.append(step())
        return 1.0

    steps = {"eager": lambda: "eager", "a": lambda: "a", "b": lambda: "b"}
    per_round = harness.interleave(steps, CPU, min_run_time=1.0, rounds=3, timer=timer)
    timed = order[2 * len(steps) :]  # after two estimate calls per provider
    assert timed == ["eager", "a", "b", "a", "b", "eager", "b", "eager", "a"]
    assert {k: len(v) for k, v in per_round.items()} == {"eager": 3, "a": 3, "b": 3}


def test_drift_does_not_become_a_ratio():
    """Two providers of equal cost on a machine that slows down steadily: timed one
    after the other the second would look slower by the drift; interleaved, every
    per-round ratio stays near 1 and their spread is reported."""
    clock = {"t": 0}

    def timer(step, calls):  # each block costs 1 unit, times the machine's slowdown
        clock["t"] += 1
        return 1.0 + 0.05 * clock["t"]

    stats = harness.measure_case(
        {"eager": lambda: torch.ones(3), "fused": lambda: torch.ones(3)}, CPU, 1.0,
        baseline="eager", rounds=9, timer=timer,
    )  # fmt: skip
    med, lo, hi = stats["fused"].ratio(stats["eager"])
    assert 0.95 < lo <= med <= hi < 1.06, (lo, med, hi)
    cols = harness.ratio_columns("speedup_vs_eager", stats["fused"], stats["eager"])
    assert cols["speedup_vs_eager_min"] <= cols["speedup_vs_eager"] <= cols["speedup_vs_eager_max"]


def test_a_provider_computing_something_else_is_refused_before_timing():
    timed = []

    def timer(step, calls):
        timed.append(step)
        return 1.0

    steps = {"eager": lambda: torch.ones(4), "fused": lambda: torch.ones(4) * 1.5,
             "conv": lambda: torch.zeros(4)}  # fmt: skip
    with pytest.raises(harness.MismatchError, match="'fused' differs from 'eager'"):
        harness.measure_case(steps, CPU, 1.0, baseline="eager", unchecked=("conv",),
                             timer=timer)  # fmt: skip
    assert not timed
    steps["fused"] = lambda: torch.ones(4) * (1 + 1e-5)
    stats = harness.measure_case(steps, CPU, 1.0, baseline="eager", unchecked=("conv",),
                                 timer=timer, rounds=3)  # fmt: skip
    assert stats["conv"].rel_diff is None and 0 < stats["fused"].rel_diff < 1e-4


def test_the_fp64_reference_arbitrates_a_baseline_off_at_a_kink():
    """A per-channel sum where the baseline's rounding put one pre-activation on the
    other side of a kink: the baseline is off by a whole term, the fused step agrees
    with the fp64 reference and is accepted; a step off from both is still refused."""
    exact = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64)
    baseline_off = (exact + torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64)).float()
    steps = {"eager": lambda: baseline_off, "fused": lambda: exact.float()}
    timer = lambda step, calls: 1.0  # noqa: E731
    with pytest.raises(harness.MismatchError, match="differs from 'eager'"):
        harness.measure_case(steps, CPU, 1.0, baseline="eager", rounds=1, timer=timer)
    calls = []
    reference = lambda: calls.append(1) or exact  # noqa: E731
    stats = harness.measure_case(steps, CPU, 1.0, baseline="eager", rounds=1, timer=timer,
                                 reference=reference)  # fmt: skip
    assert stats["fused"].rel_diff > 1e-3  # reported against the baseline, as before
    assert len(calls) == 1
    # Not computed where every step agrees with the baseline.
    harness.measure_case({"eager": lambda: exact.float(), "fused": lambda: exact.float()}, CPU,
                         1.0, baseline="eager", rounds=1, timer=timer, reference=reference)  # fmt: skip
    assert len(calls) == 1
    steps["fused"] = lambda: (exact * 1.01).float()
    with pytest.raises(harness.MismatchError, match="from the fp64 reference by"):
        harness.measure_case(steps, CPU, 1.0, baseline="eager", rounds=1, timer=timer,
                             reference=lambda: exact)  # fmt: skip


def test_op_bench_reference_is_eager_in_fp64_on_the_first_set():
    from resnet_fused.bench import op

    case = op.Case("bn_relu6", (2, 3, 4, 5), "channels_last", "train forward+backward",
                   torch.float32)  # fmt: skip
    (x, r, rm, rv, w, b), g = op._inputs(case, CPU, True)
    ref = op._fp64_reference(case, True, (x, r, rm, rv, w, b, g))()
    assert all(t.dtype == torch.float64 for t in ref)
    assert ref[0].is_contiguous(memory_format=torch.channels_last)
    x64 = x.detach().double().requires_grad_()
    out = torch.nn.functional.relu6(
        torch.nn.functional.batch_norm(
            x64, None, None, w.detach().double(), b.detach().double(), True
        )
    )
    (gx,) = torch.autograd.grad(out, x64, g.double())
    torch.testing.assert_close(ref[0], gx)


def test_steps_drawing_random_numbers_are_checked_on_the_same_draws():
    """A model with dropout in training draws random masks: each provider's checked
    first step starts from one seed (else every such model was refused as differing),
    and the caller's random stream is left as it was."""
    drop = torch.nn.Dropout(0.5).train()
    x = torch.ones(64)
    steps = {"eager": lambda: drop(x), "fused": lambda: drop(x.clone())}
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    stats = harness.measure_case(steps, CPU, 1.0, baseline="eager", rounds=1,
                                 timer=lambda step, calls: 1.0)  # fmt: skip
    assert stats["fused"].rel_diff == 0
    torch.testing.assert_close(torch.rand(4), expected_next)


def _op_rows(provider_ms: dict[str, float], dtype="float32", batch_shape="8x256x56x56"):
    rows = []
    for p, ms in provider_ms.items():
        ratio = provider_ms["eager"] / ms
        rows.append({"device": "x", "op": "bn_add_relu", "shape": batch_shape, "dtype": dtype,
                     "layout": "channels_last", "mode": "train forward+backward",
                     "provider": p, "median_ms": ms, "speedup_vs_eager": round(ratio, 3),
                     "speedup_vs_eager_min": round(ratio, 3),
                     "speedup_vs_eager_max": round(ratio, 3)})  # fmt: skip
    return rows


def _verdict(text: str, measure: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if measure in ln)
    return [c.strip() for c in line.strip("|").split("|")]


def test_suite_verdict_comes_from_the_default_provider_of_this_run(monkeypatch):
    monkeypatch.setattr(backends, "auto_backend", lambda device: ("cpu", None))
    measure = "BN+add+ReLU train forward+backward"  # goal 1.5x
    # triton (not what auto runs) would meet the goal; cpu (auto's backend) does not.
    rows = _op_rows({"eager": 3.0, "cpu": 2.5, "triton": 1.5})
    cells = _verdict(goals.report({"op": rows}, "t", CPU), measure)
    assert cells[3:] == ["1.20×", "cpu", "1", "missed"], cells


def test_suite_verdict_never_pairs_rows_of_different_cases(monkeypatch):
    """An fp32 eager row and a bf16 fused row (or another batch) are different cases."""
    monkeypatch.setattr(backends, "auto_backend", lambda device: ("cpu", None))
    measure = "BN+add+ReLU train forward+backward"
    rows = [r for r in _op_rows({"eager": 3.0, "cpu": 1.0}) if r["provider"] == "eager"]
    rows += [r for r in _op_rows({"eager": 9.0, "cpu": 1.0}, dtype="bfloat16")
             if r["provider"] == "cpu"]  # fmt: skip
    rows += [r for r in _op_rows({"eager": 9.0, "cpu": 1.0}, batch_shape="2x256x56x56")
             if r["provider"] == "cpu"]  # fmt: skip
    cells = _verdict(goals.report({"op": rows}, "t", CPU), measure)
    assert cells[3:] == ["-", "cpu", "0", "not measured"], cells


def test_ratio_table_agrees_with_the_rows():
    """The headline geomean takes each row's own per-round ratio (the median of the
    per-round ratios that the rows print), not the ratio of the median times, which can
    differ: here 1.25 and 0.8 per round against 10/9 from the medians."""
    from resnet_fused.bench import report

    rows = [
        {"model": "m", "mode": "train", "provider": "eager", "median_ms": "10",
         "speedup_vs_eager_cl": "1.0"},
        {"model": "m", "mode": "train", "provider": "fused", "median_ms": "9",
         "speedup_vs_eager_cl": "1.25"},
        {"model": "m", "mode": "eval", "provider": "eager", "median_ms": "4",
         "speedup_vs_eager_cl": "1.0"},
        {"model": "m", "mode": "eval", "provider": "fused", "median_ms": "5",
         "speedup_vs_eager_cl": "0.8"},
        {"model": "m", "mode": "old", "provider": "eager", "median_ms": "4"},
        {"model": "m", "mode": "old", "provider": "fused", "median_ms": "2"},
    ]  # fmt: skip
    table = report.ratio_table(rows, ("model", "mode"), ["eager", "fused"])
    assert "| m | train | 1.25× |" in table
    assert "| m | eval | 0.80× |" in table
    assert "| m | old | 2.00× |" in table  # no per-round column: the medians' ratio


def test_twice_the_baseline_error_rule_against_the_fp64_reference():
    """``twice_baseline_error``: a step far from an inaccurate baseline is accepted when
    it is no farther from the fp64 reference than twice the baseline is (plus the
    tolerance), and refused beyond that."""
    exact = torch.linspace(1.0, 2.0, 100, dtype=torch.float64)
    noise = torch.sin(torch.arange(100, dtype=torch.float64))
    baseline = (exact + 0.2 * noise).float()  # 9% off, as eager's bf16 at a tiny batch
    timer = lambda step, calls: 1.0  # noqa: E731
    for scale, ok in ((-0.3, True), (0.5, False)):
        steps = {"eager": lambda: baseline, "fused": lambda s=scale: (exact + s * noise).float()}
        run = lambda steps=steps: harness.measure_case(  # noqa: E731
            steps, CPU, 1.0, baseline="eager", rounds=1, timer=timer, tolerance=1e-2,
            reference=lambda: exact, twice_baseline_error=True,
        )  # fmt: skip
        if ok:
            assert run()["fused"].rel_diff > 0.2  # (from the baseline, as reported)
        else:
            with pytest.raises(harness.MismatchError, match="from the fp64 reference by"):
                run()
    with pytest.raises(harness.MismatchError):  # (the plain rule refuses the first)
        harness.measure_case(
            {"eager": lambda: baseline, "fused": lambda: (exact - 0.3 * noise).float()}, CPU,
            1.0, baseline="eager", rounds=1, timer=timer, tolerance=1e-2,
            reference=lambda: exact,
        )  # fmt: skip
