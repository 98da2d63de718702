"""``backend="auto"``'s tuning table: the picks of :mod:`.auto_choice` kept on disk, so
that a new process on the same machine uses them instead of timing every shape again.

Where: ``$RESNET_FUSED_CACHE_DIR`` (an empty value turns the table off), else
``$XDG_CACHE_HOME/resnet_fused``, else ``~/.cache/resnet_fused``. Under pytest
(``PYTEST_CURRENT_TEST`` set) only an explicit ``RESNET_FUSED_CACHE_DIR`` is used: a test
suite's timings (often faked, or with a candidate slowed on purpose) never reach a user's
table.

One file per fingerprint, ``auto-<device type>-<digest>.json``; the fingerprint
(:func:`fingerprint`) holds what a pick depends on beyond its key: the device (CPU: model
name, the instruction set torch's kernels use, the number of torch threads; CUDA: device
name, compute capability, CUDA and cuDNN versions), the versions of resnet_fused, torch
and triton, the compiled extension's file (size and modification time: a rebuild starts a
new table) and the table format. The file repeats its fingerprint, which is checked on
reading.

Keys are those of :func:`.auto_choice.choose` (tuples of strings, ints, bools, None,
dtypes, memory formats, a device and nested tuples), stored as JSON with tagged values
(``{"dtype": "float32"}``, ``{"memory_format": "channels_last"}``, ``{"device": "cuda"}``,
tuples as arrays): the device is stored by type alone, its identity being in the
fingerprint, so ``cuda:0`` and ``cuda:1`` of the same model share a table. Nothing but
JSON is ever read (no pickle): a foreign file cannot run code. A key holding anything else
is kept in memory only.

Reading: lazily, at the first pick a process needs that it does not hold in memory, once
per file (read again when the file changed on disk since; a key found missing is looked
up again at most every :data:`MISS_RECHECK_S`). Writing: at each new timed
pick, read-merge-write under an advisory lock (``fcntl.flock`` on ``<file>.lock``, given up
after :data:`LOCK_TIMEOUT_S`), through a temporary file in the same folder, fsync'd and
renamed over the table (``os.replace``): several processes (DDP ranks) can share a table,
and a reader never sees half a file. Without locking the rename is still atomic (a
concurrent writer's new picks may then be lost, never the file). At most
:data:`MAX_ENTRIES` entries, the oldest dropped first.

A corrupt, truncated, unreadable or foreign (other format or fingerprint) file is ignored
(the picks are timed again and the file is rewritten at the next pick) with one
:class:`TuningCacheWarning` per file and process; a folder that cannot be written warns
once and the picks stay in memory. Nothing here raises into an op call.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator

import torch

__all__ = [
    "CACHE_DIR_ENV",
    "TuningCacheWarning",
    "fingerprint",
    "table_dir",
    "table_path",
]

CACHE_DIR_ENV = "RESNET_FUSED_CACHE_DIR"
FORMAT = "resnet_fused.auto_table"
FORMAT_VERSION = 1
MAX_ENTRIES = 4096
MISS_RECHECK_S = 1.0
LOCK_TIMEOUT_S = 10.0
ORIGIN_RUN = "run"  # timed by a process's own op calls
ORIGIN_TUNE = "tune"  # timed by ``resnet-fused tune``

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


class TuningCacheWarning(UserWarning):
    """auto's tuning table could not be read or written: the picks are timed again or
    kept for this process only."""


# ---------------------------------------------------------------------------------------
# Where, and for what


def table_dir() -> str | None:
    """The table's folder, or None when the table is off (``RESNET_FUSED_CACHE_DIR=""``,
    or under pytest without an explicit ``RESNET_FUSED_CACHE_DIR``)."""
    value = os.environ.get(CACHE_DIR_ENV)
    if value is not None:
        value = value.strip()
        return os.path.abspath(os.path.expanduser(value)) if value else None
    if "PYTEST_CURRENT_TEST" in os.environ:
        return None
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnet_fused")


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _static_fingerprint(device_type: str, index: int | None) -> tuple:
    from .. import __version__, _extension

    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(index)
        dev = {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "capability": f"{major}.{minor}",
            "cuda": torch.version.cuda or torch.version.hip,
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        dev = {"type": device_type}
        if device_type == "cpu":
            dev.update(name=_cpu_model_name(), isa=torch.backends.cpu.get_cpu_capability())
    ext = None
    if _extension.is_loaded():
        try:
            st = os.stat(_extension._C.__file__)
            ext = f"{st.st_size}-{st.st_mtime_ns}"
        except (OSError, AttributeError, TypeError):
            ext = "unknown"
    versions = {
        "resnet_fused": __version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "extension": ext,
    }
    return json.dumps(dev, sort_keys=True), json.dumps(versions, sort_keys=True)


def fingerprint(device: torch.device | str = "cpu") -> dict:
    """What the picks for ``device`` depend on beyond their keys (see the module's
    docstring); a table is used only by processes with the same fingerprint."""
    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    dev, versions = _static_fingerprint(device.type, index)
    dev = json.loads(dev)
    if device.type == "cpu":
        dev["threads"] = torch.get_num_threads()  # picks change with the thread count
    return {"format": FORMAT_VERSION, "device": dev, "versions": json.loads(versions)}


def _digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def table_path(device: torch.device | str = "cpu") -> str | None:
    """The table file for ``device`` on this machine and these versions (None when the
    table is off). It need not exist yet."""
    folder = table_dir()
    if folder is None:
        return None
    device = torch.device(device)
    return os.path.join(folder, f"auto-{device.type}-{_digest(fingerprint(device))}.json")


# ---------------------------------------------------------------------------------------
# Keys as JSON


class _NotStorable(Exception):
    pass


_DTYPES = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}
_FORMATS = {
    str(v).removeprefix("torch."): v
    for v in vars(torch).values()
    if isinstance(v, torch.memory_format)
}


def _encode(value):
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NotStorable(value)
        return value
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": value.type}
    raise _NotStorable(value)


def _decode(value, device: torch.device):
    """The in-memory form of an encoded key part (``{"device": type}`` -> ``device``);
    ValueError for anything that is not an encoded key part."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list):
        return tuple(_decode(v, device) for v in value)
    if isinstance(value, dict) and len(value) == 1:
        ((tag, name),) = value.items()
        if tag == "dtype" and name in _DTYPES:
            return _DTYPES[name]
        if tag == "memory_format" and name in _FORMATS:
            return _FORMATS[name]
        if tag == "device" and name == device.type:
            return device
    raise ValueError(f"not a key part: {value!r}")


