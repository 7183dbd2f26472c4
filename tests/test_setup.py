"""The set-up: the environment is exactly the committed lock, the lock satisfies pyproject.toml's
ranges, and no folder of the repository shadows an installed package when Python runs from the
repository root (as the README's commands do)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement

from megarl.config import resolve_model_path
from tests.distributed import REPO

pytestmark = pytest.mark.cpu

LOCK = REPO / "requirements" / "cpu.txt"
NO_DEPS = REPO / "requirements" / "no-deps.txt"
NOT_LOCKED = {"megarl", "pip"}
"""megarl is installed from the checkout; pip comes with the virtual environment."""


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, by normalised name."""
    pinned = {}
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            pinned[normalized(match.group(1))] = match.group(2)
    return pinned


def test_the_environment_is_exactly_the_lock():
    # What is installed in the environment's site-packages: once setuptools is imported, the
    # packages it vendors are on sys.path too, with their own metadata.
    site_packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {
        normalized(distribution.metadata["Name"]): distribution.version
        for distribution in importlib.metadata.distributions(path=site_packages)
    }
    expected = {**pins(LOCK), **pins(NO_DEPS)}
    unlocked = {name: version for name, version in installed.items() if name not in expected and name not in NOT_LOCKED}
    missing = sorted(expected.keys() - installed.keys())
    differ = {name: (expected[name], installed[name]) for name in expected.keys() & installed.keys() if expected[name] != installed[name]}
    assert (unlocked, missing, differ) == ({}, [], {}), "run bash tools/setup.sh: the environment is not the lock"


def test_the_lock_satisfies_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [
        *project["build-system"]["requires"],
        *project["project"]["dependencies"],
        *project["project"]["optional-dependencies"]["dev"],
    ]
    locked = pins(LOCK)
    unmet = []
    for text in requirements:
        requirement = Requirement(text)
        version = locked.get(normalized(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            unmet.append(f"{text} (lock: {version})")
    assert unmet == [], "pyproject.toml and requirements/cpu.txt disagree: refresh the lock with bash tools/lock.sh"


def test_no_folder_of_the_repository_shadows_an_installed_package():
    """Python puts the working directory first on ``sys.path``: from the repository root, a folder
    with an ``__init__.py`` (or a ``.py`` file) there wins over an installed package of that name.
    A folder without one (``kernels/``, ``tools/``) is a namespace portion and never does."""
    installed = importlib.metadata.packages_distributions()
    importable = {
        path.stem if path.suffix == ".py" else path.name
        for path in REPO.iterdir()
        if path.suffix == ".py" or (path / "__init__.py").exists()
    }
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert {name: installed[name] for name in importable - {"megarl"} if name in installed} == {}


def test_from_the_repository_root_kernels_is_hugging_faces_and_a_moe_model_loads():
    """transformers imports Hugging Face's ``kernels`` while it loads a model class: the repository's
    ``kernels/`` folder must not stand in its way, and must still be ``megarl.kernels``."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (transformers before 5.25 does not need it)")
    source = (
        "import kernels, transformers\n"
        "import megarl.kernels.logprob_entropy as ours\n"
        "print(kernels.__file__)\n"
        "print(ours.__name__, ours.__file__)\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({str(resolve_model_path('bundled:tiny-moe'))!r})\n"
        "print(type(model).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", source], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    hugging_face, ours, model_class = result.stdout.splitlines()
    assert "site-packages" in hugging_face and not hugging_face.startswith(str(REPO / "kernels"))
    assert ours == f"megarl.kernels.logprob_entropy {REPO / 'kernels' / 'logprob_entropy.py'}"
    assert model_class == "Qwen3MoeForCausalLM"


def test_a_wheel_installs_kernels_as_megarl_kernels(tmp_path):
    """Outside an editable install too: the wheel holds ``kernels/`` as ``megarl/kernels`` (and no
    top-level ``kernels``), and its ops import from there."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps", str(REPO), "-w", str(tmp_path)],
        cwd=REPO, check=True, capture_output=True, timeout=600,
    )
    (wheel,) = tmp_path.glob("megarl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "installed")
        names = archive.namelist()
    assert "megarl/kernels/logprob_entropy.py" in names and not any(name.startswith("kernels/") for name in names)
    # -S: no site processing, so the editable install's path hooks stay out; the environment's
    # packages come from PYTHONPATH after the unpacked wheel.
    site_packages = next(path for path in sys.path if path.endswith("site-packages"))
    source = "import megarl.kernels.fused_linear_logprob_entropy as op, megarl._C; print(op.__file__)"
    result = subprocess.run(
        [sys.executable, "-S", "-c", source], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": f"{tmp_path / 'installed'}:{site_packages}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "installed" / "megarl" / "kernels" / "fused_linear_logprob_entropy.py")
