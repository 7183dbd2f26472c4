#!/usr/bin/env bash
# The GPU checks of megarl in one run, for a machine with an NVIDIA GPU whose Python already holds a
# CUDA build of torch, Triton, transformers and megatron-core (tools/setup.sh is the CPU set-up and
# does not apply there). In order, each step with its own time limit, going on past a failed step:
#   1. build: installs megarl editable, without dependencies, into that Python (`pip install -e .`),
#      its C++ extension compiled with the CUDA copy kernel for this GPU's architecture. The build
#      refuses a compiler that links the C++ runtime statically (csrc/check_cxx_runtime.cmake): set
#      CXX and CUDAHOSTCXX to one that does not (on the project's device machine, /usr/bin/g++);
#   2. gpu-tests: the CUDA copy kernel against the CPU engine and torch
#      (tests/weights/test_copy_plan_cuda.py), the tests marked gpu, the extension's own tests;
#   3. bench-kernels: tools/bench_kernels.py at its default (H100 target) shapes -> bench_kernels.json;
#   4. bench-weight-sync: tools/bench_weight_sync.py --device cuda -> bench_weight_sync.json;
#   5. bench-update: tools/bench_update.py in bf16 (padded vs packed micro-batches) -> bench_update.json;
#   6. kernel-tests: the Triton kernels' tests, compiled for the GPU (the CPU runs them interpreted).
# Logs go to $OUT/gpu_check.log (OUT defaults to ./gpu_check), a line per step to $OUT/summary.txt.
# The whole run stays within GPU_CHECK_SECONDS (default 540): a step gets what is left when it starts.
# GPU_CHECK_STEPS names the steps to run (default: all six), e.g. "build gpu-tests".
# Exit status: 0 when every step passed, 1 otherwise, 2 without a CUDA device.
#
#   bash tools/gpu_check.sh                  # then copy the tables into docs/benchmarks.md
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check}
BUDGET=${GPU_CHECK_SECONDS:-540}
STEPS=${GPU_CHECK_STEPS:-build gpu-tests bench-kernels bench-weight-sync bench-update kernel-tests}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
started=$SECONDS
failed=0

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "tools/gpu_check.sh: $PYTHON sees no CUDA device (or no torch): run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
  exit 2
fi

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with at most CAP seconds (less if the budget is short).
step() {
  local name=$1 cap=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  local left=$((BUDGET - (SECONDS - started) - 5))
  local limit=$((cap < left ? cap : left))
  if [ "$left" -lt 10 ]; then
    echo "$name: skipped (the ${BUDGET} s budget is spent)" | tee -a "$SUMMARY"
    failed=1
    return
  fi
  echo "===== $name (limit ${limit} s): $*" >>"$LOG"
  local begin=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local verdict=passed
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="timed out"; elif [ "$rc" -ne 0 ]; then verdict="failed (exit $rc)"; fi
  [ "$verdict" = passed ] || failed=1
  echo "$name: $verdict in $((SECONDS - begin)) s" | tee -a "$SUMMARY"
}

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
  "$PYTHON" -c 'import platform, torch, triton; print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)'
  nvcc --version 2>/dev/null | tail -1
  echo "cpus: $(nproc)"
} | tee -a "$SUMMARY" >>"$LOG"

arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
step build 300 "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index \
  -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=${arch}" -e .
step gpu-tests 120 "$PYTHON" -m pytest -p no:cacheprovider -q -m "gpu or cpu" \
  tests/weights/test_copy_plan_cuda.py tests/weights/test_copy_plan.py tests/test_extension.py \
  tests/test_megatron_compat.py::test_enable_cpu_refuses_on_cuda_machines
step bench-kernels 200 "$PYTHON" tools/bench_kernels.py --json "$OUT/bench_kernels.json"
step bench-weight-sync 90 "$PYTHON" tools/bench_weight_sync.py --device cuda --layers 32 --repeats 5 \
  --json "$OUT/bench_weight_sync.json"
step bench-update 150 "$PYTHON" tools/bench_update.py --dtype bf16 --samples 128 --repeats 3 --json "$OUT/bench_update.json"
step kernel-tests 240 "$PYTHON" -m pytest -p no:cacheprovider -q \
  tests/kernels/test_logprob_entropy.py tests/kernels/test_fused_linear_logprob_entropy.py
echo "total: $((SECONDS - started)) s" | tee -a "$SUMMARY"
exit "$failed"