def encode_key(key: tuple) -> str | None:
    """The canonical JSON text of ``key`` (its device by type only), or None when the key
    holds a value the table cannot store."""
    try:
        return json.dumps(_encode(tuple(key)), separators=(",", ":"), allow_nan=False)
    except _NotStorable:
        return None


def decode_key(text: str, device: torch.device | str = "cpu") -> tuple:
    """The key that :func:`encode_key` stored, with ``device`` as its device."""
    return _decode(json.loads(text), torch.device(device))


# ---------------------------------------------------------------------------------------
# The table in this process


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        # path -> (file signature, {encoded key: entry})
        self.loaded: dict[str, tuple[tuple | None, dict[str, dict]]] = {}
        self.warned: set[str] = set()
        self.unwritable: set[str] = set()
        self.origin = ORIGIN_RUN
        self.read = True  # False: every pick is timed again (``resnet-fused tune --retime``)
        self.added: list[str] = []  # keys this process added to a table (encoded)
        # key -> when the table last had no entry for it: a key that is never timed (the
        # fused default under synchronised BatchNorm) looks again at most every
        # MISS_RECHECK_S, not at every call
        self.missed: dict[tuple, float] = {}


_STATE = _State()


def reset() -> None:
    """Forget every table read, warning given and folder found unwritable (tests)."""
    with _STATE.lock:
        _STATE.loaded.clear()
        _STATE.warned.clear()
        _STATE.unwritable.clear()
        _STATE.added.clear()
        _STATE.missed.clear()
        _STATE.origin = ORIGIN_RUN
        _STATE.read = True


