"""What every part of the config shares: its error types, the :class:`Range` a numeric field
declares and the :class:`Section` base that checks it, the helpers that word the fixes (the nearest
valid name: :func:`did_you_mean`), and the ``bundled:`` names of the files shipped in
``megarl/assets``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The ``megarl`` package directory (``bundled:`` names resolve under its ``assets/``)."""
BUNDLED_PREFIX = "bundled:"


class ConfigError(ValueError):
    """An invalid configuration; the message names the field(s), the value(s) and the fix, one
    problem a line when there are several."""


class FieldError(ConfigError):
    """A section's fields out of range or breaking its rules, raised when the section is built,
    every problem at once (one a line).

    The section does not know where it sits (the optimizer serves ``train`` and ``critic``), so the
    loader replaces each key with the full dotted key and prefixes the file or override the value
    came from.

    Attributes:
        problems: (key, problem) pairs; the key as the section names it (``optimizer.lr``), the
            problem says what is wrong and how to fix it (``(0.0) must be > 0``).
    """

    def __init__(self, problems: Sequence[tuple[str, str]]):
        super().__init__("\n".join(f"`{key}` {problem}" for key, problem in problems))
        self.problems = list(problems)


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    """The bounds of a numeric field, declared on its annotation and checked when its section is
    built (:class:`Section`)::

        gamma: Annotated[float, Range(ge=0, le=1)] = 1.0
        max_samples: Annotated[Optional[int], Range(ge=1)] = None   # null is also accepted
        stop_token_ids: Annotated[list[int], Range(ge=0)] = ...      # every item is checked

    A value out of range is reported as ``(0) must be >= 1``, ``(1.5) must be in [0, 1)``, with
    ``, or null`` for an Optional field and ``must all be`` for a list.
    """

    ge: float | None = None
    """Inclusive lower bound."""
    gt: float | None = None
    """Exclusive lower bound."""
    le: float | None = None
    """Inclusive upper bound."""
    lt: float | None = None
    """Exclusive upper bound."""
    off: float | None = None
    """A value outside the bounds that switches the setting off (``rollout.top_k`` = -1)."""
    note: str = ""
    """What a value at the bound means, said in parentheses after it (``0 is greedy``)."""
    fix: str = ""
    """What to do instead, said after the bound (``remove a file ... instead of giving it weight 0``)."""

    def admits(self, value: float) -> bool:
        """Whether ``value`` lies within the bounds (or is the ``off`` value)."""
        if self.off is not None and value == self.off:
            return True
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        """The bounds as a message says them: ``>= 1``, ``> 0``, ``in [0, 1)``, ``-1 (off) or >= 1``."""
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if low and high:
            text = f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
        elif low:
            text = f"{'>=' if low[0] == '[' else '>'} {low[1]}"
        elif high:
            text = f"{'<=' if high[0] == ']' else '<'} {high[1]}"
        else:
            raise TypeError("a Range needs at least one bound")
        return text if self.off is None else f"{self.off} (off) or {text}"

    def problem(self, value: Any, *, optional: bool, items: bool) -> str | None:
        """What is wrong with ``value`` (a list when ``items``), worded for :class:`FieldError`, or None."""
        if value is None and optional:
            return None
        if all(self.admits(item) for item in (value if items else [value])):
            return None
        message = f"({value}) must {'all ' if items else ''}be {self.describe()}"
        if optional:
            message += ", or null"
        if self.note:
            message += f" ({self.note})"
        if self.fix:
            message += f": {self.fix}"
        return message


@dataclasses.dataclass(frozen=True, slots=True)
class _DeclaredRange:
    """A :class:`Range` found on a field, with the shape of the field it bounds."""

    name: str
    bounds: Range
    optional: bool
    """The field is Optional: null passes."""
    items: bool
    """The field is a list: every item is checked."""


@functools.cache
def _declared_ranges(cls: type) -> tuple[_DeclaredRange, ...]:
    """Every :class:`Range` declared on ``cls``'s fields (the sections use postponed annotations,
    so they are resolved here, keeping the ``Annotated`` extras that the loader's type checks drop)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    declared = []
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        if typing.get_origin(annotation) is not Annotated:
            continue
        inner, *extras = typing.get_args(annotation)
        optional = typing.get_origin(inner) in (typing.Union, types.UnionType) and type(None) in typing.get_args(inner)
        if optional:
            (inner,) = [arg for arg in typing.get_args(inner) if arg is not type(None)]
        items = typing.get_origin(inner) in (list, tuple)
        declared += [_DeclaredRange(field.name, extra, optional, items) for extra in extras if isinstance(extra, Range)]
    return tuple(declared)


class Section:
    """Base of the config sections: when built, a section checks every :class:`Range` its fields
    declare, then its own cross-field rules (:meth:`_rule_problems`), and raises one
    :class:`FieldError` listing all that fail.

    Keys are named after the class: ``OptimizerConfig.lr`` is ``optimizer.lr`` (the loader puts
    the section's place in the whole config in front).
    """

    __slots__ = ()

    def __post_init__(self) -> None:
        prefix = type(self).__name__.removesuffix("Config").lower()
        problems = [
            (declared.name, problem)
            for declared in _declared_ranges(type(self))
            if (problem := declared.bounds.problem(getattr(self, declared.name), optional=declared.optional, items=declared.items))
        ]
        problems += self._rule_problems()
        if problems:
            raise FieldError([(f"{prefix}.{name}", problem) for name, problem in problems])

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        """(field, problem) for each rule of the section that its values break: checks on more than
        one field, or on more than a numeric range; none by default."""
        return iter(())


def did_you_mean(word: str, candidates: Sequence[str], cutoff: float = 0.5) -> str:
    """`` — did you mean `nearest`?`` naming the candidate spelt most like ``word`` (at least
    ``cutoff`` alike, 0 to 1), or ``""`` when none is."""
    nearest = difflib.get_close_matches(word, candidates, n=1, cutoff=cutoff)
    return f" — did you mean `{nearest[0]}`?" if nearest else ""


def _divisors(number: int) -> list[int]:
    return [candidate for candidate in range(1, number + 1) if number % candidate == 0]


def _one_of(options: Sequence[int]) -> str:
    """``[1, 2, 4]`` -> ``"1, 2 or 4"``."""
    words = [str(option) for option in options]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


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
