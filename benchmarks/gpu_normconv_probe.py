#!/usr/bin/env python3
"""GPU probe for the NormConv units of issue 15 (see docs/normconv.md).

One self-contained run for a lent GPU machine. It answers, per ResNet-50 shape and dtype:
does cuDNN (through the frontend's Python graph API, `nvidia-cudnn-frontend`) have an
engine for each NormConv graph, how long the plan takes to build, whether the result matches
an fp64 reference as well as eager does, and how fast it runs against the same maths in eager
PyTorch (and against the bare convolution).

Graphs (dims in NCHW order, strides NHWC; scale/bias per channel, in the I/O dtype):

- ``fwd_sbr_genstats``   y = conv(relu(x*s + b), w); Σy, Σy² per output channel (fp32).
                          The forward NormConv unit (cuDNN's ConvBNfprop pattern).
- ``wgrad_sbr``          dw = wgrad(relu(x*s + b), dy): the activation recomputed, not stored
                          (ConvBNwgrad).
- ``dgrad_drelu``        dz = dgrad(dy, w) * [x*s + b > 0] (dgrad + ReLU backward).
- ``fwd_genstats``       y = conv(x, w); Σy, Σy² (the partial ConvBNfprop pattern).
- ``fwd_sbr``            y = conv(relu(x*s + b), w), no statistics.
- ``dgrad_drelu_dbias``  dgrad_drelu plus Σdz per channel (one reduction: the BN bias grad).
- ``fwd_dbarcs``         r = relu(x*s + b + x2*s2 + b2) stored; y = conv1x1(r); Σy, Σy²
                          (the block tail fused into the next 1x1 conv; cuDNN's DBARCS).

The BN-backward weight sums (cuDNN's BNBwdWeight, C++ `dbn_weight`) and `bn_finalize` are not
in the frontend's Python API (C++ only), so they are not probed here; `--cpp-check` compiles a
C++ translation unit that builds those graphs with the header-only frontend (syntax only).

Usage on the GPU machine (the frontend wheel carried in a git-ignored folder):

    python3 benchmarks/gpu_normconv_probe.py --wheel-dir .carry/wheels --budget 420

Everything printed also goes to $OUT/normconv_probe.txt as it is printed (one JSON record per
case in $OUT/normconv_probe.jsonl), so a timeout keeps the partial result. Without a CUDA GPU
it says so and exits 2; ``--construct-only`` then builds the graph objects (no engine, no
GPU) to check the API calls.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

EXIT_NO_GPU = 2

SHAPES = {
    # name: (N, C, K, H, W, R, pad, stride)
    "l3.conv2": (256, 256, 256, 14, 14, 3, 1, 1),
    "l2.conv3": (256, 128, 512, 28, 28, 1, 0, 1),
}
VARIANTS = (
    "fwd_sbr_genstats",
    "wgrad_sbr",
    "dgrad_drelu",
    "fwd_genstats",
    "fwd_sbr",
    "dgrad_drelu_dbias",
    "fwd_dbarcs",
)


class Log:
    """Print to stdout and append to a file, flushed line by line."""

    def __init__(self, path: str | None):
        self.path = path
        self.fh = open(path, "a", buffering=1) if path else None  # noqa: SIM115

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if self.fh:
            self.fh.write(line + "\n")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--wheel-dir",
        default=os.environ.get("NORMCONV_FE_WHEELS"),
        help="folder holding nvidia_cudnn_frontend-*.whl (the one for this Python is unpacked "
        "into a temporary folder and imported); env NORMCONV_FE_WHEELS",
    )
    p.add_argument(
        "--fe-path",
        default=os.environ.get("NORMCONV_FE_PATH"),
        help="a folder that already holds the `cudnn` package (e.g. a pip --target folder)",
    )
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=None, help="override N of every shape")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--iters", type=int, default=20, help="calls per timed block")
    p.add_argument(
        "--budget", type=float, default=420.0, help="seconds; no new case starts after this"
    )
    p.add_argument("--floor", type=float, default=1e-3, help="tolerance floor (relative)")
    p.add_argument("--cpp-check", action="store_true", help="also syntax-check the C++ route")
    p.add_argument(
        "--construct-only",
        action="store_true",
        help="only build the graph objects (no GPU needed; checks the API calls)",
    )
    return p.parse_args()


# --------------------------------------------------------------------------- environment


def _loaded_libs(fragment: str) -> list[str]:
    """Paths of the loaded shared objects whose file name contains `fragment`."""
    paths = set()
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if fragment in os.path.basename(path):
                    paths.add(path)
    except OSError:
        pass
    return sorted(paths)


def _unpack_wheel(wheel_dir: str, log: Log) -> str | None:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = sorted(glob.glob(os.path.join(wheel_dir, f"nvidia_cudnn_frontend-*-{tag}-*.whl")))
    if not wheels:
        have = sorted(os.path.basename(w) for w in glob.glob(os.path.join(wheel_dir, "*.whl")))
        log(f"FE: no nvidia_cudnn_frontend wheel for {tag} in {wheel_dir} (found: {have})")
        return None
    dest = tempfile.mkdtemp(prefix="cudnn_fe_")
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extractall(dest)
    log(f"FE: unpacked {os.path.basename(wheels[-1])} into {dest}")
    return dest


def _import_frontend(args, log: Log):
    """Import the frontend's `cudnn` module, bound to the libcudnn torch already loaded."""
    site = None
    if args.fe_path:
        site = args.fe_path
    elif args.wheel_dir:
        site = _unpack_wheel(args.wheel_dir, log)
        if site is None:
            return None, None
    if site:
        sys.path.insert(0, site)
    # The frontend's Python graph (1.32) queries the device through cuda-bindings (the GPU
    # image has it); fall back to carried cuda_bindings/cuda_pathfinder wheels if it does not.
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError as exc:
        log(f"FE: cuda.bindings not importable ({exc}); looking for carried wheels")
        tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
        for pattern in (f"cuda_bindings-*-{tag}-*.whl", "cuda_pathfinder-*.whl"):
            found = sorted(glob.glob(os.path.join(args.wheel_dir or "", pattern)))
            if found:
                dest = tempfile.mkdtemp(prefix="cuda_py_")
                with zipfile.ZipFile(found[-1]) as zf:
                    zf.extractall(dest)
                sys.path.insert(0, dest)
                log(f"FE: unpacked {os.path.basename(found[-1])}")
    # The frontend dlopens the first libcudnn.so.9 on LD_LIBRARY_PATH, else the one in this
    # interpreter's site-packages (nvidia/cudnn/lib). Put the folder of the libcudnn that torch
    # has loaded first, so that one process holds one libcudnn.
    torch_cudnn = [p for p in _loaded_libs("libcudnn.so") if "libcudnn.so" in os.path.basename(p)]
    if torch_cudnn:
        folder = os.path.dirname(torch_cudnn[0])
        old = os.environ.get("LD_LIBRARY_PATH", "")
        os.environ["LD_LIBRARY_PATH"] = folder + (os.pathsep + old if old else "")
    try:
        import cudnn
    except Exception as exc:  # the import error is the finding
        log(f"FE: import cudnn FAILED: {type(exc).__name__}: {exc}")
        return None, site
    return cudnn, site


