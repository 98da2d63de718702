#!/usr/bin/env bash
# The GPU check in one go, for a machine with a CUDA GPU and torch/triton installed:
# build the extension in place, run the whole test suite on the GPU, run the GPU
# benchmarks. Everything it writes goes under $OUT (default: ./gpu_out).
#
#   OUT=/tmp/x STAGES="build test bench" bash benchmarks/gpu_suite.sh
#
# Variables: PYTHON (default python3), STAGES (any of build test bench; default all),
# TEST_ARGS (extra pytest arguments), BENCH_LEVELS (default "layer model op"; "sync" too),
# LAYER_ARGS / MODEL_ARGS / OP_ARGS / SYNC_ARGS (`resnet_fused bench` arguments per level;
# defaults: a quick bf16 layer selection, ResNet-50 with AMP, the quick channels_last op
# selection, every synchronised-BN case over 2 ranks), TEST_TIMEOUT / BENCH_TIMEOUT
# (seconds, each), TORCH_CUDA_ARCH_LIST (default: this GPU's).
# $OUT/00_summary.txt collects what matters (GPU, build time, test counts and the name
# of every failed test, each benchmark's markdown report); it sorts first, for
# transfers that bring back only a few files. The test suite alone takes over 5 minutes
# on an H200 with 14 workers (a run cut at 290 s had done about 95% of it), so on a
# machine with a 10-minute limit per command run STAGES="build test" and STAGES="bench"
# as two commands (the build stays in place). The tests pin one Triton conv configuration (RESNET_FUSED_CONV_CONFIG) so that they do
# not autotune every shape; the benchmarks autotune.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${STAGES:-build test bench}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
status=0
SUMMARY="$OUT/00_summary.txt"
: >"$SUMMARY"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$SUMMARY"
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$SUMMARY"

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
  echo "build: $((SECONDS - start)) s (arch $TORCH_CUDA_ARCH_LIST)" | tee -a "$SUMMARY"
  $PY -m resnet_fused info | tee -a "$SUMMARY"
fi

if [[ " $STAGES " == *" test "* ]]; then
  start=$SECONDS
  xdist=()
  if $PY -c "import xdist" 2>/dev/null; then xdist=(-n "${TEST_WORKERS:-8}"); fi
  RESNET_FUSED_CONV_CONFIG=${RESNET_FUSED_CONV_CONFIG:-128,64,32,4,3} \
  timeout "${TEST_TIMEOUT:-420}" $PY -m pytest -v -rfE -p no:cacheprovider "${xdist[@]}" \
      ${TEST_ARGS:-} >"$OUT/tests.log" 2>&1
  rc=$?
  {
    # The per-test lines name every failure even when a timeout cuts the summary off.
    grep -E "(^| )(FAILED|ERROR)( |$)" "$OUT/tests.log" | grep -oE "[^ ]+::[^ ]+" |
      sed 's/^/failed: /' | sort -u | head -n 60
    grep -E "^E  " "$OUT/tests.log" | head -n 40
    echo "passed: $(grep -c " PASSED " "$OUT/tests.log"), failed: $(grep -c " FAILED " "$OUT/tests.log")"
    tail -n 2 "$OUT/tests.log"
    echo "tests: rc=$rc, $((SECONDS - start)) s"
  } | tee -a "$SUMMARY"
  [[ $rc -ne 0 ]] && status=1
fi

if [[ " $STAGES " == *" bench "* ]]; then
  for level in ${BENCH_LEVELS:-layer model op}; do
    start=$SECONDS
    args=${OP_ARGS:---quick --layouts channels_last --providers eager,cuda,triton}
    [[ $level == layer ]] && args=${LAYER_ARGS:---quick --dtype bf16 --min-run-time 0.1}
    [[ $level == model ]] && args=${MODEL_ARGS:---models resnet50}
    [[ $level == sync ]] && args=${SYNC_ARGS:---min-run-time 0.3}
    timeout "${BENCH_TIMEOUT:-100}" $PY -m resnet_fused bench --level "$level" --device cuda \
        --out "$OUT" $args >"$OUT/bench_$level.log" 2>&1
    rc=$?
    grep -v "^W1\|Warning" "$OUT/bench_$level.log" | tail -n 30
    echo "bench $level: rc=$rc, $((SECONDS - start)) s" | tee -a "$SUMMARY"
    for md in "$OUT"/"${level}"_*.md; do [[ -f $md ]] && cat "$md" >>"$SUMMARY"; done
    [[ $rc -ne 0 ]] && status=1
  done
fi
exit $status
