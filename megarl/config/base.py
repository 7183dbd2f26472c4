"""What every part of the config shares: its error types, range checks that name the key, and
the ``bundled:`` names of the files shipped in ``megarl/assets``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The ``megarl`` package directory (``bundled:`` names resolve under its ``assets/``)."""
BUNDLED_PREFIX = "bundled:"


class ConfigError(ValueError):
    """An invalid configuration; the message names the field(s), the value(s) and the fix."""


class FieldError(ConfigError):
    """A field out of range, raised by a section's ``__post_init__``.

    The section does not know where it sits (the optimizer serves ``train`` and ``critic``), so the
    loader replaces ``key`` with the full dotted key and prefixes the file or override the value
    came from.

    Attributes:
        key: the field as its section names it, e.g. ``optimizer.lr``.
        problem: what is wrong and how to fix it.
    """

    def __init__(self, key: str, problem: str):
        super().__init__(f"`{key}` {problem}")
        self.key = key
        self.problem = problem


def _require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise FieldError(key, problem)


def _require_positive(section: Any, prefix: str, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value >= 1, f"{prefix}.{name}", f"({value}) must be >= 1")


def _bundled(path: str | Path, folder: str) -> Path:
    """``bundled:NAME`` -> ``megarl/assets/<folder>/NAME``; any other value is a path as it is."""
    text = str(path)
    if text.startswith(BUNDLED_PREFIX):
        return PACKAGE_DIR / "assets" / folder / text[len(BUNDLED_PREFIX) :]
    return Path(text)


def resolve_model_path(path: str | Path) -> Path:
    """The directory a ``model.path``-like value names: ``bundled:NAME`` for a model shipped in
    ``megarl/assets/models/NAME``, or a directory (not checked for existence)."""
    return _bundled(path, "models")


def resolve_data_path(path: str | Path) -> Path:
    """The file a ``data.train_files`` entry names: ``bundled:NAME`` for a dataset shipped in
    ``megarl/assets/data/NAME``, or a file path (not checked for existence)."""
    return _bundled(path, "data")
