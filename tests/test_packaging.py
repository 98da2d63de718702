"""The package metadata builds without setuptools' deprecation warnings."""

from __future__ import annotations

import pathlib
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pyproject_license_is_an_spdx_string_without_warnings():
    pyprojecttoml = pytest.importorskip("setuptools.config.pyprojecttoml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = pyprojecttoml.apply_configuration(
            __import__("setuptools").dist.Distribution(), str(ROOT / "pyproject.toml")
        )
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "license" in m.lower()], messages
    assert dist.metadata.license_expression == "BSD-3-Clause"
