"""Loading a config: a YAML file and ``key.sub=value`` overrides, strictly (an unknown key names
the nearest valid one, every value is checked against its field's type, then against its
section's declared ranges and rules; a key given twice in a file is refused), every violation
reported at once, and saving a config that loads again.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from megarl.config.base import ConfigError, FieldError, did_you_mean
from megarl.config.root import Config


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the modules use postponed annotations), without the
    ``Annotated`` extras: a declared :class:`~megarl.config.base.Range` is the section's to check."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


@functools.cache
def _all_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    keys: list[str] = []
    for name, annotation in _field_types(cls).items():
        keys.append(prefix + name)
        if _is_section(annotation):
            keys += _all_keys(annotation, f"{prefix}{name}.")
    return tuple(keys)


def _unknown_key(key: str, source: str, root: type) -> str:
    """The error for ``key``, naming the nearest valid key among all dotted keys of ``root``: first
    one ending in the same name (``train.lr`` -> ``train.optimizer.lr``), else the closest spelling."""
    candidates = _all_keys(root)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [candidate for candidate in candidates if candidate.rsplit(".", 1)[-1] == leaf]
    hint = did_you_mean(key, same_leaf, cutoff=0.0) or did_you_mean(key, candidates)
    return f"{source}: unknown key `{key}`{hint}"


_SCALARS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}


def _leaf_key(key: str, value: Any) -> str:
    """``key`` extended along the first nested mapping of ``value`` to a leaf: the key the user
    meant to set (``trian`` with ``{steps: 3}`` -> ``trian.steps``), so that the suggestion is the
    nearest leaf (``train.steps``)."""
    while isinstance(value, dict) and value:
        name, value = next(iter(value.items()))
        key = f"{key}.{name}"
    return key


def _describe(annotation: Any) -> str:
    """``annotation`` (not Optional) as the error messages say it: "an integer", "one of 'a', 'b'",
    "a list of 2 numbers" (lists and tuples of one item type)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is dict:
        return "a mapping of names to values"
    if origin in (list, tuple):
        count = "" if origin is list or args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{_SCALARS[args[0]][1]}"
    return _SCALARS[annotation][0]


# YAML 1.1 reads `1e-6` (no dot) as a string; a float field accepts what is clearly a number.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(value: Any, annotation: Any, key: str, source: str, nullable: bool = False) -> Any:
    """``value`` checked against (and converted to) ``annotation``; ``nullable`` says that the
    field is ``Optional[annotation]``, for the message.

    Raises:
        ConfigError: naming ``source``, ``key``, the value and the expected type.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)

    def mismatch() -> ConfigError:
        expected = _describe(annotation)
        return ConfigError(f"{source}: `{key}` = {value!r} must be {'null or ' if nullable else ''}{expected}")

    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _convert(value, inner, key, source, nullable=True)
    if origin is Literal:
        if value not in args:
            raise mismatch()
        return value
    if origin is dict:
        # Free-form keyword arguments (``agent.env_kwargs``): names checked, values as YAML gave them.
        if not isinstance(value, dict) or not all(isinstance(name, str) for name in value):
            raise mismatch()
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise mismatch()
        if origin is list or args[-1] is Ellipsis:
            item_types = [args[0]] * len(value)
        elif len(value) != len(args):
            raise mismatch()
        else:
            item_types = list(args)
        items = [_convert(item, item_type, f"{key}[{index}]", source) for index, (item, item_type) in enumerate(zip(value, item_types))]
        return items if origin is list else tuple(items)
    if annotation is float and isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not annotation:
        raise mismatch()
    return value


def _typed(cls: type, raw: Any, prefix: str, source: str, problems: list[str], root: type) -> dict[str, Any]:
    """Check a nested mapping from ``source`` against section ``cls`` of the config class ``root``:
    keys exist, values have their field's type. Returns the mapping with converted values (sections
    as nested dicts), without the entries that fail, whose errors go to ``problems``."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        where = f"`{prefix[:-1]}`" if prefix else "the top level"
        problems.append(f"{source}: {where} must be a mapping of field: value, got {raw!r}")
        return {}
    types_by_name = _field_types(cls)
    typed: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name not in types_by_name:
            problems.append(_unknown_key(_leaf_key(key, value), source, root))
            continue
        annotation = types_by_name[name]
        if _is_section(annotation):
            typed[name] = _typed(annotation, value, f"{key}.", source, problems, root)
        elif isinstance(value, dict) and value and typing.get_origin(annotation) is not dict:
            problems.append(_unknown_key(_leaf_key(key, value), source, root))
        else:
            try:
                typed[name] = _convert(value, annotation, key, source)
            except ConfigError as error:
                problems.append(str(error))
    return typed


