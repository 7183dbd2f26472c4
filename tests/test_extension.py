"""The C++ extension `megarl._C` builds, loads on its own, and registers its ops once."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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


def test_errors_raised_in_the_extension_reach_python():
    # In a fresh process: an extension carrying its own C++ runtime crashes here instead of raising.
    result = run_python_source(
        "import torch\n"
        "from megarl.weights.copy_plan import execute_copy_plan\n"
        "plan = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 0, 0]], dtype=torch.int64)\n"
        "try:\n"
        "    execute_copy_plan(plan, [torch.ones(1)], torch.zeros(8, dtype=torch.uint8))\n"
        "except RuntimeError as error:\n"
        "    print('raised:', error)\n"
    )
    assert "raised: execute_copy_plan: plan row 0 reaches byte 8 of its source, which holds only 4 bytes" in result.stdout


CHECK_RUNTIME = Path(__file__).resolve().parents[1] / "csrc" / "check_cxx_runtime.cmake"


@pytest.mark.skipif(sys.platform != "linux" or not shutil.which("objdump"), reason="checks Linux shared objects with objdump")
def test_link_check_refuses_an_extension_without_the_shared_cxx_runtime():
    import _ctypes

    import megarl._C

    cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake")

    def check(library: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [cmake, f"-DOBJDUMP={shutil.which('objdump')}", f"-DLIBRARY={library}", "-DCOMPILER=c++", "-P", str(CHECK_RUNTIME)],
            capture_output=True, text=True, timeout=60,
        )

    assert check(megarl._C.__file__).returncode == 0
    # A C extension of Python's own: linked against no C++ runtime at all, as a static copy leaves it.
    refused = check(_ctypes.__file__)
    assert refused.returncode != 0
    assert "linked a static copy of the C++ runtime into megarl._C" in refused.stderr
