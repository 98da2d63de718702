"""The supported-models table (benchmarks/supported_models.py): its per-model row agrees
with counts made here independently of the converter's report, and its writers produce
every column."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import pathlib
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("timm")  # a test dependency (Makefile DEPS, pyproject extras)

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "supported_models.py"
MODELS = ["tv:mobilenet_v3_small", "timm:regnety_002"]
# 64x64: at 32x32 these models' last BatchNorms normalise 2 values per channel (batch 2,
# 1x1), whose training output amplifies fp64 rounding of the convolutions to ~1e-7.
SIZE = 64


def _load_script():
    spec = importlib.util.spec_from_file_location("supported_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sm = _load_script()


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    return {key: sm.measure(key, size=SIZE) for key in MODELS}


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# Activations the fused kernels do not apply (ReLU, ReLU6, LeakyReLU, SiLU, Hardswish, GELU
# and Sigmoid are fused with the BatchNorm they follow).
_UNFUSED_ACTS = (nn.Hardsigmoid, nn.Mish, nn.ELU, nn.Tanh, nn.PReLU)


def _bn_then_unfused_activation(model: nn.Module) -> int:
    """BatchNorms followed by an activation the kernels do not apply, from the module
    tree: a Sequential's consecutive (BatchNorm, activation) children, and timm's
    norm-act layers (a BatchNorm carrying its own ``act``)."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            kids = list(m.children())
            count += sum(
                isinstance(a, nn.modules.batchnorm._BatchNorm) and isinstance(b, _UNFUSED_ACTS)
                for a, b in itertools.pairwise(kids)
            )
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(
            getattr(m, "act", None), _UNFUSED_ACTS
        ):
            count += 1
    return count


@pytest.mark.parametrize("key", MODELS)
def test_row_agrees_with_independent_counts(rows, key):
    row = rows[key]
    model = sm.build(sm.spec_for(key))
    n_bn = len(_batchnorms(model))
    assert n_bn > 0
    assert row["input"] == f"2x3x{SIZE}x{SIZE}"
    assert row["batchnorms"] == n_bn
    # These models' BatchNorms all follow a convolution: every one is fused, and none
    # is left for PyTorch's batch_norm in either mode.
    assert row["bn_fused"] == n_bn
    assert row["fused_sites"] > 0
    kinds = dict(k.split(" ×") for k in row["site_kinds"].split(", "))
    assert sum(int(n) for n in kinds.values()) == row["fused_sites"]
    assert row["eager_bn_ops_train"] == 0
    assert row["eager_bn_ops_eval"] == 0
    assert row["act_not_fused"] == _bn_then_unfused_activation(model)
    assert row["other_not_fused"] == 0
    assert row["max_diff_eval"] < 1e-9
    assert row["max_diff_train"] < 1e-9
    assert 0 <= row["rel_diff_eval"] < 1e-9 and 0 <= row["rel_diff_train"] < 1e-9
    assert not row["error"]


def test_the_op_count_sees_eager_batch_norm():
    """The unconverted model dispatches at least one batch_norm op per BatchNorm in each
    mode: a zero for the converted model means the count would have seen one."""
    model = sm.build(sm.spec_for("timm:regnety_002"))
    x = torch.randn(2, 3, SIZE, SIZE)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            _, ops = sm.counted_forward(model, x)
        assert ops >= len(_batchnorms(model)), training


def test_fused_batchnorms_reads_site_paths():
    fused = [
        "layer1.0",  # a torchvision block fused whole
        "conv1, bn1, relu (conv-bn-relu)",
        "blocks.0.conv_pw, blocks.0.bn2 (conv-bn)",
    ]
    bns = ["bn1", "layer1.0.bn1", "layer1.0.downsample.1", "layer1.00.bn1", "blocks.0.bn1",
           "blocks.0.bn2", "layer2.0.bn1"]  # fmt: skip
    assert [sm.site_kind(e) for e in fused] == ["block", "conv-bn-relu", "conv-bn"]
    assert sm.fused_batchnorms(bns, fused) == [
        "bn1",
        "layer1.0.bn1",
        "layer1.0.downsample.1",
        "blocks.0.bn2",
    ]


def test_writers_produce_every_column(rows, tmp_path):
    measured = list(rows.values())
    failed = sm.failed_row(sm.spec_for("timm:resnet18"), RuntimeError("did not build"))
    sm.write_markdown([*measured, failed], tmp_path / "t.md", "python x.py", "today")
    sm.write_csv([*measured, failed], tmp_path / "t.csv", "today")
    text = (tmp_path / "t.md").read_text()
    header = "| " + " | ".join(title for _, title in sm.COLUMNS) + " |"
    assert header in text
    assert "python x.py" in text and "not written by hand" in text
    for row in measured:
        line = next(x for x in text.splitlines() if x.startswith(f"| {row['source']} | "
                                                                 f"{row['model']} |"))  # fmt: skip
        assert line.count("|") == len(sm.COLUMNS) + 1
    assert "timm resnet18: RuntimeError: did not build" in text
    with open(tmp_path / "t.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == [r["model"] for r in measured] + ["resnet18"]
    for key, _ in sm.COLUMNS:
        assert key in table[0]
        assert table[0][key] == str(measured[0][key])
