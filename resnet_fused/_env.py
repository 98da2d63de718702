"""Environment variables read on the hot path."""

from __future__ import annotations

import os

# os.environ.get encodes the name and decodes the value on every call (about 0.7 us, as
# much as the rest of a fused unit's signature); the mapping behind it holds the encoded
# names, kept in step by os.environ's setters (monkeypatch.setenv, os.environ[...] = ...).
_DATA = getattr(os.environ, "_data", None)
_ENCODED: dict[str, object] = {}


def read_env(name: str) -> object:
    """The value of ``name`` as a cheap, comparable token (None when unset). For
    comparisons only (a plan's signature): parse the value with ``os.environ``."""
    if _DATA is None:
        return os.environ.get(name)
    key = _ENCODED.get(name)
    if key is None:
        key = _ENCODED[name] = os.environ.encodekey(name)
    return _DATA.get(key)


def env_mapping() -> dict | None:
    """os.environ's mapping of encoded names to encoded values, which :func:`read_env`
    reads (None where os.environ has none: then read_env asks os.environ)."""
    return _DATA


def encoded_name(name: str) -> object:
    """``name`` as a key of :func:`env_mapping`."""
    return os.environ.encodekey(name)
