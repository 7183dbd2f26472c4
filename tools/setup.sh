#!/usr/bin/env bash
# Set up megarl in ./.venv with exactly the versions of the lock, requirements/cpu.txt (the CPU
# build of torch 2.13.0 among them: pip never resolves a range there), then megarl itself, its C++
# extension compiled against that torch (--no-build-isolation: no second torch in a build
# environment). uv installs the lock: it is pinned there, takes seconds where pip takes minutes,
# and removes whatever the lock does not hold. It compiles the bytecode as pip would: where
# PYTHONDONTWRITEBYTECODE is set, every process would otherwise compile torch's, Megatron's and
# transformers' sources again (seconds per process). Refresh the lock with tools/lock.sh.
# Idempotent: a re-run brings .venv back to the lock and re-installs megarl.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "tools/setup.sh: the lock (requirements/cpu.txt) is for Python 3.11; $PYTHON is $("$PYTHON" -V 2>&1): run with PYTHON=python3.11" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  rm -rf .venv
  "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
uv_version=$(sed -n 's/^uv==//p' requirements/cpu.txt)
if [ "$(.venv/bin/uv --version 2>/dev/null)" != "uv $uv_version" ]; then
  .venv/bin/python -m pip install --quiet "uv==$uv_version"
fi
. tools/torch_source.sh
uv_pip() { .venv/bin/uv pip "$@" --python .venv/bin/python --find-links "$TORCH_FIND_LINKS" --compile-bytecode --quiet; }
uv_pip sync requirements/cpu.txt
uv_pip install --no-deps -r requirements/no-deps.txt
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
.venv/bin/python -c "import megarl._C, torch; print('megarl installed: torch', torch.__version__, '| C++ extension loaded, CUDA kernels:', torch.ops.megarl.built_with_cuda())"
