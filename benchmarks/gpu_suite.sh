#!/usr/bin/env bash
# The GPU check in one go, for a machine with a CUDA GPU and torch/triton installed:
# build the extension in place, run the whole test suite on the GPU, run the GPU
# benchmarks. Everything it writes goes under $OUT (default: ./gpu_out).
#
#   OUT=/tmp/x STAGES="build test bench" bash benchmarks/gpu_suite.sh
#
# Variables: PYTHON (default python3), STAGES (any of build test bench; default all),
# TEST_ARGS (extra pytest arguments), BENCH_ARGS (extra `resnet_fused bench` arguments),
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds), TORCH_CUDA_ARCH_LIST (default: this GPU's).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${STAGES:-build test bench}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

if [[ " $STAGES " == *" build "* ]]; then
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  start=$SECONDS
  if ! $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -n 60 "$OUT/build.log"
    echo "BUILD FAILED"
    exit 1
  fi
  echo "build: $((SECONDS - start)) s (arch $TORCH_CUDA_ARCH_LIST)"
  $PY -m resnet_fused info | tee "$OUT/info.txt"
fi

if [[ " $STAGES " == *" test "* ]]; then
  start=$SECONDS
  xdist=()
  if $PY -c "import xdist" 2>/dev/null; then xdist=(-n "${TEST_WORKERS:-8}"); fi
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -rfE -p no:cacheprovider "${xdist[@]}" \
      ${TEST_ARGS:-} >"$OUT/tests.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 40
  tail -n 3 "$OUT/tests.log"
  echo "tests: rc=$rc, $((SECONDS - start)) s"
  [[ $rc -ne 0 ]] && status=1
fi

if [[ " $STAGES " == *" bench "* ]]; then
  start=$SECONDS
  timeout "${BENCH_TIMEOUT:-240}" $PY -m resnet_fused bench --device cuda --out "$OUT" \
      ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
  rc=$?
  tail -n 40 "$OUT/bench.log"
  echo "bench: rc=$rc, $((SECONDS - start)) s"
  [[ $rc -ne 0 ]] && status=1
fi
exit $status
