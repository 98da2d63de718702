"""auto's tuning table (resnet_fused.functional.tuning_cache): picks kept on disk per
machine and versions, read by a fresh process instead of timing; the key's JSON form;
what a corrupt, foreign or unwritable table does (one warning, timing again); the table
turned off; several processes writing at once; ``resnet-fused tune``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import resnet_fused
from resnet_fused.__main__ import main as cli_main
from resnet_fused.activations import Act
from resnet_fused.functional import auto_choice as fc
from resnet_fused.functional import tuning_cache as tc

CPU = torch.device("cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A fresh table folder, the "time" policy (the suite pins "fused") and no picks or
    table state carried in or out of the test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(tc.CACHE_DIR_ENV, str(folder))
    monkeypatch.setenv(fc.POLICY_ENV, "time")
    fc.reset()
    yield folder
    fc.reset()


@pytest.fixture
def fake_timing(monkeypatch):
    """_time_candidates replaced: no real timing; the first candidate (fused) is the
    fastest unless ``times`` says otherwise. Returns the list of timed candidate lists."""
    calls: list[tuple] = []
    times: dict[str, float] = {}

    def fake(candidates, trial, device, repeats=5):
        calls.append(tuple(candidates))
        return {c: times.get(c, 1.0 + i) for i, c in enumerate(candidates)}

    monkeypatch.setattr(fc, "_time_candidates", fake)
    calls_times = calls, times
    return calls_times


def _choose(name, candidates=("cpu", "eager")):
    return fc.choose((name, 4, torch.float32, CPU), list(candidates), None, CPU)


def _file(folder):
    (path,) = [p for p in folder.iterdir() if p.suffix == ".json"]
    return path


def _env(folder, **extra):
    env = dict(os.environ)
    env.update({tc.CACHE_DIR_ENV: str(folder), fc.POLICY_ENV: "time", **extra})
    return env


def _run(code, env, timeout=120):
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_key_json_round_trip():
    x = torch.empty(3, 4, 6, 6).to(memory_format=torch.channels_last)
    w = torch.empty(8, 4, 3, 3)
    geometry = ((1, 1), (1, 1), (1, 1), 1)
    key = (*fc.conv_unit_key(x, w, geometry, True, None, Act(3, 0.2)), ("cpu", "eager"))
    text = tc.encode_key(key)
    assert tc.decode_key(text, CPU) == key
    assert json.loads(text)[4] == {"memory_format": "channels_last"}
    assert {"dtype": "float32"} in json.loads(text)
    # a device is stored by type: its identity is in the table's fingerprint
    gpu_key = ("add_relu", (2, 3), torch.bfloat16, None, False, torch.device("cuda", 1))
    text = tc.encode_key(gpu_key)
    assert '{"device":"cuda"}' in text and "1" not in text.split("device")[1]
    assert tc.decode_key(text, "cuda:1") == gpu_key
    with pytest.raises(ValueError):
        tc.decode_key(text, CPU)  # a CUDA key is no CPU key
    assert tc.encode_key(("k", object())) is None  # not storable: kept in memory only
    with pytest.raises(ValueError):
        tc.decode_key('["k", {"eval": "print(1)"}]')


def test_fingerprint_and_location(tmp_path, monkeypatch):
    fp = tc.fingerprint(CPU)
    assert fp["device"]["isa"] == torch.backends.cpu.get_cpu_capability()
    assert fp["device"]["name"] and fp["device"]["threads"] == torch.get_num_threads()
    assert fp["versions"]["torch"] == torch.__version__
    assert fp["versions"]["resnet_fused"] == resnet_fused.__version__
    assert "triton" in fp["versions"]
    monkeypatch.setenv(tc.CACHE_DIR_ENV, str(tmp_path))
    path = tc.table_path(CPU)
    assert os.path.dirname(path) == str(tmp_path) and "auto-cpu-" in path
    monkeypatch.setattr(torch, "get_num_threads", lambda: 999)
    assert tc.table_path(CPU) != path  # picks depend on the thread count
    # the default location: XDG_CACHE_HOME, else ~/.cache; never the user's under pytest
    monkeypatch.delenv(tc.CACHE_DIR_ENV)
    assert tc.table_dir() is None
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tc.table_dir() == str(tmp_path / "xdg" / "resnet_fused")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tc.table_dir() == str(tmp_path / "home" / ".cache" / "resnet_fused")
    monkeypatch.setenv(tc.CACHE_DIR_ENV, "")
    assert tc.table_dir() is None and tc.table_path(CPU) is None


def test_pick_is_stored_and_read_back(table, fake_timing):
    calls, _ = fake_timing
    assert _choose("a") == "cpu"
    assert fc.auto_choice_sources() == {("a", 4, torch.float32, CPU, ("cpu", "eager")): "timed"}
    data = json.loads(_file(table).read_text())
    assert data["fingerprint"] == tc.fingerprint(CPU)
    (entry,) = data["entries"]
    assert entry["pick"] == "cpu" and entry["times"] == {"cpu": 1.0, "eager": 2.0}
    assert entry["key"] == ["a", 4, {"dtype": "float32"}, {"device": "cpu"}, ["cpu", "eager"]]
    fc._AUTO_CHOICES.clear()  # a new process: the picks of this one forgotten
    tc.reset()
    assert _choose("a") == "cpu"
    assert len(calls) == 1  # not timed again
    ((key, source),) = fc.auto_choice_sources().items()
    assert source == "cache" and fc.auto_timings()[key] == {"cpu": 1.0, "eager": 2.0}
    assert set(resnet_fused.auto_choices()) == set(resnet_fused.auto_choice_sources())


def test_another_process_pick_is_found_after_first_read(table, fake_timing, monkeypatch):
    """The table is read at the first new key, and again when the file changed since (a
    key found missing is looked up again after MISS_RECHECK_S)."""
    calls, _ = fake_timing
    _choose("mine")
    theirs = ("theirs", 4, torch.float32, CPU, ("cpu", "eager"))
    assert tc.lookup(theirs, CPU, theirs[-1]) is None
    path = _file(table)
    data = json.loads(path.read_text())
    other = dict(data["entries"][0], key=json.loads(tc.encode_key(theirs)), pick="eager")
    path.write_text(tc._dump(tc.fingerprint(CPU), [*data["entries"], other]))
    assert tc.lookup(theirs, CPU, theirs[-1]) is None  # missed just now: not looked again
    monkeypatch.setattr(tc, "MISS_RECHECK_S", 0.0)
    assert _choose("theirs") == "eager" and len(calls) == 1
    assert fc.auto_choice_sources()[theirs] == "cache"


def test_fresh_process_uses_the_saved_pick_without_timing(tmp_path):
    """A real pick (add_relu and a Conv+BN+ReLU unit under backend auto) made by one
    process is used by the next one: no timing call, source "cache"."""
    code = """
        import json, torch, resnet_fused
        from resnet_fused.functional import auto_choice as fc
        timed = []
        real = fc._time_candidates
        fc._time_candidates = lambda *a, **k: timed.append(1) or real(*a, **k)
        torch.manual_seed(0)
        x = torch.randn(2, 8, 6, 6, requires_grad=True)
        resnet_fused.add_relu(x, torch.randn(2, 8, 6, 6)).sum().backward()
        w, g, b = torch.randn(8, 8, 3, 3), torch.ones(8), torch.zeros(8)
        resnet_fused.conv_bn_act(x.detach(), w, g, b, torch.zeros(8), torch.ones(8),
                                 training=False, padding=1)
        print(json.dumps({"timed": len(timed), "picks": sorted(
            [k[0], p, fc.auto_choice_sources()[k]] for k, p in fc.auto_choices().items())}))
    """
    env = _env(tmp_path)
    first = json.loads(_run(code, env).strip().splitlines()[-1])
    second = json.loads(_run(code, env).strip().splitlines()[-1])
    assert first["timed"] == 2 and {s for _, _, s in first["picks"]} == {"timed"}
    assert second["timed"] == 0
    assert [(n, p) for n, p, _ in second["picks"]] == [(n, p) for n, p, _ in first["picks"]]
    assert {s for _, _, s in second["picks"]} == {"cache"}
    assert [n for n, _, _ in second["picks"]] == ["add_relu", "conv_bn_act"]


CORRUPTIONS = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "pickle": lambda text: b"\x80\x03cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.",
    "garbage": lambda text: "{]\x00" + text,
    "not_a_table": lambda text: "[1, 2, 3]",
    "bad_entry_fields": lambda text: text.replace('"pick": "cpu"', '"pick": 7'),
    "unknown_tag": lambda text: text.replace('{"dtype": "float32"}', '{"tensor": "x"}'),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_table_warns_once_and_times_again(table, fake_timing, corruption):
    calls, _ = fake_timing
    _choose("a")
    _choose("b")
    path = _file(table)
    content = CORRUPTIONS[corruption](path.read_text())
    if isinstance(content, bytes):
        path.write_bytes(content)  # not even UTF-8 (a pickle: never unpickled)
    else:
        path.write_text(content)
    fc.reset()
    with pytest.warns(tc.TuningCacheWarning) as record:
        for name in ("a", "b", "c"):
            _choose(name)
    assert len(record) == 1, [str(w.message) for w in record]
    assert len(calls) == 2 + 3  # every pick timed again
    # rewritten as a valid table holding every pick
    fc.reset()
    assert len(tc.table_entries(CPU)) == 3


def test_foreign_fingerprint_is_ignored(table, fake_timing):
    calls, _ = fake_timing
    _choose("a")
    path = _file(table)
    data = json.loads(path.read_text())
    data["fingerprint"]["versions"]["torch"] = "0.0.1"
    data["entries"][0]["pick"] = "eager"
    path.write_text(json.dumps(data))
    # another machine's or version's table under its own name is not even read
    (table / "auto-cpu-0123456789abcdef.json").write_text("{not json")
    fc.reset()
    with pytest.warns(tc.TuningCacheWarning, match="another machine or version") as record:
        assert _choose("a") == "cpu"  # timed again, not the foreign "eager"
    assert len(record) == 1 and len(calls) == 2
    assert fc.auto_choice_sources()[("a", 4, torch.float32, CPU, ("cpu", "eager"))] == "timed"
    assert json.loads(path.read_text())["fingerprint"] == tc.fingerprint(CPU)  # replaced


def test_empty_cache_dir_turns_the_table_off(tmp_path, monkeypatch, fake_timing):
    calls, _ = fake_timing
    monkeypatch.setenv(tc.CACHE_DIR_ENV, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(fc.POLICY_ENV, "time")
    fc.reset()
    try:
        _choose("a")
        fc._AUTO_CHOICES.clear()
        _choose("a")
    finally:
        fc.reset()
    assert len(calls) == 2  # timed in each "process"
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere
    assert cli_main(["tune", "resnet18", "--device", "cpu"]) == 2


def test_unwritable_folder_warns_once(tmp_path, monkeypatch, fake_timing):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(tc.CACHE_DIR_ENV, str(blocker / "cache"))  # cannot be created
    monkeypatch.setenv(fc.POLICY_ENV, "time")
    fc.reset()
    try:
        with pytest.warns(tc.TuningCacheWarning, match="cannot be written") as record:
            assert _choose("a") == "cpu" and _choose("b") == "cpu"
        assert len(record) == 1
        assert set(fc.auto_choice_sources().values()) == {"timed"}
    finally:
        fc.reset()


def test_held_lock_delays_then_writes_anyway(table, fake_timing, monkeypatch):
    """A lock another process never releases costs LOCK_TIMEOUT_S once, then the write
    goes ahead (still an atomic replace) with one warning."""
    fcntl = pytest.importorskip("fcntl")
    monkeypatch.setattr(tc, "LOCK_TIMEOUT_S", 0.05)
    path = tc.table_path(CPU)
    table.mkdir(parents=True)
    with open(path + ".lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # another open file: conflicts
        with pytest.warns(tc.TuningCacheWarning, match="lock was not granted") as record:
            _choose("a")
            _choose("b")
    assert len(record) == 1
    assert {k[0] for k in tc.table_entries(CPU)} == {"a", "b"}


def test_table_is_bounded(table, fake_timing, monkeypatch):
    monkeypatch.setattr(tc, "MAX_ENTRIES", 3)
    for i in range(5):
        _choose(f"k{i}")
        time.sleep(0.002)
    names = sorted(k[0] for k in tc.table_entries(CPU))
    assert names == ["k2", "k3", "k4"]  # the oldest dropped


def test_concurrent_writers_keep_every_pick(tmp_path):
    """Several processes adding picks at the same moment: the table holds all of them
    and parses; no temporary file is left behind."""
    procs, per_proc = 4, 20
    code = """
        import os, sys, time, torch
        from resnet_fused.functional import tuning_cache as tc
        rank, n, barrier = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        open(os.path.join(barrier, str(rank)), "w").close()
        deadline = time.time() + 60
        while len(os.listdir(barrier)) < int(sys.argv[4]) and time.time() < deadline:
            time.sleep(0.001)  # all processes imported: start together
        for i in range(n):
            key = ("race", rank, i, torch.float16, torch.device("cpu"), ("cpu", "eager"))
            assert tc.record(key, torch.device("cpu"), "cpu", {"cpu": 1.0, "eager": 2.0})
    """
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    table = tmp_path / "table"
    env = _env(table)
    running = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *map(str, (r, per_proc, barrier, procs))],
            env=env,
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(procs)
    ]
    for p in running:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    path = _file(table)
    keys = {tuple(e["key"][1:3]) for e in json.loads(path.read_text())["entries"]}
    assert keys == {(r, i) for r in range(procs) for i in range(per_proc)}
    assert not [p for p in table.iterdir() if p.suffix == ".tmp"]


def test_tune_cli_fills_the_table(table, fake_timing, capsys):
    """In-process with fake timings: every unit of a converted ResNet-18's training step
    and eval forward gets a pick in the table, marked as tuned; a second run times
    nothing; --retime times everything again."""
    calls, _ = fake_timing
    args = ["tune", "resnet18", "--batch", "2", "--image-size", "32", "--device", "cpu"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    entries = tc.table_entries(CPU)
    assert len(entries) == len(calls) > 10
    assert {e["origin"] for e in entries.values()} == {"tune"}
    assert "conv_bn_act" in {k[0] for k in entries}
    assert {k[7] for k in entries if k[0] == "conv_bn_act"} == {True, False}  # train, eval
    assert f"{len(entries)} added to {tc.table_path(CPU)}" in out
    assert os.environ[fc.POLICY_ENV] == "time"

    fc.reset()
    n = len(calls)
    assert cli_main([*args, "--mode", "train"]) == 0
    assert len(calls) == n and "0 timed" in capsys.readouterr().out
    assert set(fc.auto_choice_sources().values()) == {"tuned"}
    fc.reset()
    assert cli_main([*args, "--mode", "eval", "--retime"]) == 0
    assert len(calls) > n and "0 added" in capsys.readouterr().out


def test_tune_console_script_on_cpu(tmp_path):
    """The real command (the console script's module, real timing) on a tiny model."""
    out = subprocess.run(
        [sys.executable, "-m", "resnet_fused", "tune", "resnet18", "--batch", "2",
         "--image-size", "32", "--device", "cpu", "--mode", "eval"],
        env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    entries = json.loads(_file(tmp_path).read_text())["entries"]
    assert len(entries) > 10 and all(e["origin"] == "tune" for e in entries)
    assert f"{len(entries)} added to {_file(tmp_path)}" in out.stdout