def _env_report(args, log: Log, torch, cudnn, site) -> dict:
    info: dict = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_cudnn": torch.backends.cudnn.version()
        if torch.backends.cudnn.is_available()
        else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    if cudnn is not None:
        info["fe_version"] = getattr(cudnn, "__version__", "?")
        info["fe_file"] = cudnn.__file__
        try:
            info["fe_backend_version"] = cudnn.backend_version()
        except Exception as exc:
            info["fe_backend_version"] = f"error {exc}"
    info["libcudnn_loaded"] = _loaded_libs("libcudnn.so")
    for key, value in info.items():
        log(f"ENV {key}: {value}")
    if cudnn is not None and info.get("torch_cudnn") is not None:
        same = info.get("fe_backend_version") == info["torch_cudnn"]
        log(f"ENV frontend and torch see the same cuDNN version: {same}")
    mains = [p for p in info["libcudnn_loaded"] if os.path.basename(p).startswith("libcudnn.so")]
    log(f"ENV one libcudnn.so in this process: {len(mains) <= 1} ({mains})")
    return info


def _cpp_check(log: Log, torch, site: str | None) -> None:
    """Syntax-check a C++ unit that builds the NormConv graphs with the header-only frontend."""
    fe_inc = None
    for cand in ([os.path.join(site, "include")] if site else []) + [
        os.environ.get("CUDNN_FRONTEND_INCLUDE", "")
    ]:
        if cand and os.path.isfile(os.path.join(cand, "cudnn_frontend.h")):
            fe_inc = cand
    cudnn_inc = None
    try:
        import nvidia.cudnn

        for base in list(nvidia.cudnn.__path__):
            if os.path.isfile(os.path.join(base, "include", "cudnn.h")):
                cudnn_inc = os.path.join(base, "include")
    except ImportError:
        pass
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    try:
        import nvidia

        for base in list(nvidia.__path__):
            cands += [os.path.join(base, "cu13"), os.path.join(base, "cuda_runtime")]
    except ImportError:
        pass
    # cudnn.h needs cuda_runtime_api.h; the frontend's headers also include nvrtc.h
    cuda_incs = []
    for header in ("cuda_runtime_api.h", "nvrtc.h"):
        for cand in cands:
            inc = os.path.join(cand, "include") if cand else ""
            if inc and os.path.isfile(os.path.join(inc, header)):
                if inc not in cuda_incs:
                    cuda_incs.append(inc)
                break
    cuda_inc = (
        os.pathsep.join(cuda_incs)
        if len(cuda_incs)
        and all(
            any(os.path.isfile(os.path.join(i, h)) for i in cuda_incs)
            for h in ("cuda_runtime_api.h", "nvrtc.h")
        )
        else None
    )
    log(f"CPP frontend headers: {fe_inc}; cudnn.h: {cudnn_inc}; CUDA include: {cuda_inc}")
    cxx = shutil.which("g++") or shutil.which("c++")
    if not (fe_inc and cudnn_inc and cuda_inc and cxx):
        log("CPP check SKIPPED: a header folder or the compiler is missing")
        return
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "normconv_graphs.cpp")
        with open(src, "w") as fh:
            fh.write(CPP_UNIT)
        cmd = [cxx, "-std=c++17", "-fsyntax-only", "-I", fe_inc, "-I", cudnn_inc]
        for inc in cuda_inc.split(os.pathsep):
            cmd += ["-I", inc]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, src], capture_output=True, text=True, timeout=240)
        dt = time.perf_counter() - t0
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    log(f"CPP check: rc={proc.returncode} in {dt:.1f} s" + ("" if proc.returncode else " (OK)"))
    for line in tail:
        log("CPP   " + line)


