#!/usr/bin/env bash
# Refresh requirements/cpu.txt, the exact set of versions tools/setup.sh installs: resolve
# pyproject.toml's dependencies (with the `dev` extra) and requirements/cpu.in to the newest
# versions they allow, for CPython 3.11 on x86-64 Linux. Run tools/check_latest.sh first: it tests
# those newest versions before they become the lock. Then run the tests on the new lock.
#
#   bash tools/lock.sh            # needs tools/setup.sh's .venv (it provides uv)
#
# The CPU build of torch (torch==2.13.0+cpu) is not on PyPI: it comes from the find-links pip is
# configured with (PIP_FIND_LINKS or `pip config`), else from PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/torch_source.sh
.venv/bin/uv pip compile pyproject.toml requirements/cpu.in --extra dev \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --find-links "$TORCH_FIND_LINKS" --no-emit-find-links \
  --custom-compile-command "bash tools/lock.sh" \
  --upgrade --quiet -o requirements/cpu.txt
echo "requirements/cpu.txt: $(grep -c '^[a-z]' requirements/cpu.txt) packages"
