#!/usr/bin/env bash
# One prepared GPU session: build the extension for sm_90a, run the GPU tests, run benchmarks.
#
#   benchmarks/gpu_check.sh [pytest targets...]
#
# Everything goes under $OUT (default benchmarks/results/gpu_check): gpu_check.log (install,
# tests, benchmark output) and each benchmark's .json/.md/.png. Time limits per stage come from
# TEST_SECONDS and BENCH_SECONDS, so a slow stage cannot eat the next one's time; BENCHMARKS
# lists "script|arguments" entries run in order.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export SIPL_FAST_CUDA_ARCH_LIST=${SIPL_FAST_CUDA_ARCH_LIST:-90a} SIPL_FAST_REQUIRE_CUDA=1
export SIPL_FAST_NVCC_THREADS=${SIPL_FAST_NVCC_THREADS:-8} SIPL_FAST_BENCH_RESULTS="$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts import sipl_fast even where the editable hook does not
TESTS=("$@")
[ ${#TESTS[@]} -eq 0 ] && TESTS=(tests/test_gated_dwconv_gelu.py tests/test_channel_attention.py tests/test_layer_norm2d.py
                                  tests/test_cosine_attention.py tests/test_engine.py)
# backbone: first the target shapes with torch.compile, then every shape without it (compiling
# each shape takes seconds)
BENCHMARKS=${BENCHMARKS:-"backbone|--headline;backbone|--variants eager-fp32,eager-bf16,triton-bf16,cuda-bf16,auto-bf16;cosine_attention|--variants naive,sdpa,triton,triton-online,cuda --backward-shapes 0,2;fast_sipl|--sizes 256,256b4,512,1024,2048 --variants eager-fp32,eager-bf16,fast-fp32,fast-bf16,fast-bf16-eager"}

stage() { echo "=== $1 ($(date -u +%H:%M:%S), ${SECONDS}s in)" | tee -a "$LOG"; }
{
  stage "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  stage "install"
  pip install --no-deps --no-build-isolation -e . 2>&1 | tail -3
  python -c "import sipl_fast.ops as o; print(o.available_backends())"
} >>"$LOG" 2>&1

stage "tests: ${TESTS[*]}"
# Tests compile many small kernel variants: skip the Triton autotuner there (first config).
SIPL_FAST_TRITON_AUTOTUNE=0 timeout "${TEST_SECONDS:-240}" python -m pytest -q -p no:cacheprovider -rs \
  "${TESTS[@]}" >>"$LOG" 2>&1
echo "tests exit code $?" | tee -a "$LOG"

IFS=';' read -ra entries <<<"$BENCHMARKS"
for entry in "${entries[@]}"; do
  script=${entry%%|*}
  args=${entry#*|}
  stage "benchmark $script $args"
  # shellcheck disable=SC2086  # the arguments are meant to split
  timeout "${BENCH_SECONDS:-200}" python "benchmarks/$script.py" $args >>"$LOG" 2>&1
  echo "benchmark $script exit code $?" | tee -a "$LOG"
done
stage "done"