def _merge(into: dict[str, Any], update: dict[str, Any], origins: dict[str, str], source: str, prefix: str = "") -> None:
    """Merge ``update`` into ``into`` (nested mappings merge, values replace) and record ``source``
    as the origin of every value it sets."""
    for name, value in update.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            _merge(into.setdefault(name, {}), value, origins, source, f"{key}.")
        else:
            into[name] = value
            origins.pop(key, None)  # keep the latest setting last
            origins[key] = source


def _origin(key: str, prefix: str, origins: dict[str, str], fallback_source: str) -> str:
    """Where ``key``'s value came from; for a field left at its default (``reward.function``
    missing), where the section's latest value came from (``reward.type=function``)."""
    if key in origins:
        return origins[key]
    in_section = [source for set_key, source in origins.items() if set_key.startswith(prefix)]
    return in_section[-1] if in_section else fallback_source


def _instantiate(
    cls: type, typed: dict[str, Any], base: Any, prefix: str, origins: dict[str, str], fallback_source: str, problems: list[str]
) -> Any:
    """Section ``cls`` from ``base`` (its default instance) with the ``typed`` values applied.

    Each range or rule the section breaks goes to ``problems``, naming the full key and the file or
    override its value came from; ``base`` then stands in for the section, so that the sections
    around it are still built and checked."""
    kwargs = {field.name: getattr(base, field.name) for field in dataclasses.fields(cls)}
    for name, annotation in _field_types(cls).items():
        if name not in typed:
            continue
        if _is_section(annotation):
            kwargs[name] = _instantiate(annotation, typed[name], kwargs[name], f"{prefix}{name}.", origins, fallback_source, problems)
        else:
            kwargs[name] = typed[name]
    try:
        return cls(**kwargs)
    except FieldError as error:
        for section_key, problem in error.problems:
            key = prefix + section_key.split(".", 1)[-1]  # the section name off: `rollout.engine_kwargs.x` keeps its own dots
            problems.append(f"{_origin(key, prefix, origins, fallback_source)}: `{key}` {problem}")
        return base


def parse_override(text: str) -> tuple[str, Any]:
    """Split a command-line override.

    Args:
        text: ``key.sub=value``; the value is read as YAML (``10``, ``1e-3``, ``true``, ``null``,
            ``[1, 2]``; an empty value is null).

    Returns:
        The dotted key and the parsed value.

    Raises:
        ConfigError: no ``=``, no key, or a value that is not valid YAML.
    """
    key, separator, raw = text.partition("=")
    key = key.strip()
    if not separator:
        raise ConfigError(f"override `{text}` must look like key.sub=value (e.g. train.steps=10)")
    if not key or "" in key.split("."):
        raise ConfigError(f"override `{text}` needs a dotted key before '=' (e.g. train.steps=10)")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override `{text}`: the value is not valid YAML ({error.problem})") from None


def _nest(key: str, value: Any) -> dict[str, Any]:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``."""
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path``, refusing a key given twice in one mapping (YAML would keep
    the last silently: a second ``train:`` section would undo the first)."""
    text = path.read_text()
    _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
    return yaml.safe_load(text)


def _refuse_duplicate_keys(node: yaml.Node | None, path: Path, prefix: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        first_lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: the typed loading refuses it
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in first_lines:
                raise ConfigError(
                    f"{path}:{line}: `{prefix}{key}` is given twice (lines {first_lines[key]} and {line}); YAML would keep only "
                    f"the second: merge them into one"
                )
            first_lines.setdefault(key, line)
            _refuse_duplicate_keys(value_node, path, f"{prefix}{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{prefix[:-1]}[{index}].")


def load_config(path: str | Path | None, overrides: Sequence[str] = (), root: type[Config] = Config) -> Config:
    """Read a YAML config and apply command-line overrides, strictly.

    Args:
        path: the YAML file; None starts from the defaults alone.
        overrides: ``key.sub=value`` strings, applied in order after the file.
        root: the config class: :class:`Config`, or a subclass with more sections (fields whose
            type is a :class:`~megarl.config.base.Section`), loaded and checked the same way.

    Returns:
        The config, every field filled (defaults live only in the dataclasses).

    Raises:
        ConfigError: every unknown key (with the nearest valid one), wrong type, value out of range
            and broken rule, one a line, each naming the file or the override and the dotted key;
            or, alone, a file that is missing, not YAML or gives a key twice.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    problems: list[str] = []
    fallback_source = "overrides"
    if path is not None:
        fallback_source = str(path)
        try:
            raw = _read_yaml(Path(path))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        _merge(values, _typed(root, raw, "", str(path), problems, root), origins, str(path))
    for override in overrides:
        source = f"override `{override}`"
        try:
            nested = _nest(*parse_override(override))
        except ConfigError as error:
            problems.append(str(error))
            continue
        _merge(values, _typed(root, nested, "", source, problems, root), origins, source)
    config = _instantiate(root, values, root(), "", origins, fallback_source, problems)
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config`` as YAML with every field, loadable again by :func:`load_config`."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
