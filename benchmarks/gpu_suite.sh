#!/usr/bin/env bash
# The GPU check in one go, for a machine with a CUDA GPU and torch/triton installed:
# build the extension in place, run the whole test suite on the GPU, run the GPU
# benchmarks. Everything it writes goes under $OUT (default: ./gpu_out), as it goes, so a
# run cut by a timeout keeps what it finished.
#
#   OUT=/tmp/x STAGES="build test bench" bash benchmarks/gpu_suite.sh
#
# Variables: PYTHON (default python3), STAGES (any of build test bench; default all),
# TEST_ARGS (extra pytest arguments), BENCH_LEVELS (default "profile layer model op";
# "sync" and "host" too), PROFILE_ARGS / LAYER_ARGS / MODEL_ARGS / OP_ARGS / SYNC_ARGS /
# HOST_ARGS (`resnet_fused
# bench` arguments per level; defaults below: the deep 3x3 layers profiled per provider
# in bf16, every ResNet-50 layer in bf16 with eager and auto (train and eval), ResNet-50
# train and eval with AMP: eager, fused and both as CUDA graphs, the quick channels_last op
# selection, every synchronised-BN case over 2 ranks), TEST_TIMEOUT / BENCH_TIMEOUT
# (seconds, each), TORCH_CUDA_ARCH_LIST (default: this GPU's), BENCH_DEVICE (default
# cuda; cpu runs the bench stage's logic on a machine without a GPU).
# $OUT/00_summary.txt collects what matters (GPU, build time, test counts and the name
# of every failed test, each benchmark's markdown report); it sorts first, for
# transfers that bring back only a few files. The per-test lines (pytest -v) name every
# failure even when a timeout cuts the run short.
#
# Durations on an H200: the test suite alone takes over 5 minutes with 14 workers (a run
# cut at 290 s had done about 95% of it). With 10 minutes per command and about 15
# minutes of device time per session (start-up included), a session runs two commands:
#   OUT=$OUT STAGES="build test" TEST_TIMEOUT=360 bash benchmarks/gpu_suite.sh
#   OUT=$OUT STAGES=bench BENCH_TIMEOUT=150 bash benchmarks/gpu_suite.sh
# (the build stays in place between them). The tests pin one Triton conv configuration
# (RESNET_FUSED_CONV_CONFIG) so that they do not autotune every shape; so does the bench
# stage unless BENCH_AUTOTUNE=1 (autotuning each of ResNet-50's shapes costs minutes).
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
# SUMMARY_APPEND=1: a later call (another stage) adds to the summary of an earlier one.
[[ "${SUMMARY_APPEND:-0}" == 1 ]] || : >"$SUMMARY"

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
  eval "test_args=(${TEST_ARGS:-})"  # quoted words stay whole: TEST_ARGS='-k "cuda or triton"'
  : >"$OUT/failures.txt"
  RESNET_FUSED_FAILURE_LOG="$OUT/failures.txt" \
  timeout "${TEST_TIMEOUT:-420}" $PY -m pytest -v -rfE -p no:cacheprovider "${xdist[@]}" \
      "${test_args[@]}" >"$OUT/tests.log" 2>&1
  rc=$?
  {
    # The per-test lines name every failure even when a timeout cuts the summary off.
    grep -E "(^| )(FAILED|ERROR)( |$)" "$OUT/tests.log" | grep -oE "[^ ]+::[^ ]+" |
      sed 's/^/failed: /' | sort -u | head -n 60
    grep -E "^E  " "$OUT/tests.log" | head -n 40
    # each failure's traceback was written as it failed (tests/conftest.py): its errors
    grep -E "^=== |^E  |Error" "$OUT/failures.txt" | head -n 120
    echo "passed: $(grep -c " PASSED " "$OUT/tests.log"), failed: $(grep -c " FAILED " "$OUT/tests.log")"
    tail -n 2 "$OUT/tests.log"
    echo "tests: rc=$rc, $((SECONDS - start)) s"
  } | tee -a "$SUMMARY"
  [[ $rc -ne 0 ]] && status=1
fi

if [[ " $STAGES " == *" bench "* ]]; then
  if [[ "${BENCH_AUTOTUNE:-0}" != 1 ]]; then
    export RESNET_FUSED_CONV_CONFIG=${RESNET_FUSED_CONV_CONFIG:-128,64,32,4,3}
  fi
  for level in ${BENCH_LEVELS:-profile layer model op}; do
    start=$SECONDS
    args=(--quick --layouts channels_last --providers eager,cuda,triton,auto)
    [[ -n ${OP_ARGS:-} ]] && eval "args=($OP_ARGS)"
    if [[ $level == profile ]]; then
      args=(--dtype bf16 --layers "l3.conv2 3x3,l4.conv2 3x3,l3.conv3 1x1")
      [[ -n ${PROFILE_ARGS:-} ]] && eval "args=($PROFILE_ARGS)"
    elif [[ $level == layer ]]; then
      args=(--dtype bf16 --min-run-time 0.1 --providers eager,auto)
      [[ -n ${LAYER_ARGS:-} ]] && eval "args=($LAYER_ARGS)"
    elif [[ $level == model ]]; then
      # No torch.compile here (minutes per model); the compile providers get their own
      # call: MODEL_ARGS="--models resnet50 --mode train --providers eager,compile,fused,fused-compile"
      args=(--models resnet50 --providers eager,fused,eager-graph,fused-graph)
      [[ -n ${MODEL_ARGS:-} ]] && eval "args=($MODEL_ARGS)"
    elif [[ $level == host ]]; then
      args=(--rounds 5)
      [[ -n ${HOST_ARGS:-} ]] && eval "args=($HOST_ARGS)"
    elif [[ $level == sync ]]; then
      args=(--min-run-time 0.3)
      [[ -n ${SYNC_ARGS:-} ]] && eval "args=($SYNC_ARGS)"
    fi
    timeout "${BENCH_TIMEOUT:-150}" $PY -m resnet_fused bench --level "$level" \
        --device "${BENCH_DEVICE:-cuda}" \
        --out "$OUT" "${args[@]}" >"$OUT/bench_$level.log" 2>&1
    rc=$?
    grep -v "^W1\|Warning" "$OUT/bench_$level.log" | tail -n 30
    echo "bench $level: rc=$rc, $((SECONDS - start)) s" | tee -a "$SUMMARY"
    for md in "$OUT"/"${level}"_*.md; do
      # (the profile report's per-kernel tables stay in its own file)
      [[ -f $md ]] && { [[ $level == profile ]] && sed -n '1,/^### /p' "$md" || cat "$md"; } >>"$SUMMARY"
    done
    [[ $rc -ne 0 ]] && status=1
  done
fi
exit $status
