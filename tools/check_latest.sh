#!/usr/bin/env bash
# Check that pyproject.toml's version ranges are true: build a throw-away environment
# (.venv-latest, rebuilt on every run) with the newest versions the ranges allow, list how they
# differ from the lock, and run the fast tests there (or the pytest arguments given).
# Run it before refreshing the lock with tools/lock.sh.
#
#   bash tools/check_latest.sh                  # newest versions, the cpu-marked tests
#   bash tools/check_latest.sh tests/test_train.py
#   RESOLUTION=lowest-direct bash tools/check_latest.sh   # the oldest versions the ranges allow
#
# torch stays the CPU build of the lock (requirements/cpu.in): PyPI's newer torch is the CUDA build.
# Needs tools/setup.sh's .venv (for uv).
set -euo pipefail
cd "$(dirname "$0")/.."
RESOLUTION=${RESOLUTION:-highest}
VENV=.venv-latest
. tools/torch_source.sh
uv=.venv/bin/uv
rm -rf "$VENV"
python3 -m venv "$VENV"
"$uv" pip compile pyproject.toml requirements/cpu.in --extra dev \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --resolution "$RESOLUTION" \
  --find-links "$TORCH_FIND_LINKS" --no-emit-find-links --no-header --no-annotate --quiet \
  -o "$VENV/requirements.txt"
echo "== versions that differ from requirements/cpu.txt (lock -> $RESOLUTION)"
.venv/bin/python - requirements/cpu.txt "$VENV/requirements.txt" <<'PY'
import re, sys

def pins(path):
    return dict(line.strip().split("==", 1) for line in open(path) if re.match(r"[a-z0-9]", line))

lock, new = pins(sys.argv[1]), pins(sys.argv[2])
for name in sorted(lock.keys() | new.keys()):
    if lock.get(name) != new.get(name):
        print(f"  {name}: {lock.get(name, '-')} -> {new.get(name, '-')}")
PY
"$uv" pip sync "$VENV/requirements.txt" --python "$VENV/bin/python" --find-links "$TORCH_FIND_LINKS" --compile-bytecode --quiet
"$uv" pip install --no-deps -r requirements/no-deps.txt --python "$VENV/bin/python" --compile-bytecode --quiet
# Its own build directory: .venv's editable build stays untouched.
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation \
  --config-settings=build-dir="$VENV/build" -e .
if [ $# -eq 0 ]; then
  set -- -m cpu --deselect tests/test_setup.py::test_the_environment_is_exactly_the_lock
fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
