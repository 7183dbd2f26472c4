"""The C++ extension `megarl._C` builds, loads on its own, and registers its ops once."""

from __future__ import annotations

import pytest

from tests.distributed import run_python_source

pytestmark = pytest.mark.cpu


def test_extension_loads_before_torch_and_registers_ops():
    result = run_python_source(
        "import megarl._C\n"
        "import torch\n"
        "built = torch.ops.megarl.built_with_cuda()\n"
        "assert isinstance(built, bool)\n"
        "assert not built or torch.version.cuda, 'CUDA kernels in a CPU build of torch'\n"
        "print('extension-ok', built)\n"
    )
    assert "extension-ok" in result.stdout
