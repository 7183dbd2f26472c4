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
#   6. kernel-tests: the Triton kernels' tests, compiled for the GPU (the CPU runs them interpreted);
#   7. train-moe: 20 steps of the README's main job (tiny MoE, GRPO) on one GPU, one process.
# Logs go to $OUT/gpu_check.log (OUT defaults to ./gpu_check), a line per step to $OUT/summary.txt.
# The whole run stays within GPU_CHECK_SECONDS (default 540): a step gets what is left when it starts.
# GPU_CHECK_STEPS names the steps to run (default: all seven), e.g. "build gpu-tests".
# Exit status: 0 when every step passed, 1 otherwise, 2 without a CUDA device.
#
# --dry-run (any machine, no GPU needed): lists each step's command and checks it without running
# it: every Python tool it calls parses its arguments (the tool stops after argparse), every test
# it names is collected by pytest, the training run's config validates, the package builds from
# pyproject.toml. Exit status 0 when all of them check out, 1 otherwise.
#
#   bash tools/gpu_check.sh                  # then copy the tables into docs/benchmarks.md
#   bash tools/gpu_check.sh --dry-run        # what it would run, checked
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check}
BUDGET=${GPU_CHECK_SECONDS:-540}
STEPS=${GPU_CHECK_STEPS:-build gpu-tests bench-kernels bench-weight-sync bench-update kernel-tests train-moe}
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
started=$SECONDS
failed=0

if [ "$DRY_RUN" = 0 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "tools/gpu_check.sh: $PYTHON sees no CUDA device (or no torch): run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
  exit 2
fi

# check COMMAND...: what --dry-run does for a step's command instead of running it.
check() {
  case "$*" in
  *" -m pip install "*)
    [ -f pyproject.toml ] && "$PYTHON" -c 'import tomllib; tomllib.load(open("pyproject.toml", "rb"))' ;;
  *" -m pytest "*)
    local targets=() word
    for word in "$@"; do case "$word" in tests/*) targets+=("$word") ;; esac; done
    "$PYTHON" -m pytest -p no:cacheprovider -q --collect-only "${targets[@]}" >/dev/null ;;
  *" -m megarl.train "*)
    local config=() seen=0 word
    for word in "$@"; do
      if [ "$seen" = 1 ]; then config+=("$word"); fi
      if [ "$word" = "megarl.train" ]; then seen=1; fi
    done
    "$PYTHON" -m megarl.config "${config[@]}" --world-size 1 >/dev/null ;;
  *tools/*.py*)
    # The tool runs up to its argument parser, which must accept what the step gives it.
    "$PYTHON" - "${@:2}" <<'PARSE'
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_and_stop(self, *args, **kwargs):
    parse(self, *args, **kwargs)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_and_stop
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
sys.exit(f"{sys.argv[0]} finished without parsing arguments")
PARSE
    ;;
  *) return 1 ;;
  esac
}

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with at most CAP seconds (less if the budget is short).
step() {
  local name=$1 cap=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  if [ "$DRY_RUN" = 1 ]; then
    local verdict="checked"
    check "$@" >>"$LOG" 2>&1 || { verdict="FAILED the check"; failed=1; }
    echo "$name (limit ${cap} s): $* -- $verdict" | tee -a "$SUMMARY"
    return
  fi
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

[ "$DRY_RUN" = 1 ] || {
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
  "$PYTHON" -c 'import platform, torch, triton; print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda)'
  nvcc --version 2>/dev/null | tail -1
  echo "cpus: $(nproc)"
} | tee -a "$SUMMARY" >>"$LOG"

arch=$([ "$DRY_RUN" = 1 ] && echo 90 || nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
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
step train-moe 180 "$PYTHON" -m torch.distributed.run --nproc_per_node 1 -m megarl.train --config configs/moe_grpo.yaml \
  parallel.expert=1 train.steps=20 train.eval_every=0 checkpoint.resume=never checkpoint.save_every=0 logging.run_dir="$OUT/train_moe"
echo "total: $((SECONDS - started)) s" | tee -a "$SUMMARY"
exit "$failed"
