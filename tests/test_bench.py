"""The benchmark command runs end to end and writes its reports."""

from __future__ import annotations

import csv

import pytest
import torch

import resnet_fused
from resnet_fused.__main__ import main


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_bench_writes_csv_and_summary(tmp_path, capsys):
    rc = main(
        [
            "bench",
            "--level",
            "op",
            "--device",
            "cpu",
            "--quick",
            "--ops",
            "add_relu,bn_add_relu,bn_add_silu",
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
    assert {r["op"] for r in rows} == {"add_relu", "bn_add_relu", "bn_add_silu"}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    text = mds[0].read_text()
    assert "Geometric-mean speed-up against eager" in text and "bn_add_relu" in text


def test_bench_rejects_unknown_provider(capsys):
    assert main(["bench", "--device", "cpu", "--providers", "cudnn", "--out", "/nonexistent"]) == 2
    assert "not available here" in capsys.readouterr().err


def _bench(tmp_path, *args):
    return main(
        ["bench", "--device", "cpu", "--min-run-time", "0.01", "--out", str(tmp_path), *args]
    )


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_layer_block_model_levels_write_csv_png_md(tmp_path):
    assert _bench(tmp_path, "--level", "layer", "--layers", "l4.conv3 1x1", "--batch", "1") == 0
    assert _bench(tmp_path, "--level", "block", "--blocks", "r18.layer3", "--batch", "1") == 0
    model_args = ["--level", "model", "--model", "resnet18", "--mode", "eval", "--batch", "1"]
    assert _bench(tmp_path, *model_args, "--image-size", "32", "--layouts", "channels_last") == 0
    expected = {
        "layer": ("layer", "mode", "provider", "median_ms", "tflops", "speedup_vs_eager"),
        "block": ("block", "mode", "provider", "median_ms", "images_per_s", "speedup_vs_eager"),
        "model": ("model", "mode", "provider", "median_ms", "images_per_s", "peak_mb"),
    }
    for level, columns in expected.items():
        (csv_path,) = tmp_path.glob(f"{level}_*.csv")
        rows = list(csv.DictReader(csv_path.open()))
        assert rows and all(c in rows[0] for c in ("device", "torch", "date", *columns))
        assert {"eager"} < {r["provider"] for r in rows}
        assert all(float(r["median_ms"]) > 0 for r in rows)
        assert csv_path.with_suffix(".md").read_text().startswith("#")
        png = csv_path.with_suffix(".png")
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    model_rows = list(csv.DictReader(next(tmp_path.glob("model_*.csv")).open()))
    assert {r["mode"] for r in model_rows} == {"eval"}


def test_bench_bad_arguments_exit_2(capsys, tmp_path):
    assert _bench(tmp_path, "--level", "model", "--model", "resnet7") == 2
    assert "unknown model(s): resnet7: not a torchvision model" in capsys.readouterr().err
    assert _bench(tmp_path, "--level", "model", "--model", "timm:resnet7") == 2
    assert "timm has no model 'resnet7'" in capsys.readouterr().err
    assert _bench(tmp_path, "--level", "layer", "--providers", "cuda") == 2
    assert "not available here" in capsys.readouterr().err
    assert _bench(tmp_path, "--level", "layer", "--layers", "l9.conv1") == 2
    assert "unknown layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--level", "kernel"])


def test_bench_device_cuda_runs_or_refuses_on_every_machine(capsys, tmp_path):
    """A real assertion with and without a GPU: a GPU runs a tiny op benchmark on it, a
    machine without one refuses with exit code 2 and says why."""
    rc = main(["bench", "--device", "cuda", "--level", "op", "--ops", "add_relu", "--quick",
               "--layouts", "nchw", "--batch", "1", "--providers", "eager", "--min-run-time", "0.01", "--out", str(tmp_path)])  # fmt: skip
    if torch.cuda.is_available():
        assert rc == 0
        (csv_path,) = tmp_path.glob("op_*.csv")
        rows = list(csv.DictReader(csv_path.open()))
        assert rows and all(r["cuda"] and float(r["median_ms"]) > 0 for r in rows)
        assert {r["device"] for r in rows} == {torch.cuda.get_device_name()}
    else:
        assert rc == 2
        assert "no CUDA GPU is available here" in capsys.readouterr().err
        assert not list(tmp_path.glob("*.csv"))


