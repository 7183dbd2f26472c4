"""The package's import structure: no cycles, and no part importing a part above it (the layers of
docs/architecture.md). Imports inside functions count: they run too."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from tests.distributed import REPO

pytestmark = pytest.mark.cpu


def modules() -> dict[str, Path]:
    """Module name -> file, for ``megarl/`` and ``kernels/`` (installed as ``megarl.kernels``)."""
    found = {}
    for root, package in ((REPO / "megarl", ("megarl",)), (REPO / "kernels", ("megarl", "kernels"))):
        for path in root.rglob("*.py"):
            parts = (*package, *path.relative_to(root).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _runs(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (type hints only: never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            yield from (inner for branch in node.orelse for inner in (branch, *_runs(branch)))
            continue
        yield node
        yield from _runs(node)


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The megarl modules ``path`` imports when it runs, anywhere in the file."""
    names = set()
    for node in _runs(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("megarl"):
            names |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("megarl")}
    return {name for name in names if name in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def layers() -> dict[str, int]:
    """Part -> layer, from the ```layers block of docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text()
    (block,) = re.findall(r"```layers\n(.*?)```", text, re.S)
    table = {}
    for line in block.strip().splitlines():
        level, *parts = line.split()
        table.update({part: int(level) for part in parts})
    return table


def part(module: str, table: dict[str, int]) -> str:
    """``megarl.trainer.loop`` -> ``trainer``; ``megarl.config.__main__`` -> itself when listed."""
    name = module.removeprefix("megarl.")
    return name if name in table else name.split(".")[0]


def cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle, or []."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges)))
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_closes_a_cycle():
    assert cycle(graph()) == []


def test_no_part_imports_a_part_above_it():
    table = layers()
    edges = graph()
    unplaced = sorted({part(module, table) for module in edges} - set(table) - {"megarl"})
    assert unplaced == [], f"parts missing from the layers of docs/architecture.md: {unplaced}"
    upward = [
        f"{module} (layer {table[part(module, table)]}) imports {target} (layer {table[part(target, table)]})"
        for module, targets in sorted(edges.items()) if module != "megarl"
        for target in sorted(targets)
        if target != "megarl" and part(target, table) != part(module, table) and table[part(target, table)] >= table[part(module, table)]
    ]
    assert upward == []


def test_the_checks_see_a_cycle_and_an_upward_import():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) == []
    table = layers()
    assert table["models"] > table["config"] and part("megarl.trainer.loop", table) == "trainer"
    assert part("megarl.config.__main__", table) == "config.__main__" and part("megarl.config", table) == "config"
    edges = graph()
    assert "megarl.models.families" in edges["megarl.models.builder"] and "megarl.kernels.logprob_entropy" in edges
    # megarl.trainer.loop names Run for type hints only.
    assert "megarl.trainer.run" not in edges["megarl.trainer.loop"]


MAX_LINES = 500
"""Longest a source file of the package may be: past it a file does more than one thing (issue 16)."""


def test_no_source_file_is_over_the_line_limit():
    # kernels/ is installed as megarl.kernels.
    too_long = [
        f"{path.relative_to(REPO)} ({count} lines)"
        for path in sorted([*(REPO / "megarl").rglob("*.py"), *(REPO / "kernels").rglob("*.py")])
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert too_long == [], f"source files over {MAX_LINES} lines; split them by what they do: {too_long}"


def test_the_architecture_document_names_every_module():
    # docs/architecture.md describes the tree: each module appears there by its file name (or its
    # path under megarl/), so a module added, moved or renamed without the document fails here.
    document = (REPO / "docs" / "architecture.md").read_text()
    files = [*(REPO / "megarl").rglob("*.py"), *(REPO / "kernels").rglob("*.py")]
    unnamed = sorted(
        str(path.relative_to(REPO))
        for path in files
        if path.name != "__init__.py" and "assets" not in path.parts
        and path.name not in document and str(path.relative_to(path.parents[1])) not in document
    )
    assert unnamed == [], f"modules docs/architecture.md does not name: {unnamed}"


def test_test_files_have_distinct_names():
    # The test folders are not packages: pytest imports each test file by its file name, so two
    # with one name (tests/agents/test_toy.py and tests/rewards/test_toy.py) fail collection.
    by_name: dict[str, list[str]] = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        by_name.setdefault(path.name, []).append(str(path.relative_to(REPO)))
    assert {name: paths for name, paths in by_name.items() if len(paths) > 1} == {}
