#!/usr/bin/env bash
# One prepared GPU session: build the extension for sm_90a, run the GPU tests, run benchmarks.
#
#   benchmarks/gpu_check.sh [pytest targets...]
#
# One device call holds 600 s at most, about what the benchmarks take: a session with 15 minutes
# runs them in one call, then the tests in a second one at once (the machine stays warm 30 s).
# A call returns 8 files at most, so each call writes to a folder and archives it:
#   OUT=/tmp/r benchmarks/gpu_check.sh; tar czf $OUT/r.tgz -C /tmp r        # benchmarks first
#   PROBE= BENCHMARKS= TEST_SECONDS=200 OUT=/tmp/t benchmarks/gpu_check.sh; cp /tmp/t/gpu_check.log $OUT
#
# Everything goes under $OUT (default benchmarks/results/gpu_check): gpu_check.log (install,
# probe, benchmark and test output), gpu_probe.xml and gpu_tests.xml (each test's outcome and
# failure message, also when the time limit stops the run) and each benchmark's .json/.md/.png.
# A short probe of tests runs first (PROBE), then the benchmarks (they need the GPU to
# themselves), the tests after them with the time that is left. Time limits per stage come
# from PROBE_SECONDS, TEST_SECONDS and BENCH_SECONDS (or a benchmark entry's own), so a
# slow stage cannot eat the next one's time, and no stage runs past DEADLINE_SECONDS from the
# start (default 560: one device call may run 600 s); BENCHMARKS lists
# "script|arguments[|seconds]" entries run in order, the most needed first; the scripts in
# COLD_TRITON_CACHE run with an empty Triton cache, so their first-call times include compiling
# every kernel, as on a fresh machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export SIPL_FAST_CUDA_ARCH_LIST=${SIPL_FAST_CUDA_ARCH_LIST:-90a} SIPL_FAST_REQUIRE_CUDA=1
export SIPL_FAST_NVCC_THREADS=${SIPL_FAST_NVCC_THREADS:-8} SIPL_FAST_BENCH_RESULTS="$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts import sipl_fast even where the editable hook does not
TESTS=("$@")
# never run on a GPU first: conv1x1, the CUDA gated conv, bf16 dots, the changed attention kernels, graphs
[ ${#TESTS[@]} -eq 0 ] && TESTS=(tests/test_backend_choice.py tests/test_conv1x1.py tests/test_gated_dwconv_gelu.py
                                  tests/test_channel_attention.py tests/test_engine.py tests/test_cosine_attention.py
                                  tests/test_layer_norm2d.py tests/test_depthwise_conv3x3.py)
# the issues' targets first: the attention; FastSIPL at 256^2 (batch 1 and 4) and 512^2 (NCHW
# and channels-last); its kernels by device time per backend and layout; the backbone's target shapes;
# FastSIPL's peaks at 2048^2 and 3840x2160; the gate and the cross blocks' depthwise convolution at every shape
BENCHMARKS=${BENCHMARKS-"cosine_attention|--variants naive,sdpa,triton,cuda --backward-shapes 0|120;fast_sipl|--sizes 256,256b4,512 --variants eager-fp32,eager-bf16,fast-bf16,fast-bf16-cl|170;fast_sipl_profile|--sizes 512 --backends auto,triton --layouts nchw,channels-last|120;backbone|--headline|80;fast_sipl|--sizes 2048,3840x2160 --variants fast-bf16 --tag _large|100;gated_dwconv_gelu|--variants eager-bf16,triton-bf16,cuda-bf16|60;depthwise_conv3x3|--variants eager-bf16,triton-bf16|40"}
COLD_TRITON_CACHE=${COLD_TRITON_CACHE:-fast_sipl}
DEADLINE=${DEADLINE_SECONDS:-560}

stage() { echo "=== $1 ($(date -u +%H:%M:%S), ${SECONDS}s in)" | tee -a "$LOG"; }
# limit SECONDS: the stage's own limit, cut to what is left before the deadline (0: skip)
limit() { local left=$((DEADLINE - SECONDS)); [ "$left" -lt 30 ] && left=0; echo $(($1 < left ? $1 : left)); }
stage "machine"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >>"$LOG" 2>&1
stage "install"
{
  pip install --no-deps --no-build-isolation -e . 2>&1 | tail -3
  python -c "import sipl_fast.ops as o; print(o.available_backends())"
} >>"$LOG" 2>&1

# A short probe first, in the same call as the benchmarks: the Triton attention's accuracy tests,
# with those that take an unexplained GPU failure apart (PROBE: a pytest -k expression over
# tests/test_cosine_attention.py, "" skips it; PROBE_SECONDS), so that it is read even if no
# second call for the full tests follows. Its tensors start as NaN (SIPL_FAST_TEST_FILL_EMPTY): a
# kernel that reads memory nobody wrote shows as NaN (on the CPU the kernel tests pass so).
PROBE=${PROBE-"d96_every_tile or forward_matches_reference or no_rounding_of_normalised or backward_matches"}
# Tests spread over TEST_WORKERS processes where pytest-xdist is installed; tests/conftest.py
# gives each worker's PyTorch its share of the cores (all of them each had oversubscribed the
# 16 cores 8 times over: CPU-only tests that take 0.3 s on a 2-core machine took ~55 s there).
workers=()
python -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")
seconds=$(limit "${PROBE_SECONDS:-100}")
if [ -n "$PROBE" ] && [ "$seconds" -gt 0 ]; then
  stage "probe: tests/test_cosine_attention.py -k '$PROBE'"
  SIPL_FAST_TRITON_AUTOTUNE=0 SIPL_FAST_TEST_FILL_EMPTY=1 timeout -s INT -k 15 "$seconds" python -m pytest -q \
    -p no:cacheprovider -rfE --junitxml="$OUT/gpu_probe.xml" "${workers[@]}" tests/test_cosine_attention.py \
    -k "$PROBE" >>"$LOG" 2>&1
  echo "probe exit code $?" | tee -a "$LOG"
fi

IFS=';' read -ra entries <<<"$BENCHMARKS"
for entry in "${entries[@]}"; do
  script=${entry%%|*}
  rest=${entry#*|}
  args=${rest%%|*}
  own=${BENCH_SECONDS:-150}
  [[ "$rest" == *"|"* ]] && own=${rest#*|}
  seconds=$(limit "$own")
  if [ "$seconds" -eq 0 ]; then echo "=== skipped (deadline): $script $args" | tee -a "$LOG"; continue; fi
  stage "benchmark $script $args"
  cache=${TRITON_CACHE_DIR:-}
  [[ " $COLD_TRITON_CACHE " == *" $script "* ]] && cache=$(mktemp -d)
  # shellcheck disable=SC2086  # the arguments are meant to split
  TRITON_CACHE_DIR=${cache:-$HOME/.triton/cache} timeout "$seconds" python "benchmarks/$script.py" $args >>"$LOG" 2>&1
  echo "benchmark $script exit code $?" | tee -a "$LOG"
done
stage "tests: ${TESTS[*]}"
# Tests compile many small kernel variants: skip the Triton autotuner there (first config). At
# the limit, SIGINT makes pytest print its summary (the failures' names) and exit; KILL 30 s
# later if it does not.
seconds=$(limit "${TEST_SECONDS:-220}")
[ "$seconds" -gt 60 ] && seconds=$((seconds - 30))
[ "$seconds" -gt 0 ] && SIPL_FAST_TRITON_AUTOTUNE=0 timeout -s INT -k 30 "$seconds" python -m pytest -q -p no:cacheprovider -rfEs --durations=15 --junitxml="$OUT/gpu_tests.xml" \
  "${workers[@]}" "${TESTS[@]}" >>"$LOG" 2>&1
echo "tests exit code $?" | tee -a "$LOG"
stage "done"