def test_providers_are_timed_interleaved_with_the_ratio_spread(tmp_path):
    """Every row carries its rounds and the range of its per-round ratio to eager; the
    markdown shows the range."""
    providers = "eager,cpu" if resnet_fused.is_available("cpu", "cpu") else "eager"
    assert _bench(tmp_path, "--level", "op", "--ops", "add_relu", "--quick", "--layouts",
                  "nchw", "--batch", "1", "--providers", providers, "--rounds", "5") == 0  # fmt: skip
    (csv_path,) = tmp_path.glob("op_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["provider"] for r in rows} == set(providers.split(","))
    for r in rows:
        assert r["rounds"] == "5"
        lo, med, hi = (float(r[f"speedup_vs_eager{s}"]) for s in ("_min", "", "_max"))
        assert 0 < lo <= med <= hi
        if r["provider"] == "eager":
            assert lo == med == hi == 1.0  # its own rounds: exactly 1
    md = csv_path.with_suffix(".md").read_text()
    assert "timed interleaved: 5 rounds" in md
    if "cpu" in providers:
        r = next(r for r in rows if r["provider"] == "cpu")
        lo, hi = float(r["speedup_vs_eager_min"]), float(r["speedup_vs_eager_max"])
        assert f"({lo:.2f}–{hi:.2f})" in md


def test_model_level_prints_no_blank_peak_on_cpu(tmp_path, capsys):
    assert _bench(tmp_path, "--level", "model", "--model", "resnet18", "--mode", "eval",
                  "--batch", "1", "--image-size", "32", "--layouts", "channels_last",
                  "--providers", "eager") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "peak  MB" not in out and "peak n/a (CPU)" in out
    md = next(tmp_path.glob("model_*.md")).read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| resnet18 | eval | eager"))
    assert row.rstrip().endswith("| n/a (CPU) |") and "|  |" not in row


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_check_passes(capsys):
    assert main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cases match the fp64 reference" in out and "MISMATCH" not in out
    assert " cpu " in out and "conv_bn_add_relu eval" in out


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_sync_level_times_the_same_maths(tmp_path, capsys):
    """Two gloo ranks: every provider runs, and the fused synchronised step gives the
    eager synchronised BatchNorm's output and input gradient (checked by the benchmark
    before timing and written to the CSV)."""
    cases = "bn_add_relu c2048,r50.layer3 block"
    assert _bench(tmp_path, "--level", "sync", "--sync-cases", cases, "--batch", "2") == 0
    (csv_path,) = tmp_path.glob("sync_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["case"], r["provider"]) for r in rows] == [
        (c, p) for c in cases.split(",") for p in ("eager", "fused", "fused-local")
    ]
    assert all(float(r["median_ms"]) > 0 and r["world"] == "2" for r in rows)
    diffs = {(r["case"], r["provider"]): float(r["rel_diff"]) for r in rows}
    for case in cases.split(","):
        assert diffs[case, "fused"] < 1e-4, diffs
        assert diffs[case, "fused-local"] > 1e-2, diffs  # local statistics differ: the check bites
    md = csv_path.with_suffix(".md").read_text()
    assert md.startswith("# Synchronised BatchNorm") and "fused ×eager" in md
    assert _bench(tmp_path, "--level", "sync", "--world", "1") == 2
    assert "--world must be at least 2" in capsys.readouterr().err
    assert _bench(tmp_path, "--level", "sync", "--providers", "SyncBatchNorm") == 2


def test_model_level_skips_a_mode_the_model_cannot_run(tmp_path, capsys):
    """Batch 1 at 32x32 reaches resnet18's 1x1 maps, where nn.BatchNorm2d in training
    refuses a single value per channel: the training mode is reported as not timed (with
    eager's own error) and inference is still measured."""
    rc = _bench(
        tmp_path, "--level", "model", "--model", "resnet18", "--mode", "both", "--batch", "1",
        "--image-size", "32", "--layouts", "channels_last", "--rounds", "1",
    )  # fmt: skip
    assert rc == 0
    rows = list(csv.DictReader(next(tmp_path.glob("model_*.csv")).open()))
    assert {(r["mode"], r["provider"]) for r in rows} == {("eval", "eager"), ("eval", "fused")}
    md = next(tmp_path.glob("model_*.md")).read_text()
    assert "resnet18 train: not timed, eager's own step fails at batch 1" in md
    assert "more than 1 value per channel" in md


def test_model_level_takes_timm_and_tutorial_models(tmp_path, capsys):
    """timm names and the tutorial ResNet run through the same convert, checked against
    eager before timing (the harness refuses a mismatch)."""
    pytest.importorskip("timm")
    rc = _bench(
        tmp_path, "--level", "model", "--model", "timm:resnet18,tutorial_resnet18",
        "--mode", "eval", "--batch", "2", "--image-size", "64", "--layouts", "channels_last",
        "--min-run-time", "0.05", "--rounds", "2", "--device", "cpu",
    )  # fmt: skip
    assert rc == 0
    rows = list(csv.DictReader(next(tmp_path.glob("model_*.csv")).open()))
    assert {r["model"] for r in rows} == {"timm:resnet18", "tutorial_resnet18"}
    assert {r["provider"] for r in rows} == {"eager", "fused"}
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    # the conversion's own time is reported for the fused provider (not a timed test)
    assert all((r["convert_s"] != "") == (r["provider"] == "fused") for r in rows)


def test_model_summary_pairs_fused_with_eager():
    """The per-provider convert_s column must not split one case in two (the summary's
    geometric mean was nan when it did)."""
    from resnet_fused.bench import model

    base = dict(device="cpu", torch="x", triton="x", cuda="", date="d", batch=2,
                image_size=32, amp=False, rounds=2, model="m", mode="eval")  # fmt: skip
    rows = [
        {**base, "layout": "channels_last", "provider": "eager", "median_ms": 2.0,
         "images_per_s": 1.0, "peak_mb": "", "convert_s": ""},
        {**base, "layout": "channels_last", "provider": "fused", "median_ms": 1.0,
         "images_per_s": 2.0, "peak_mb": "", "convert_s": 0.1},
    ]  # fmt: skip
    assert "| m | eval | 2.00× |" in model.summarise(rows)


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_profile_level_reports_kernels_and_the_op_trace_per_provider(tmp_path, capsys):
    args = ["--level", "profile", "--device", "cpu", "--batch", "2", "--layers",
            "l4.conv2 3x3", "--providers", "eager,cpu,auto"]  # fmt: skip
    assert _bench(tmp_path, *args) == 0
    md = next(tmp_path.glob("profile_*.md")).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| layer | provider"))
    for provider in ("eager", "cpu", "auto"):
        row = next(
            line for line in md.splitlines() if line.startswith(f"| l4.conv2 3x3 | {provider} |")
        )
        assert row.count("|") == header.count("|")
    assert "### l4.conv2 3x3, eager" in md and "aten::native_batch_norm" in md
    trace = next(tmp_path.glob("profile_*_ops.txt")).read_text()
    eager = trace.split("## l4.conv2 3x3, cpu")[0]
    fused = trace.split("## l4.conv2 3x3, cpu")[1].split("## l4.conv2 3x3, auto")[0]
    assert "aten.native_batch_norm" in eager and "resnet_fused.bn_" not in eager
    assert "resnet_fused.bn_act_forward.default: float32[2, 512, 7, 7] NHWC" in fused
    assert "aten.native_batch_norm" not in fused
    assert "aten.convolution_backward.default" in fused
    assert _bench(tmp_path, "--level", "profile", "--device", "cpu", "--providers", "conv") == 2
    assert "not available here" in capsys.readouterr().err


_NEW_MODEL_COLUMNS = ("first_step_s", "peak_mb", "peak_step_mb", "fused_op_calls",
                      "speedup_vs_compile")  # fmt: skip


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_model_level_fused_compile_runs_fused_ops_under_compile(tmp_path):
    """fused-compile is torch.compile of the converted model: it compiles (dynamo), it
    dispatches resnet_fused ops in its step (no silent fallback to eager BatchNorm), its
    first step is checked against eager's before timing, and every row has its first-step
    time."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    # eval: the quicker compile on a CPU (test_resnet compiles a converted model's
    # training step); the bench times both modes the same way.
    assert _bench(tmp_path, "--level", "model", "--model", "resnet18", "--mode", "eval",
                  "--batch", "2", "--image-size", "32", "--layouts", "channels_last",
                  "--providers", "eager,fused-compile", "--rounds", "1") == 0  # fmt: skip
    assert counters["stats"]["unique_graphs"] > graphs
    (csv_path,) = tmp_path.glob("model_*.csv")
    rows = {r["provider"]: r for r in csv.DictReader(csv_path.open())}
    assert set(rows) == {"eager", "fused-compile"}
    assert all(c in rows["eager"] for c in _NEW_MODEL_COLUMNS)
    assert all(float(r["first_step_s"]) > 0 for r in rows.values())
    assert int(rows["fused-compile"]["fused_op_calls"]) > 0
    assert int(rows["eager"]["fused_op_calls"]) == 0
    assert float(rows["fused-compile"]["rel_diff"]) <= 1e-3  # the harness's gate
    md = csv_path.with_suffix(".md").read_text()
    assert "| first step s |" in md and "| resnet18 | eval | fused-compile |" in md


def test_model_level_refuses_graph_providers_off_cuda(tmp_path, capsys):
    for provider in ("fused-graph", "eager-graph"):
        assert _bench(tmp_path, "--level", "model", "--model", "resnet18",
                      "--providers", f"eager,{provider}") == 2  # fmt: skip
        err = capsys.readouterr().err
        assert f"['{provider}']" in err and "need a CUDA GPU" in err and "on cpu" in err
    assert not list(tmp_path.glob("*.csv"))


def _small_model():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def test_restore_state_makes_the_next_step_the_first_again():
    """What the CUDA-graph providers rely on: steps run after a snapshot (the warm-up),
    then restored, leave the model, its BatchNorm statistics and SGD's momentum such that
    the next step equals a fresh model's first step exactly."""
    from resnet_fused.bench import model as bench_model

    def small():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10),
        )  # fmt: skip

    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    cpu = torch.device("cpu")
    fresh, warmed = small(), small()
    run_fresh, opt_fresh = bench_model._step(fresh, True, False, cpu)
    run_warm, opt_warm = bench_model._step(warmed, True, False, cpu)
    saved = bench_model.snapshot_state(warmed, opt_warm)
    for _ in range(3):
        run_warm(x, y)
    assert not torch.equal(warmed[5].weight, fresh[5].weight)  # the warm-up changed it
    bench_model.restore_state(saved, warmed, opt_warm)
    for _ in range(2):  # the first step and one with momentum
        assert torch.equal(run_warm(x, y), run_fresh(x, y))
    for a, b in zip(warmed.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    bufs = [[s["momentum_buffer"] for s in o.state.values()] for o in (opt_warm, opt_fresh)]
    assert all(torch.equal(a, b) for a, b in zip(*bufs, strict=True))


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_fused_op_calls_tell_a_fused_step_from_an_eager_one():
    from resnet_fused.bench import model as bench_model

    eager = _small_model().eval()
    fused = resnet_fused.convert(_small_model().train(), backend="cpu")
    x = torch.randn(2, 3, 32, 32)
    assert bench_model.fused_op_calls(lambda: eager(x)) == 0
    assert bench_model.fused_op_calls(lambda: fused(x)) >= 20  # 20 BatchNorms, 4 ops each
    with pytest.raises(ValueError, match="'fused-compile' dispatched no resnet_fused op"):
        bench_model.check_fused_ran("fused-compile", 0)
    bench_model.check_fused_ran("fused-compile", 1)
    bench_model.check_fused_ran("compile", 0)


def _goal_rows(**cases):
    """Synthetic resnet50 rows, one per ``<mode>_<provider>=(ratio, peak_mb)`` (provider
    ``fc``: fused-compile, whose ratio is against compile; the others' against eager
    channels_last)."""
    base = dict(device="d", device_type="cuda", torch="x", triton="x", cuda="12", date="d",
                batch=256, image_size=224, amp=True, rounds=3, model="resnet50",
                layout="channels_last", median_ms=1.0, images_per_s=256.0)  # fmt: skip
    rows = []
    for key, (ratio, peak) in cases.items():
        mode, provider = key.split("_")
        provider = {"fc": "fused-compile"}.get(provider, provider)
        row = {**base, "mode": mode, "provider": provider, "peak_mb": peak}
        column = "speedup_vs_compile" if provider == "fused-compile" else "speedup_vs_eager_cl"
        row.update({column: ratio, f"{column}_min": ratio, f"{column}_max": ratio})
        rows.append(row)
    return rows


def test_model_goal_verdicts_follow_the_issue_goals():
    """Each of issue 14's model-level goals judged from synthetic rows just above and
    just below it; goals without rows are left out."""
    from resnet_fused.bench import model as bench_model

    def verdicts(**cases):
        return {goal: verdict for goal, _, verdict in bench_model.verdicts(_goal_rows(**cases))}

    train = "ResNet-50 training ≥ 1.15× eager channels_last"
    infer = "ResNet-50 inference ≥ 1.4× eager channels_last"
    fc_train = "ResNet-50 training: fused under torch.compile ≥ torch.compile"
    fc_infer = "ResNet-50 inference: fused under torch.compile ≥ torch.compile"
    memory = "ResNet-50 training: fused peak memory ≤ eager channels_last"
    got = verdicts(train_eager=(1.0, 1000.0), train_fused=(1.16, 990.0),
                   eval_fused=(1.39, ""), train_fc=(0.99, 900.0))  # fmt: skip
    assert got == {train: "met", infer: "missed", fc_train: "missed", memory: "met"}
    got = verdicts(train_eager=(1.0, 1000.0), train_fused=(1.14, 1001.0),
                   eval_fused=(1.41, ""), eval_fc=(1.0, ""))  # fmt: skip
    assert got == {train: "missed", infer: "met", fc_infer: "met", memory: "missed"}
    md = bench_model.summarise(_goal_rows(train_eager=(1.0, 1000.0), train_fused=(1.14, 900.0)))
    assert "## Goals (issue 14), from this run's rows" in md
    assert f"| {train} | 1.14× (1.14–1.14) | missed |" in md
    assert "indicative only" not in md  # the rows are in the goals' setting
    assert bench_model.verdicts(_goal_rows(eval_eager=(1.0, ""))) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_model_level_cuda_graph_providers_capture_and_time(tmp_path):
    """On a GPU: the whole training step and the inference of the torchvision and the
    converted model are captured as CUDA graphs, checked against eager on their first
    replay and timed; the fused graph dispatched fused ops when captured; peak memory is
    measured; the resident-memory count equals the allocator's."""
    from resnet_fused.bench import model as bench_model

    device = torch.device("cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    net = _small_model().to(device)
    assert torch.cuda.memory_allocated() - before == bench_model._resident_bytes(
        net, None, (), device
    )
    del net
    rc = main(["bench", "--device", "cuda", "--level", "model", "--model", "resnet18",
               "--batch", "8", "--image-size", "64", "--layouts", "channels_last",
               "--providers", "eager,fused,eager-graph,fused-graph", "--rounds", "2",
               "--min-run-time", "0.05", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    (csv_path,) = tmp_path.glob("model_*.csv")
    rows = {(r["mode"], r["provider"]): r for r in csv.DictReader(csv_path.open())}
    md = csv_path.with_suffix(".md").read_text()
    assert "Not timed" not in md, md
    for mode in ("train", "eval"):
        for provider in ("eager-graph", "fused-graph"):
            r = rows[mode, provider]
            assert float(r["median_ms"]) > 0 and float(r["first_step_s"]) > 0
            assert float(r["peak_mb"]) >= float(r["peak_step_mb"]) >= 0
            assert float(r["graph_pool_mb"]) >= 0
        assert int(rows[mode, "fused-graph"]["fused_op_calls"]) > 0
        assert int(rows[mode, "eager-graph"]["fused_op_calls"]) == 0
        assert float(rows[mode, "fused"]["peak_mb"]) > 0
    assert "resnet18 training step captured as a CUDA graph and timed" in md


@pytest.mark.skipif(not resnet_fused.is_available("cpu", "cpu"), reason="extension not built")
def test_graph_capture_sequence_on_a_cpu_stand_in(monkeypatch):
    """The CUDA-graph providers' capture, run on a CPU with torch.cuda's calls replaced by
    a recording stand-in (no GPU here; the GPU test above runs the real thing): warm-up
    steps on a side stream, the fused-op count taken on the last of them, gradients set to
    None before the capture, one step captured, and the model, its statistics and SGD's
    momentum then back where they were, so that the first replay is the first step."""
    from contextlib import contextmanager

    from resnet_fused.bench import model as bench_model

    log = []

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            log.append("wait_stream")

    @contextmanager
    def context(name):
        log.append(f"enter {name}")
        yield
        log.append(f"exit {name}")

    class Graph:
        def replay(self):
            log.append("replay")

    fake = dict(Stream=Stream, stream=lambda s: context("side stream"),
                current_stream=lambda device=None: Stream(),
                synchronize=lambda device=None: None, CUDAGraph=Graph,
                graph=lambda g: context("capture"), memory_allocated=lambda device=None: 0,
                memory_reserved=lambda device=None: 0, max_memory_allocated=lambda device=None: 0,
                reset_peak_memory_stats=lambda device=None: None)  # fmt: skip
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, value)
    cpu = torch.device("cpu")
    net = resnet_fused.convert(_small_model(), backend="cpu")
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    run, opt = bench_model._step(net, True, False, cpu, autocast_cache=False)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    steps = []

    def step():
        steps.append(list(log))
        assert "enter capture" not in log or all(p.grad is None for p in net.parameters())
        return run(x, y)

    case = bench_model._Case(bench_model.parse_provider("fused-graph"), net, opt, step, cpu,
                             (x, y))  # fmt: skip
    assert case.first_step() > 0
    assert log == ["wait_stream", "enter side stream", "exit side stream", "wait_stream",
                   "enter capture", "exit capture", "replay"]  # fmt: skip
    assert len(steps) == bench_model.GRAPH_WARMUP + 1  # the warm-up, then the capture
    assert case.fused_ops() > 0 and case.graph_pool_mb == 0.0
    for k, v in net.state_dict().items():
        assert torch.equal(v, initial[k]), k
    assert all(s["momentum_buffer"].abs().max() == 0 for s in opt.state.values())
    out = case.call()  # the stand-in's replay runs nothing: the captured step's output
    assert log[-1] == "replay" and out.shape == ()


def test_fused_provider_whose_units_auto_ran_as_aten_ops_is_timed():
    from resnet_fused.bench import model as bench_model

    """Where backend="auto" timed the units and picked eager ops (or aten's convolution
    with the folded bias) everywhere, the step is what the converted model runs."""
    bench_model.check_fused_ran("fused", 0, auto_decided=True)
    with pytest.raises(ValueError, match="dispatched no resnet_fused op"):
        bench_model.check_fused_ran("fused", 0, auto_decided=False)


@pytest.mark.parametrize("mode", ["steady", "default"])
def test_host_allocator_choice_is_applied_and_reported(tmp_path, mode):
    """``--host-allocator default`` leaves glibc's heap settings alone (the timings then
    include the page faults of fresh outputs); ``steady`` (the default) tunes them. Each
    run is a new process (a tuned process stays tuned), and its rows and report say
    which it was."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "resnet_fused", "bench", "--level", "op", "--device", "cpu",
         "--quick", "--ops", "add_relu", "--layouts", "nchw", "--batch", "1", "--providers",
         "eager", "--min-run-time", "0.01", "--rounds", "1", "--host-allocator", mode,
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (csv_path,) = tmp_path.glob("op_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["host_allocator"] for r in rows} == {mode}
    (md,) = tmp_path.glob("op_*.md")
    words = "glibc's default heap settings" if mode == "default" else "steady state"
    assert words in md.read_text()


def test_host_models_case_times_converted_against_eager(monkeypatch):
    """The host level's ``models`` case: every mode of a whole model at the tiny input,
    the converted model checked against eager's first step, then both timed."""
    from resnet_fused.bench import host

    monkeypatch.setattr(host, "HOST_MODELS", ("tutorial_resnet18",))
    rows = []
    host.run_models(rows.append, 0.01, 1, progress=lambda *a: None)
    modes = ("eval", "inference_mode", "train", "eval+autocast", "train+autocast")
    assert [(r["mode"], r["provider"]) for r in rows] == [
        (m, p) for m in modes for p in ("eager", "fused")
    ]
    for r in rows:
        assert r["case"] == "tutorial_resnet18 2x3x64x64" and float(r["median_ms"]) > 0
        assert float(r["time_vs_eager"]) > 0
        if r["provider"] == "fused":
            assert r["rel_diff"] != ""  # (checked against eager's first step)


def test_host_steps_enter_autocast_only_in_the_autocast_modes(monkeypatch):
    """The host level's plain modes time the step a user runs, without a disabled
    autocast context (a few microseconds charged to both providers); the +autocast
    modes run under bf16 autocast."""
    from resnet_fused.bench import host

    entered = []
    real = torch.autocast

    def counting(*args, **kwargs):
        entered.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", counting)
    for mode in ("eval", "inference_mode", "train", "eval+autocast", "train+autocast"):
        entered.clear()
        for step in host._unit_steps(mode).values():
            out = step()
        if "+autocast" in mode:  # (the library's first, planning call may enter others)
            assert entered.count(torch.bfloat16) == 2, mode
        else:
            assert entered == [], mode
        assert out.dtype == torch.float32
