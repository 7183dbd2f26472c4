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
#   3. bench-kernels: tools/bench_kernels.py at the issue's shape (N, H, V = 16384, 4096, 151936),
#      the public functions, the trainer's vocab-parallel call with a one-rank tensor-parallel group
#      (megarl-tp1), the torch path and Liger where installed, with --phases (stats, grad-logits,
#      dW, dX timed with CUDA events, TFLOP/s each) -> bench_kernels.json;
#   4. bench-weight-sync: tools/bench_weight_sync.py --device cuda -> bench_weight_sync.json;
#   5. bench-copy: tools/bench_copy.py --device cuda, the copy engine against copy_ (aligned, 2 bytes
#      misaligned, fp32->bf16, many small tensors) -> bench_copy.json;
#   6. bench-update: tools/bench_update.py in bf16, megarl's padded micro-batches against its default
#      packed + balanced ones -> bench_update.json;
#   7. kernel-tests: the Triton kernels' tests, compiled for the GPU (the CPU runs them interpreted),
#      the production-shape ones (tests/kernels/test_production_shape.py) and the backward's
#      variants (cuBLAS and Triton dX, skipped gradients) among them;
#   8. train-moe: 20 steps of the README's main job (tiny MoE, GRPO) on one GPU, one process
#      -> train_moe/metrics.jsonl;
#   then report: tools/gpu_report.py prints one markdown table of all of it (verdicts, seconds, the
#      benchmarks' headline numbers, the run's steps, step time and reward) and writes
#      $OUT/gpu_check.json; it runs after failed steps too (what is missing shows as "—").
# Logs go to $OUT/gpu_check.log (OUT defaults to ./gpu_check), a line per step to $OUT/summary.txt;
# a run first removes what an earlier run left there, so the table shows this run's numbers only.
# The whole run stays within GPU_CHECK_SECONDS (default 480, the issue's 8 minutes): a step gets at
# most its limit and never more than what is left when it starts. The limits sum to 470 s, so with
# the default every step gets its whole limit, and the machine lines and the report fit in the rest.
# GPU_CHECK_STEPS names the steps to run (default: all eight and the report), e.g. "build gpu-tests".
# Every step runs with MEGARL_AUTOTUNE=first unless the caller sets it: each Triton kernel takes the
# first configuration of its autotuning list instead of compiling and timing them all (minutes at
# the bench's shape); `MEGARL_AUTOTUNE=all python tools/bench_kernels.py --phases` compares them
# (its JSON names each autotuner's choice).
# Exit status: 0 when every step passed, 1 otherwise, 2 without a CUDA device.
#
# --dry-run (any machine, no GPU needed): lists each step's command and checks it without running
# it: every Python tool it calls parses its arguments (the tool stops after argparse), every test
# it names is collected by pytest, the training run's config validates, the package builds from
# pyproject.toml. Exit status 0 when all of them check out, 1 otherwise.
#
#   bash tools/gpu_check.sh                  # then paste the table into docs/benchmarks.md
#   bash tools/gpu_check.sh --dry-run        # what it would run, checked
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check}
BUDGET=${GPU_CHECK_SECONDS:-480}
STEPS=${GPU_CHECK_STEPS:-build gpu-tests bench-kernels bench-weight-sync bench-copy bench-update kernel-tests train-moe report}
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
mkdir -p "$OUT"
[ "$DRY_RUN" = 1 ] || rm -rf "$OUT"/bench_kernels.json "$OUT"/bench_weight_sync.json "$OUT"/bench_copy.json "$OUT"/bench_update.json \
  "$OUT"/train_moe "$OUT"/gpu_check.json
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
export MEGARL_AUTOTUNE=${MEGARL_AUTOTUNE:-first}
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
step build 130 "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index \
  -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=${arch}" -e .
step gpu-tests 40 "$PYTHON" -m pytest -p no:cacheprovider -q -m "gpu or cpu" -k "not emulated" \
  tests/weights/test_copy_plan_cuda.py tests/weights/test_copy_plan.py tests/test_extension.py \
  tests/test_megatron_compat.py::test_enable_cpu_refuses_on_cuda_machines
step bench-kernels 70 "$PYTHON" tools/bench_kernels.py --shapes 16384,4096,151936 \
  --providers megarl megarl-tp1 torch liger --phases --json "$OUT/bench_kernels.json"
step bench-weight-sync 45 "$PYTHON" tools/bench_weight_sync.py --device cuda --layers 32 --repeats 5 \
  --json "$OUT/bench_weight_sync.json"
step bench-copy 30 "$PYTHON" tools/bench_copy.py --device cuda --mib 256 --repeats 10 --json "$OUT/bench_copy.json"
step bench-update 35 "$PYTHON" tools/bench_update.py --dtype bf16 --cases padded,packed+balanced --samples 128 --repeats 3 --json "$OUT/bench_update.json"
step kernel-tests 70 "$PYTHON" -m pytest -p no:cacheprovider -q \
  tests/kernels/test_logprob_entropy.py tests/kernels/test_fused_linear_logprob_entropy.py \
  tests/kernels/test_production_shape.py tests/kernels/test_fused_backward_paths.py
step train-moe 50 "$PYTHON" -m torch.distributed.run --nproc_per_node 1 -m megarl.train --config configs/moe_grpo.yaml \
  parallel.expert=1 train.steps=20 train.eval_every=0 checkpoint.resume=never checkpoint.save_every=0 logging.run_dir="$OUT/train_moe"
echo "total: $((SECONDS - started)) s" | tee -a "$SUMMARY"

# The report: one table of what the steps left in $OUT, after failed or skipped steps too.
case " $STEPS " in *" report "*)
  report=("$PYTHON" tools/gpu_report.py "$OUT")
  if [ "$DRY_RUN" = 1 ]; then
    verdict="checked"
    check "${report[@]}" >>"$LOG" 2>&1 || { verdict="FAILED the check"; failed=1; }
    echo "report (limit 30 s): ${report[*]} -- $verdict" | tee -a "$SUMMARY"
  else
    echo "===== report: ${report[*]}" >>"$LOG"
    echo
    timeout --kill-after=5 30 "${report[@]}" 2>>"$LOG" | tee -a "$LOG" || { echo "report: failed, see $LOG"; failed=1; }
  fi
  ;;
esac
exit "$failed"
