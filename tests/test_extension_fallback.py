"""When the compiled extension fails to import, ``backend="auto"`` runs the reference:
that must be said (a warning once, ``info``), and the benchmark must not time the
reference under a "fused" name. The failed import is simulated on the loaded module."""

from __future__ import annotations

import warnings

import pytest
import torch

import resnet_fused
from resnet_fused import _extension, backends
from resnet_fused.__main__ import main
from resnet_fused.info import format_info, info

ERROR = "libc10.so: undefined symbol _ZN3c10simulated"


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "IMPORT_ERROR", ImportError(ERROR))
    monkeypatch.setattr(_extension, "_BUILD_INFO", {"loaded": False, "error": ERROR})
    monkeypatch.setattr(backends, "_WARNED_FALLBACK", False, raising=False)


def test_auto_fallback_warns_once_naming_the_error_and_the_fix(no_extension):
    x, r = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    with pytest.warns(RuntimeWarning, match="did not import") as caught:
        out = resnet_fused.add_relu(x, r)  # backend="auto"
    torch.testing.assert_close(out, torch.relu(x + r))
    (w,) = caught
    assert w.category is backends.ReferenceFallbackWarning
    text = str(w.message)
    assert ERROR in text and "pip install --no-build-isolation -e ." in text
    assert '"torch"' in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resnet_fused.add_relu(x, r)  # once per process
    assert resnet_fused.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_no_warning_when_the_extension_is_only_absent_for_the_device(monkeypatch):
    """An explicit backend never warns; a reference run that is not a fallback (e.g. a
    device with no compiled kernels) neither."""
    monkeypatch.setattr(backends, "_WARNED_FALLBACK", False, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resnet_fused.resolve_backend("torch", torch.device("cpu")) == "torch"
        assert resnet_fused.resolve_backend("auto", torch.device("meta")) == "torch"


def test_info_says_why_auto_runs_the_reference(no_extension):
    report = info()
    assert report["auto"]["cpu"]["backend"] == "torch"
    assert ERROR in report["auto"]["cpu"]["fallback"]
    text = format_info(report)
    assert "auto -> torch" in text and ERROR in text


@pytest.mark.parametrize(
    "level_args",
    [
        ["--level", "block", "--blocks", "r18.layer3"],
        ["--level", "model", "--model", "resnet18", "--image-size", "32", "--mode", "eval"],
        ["--level", "block", "--blocks", "r18.layer3", "--providers", "eager,fused"],
    ],
)
def test_bench_refuses_to_time_the_reference_as_fused(no_extension, tmp_path, capsys,
                                                      level_args):  # fmt: skip
    rc = main(["bench", "--device", "cpu", "--batch", "1", "--min-run-time", "0.01",
               "--out", str(tmp_path), *level_args])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "'fused'" in err and "reference" in err and ERROR in err
    assert not list(tmp_path.glob("*.csv"))  # nothing was timed