CPP_UNIT = r"""
#include <cudnn_frontend.h>
namespace fe = cudnn_frontend;
using T = std::shared_ptr<fe::graph::Tensor_attributes>;
static T nhwc(fe::graph::Graph& g, const char* name, int64_t n, int64_t c, int64_t h, int64_t w) {
    return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_dim({n, c, h, w})
                        .set_stride({c * h * w, 1, c * w, c}));
}
// Forward NormConv: scale-bias-relu prologue, conv, genstats; then bn_finalize.
void forward_graphs(int64_t n, int64_t c, int64_t k, int64_t h, int64_t w, int64_t r) {
    fe::graph::Graph g;
    g.set_io_data_type(fe::DataType_t::BFLOAT16).set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto X = nhwc(g, "x", n, c, h, w), S = nhwc(g, "s", 1, c, 1, 1), B = nhwc(g, "b", 1, c, 1, 1);
    auto Wt = nhwc(g, "w", k, c, r, r);
    auto mul = fe::graph::Pointwise_attributes().set_mode(fe::PointwiseMode_t::MUL);
    auto add = fe::graph::Pointwise_attributes().set_mode(fe::PointwiseMode_t::ADD);
    auto relu = fe::graph::Pointwise_attributes().set_mode(fe::PointwiseMode_t::RELU_FWD);
    auto a = g.pointwise(g.pointwise(g.pointwise(X, S, mul), B, add), relu);
    auto conv = fe::graph::Conv_fprop_attributes().set_padding({r / 2, r / 2}).set_stride({1, 1})
                    .set_dilation({1, 1});
    auto Y = g.conv_fprop(a, Wt, conv);
    Y->set_output(true);
    auto [sum, sq_sum] = g.genstats(Y, fe::graph::Genstats_attributes());
    sum->set_output(true).set_data_type(fe::DataType_t::FLOAT);
    sq_sum->set_output(true).set_data_type(fe::DataType_t::FLOAT);

    fe::graph::Graph f;
    f.set_io_data_type(fe::DataType_t::FLOAT).set_compute_data_type(fe::DataType_t::FLOAT);
    auto s_in = nhwc(f, "sum", 1, k, 1, 1), q_in = nhwc(f, "sq_sum", 1, k, 1, 1);
    auto gamma = nhwc(f, "gamma", 1, k, 1, 1), beta = nhwc(f, "beta", 1, k, 1, 1);
    auto rm = nhwc(f, "rm", 1, k, 1, 1), rv = nhwc(f, "rv", 1, k, 1, 1);
    auto momentum = f.tensor(0.1f), eps = f.tensor(1e-5f), count = f.tensor(n * h * w);
    auto opts = fe::graph::BN_finalize_attributes().set_previous_running_stats(rm, rv, momentum);
    auto outs = f.bn_finalize(s_in, q_in, gamma, beta, eps, count, opts);
    for (auto& t : outs) if (t) t->set_output(true);
}
// Backward: wgrad with the same prologue; dgrad + drelu + BN backward weight sums.
void backward_graphs(int64_t n, int64_t c, int64_t k, int64_t h, int64_t w, int64_t r) {
    auto mul = fe::graph::Pointwise_attributes().set_mode(fe::PointwiseMode_t::MUL);
    auto add = fe::graph::Pointwise_attributes().set_mode(fe::PointwiseMode_t::ADD);
    fe::graph::Graph g;
    g.set_io_data_type(fe::DataType_t::BFLOAT16).set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto X = nhwc(g, "x", n, c, h, w), S = nhwc(g, "s", 1, c, 1, 1), B = nhwc(g, "b", 1, c, 1, 1);
    auto DY = nhwc(g, "dy", n, k, h, w);
    auto a = g.pointwise(g.pointwise(g.pointwise(X, S, mul), B, add),
                         fe::graph::Pointwise_attributes().set_mode(fe::PointwiseMode_t::RELU_FWD));
    auto wg = fe::graph::Conv_wgrad_attributes().set_padding({r / 2, r / 2}).set_stride({1, 1})
                  .set_dilation({1, 1});
    auto DW = g.conv_wgrad(DY, a, wg);
    DW->set_output(true).set_dim({k, c, r, r});

    fe::graph::Graph d;
    d.set_io_data_type(fe::DataType_t::BFLOAT16).set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto DY2 = nhwc(d, "dy", n, k, h, w), W2 = nhwc(d, "w", k, c, r, r);
    auto dg = fe::graph::Conv_dgrad_attributes().set_padding({r / 2, r / 2}).set_stride({1, 1})
                  .set_dilation({1, 1});
    auto DA = d.conv_dgrad(DY2, W2, dg);
    DA->set_dim({n, c, h, w});
    auto X2 = nhwc(d, "x", n, c, h, w);
    auto M = nhwc(d, "mean", 1, c, 1, 1), V = nhwc(d, "invstd", 1, c, 1, 1);
    auto G = nhwc(d, "gamma", 1, c, 1, 1), Be = nhwc(d, "beta", 1, c, 1, 1);
    for (auto t : {M, V, G, Be}) t->set_data_type(fe::DataType_t::FLOAT);
    auto sub = fe::graph::Pointwise_attributes().set_mode(fe::PointwiseMode_t::SUB);
    auto pre = d.pointwise(d.pointwise(d.pointwise(d.pointwise(X2, M, sub), V, mul), G, mul), Be, add);
    auto DZ = d.pointwise(DA, pre,
                          fe::graph::Pointwise_attributes().set_mode(fe::PointwiseMode_t::RELU_BWD));
    DZ->set_output(true);
    auto [dscale, dbias, eq_dy, eq_x, eq_b] =
        d.dbn_weight(DZ, X2, M, V, G, fe::graph::DBN_weight_attributes());
    for (auto t : {dscale, dbias, eq_dy, eq_x, eq_b}) t->set_output(true);
}
"""


