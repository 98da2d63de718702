"""The benchmark command runs end to end and writes its reports."""

from __future__ import annotations

import csv

import pytest

import resnet_fused
from resnet_fused.__main__ import main


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_bench_writes_csv_and_summary(tmp_path, capsys):
    rc = main(
        [
            "bench",
            "--device",
            "cpu",
            "--quick",
            "--ops",
            "add_relu,bn_add_relu",
            "--layouts",
            "nchw",
            "--batch",
            "1",
            "--providers",
            "eager,cpu",
            "--min-run-time",
            "0.01",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    csvs = list(tmp_path.glob("op_*.csv"))
    mds = list(tmp_path.glob("op_*.md"))
    assert len(csvs) == 1 and len(mds) == 1
    rows = list(csv.DictReader(csvs[0].open()))
    for column in (
        "device",
        "torch",
        "date",
        "op",
        "shape",
        "layout",
        "mode",
        "provider",
        "median_ms",
        "gbps",
        "fraction_of_copy",
        "speedup_vs_eager",
        "saved_mb",
    ):
        assert column in rows[0], column
    assert {r["provider"] for r in rows} == {"eager", "cpu"}
    assert {r["op"] for r in rows} == {"add_relu", "bn_add_relu"}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    text = mds[0].read_text()
    assert "Geometric-mean speed-up against eager" in text and "bn_add_relu" in text


def test_bench_rejects_unknown_provider(capsys):
    assert main(["bench", "--device", "cpu", "--providers", "cudnn", "--out", "/nonexistent"]) == 2
    assert "not available here" in capsys.readouterr().err
