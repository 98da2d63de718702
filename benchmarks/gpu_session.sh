#!/usr/bin/env bash
# One lent GPU session in two back-to-back commands (about 15 minutes of device time,
# start-up included, at most 10 minutes per command), on top of benchmarks/gpu_suite.sh:
#
#   PART=1 bash benchmarks/gpu_session.sh   # build, the GPU tests, op and host levels (unit, models)
#   PART=2 bash benchmarks/gpu_session.sh   # model level (reuses part 1's in-place build)
#   PART=all ...                             # both in one command, with shorter timeouts
#
# Part 1 runs the tests that touch a GPU (those whose names mention cuda, triton, gpu or
# auto: every CUDA and Triton case, backend="auto" on the GPU); the CPU-only rest is
# what CI runs on every change. Each stage has its own timeout, so the parts end inside
# their commands' limits, and after every stage everything written so far is packed into
# $OUT/gpu_results.tgz beside $OUT/00_summary.txt (a transfer returns only a few files).
# Seen on an H200 (2026-12-04, torch 2.11): start-up about 30 s, build 121 s, the GPU tests
# 88% done after 190 s with 14 workers (give them 240 s), the op level 7 cases in 55 s with
# Triton among the providers (each new shape compiles its kernels; the default leaves
# Triton out), the host level 19 s, a model run 20-40 s per model.
# Work files go to $WORK (default /tmp/gpu_work). Variables: PART (1 or 2), OUT, WORK,
# BUILD_TIMEOUT, TEST_TIMEOUT (defaults below); for a dry run without a GPU: PYTHON,
# SKIP_BUILD=1, TEST_SELECT (pytest arguments), BENCH_DEVICE=cpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
WORK=${WORK:-/tmp/gpu_work}
mkdir -p "$OUT" "$WORK"
# The system compiler: a g++ that links libstdc++ statically (seen on a GPU machine)
# breaks the extension's C++ error messages (README, "Running on a GPU").
if [[ -x /usr/bin/g++ ]]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/gcc -shared"
fi
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}

pack() {
  cp "$WORK/00_summary.txt" "$OUT/" 2>/dev/null
  tar czf "$OUT/gpu_results.tgz.tmp" -C "$WORK" . && mv "$OUT/gpu_results.tgz.tmp" "$OUT/gpu_results.tgz"
}

suite() { OUT=$WORK SUMMARY_APPEND=1 bash benchmarks/gpu_suite.sh; pack; }

part1() {
  : >"$WORK/00_summary.txt"
  if [[ ${SKIP_BUILD:-0} != 1 ]] && ! STAGES=build OUT=$WORK SUMMARY_APPEND=1 timeout "${BUILD_TIMEOUT:-150}" \
      bash benchmarks/gpu_suite.sh; then
    echo "build failed or timed out"; grep -A3 " error" "$WORK/build.log" | head -n 40; pack; return 1
  fi
  pack
  STAGES=test TEST_WORKERS=${TEST_WORKERS:-14} TEST_TIMEOUT=${TEST_TIMEOUT:-240} \
    TEST_ARGS=${TEST_SELECT:-'-k "cuda or triton or gpu or auto"'} suite
  STAGES=bench BENCH_LEVELS=op BENCH_TIMEOUT=${OP_TIMEOUT:-70} \
    OP_ARGS=${OP_ARGS:-"--ops bn_relu6,bn_silu,bn_hardswish,bn_relu --quick --layouts channels_last --providers eager,cuda,auto --rounds 5"} \
    suite
  STAGES=bench BENCH_LEVELS=host BENCH_TIMEOUT=${HOST_TIMEOUT:-120} \
    HOST_ARGS=${HOST_ARGS:-"--host-cases unit,models --rounds 5 --min-run-time 0.3"} suite
}

part2() {
  # Host-bound models at batch 1 and 32 (HB_BATCHES), then the BN+activation families at batch 64
  # (bf16 autocast, the model level's default on a GPU).
  for batch in ${HB_BATCHES:-1 32}; do
    mkdir -p "$WORK/hostbound_b$batch"
    OUT_SUB="$WORK/hostbound_b$batch"
    STAGES=bench BENCH_LEVELS=model BENCH_TIMEOUT=${HB_TIMEOUT:-40} \
      MODEL_ARGS="--models tutorial_resnet18,resnet18 --image-size 32 --batch $batch --layouts channels_last --providers eager,fused,eager-graph,fused-graph --rounds 5 --min-run-time 0.2" \
      OUT=$OUT_SUB SUMMARY_APPEND=1 bash benchmarks/gpu_suite.sh
    cat "$OUT_SUB/00_summary.txt" >>"$WORK/00_summary.txt"; pack
  done
  STAGES=bench BENCH_LEVELS=model BENCH_TIMEOUT=${CNN_TIMEOUT:-100} \
    MODEL_ARGS="--models ${CNN_MODELS:-mobilenet_v2,efficientnet_b0,resnet50} --batch 64 --layouts channels_last --providers eager,fused --rounds 5 --min-run-time 0.2" \
    suite
}

case ${PART:-1} in
  1) part1 ;;
  2) part2 ;;
  all) part1 && part2 ;;  # one command: set the timeouts to fit its limit
  *) echo "PART is 1, 2 or all"; exit 2 ;;
esac
