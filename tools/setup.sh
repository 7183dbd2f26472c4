#!/usr/bin/env bash
# Set up megarl in ./.venv on a fresh machine: the CPU build of torch 2.13.0 (pinned, so pip never
# resolves an open range to several GB of CUDA packages), then megarl itself with its C++ extension
# compiled against that torch (--no-build-isolation: no second torch in a build environment).
# Idempotent: re-running re-installs megarl only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet "scikit-build-core>=0.10" "cmake>=3.24" ninja
python -m pip install --quiet --no-build-isolation -e ".[dev]"
# SGLang's source (and msgspec, which its request schema decoder needs) without its GPU runtime:
# tests/rollout check megarl's requests against SGLang's own schema.
python -m pip install --quiet --no-deps "sglang==0.5.23" "msgspec>=0.19"
python -c "import megarl._C, torch; print('megarl installed: torch', torch.__version__, '| C++ extension loaded, CUDA kernels:', torch.ops.megarl.built_with_cuda())"
