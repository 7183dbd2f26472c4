"""Where SGLang's source is installed and how the tests read it.

tools/setup.sh installs SGLang's source without its dependencies, so its modules mostly do not
import here: request classes are read from the source (``ast``), and files whose imports need no
SGLang are run alone.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.find_spec("sglang")
SGLANG = Path(_SPEC.submodule_search_locations[0]) if _SPEC is not None else None
needs_sglang = pytest.mark.skipif(SGLANG is None, reason="SGLang's source is not installed (tools/setup.sh installs it)")


def class_fields(path: Path, name: str) -> tuple[set[str], set[str]]:
    """(all fields, required fields) of class ``name`` in ``path`` and of its bases in that file."""
    tree = ast.parse(path.read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    fields, required = set(), set()
    pending = [name]
    while pending:
        node = classes[pending.pop()]
        pending.extend(base.id for base in node.bases if isinstance(base, ast.Name) and base.id in classes)
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                fields.add(statement.target.id)
                if statement.value is None:
                    required.add(statement.target.id)
    return fields, required


def load_source(relative: str, module_name: str):
    """Run one SGLang source file as a module (only for files whose imports need no SGLang)."""
    spec = importlib.util.spec_from_file_location(module_name, SGLANG / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