# --------------------------------------------------------------------------- graphs


def _fe_dtype(cudnn, torch_dtype):
    import torch

    return {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[
        torch_dtype
    ]


def _t(g, name, ref):
    """A graph tensor shaped like the torch tensor `ref` (NCHW dims, its strides, its dtype)."""
    return g.tensor(name=name, dim=list(ref.size()), stride=list(ref.stride()), data_type=ref.dtype)


def _prologue(g, x, s, b, tag=""):
    sx = g.scale(name="scale" + tag, input=x, scale=s)
    return g.bias(name="bias" + tag, input=sx, bias=b)


def build_graph(cudnn, variant, data, handle, io_dtype):
    """Declare `variant`'s graph over the tensors in `data`. Returns (graph, {tensor: buffer})."""
    g = cudnn.pygraph(
        io_data_type=io_dtype,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )
    f32 = cudnn.data_type.FLOAT
    pad, stride = data["pad"], data["stride"]
    conv_kw = dict(padding=[pad, pad], stride=[stride, stride], dilation=[1, 1])
    X, W = _t(g, "x", data["x"]), _t(g, "w", data["w"])
    S, B = _t(g, "s", data["s"]), _t(g, "b", data["b"])
    pack = {X: data["x"], W: data["w"], S: data["s"], B: data["b"]}

    if variant.startswith("fwd"):
        if variant == "fwd_genstats":
            pack = {X: data["x"], W: data["w"]}
            a = X
        elif variant == "fwd_dbarcs":
            X2, S2, B2 = _t(g, "x2", data["x2"]), _t(g, "s2", data["s"]), _t(g, "b2", data["b"])
            pack.update({X2: data["x2"], S2: data["s"], B2: data["b"]})
            z = g.add(name="add", a=_prologue(g, X, S, B), b=_prologue(g, X2, S2, B2, "2"))
            a = g.relu(name="relu", input=z)
            a.set_output(True).set_data_type(io_dtype)
            pack[a] = data["r_out"]
        else:
            a = g.relu(name="relu", input=_prologue(g, X, S, B))
        Y = g.conv_fprop(name="conv", image=a, weight=W, **conv_kw)
        Y.set_output(True).set_data_type(io_dtype)
        pack[Y] = data["y_out"]
        if variant != "fwd_sbr":
            SUM, SQ = g.genstats(name="genstats", input=Y)
            SUM.set_output(True).set_data_type(f32)
            SQ.set_output(True).set_data_type(f32)
            pack.update({SUM: data["sum_out"], SQ: data["sq_out"]})
    elif variant == "wgrad_sbr":
        DY = _t(g, "dy", data["dy"])
        a = g.relu(name="relu", input=_prologue(g, X, S, B))
        DW = g.conv_wgrad(name="wgrad", image=a, loss=DY, **conv_kw)
        DW.set_output(True).set_dim(list(data["w"].size())).set_data_type(io_dtype)
        DW.set_stride(list(data["dw_out"].stride()))
        pack.update({DY: data["dy"], DW: data["dw_out"]})
    elif variant.startswith("dgrad"):
        DY = _t(g, "dy", data["dy"])
        DA = g.conv_dgrad(name="dgrad", loss=DY, filter=W, **conv_kw)
        DA.set_dim(list(data["x"].size())).set_stride(list(data["x"].stride()))
        DZ = g.relu_backward(name="drelu", loss=DA, input=_prologue(g, X, S, B))
        DZ.set_output(True).set_data_type(io_dtype)
        pack.update({DY: data["dy"], DZ: data["dz_out"]})
        if variant == "dgrad_drelu_dbias":
            DB = g.reduction(name="dbias", input=DZ, mode=cudnn.reduction_mode.ADD)
            DB.set_output(True).set_data_type(f32).set_dim([1, data["C"], 1, 1])
            DB.set_stride([data["C"], 1, data["C"], data["C"]])
            pack[DB] = data["dbias_out"]
    else:
        raise ValueError(f"unknown variant {variant}")
    return g, pack


# --------------------------------------------------------------------------- data, maths


def make_data(torch, shape, dtype, device, variant, batch=None):
    N, C, K, H, W, R, pad, stride = shape
    N = batch or N
    P = (H + 2 * pad - R) // stride + 1
    cl = torch.channels_last
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=gen, device=device) * scale + shift).to(dtype)

    d = {"N": N, "C": C, "K": K, "P": P, "R": R, "pad": pad, "stride": stride}
    d["x"] = rnd(N, C, H, W).contiguous(memory_format=cl)
    d["w"] = rnd(K, C, R, R, scale=math.sqrt(2.0 / (C * R * R))).contiguous(memory_format=cl)
    d["s"] = rnd(1, C, 1, 1, scale=0.1, shift=1.0).contiguous(memory_format=cl)
    d["b"] = rnd(1, C, 1, 1, scale=0.1).contiguous(memory_format=cl)
    if variant.startswith("fwd"):
        d["y_out"] = torch.empty(N, K, P, P, device=device, dtype=dtype, memory_format=cl)
        d["sum_out"] = torch.empty(1, K, 1, 1, device=device, dtype=torch.float32)
        d["sq_out"] = torch.empty(1, K, 1, 1, device=device, dtype=torch.float32)
        if variant == "fwd_dbarcs":
            d["x2"] = rnd(N, C, H, W).contiguous(memory_format=cl)
            d["r_out"] = torch.empty_like(d["x"])
    else:
        d["dy"] = rnd(N, K, P, P).contiguous(memory_format=cl)
        d["dw_out"] = torch.empty_like(d["w"])
        d["dz_out"] = torch.empty_like(d["x"])
        d["dbias_out"] = torch.empty(1, C, 1, 1, device=device, dtype=torch.float32)
    return d


