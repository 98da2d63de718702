"""Build script for resnet_fused and its C++/CUDA extension ``resnet_fused._C``.

The CPU sources are always compiled. The CUDA sources are compiled whenever the
installed torch has CUDA and ``nvcc`` is found -- also on machines without a GPU, so
that every build proves the CUDA code compiles and links.

Environment variables:
    RESNET_FUSED_SKIP_CUDA=1   build the CPU part only
    TORCH_CUDA_ARCH_LIST       CUDA architectures (default here: "8.0;9.0")
    MAX_JOBS                   parallel compile jobs (ninja)
    CUDA_HOME                  CUDA toolkit folder (found from nvcc when unset)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _is_toolkit(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h")) or bool(
        glob.glob(os.path.join(folder, "targets", "*", "include", "cuda_runtime.h"))
    )


def _find_cuda_home() -> str | None:
    """Locate the real CUDA toolkit, seeing through an ``nvcc`` wrapper script.

    torch's builder guesses CUDA_HOME as the parent of the folder holding ``nvcc``;
    when ``nvcc`` is a wrapper (``exec /usr/local/cuda-X/bin/nvcc "$@"``) that guess
    is wrong, so look at the wrapper's target first.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and _is_toolkit(os.environ[var]):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    candidate = os.path.dirname(os.path.dirname(real))
    if _is_toolkit(candidate):
        return candidate
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            match = re.search(rb"(/\S+)/bin/nvcc\b", head)
            if match and _is_toolkit(match.group(1).decode()):
                return match.group(1).decode()
    except OSError:
        pass
    for folder in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if _is_toolkit(folder):
            return folder
    return None


def _extensions():
    skip_cuda = _truthy("RESNET_FUSED_SKIP_CUDA")
    cuda_home = None if skip_cuda else _find_cuda_home()
    if cuda_home is not None:
        # Must be set before torch.utils.cpp_extension is imported: it reads it once.
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = not skip_cuda and torch.version.cuda is not None and cuda_home is not None
    if not skip_cuda and not with_cuda:
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc was not found"
        print(f"resnet_fused: building without CUDA ({why})", file=sys.stderr)

    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    debug = _truthy("RESNET_FUSED_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else ""
    define_macros = [
        ("RESNET_FUSED_WITH_CUDA", "1" if with_cuda else "0"),
        ("RESNET_FUSED_CUDA_ARCH_LIST", f'"{arch_list}"'),
        ("RESNET_FUSED_TORCH_VERSION", f'"{torch.__version__}"'),
        ("RESNET_FUSED_CUDA_VERSION", f'"{torch.version.cuda or ""}"' if with_cuda else '""'),
    ]
    # -fopenmp: at::parallel_for is inline and uses OpenMP, as torch's own build does.
    extra_compile_args = {"cxx": [*opt, "-fvisibility=hidden", "-fopenmp"]}
    if with_cuda:
        extra_compile_args["nvcc"] = [*opt]
        ext = CUDAExtension(
            "resnet_fused._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
        )
    else:
        ext = CppExtension(
            "resnet_fused._C",
            cpu_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["resnet_fused", "resnet_fused.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