@contextlib.contextmanager
def tuning_session(origin: str = ORIGIN_TUNE, read: bool = True) -> Iterator[None]:
    """Within: new picks are stored with ``origin`` and, with ``read=False``, the table's
    picks are ignored (every key is timed again and its entry overwritten)."""
    with _STATE.lock:
        saved = _STATE.origin, _STATE.read
        _STATE.origin, _STATE.read = origin, read
    try:
        yield
    finally:
        with _STATE.lock:
            _STATE.origin, _STATE.read = saved


def added_count() -> int:
    """How many keys this process added to a table (new entries, not overwritten ones)."""
    with _STATE.lock:
        return len(_STATE.added)


def _warn_once(path: str, message: str) -> None:
    """One warning per table file and process, whatever goes wrong with it."""
    with _STATE.lock:
        if path in _STATE.warned:
            return
        _STATE.warned.add(path)
    warnings.warn(message, TuningCacheWarning, stacklevel=2)


def _signature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read(path: str, fp: dict, device: torch.device) -> dict[str, dict]:
    """The entries of the table at ``path`` (encoded key -> entry); {} with one warning
    when the file is unreadable, corrupt or foreign; {} silently when there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (FileNotFoundError, NotADirectoryError):  # no table yet
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        _warn_once(path, f"auto's tuning table {path} is unreadable ({exc}); "
                   "its picks are timed again")  # fmt: skip
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a resnet_fused tuning table")
        if data.get("version") != FORMAT_VERSION or data.get("fingerprint") != fp:
            _warn_once(path, f"auto's tuning table {path} was written for another "
                       "machine or version (format "
                       f"{data.get('version')!r}, fingerprint {data.get('fingerprint')!r}); "
                       "it is ignored and its picks are timed again")  # fmt: skip
            return {}
        raw = data["entries"]
        if not isinstance(raw, list):
            raise ValueError("entries is not a list")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        _warn_once(path, f"auto's tuning table {path} is corrupt ({exc}); it is "
                   "ignored, its picks are timed again and it is rewritten")  # fmt: skip
        return {}
    entries, bad = {}, 0
    for e in raw:
        try:
            key = _decode(e["key"], device)
            if not isinstance(key, tuple) or not isinstance(e["pick"], str):
                raise ValueError("bad entry")
            times = {str(k): float(v) for k, v in (e.get("times") or {}).items()}
            times = {k: v for k, v in times.items() if math.isfinite(v)}
            entry = {
                "key": e["key"],
                "pick": e["pick"],
                "times": times,
                "origin": str(e.get("origin", ORIGIN_RUN)),
                "saved": float(e.get("saved", 0.0)),
            }
            encoded = encode_key(key)
            if encoded is None:
                raise ValueError("bad key")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            bad += 1
            continue
        entries[encoded] = entry
    if bad:
        _warn_once(path, f"auto's tuning table {path}: {bad} unreadable entries "
                   "ignored (their picks are timed again)")  # fmt: skip
    return entries


def _table(path: str, fp: dict, device: torch.device, refresh: bool) -> dict[str, dict]:
    """This process's copy of the table at ``path``, read at first use and read again
    (``refresh``) when the file changed since."""
    with _STATE.lock:
        held = _STATE.loaded.get(path)
        if held is not None and not (refresh and _signature(path) != held[0]):
            return held[1]
        sig = _signature(path)
        entries = _read(path, fp, device)
        _STATE.loaded[path] = (sig, entries)
        return entries


def lookup(key: tuple, device: torch.device, candidates) -> tuple[str, dict, str] | None:
    """(pick, times, source) from the table for ``key`` -- source ``"tuned"`` when
    ``resnet-fused tune`` timed it, else ``"cache"`` -- or None."""
    if not _STATE.read:
        return None
    missed = _STATE.missed.get(key)
    if missed is not None and time.monotonic() - missed < MISS_RECHECK_S:
        return None
    try:
        path = table_path(device)
        if path is None:
            return None
        encoded = encode_key(key)
        if encoded is None:
            return None
        fp = fingerprint(device)
        # read at first use; again when the file changed (another process added picks)
        entry = _table(path, fp, device, refresh=True).get(encoded)
        if entry is None or entry["pick"] not in candidates:
            with _STATE.lock:
                if len(_STATE.missed) >= MAX_ENTRIES:
                    _STATE.missed.clear()
                _STATE.missed[key] = time.monotonic()
            return None
        source = "tuned" if entry["origin"] == ORIGIN_TUNE else "cache"
        return entry["pick"], dict(entry["times"]), source
    except Exception as exc:  # never fail an op call over the table
        _warn_once("?", f"auto's tuning table could not be used ({exc!r})")
        return None


@contextlib.contextmanager
def _locked(path: str) -> Iterator[bool]:
    """An exclusive advisory lock on ``path + ".lock"`` (True), or none (False) where
    there is no flock or it was not granted within LOCK_TIMEOUT_S."""
    if fcntl is None:
        yield False
        return
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        got, deadline = False, time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    msg = f"its lock was not granted in {LOCK_TIMEOUT_S:g} s; writing without it"
                    _warn_once(path, f"auto's tuning table {path}: {msg}")
                    break
                time.sleep(0.005)
            except OSError:  # no locking on this file system: the rename is still atomic
                break
        try:
            yield got
        finally:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _dump(fp: dict, entries: list[dict]) -> str:
    head = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fp})
    lines = ",\n".join(json.dumps(e, separators=(", ", ": "), allow_nan=False) for e in entries)
    return head[:-1] + ', "entries": [\n' + lines + "\n]}\n"


def _write_atomically(path: str, text: str) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def record(key: tuple, device: torch.device, pick: str, times: dict[str, float]) -> bool:
    """Store a new timed pick in the table (merged with what is on disk now). True when
    it was written."""
    try:
        path = table_path(device)
        encoded = encode_key(key)
        if path is None or encoded is None or path in _STATE.unwritable:
            return False
        fp = fingerprint(device)
        entry = {
            "key": json.loads(encoded),
            "pick": pick,
            "times": {c: float(t) for c, t in times.items() if math.isfinite(t)},
            "origin": _STATE.origin,
            "saved": round(time.time(), 3),
        }
        with _STATE.lock:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with _locked(path):
                    entries = _read(path, fp, device)
                    new = encoded not in entries
                    entries[encoded] = entry
                    if len(entries) > MAX_ENTRIES:
                        keep = sorted(entries.items(), key=lambda kv: kv[1]["saved"])
                        entries = dict(keep[-MAX_ENTRIES:])
                    _write_atomically(path, _dump(fp, list(entries.values())))
                    _STATE.loaded[path] = (_signature(path), entries)
            except OSError as exc:
                _STATE.unwritable.add(path)
                _warn_once(path, f"auto's tuning table cannot be written at {path} "
                           f"({exc}); this process's picks are not kept")  # fmt: skip
                return False
            if new:
                _STATE.added.append(encoded)
        return True
    except Exception as exc:  # never fail an op call over the table
        _warn_once("?", f"auto's tuning table could not be written ({exc!r})")
        return False


def table_entries(device: torch.device | str = "cpu") -> dict[tuple, dict]:
    """The table's entries for ``device`` as on disk now: key -> {"pick", "times",
    "origin", "saved"} ({} when the table is off or empty)."""
    device = torch.device(device)
    path = table_path(device)
    if path is None:
        return {}
    entries = _read(path, fingerprint(device), device)
    return {
        decode_key(k, device): {n: v for n, v in e.items() if n != "key"}
        for k, e in entries.items()
    }
