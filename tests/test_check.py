"""``resnet-fused check`` counts only fused backends: the "torch" backend is the
reference's own code, so comparing it with the reference checks nothing."""

from __future__ import annotations

import io
import re

import torch

from resnet_fused import check
from resnet_fused.backends import CONCRETE_BACKENDS, is_available


def test_check_reports_torch_as_the_reference_not_a_pass():
    out = io.StringIO()
    rc = check.run_check(["cpu"], out=out)
    lines = out.getvalue().splitlines()
    case_lines = [ln for ln in lines if re.search(r" (ok|MISMATCH.*)$", ln)]
    assert not [ln for ln in case_lines if ln.split()[1] == "torch"], case_lines
    assert any("torch" in ln and "the reference" in ln for ln in lines), lines
    counted = {ln.split()[1] for ln in case_lines}
    fused_here = {b for b in CONCRETE_BACKENDS if b != "torch" and is_available(b, "cpu")}
    assert counted <= fused_here
    if counted:
        total = int(re.search(r"check: \d+/(\d+) cases", lines[-1]).group(1))
        assert total == len(case_lines) and rc == 0
    else:  # nothing fused to check here: the check must not pass
        assert rc == 1 and "nothing was checked" in lines[-1]


def test_check_with_only_the_reference_fails(monkeypatch):
    """With no fused backend usable the old check still printed "N/N cases match"."""
    monkeypatch.setattr(check, "is_available", lambda backend, device: backend == "torch")
    out = io.StringIO()
    assert check.run_check(["cpu"], out=out) == 1
    assert "nothing was checked" in out.getvalue()
    assert torch.backends.cudnn.allow_tf32 is not None  # settings restored, not left off