def reference(torch, F, variant, d, dt):
    """The variant's outputs computed in dtype `dt` by eager ops (fp64 gives the reference)."""
    conv_kw = dict(stride=d["stride"], padding=d["pad"])
    x, w, s, b = (d[k].to(dt) for k in ("x", "w", "s", "b"))
    pre = torch.addcmul(b, x, s)
    out = {}
    if variant == "fwd_dbarcs":
        pre = pre + torch.addcmul(b, d["x2"].to(dt), s)
        out["r"] = torch.relu(pre)
    a = x if variant == "fwd_genstats" else torch.relu(pre)
    if variant.startswith("fwd"):
        y = F.conv2d(a, w, **conv_kw)
        out["y"] = y
        if variant != "fwd_sbr":
            yd = y.double()
            out["sum"] = yd.sum((0, 2, 3))
            out["sq"] = (yd * yd).sum((0, 2, 3))
    elif variant == "wgrad_sbr":
        out["dw"] = torch.ops.aten.convolution_backward(
            d["dy"].to(dt),
            a,
            w,
            None,
            [d["stride"]] * 2,
            [d["pad"]] * 2,
            [1, 1],
            False,
            [0, 0],
            1,
            [False, True, False],
        )[1]
    else:
        da = torch.ops.aten.convolution_backward(
            d["dy"].to(dt),
            a,
            w,
            None,
            [d["stride"]] * 2,
            [d["pad"]] * 2,
            [1, 1],
            False,
            [0, 0],
            1,
            [True, False, False],
        )[0]
        dz = torch.ops.aten.threshold_backward(da, a, 0)
        out["dz"] = dz
        if variant == "dgrad_drelu_dbias":
            out["dbias"] = dz.double().sum((0, 2, 3))
    return out


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| (fp64)."""
    ref = ref.double()
    scale = ref.abs().max().item() or 1.0
    return (got.double().reshape(ref.shape) - ref).abs().max().item() / scale


def fused_outputs(variant, d):
    if variant.startswith("fwd"):
        out = {"y": d["y_out"]}
        if variant != "fwd_sbr":
            out["sum"], out["sq"] = d["sum_out"].flatten(), d["sq_out"].flatten()
        if variant == "fwd_dbarcs":
            out["r"] = d["r_out"]
        return out
    if variant == "wgrad_sbr":
        return {"dw": d["dw_out"]}
    out = {"dz": d["dz_out"]}
    if variant == "dgrad_drelu_dbias":
        out["dbias"] = d["dbias_out"].flatten()
    return out


def eager_step(torch, F, variant, d):
    """The same maths as eager PyTorch runs it (elementwise BN-apply, cuDNN conv, reductions)."""
    conv_kw = dict(stride=d["stride"], padding=d["pad"])
    stride, pad = [d["stride"]] * 2, [d["pad"]] * 2
    x, w, s, b = d["x"], d["w"], d["s"], d["b"]
    if variant.startswith("fwd"):
        if variant == "fwd_genstats":
            a = x
        elif variant == "fwd_dbarcs":
            a = torch.relu_(torch.addcmul(b, x, s).add_(torch.addcmul(b, d["x2"], s)))
        else:
            a = torch.relu_(torch.addcmul(b, x, s))
        y = F.conv2d(a, w, **conv_kw)
        if variant != "fwd_sbr":
            torch.batch_norm_stats(y, 1e-5)  # eager BN's one-pass statistics
        return y
    a = torch.relu_(torch.addcmul(b, x, s))  # eager stores a; recompute it as its stand-in
    if variant == "wgrad_sbr":
        return torch.ops.aten.convolution_backward(
            d["dy"], a, w, None, stride, pad, [1, 1], False, [0, 0], 1, [False, True, False]
        )[1]
    da = torch.ops.aten.convolution_backward(
        d["dy"], a, w, None, stride, pad, [1, 1], False, [0, 0], 1, [True, False, False]
    )[0]
    dz = torch.ops.aten.threshold_backward(da, a, 0)
    if variant == "dgrad_drelu_dbias":
        torch.sum(dz, dim=(0, 2, 3), dtype=torch.float32)
    return dz


def conv_only(torch, F, variant, d):
    stride, pad = [d["stride"]] * 2, [d["pad"]] * 2
    if variant.startswith("fwd"):
        return F.conv2d(d["x"], d["w"], stride=d["stride"], padding=d["pad"])
    mask = [False, True, False] if variant == "wgrad_sbr" else [True, False, False]
    return torch.ops.aten.convolution_backward(
        d["dy"], d["x"], d["w"], None, stride, pad, [1, 1], False, [0, 0], 1, mask
    )


def time_interleaved(torch, fns: dict, rounds: int, iters: int) -> dict:
    """Median ms per call of each fn, blocks interleaved round by round (order rotated)."""
    names = list(fns)
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    per = {n: [] for n in names}
    host = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            for _ in range(iters):
                fns[n]()
            end.record()
            host[n].append((time.perf_counter() - t0) * 1e3 / iters)
            end.synchronize()
            per[n].append(start.elapsed_time(end) / iters)
    out = {}
    for n in names:
        out[n] = sorted(per[n])[len(per[n]) // 2]
        out[n + "_host"] = sorted(host[n])[len(host[n]) // 2]
    ratios = sorted(a / f for a, f in zip(per.get("eager", []), per.get("fused", []), strict=False))
    if ratios:
        out["eager_over_fused"] = ratios[len(ratios) // 2]
    ratios = sorted(a / f for a, f in zip(per.get("conv", []), per.get("fused", []), strict=False))
    if ratios:
        out["conv_over_fused"] = ratios[len(ratios) // 2]
    return out


# --------------------------------------------------------------------------- one case


def run_case(args, log, torch, F, cudnn, handle, shape_name, dtype_name, variant) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    shape = SHAPES[shape_name]
    rec = {"shape": shape_name, "dtype": dtype_name, "variant": variant, "status": "?"}
    tag = f"[{variant} {shape_name} {dtype_name}]"
    if variant == "fwd_dbarcs" and shape[5] != 1:
        rec["status"] = "n/a (1x1 convolutions only)"
        return rec
    d = make_data(torch, shape, dtype, "cuda", variant, args.batch)
    io = _fe_dtype(cudnn, dtype)
    t0 = time.perf_counter()
    try:
        g, pack = build_graph(cudnn, variant, d, handle, io)
        g.validate()
        g.build_operation_graph()
        t1 = time.perf_counter()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        t2 = time.perf_counter()
        g.build_plans()
        t3 = time.perf_counter()
    except cudnn.cudnnGraphNotSupportedError as exc:
        rec["status"] = "no engine supports this graph"
        rec["error"] = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ""
        rec["build_s"] = round(time.perf_counter() - t0, 3)
        log(f"{tag} NO ENGINE supports this graph ({rec['build_s']} s): {rec['error']}")
        return rec
    rec["build_s"] = round(t3 - t0, 3)
    rec["build_split_s"] = [round(t1 - t0, 3), round(t2 - t1, 3), round(t3 - t2, 3)]
    try:
        count = g.get_execution_plan_count()
        rec["plans"] = count
        rec["plan_names"] = [g.get_plan_name_at_index(i) for i in range(min(count, 3))]
    except Exception as exc:
        rec["plan_names"] = f"? {type(exc).__name__}"
    ws = torch.empty(max(g.get_workspace_size(), 1), device="cuda", dtype=torch.uint8)
    rec["workspace_mb"] = round(ws.numel() / 2**20, 2)
    log(
        f"{tag} built in {rec['build_s']} s (graph {rec['build_split_s'][0]}, heuristics "
        f"{rec['build_split_s'][1]}, plans {rec['build_split_s'][2]}); plans {rec.get('plans')}"
        f" first {rec.get('plan_names')}; workspace {rec['workspace_mb']} MiB"
    )

    def fused():
        g.execute(pack, ws, handle=handle)

    fused()
    torch.cuda.synchronize()
    # correctness: fp64 reference from the same low-precision inputs; eager in the dtype
    torch.backends.cudnn.allow_tf32 = False
    ref = reference(torch, F, variant, d, torch.float64)
    eag = reference(torch, F, variant, d, dtype)
    got = fused_outputs(variant, d)
    ok = True
    errs = {}
    for key, r in ref.items():
        e_f, e_e = rel_err(got[key], r), rel_err(eag[key], r)
        passed = e_f <= 2 * e_e + args.floor
        ok &= passed
        errs[key] = {"fused": e_f, "eager": e_e, "pass": passed}
        log(
            f"{tag} check {key}: rel err fused {e_f:.2e}, eager {e_e:.2e} "
            f"-> {'PASS' if passed else 'FAIL'} (<= 2x eager + {args.floor:g})"
        )
    rec["errors"] = errs
    del ref, eag
    torch.cuda.empty_cache()
    t = time_interleaved(
        torch,
        {
            "fused": fused,
            "eager": lambda: eager_step(torch, F, variant, d),
            "conv": lambda: conv_only(torch, F, variant, d),
        },
        args.rounds,
        args.iters,
    )
    rec["timing_ms"] = {k: round(v, 4) for k, v in t.items()}
    log(
        f"{tag} time: fused {t['fused']:.4f} ms (host {t['fused_host']:.4f} ms/call), eager "
        f"{t['eager']:.4f} ms, conv alone {t['conv']:.4f} ms; eager/fused "
        f"{t.get('eager_over_fused', float('nan')):.3f}x, conv/fused "
        f"{t.get('conv_over_fused', float('nan')):.3f}"
    )
    rec["status"] = "ok" if ok else "numerics FAIL"
    return rec


# --------------------------------------------------------------------------- main


def construct_only(args, log, torch, cudnn) -> int:
    """Declare every graph on CPU tensors (small batch); no engine, no GPU."""
    bad = 0
    for variant in args.variants.split(","):
        for name in args.shapes.split(","):
            for dn in args.dtypes.split(","):
                dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dn]
                if variant == "fwd_dbarcs" and SHAPES[name][5] != 1:
                    continue
                try:
                    d = make_data(torch, SHAPES[name], dtype, "cpu", variant, batch=2)
                    _, pack = build_graph(cudnn, variant, d, None, _fe_dtype(cudnn, dtype))
                    log(f"[{variant} {name} {dn}] declared: {len(pack)} bound tensors")
                except Exception as exc:
                    bad += 1
                    log(f"[{variant} {name} {dn}] declaring FAILED: {type(exc).__name__}: {exc}")
    return 1 if bad else 0


def main() -> int:
    args = _parse()
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "normconv_probe.txt"))
    jsonl = os.path.join(args.out, "normconv_probe.jsonl")
    start = time.perf_counter()
    log(f"normconv probe {time.strftime('%Y-%m-%d %H:%M:%S')} args {vars(args)}")
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:
        log(f"needs PyTorch: {exc}")
        return EXIT_NO_GPU
    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.construct_only:
        log("This probe needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.")
        log("(--construct-only declares the graphs without a GPU, given the frontend wheel.)")
        return EXIT_NO_GPU
    if has_gpu:
        torch.backends.cudnn.version()  # loads torch's libcudnn before the frontend looks
    cudnn, site = _import_frontend(args, log)
    _env_report(args, log, torch, cudnn, site)
    if args.cpp_check:
        try:
            _cpp_check(log, torch, site)
        except Exception as exc:
            log(f"CPP check FAILED to run: {type(exc).__name__}: {exc}")
    if cudnn is None:
        log("The cuDNN frontend could not be imported: no graph probed.")
        return 1
    if args.construct_only:
        return construct_only(args, log, torch, cudnn)

    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    records = []
    cases = [
        (v, s, dt)
        for v in args.variants.split(",")
        for dt in args.dtypes.split(",")
        for s in args.shapes.split(",")
    ]
    for variant, shape_name, dtype_name in cases:
        if time.perf_counter() - start > args.budget:
            log(f"[{variant} {shape_name} {dtype_name}] SKIPPED: budget of {args.budget} s spent")
            records.append(
                {"shape": shape_name, "dtype": dtype_name, "variant": variant, "status": "budget"}
            )
            continue
        try:
            rec = run_case(args, log, torch, F, cudnn, handle, shape_name, dtype_name, variant)
        except Exception as exc:
            msg = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
            log(f"[{variant} {shape_name} {dtype_name}] ERROR {msg}")
            log("  " + " | ".join(traceback.format_exc().strip().splitlines()[-4:]))
            rec = {"shape": shape_name, "dtype": dtype_name, "variant": variant, "status": msg}
        records.append(rec)
        with open(jsonl, "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    log("\n## Summary\n")
    log(
        "| variant | shape | dtype | status | build s | fused ms | eager ms | conv ms | eager/fused |"
    )
    log("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        t = r.get("timing_ms", {})
        log(
            f"| {r['variant']} | {r['shape']} | {r['dtype']} | {r['status']} | "
            f"{r.get('build_s', '')} | {t.get('fused', '')} | {t.get('eager', '')} | "
            f"{t.get('conv', '')} | {t.get('eager_over_fused', '')} |"
        )
    log(f"probe done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
