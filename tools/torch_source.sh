# Sourced by tools/setup.sh, tools/lock.sh and tools/check_latest.sh: where uv finds the CPU build
# of torch, which PyPI does not have (PyPI's Linux torch is the CUDA build). A machine whose pip is
# configured with find-links (PIP_FIND_LINKS or `pip config`) holds it there; any other gets it
# from PyTorch's CPU index.
TORCH_FIND_LINKS=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-https://download.pytorch.org/whl/cpu/torch/}
