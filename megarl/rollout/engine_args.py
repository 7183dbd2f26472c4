"""``rollout.engine_kwargs``: more settings for the launched engines, checked against the engine
before the run starts and put on its command line.

A name is a field of SGLang's ``ServerArgs`` (the argparse ``dest``, e.g. ``max_running_requests``)
or one of its flags spelt with underscores (``tensor_parallel_size``); a value becomes
``--max-running-requests 64``, ``true`` the bare flag, ``false`` nothing (SGLang's switches are all
off by default), a list the flag and its items (verl: ``actor_rollout_ref.rollout.engine_kwargs.sglang``,
turned into ``ServerArgs`` fields in verl's SGLang rollout; megarl launches ``sglang.launch_server``, so
they go on its command line).

What SGLang accepts is read from SGLang itself, in the installed version:

- its own parser, ``ServerArgs.add_cli_args`` on an ``argparse`` parser, when
  ``sglang.srt.server_args`` imports (SGLang installed with its GPU kernels, ``sgl_kernel``): every
  argument with its flag, whether it takes a value, its converter and its choices;
- else its source, read with :mod:`ast` (tools/setup.sh installs SGLang's source without the
  dependencies its parser needs): the fields declared ``A[type, "help"]`` or ``A[type, Arg(...)]``
  in ``srt/arg_groups/fields/`` (what ``add_cli_args_from_dataclass`` makes arguments of) and every
  ``parser.add_argument(...)`` in ``srt/server_args.py`` (SGLang before its field namespaces declared
  them all there). Types and choices are known where the source spells them (``int``, a
  ``Literal``, a list of constants there or in ``srt/arg_groups/choices.py``); a converter such as
  ``human_readable_int`` is not run. tests/rollout/test_engine_args.py
  checks this reading against the parser built from the same source.

Refused, one line each: a name SGLang does not have (with the nearest one it has, by
:func:`difflib.get_close_matches`), a name megarl sets itself (:data:`SET_BY_MEGARL`, with the
knob that sets it), a value the argument's type or choices refuse. The ``hf`` engine honours
:data:`HF_HONOURED` and refuses the rest, naming itself.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from megarl.config.base import did_you_mean

SET_BY_MEGARL: dict[str, str] = {
    "model_path": "model.path (the engines serve the policy)",
    "host": "rollout.engine_urls to run the engines yourself (megarl picks their address)",
    "port": "rollout.engine_urls to run the engines yourself (megarl picks their ports)",
    "tp_size": "rollout.engine_tensor_parallel",
    "dp_size": "rollout.num_engines (megarl gives each engine rollout.engine_tensor_parallel GPUs)",
    "pp_size": "rollout.engine_tensor_parallel (megarl gives each engine that many GPUs)",
    "base_gpu_id": "rollout.colocate (megarl places each engine on its node's GPUs)",
    "mem_fraction_static": "rollout.mem_fraction",
    "random_seed": "rollout.seed",
    "dtype": "rollout.dtype",
    "skip_tokenizer_init": "nothing: it is always on, megarl sends token ids",
    "enable_memory_saver": "rollout.colocate",
    "enable_deterministic_inference": "rollout.deterministic",
    "enable_return_routed_experts": "algorithm.routing_replay=r3",
}
"""SGLang arguments that megarl's command line sets (:meth:`megarl.rollout.engine.Engine.command`)
or that would break its placement of engines on GPUs, with the knob to use instead."""

HF_HONOURED: dict[str, str] = {
    "context_length": "the longest prompt + response it serves (its --context-length; default the model's max_position_embeddings)",
    "disable_cuda_graph": "accepted and left off its command line: it captures no CUDA graphs, so they are disabled by nature",
}
"""The SGLang arguments the ``hf`` engine honours, and how."""

_FLAG_ACTIONS = ("store_true", "store_false")


@dataclasses.dataclass(frozen=True, slots=True)
class ServerArgument:
    """One argument of SGLang's server, as its parser (or its source) declares it."""

    name: str
    """The ``ServerArgs`` field it sets (argparse ``dest``)."""
    flag: str
    """Its first option string, e.g. ``--max-running-requests``."""
    takes_value: bool
    """False for a switch (``store_true``): given as the bare flag."""
    convert: Callable[[str], Any] | None = None
    """The parser's converter (``int``, ``float``, ``human_readable_int`` ...); None: not known."""
    choices: tuple[Any, ...] | None = None
    """The values it accepts; None: any."""
    many: bool = False
    """It takes several values (``nargs`` ``+`` or ``*``)."""


def parser_arguments(parser: argparse.ArgumentParser) -> dict[str, ServerArgument]:
    """The arguments of ``parser``, under their ``dest`` (given as the first flag) and under each
    ``--flag`` spelt with underscores (given as that flag: ``no_x`` is ``--no-x``)."""
    arguments: dict[str, ServerArgument] = {}
    for action in parser._actions:
        flags = [option for option in action.option_strings if option.startswith("--")]
        if not flags or isinstance(action, argparse._HelpAction):
            continue
        argument = ServerArgument(
            name=action.dest, flag=flags[0], takes_value=action.nargs != 0,
            convert=action.type if callable(action.type) else None,
            choices=tuple(action.choices) if action.choices is not None else None, many=action.nargs in ("+", "*"),
        )
        for flag in flags:
            arguments.setdefault(flag[2:].replace("-", "_"), dataclasses.replace(argument, flag=flag))
        arguments.setdefault(action.dest, argument)
    return arguments


_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def _constant_list(node: ast.AST | None, constants: Mapping[str, tuple[Any, ...]] | None = None) -> tuple[Any, ...] | None:
    """The values of a literal list or tuple of constants, or of a name in ``constants``; None for anything else."""
    if isinstance(node, (ast.List, ast.Tuple)) and all(isinstance(item, ast.Constant) for item in node.elts):
        return tuple(item.value for item in node.elts)
    return (constants or {}).get(node.id) if isinstance(node, ast.Name) else None


def _module_constants(path: Path) -> dict[str, tuple[Any, ...]]:
    """The module-level ``NAME = [constants]`` of a file (SGLang's ``arg_groups/choices.py``); empty when it is missing."""
    if not path.is_file():
        return {}
    constants = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values = _constant_list(node.value)
            if values is not None:
                constants[node.targets[0].id] = values
    return constants


def _keywords(call: ast.Call) -> dict[str, ast.AST]:
    return {keyword.arg: keyword.value for keyword in call.keywords if keyword.arg}


def _name(node: ast.AST | None) -> str:
    """``int`` of ``int``, ``typing.Optional`` -> ``Optional``; empty for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else ""


def _is_switch_action(node: ast.AST | None) -> bool:
    """``action="store_true"`` or a class named like SGLang's ``DeprecatedStoreTrueAction``."""
    if isinstance(node, ast.Constant):
        return node.value in _FLAG_ACTIONS
    return _name(node).endswith(("StoreTrueAction", "StoreFalseAction"))


def _field_arguments(field: str, annotation: ast.AST, constants: Mapping[str, tuple[Any, ...]]) -> list[ServerArgument]:
    """The arguments ``add_cli_args_from_dataclass`` makes of a field annotated ``A[type, meta]``:
    one per flag (a ``BooleanOptionalAction`` switch also has its ``--no-`` flag); none for
    another annotation or ``Arg(no_cli=True)``."""
    if not (isinstance(annotation, ast.Subscript) and _name(annotation.value) == "A" and isinstance(annotation.slice, ast.Tuple)):
        return []
    kind, meta = annotation.slice.elts[:2]
    if isinstance(meta, ast.Constant) and isinstance(meta.value, str):
        options: dict[str, ast.AST] = {}
    elif isinstance(meta, ast.Call) and _name(meta.func) == "Arg":
        options = _keywords(meta)
    else:
        return []
    if isinstance(options.get("no_cli"), ast.Constant) and options["no_cli"].value:
        return []
    cli_name = options.get("cli_name")
    flags = [cli_name.value if isinstance(cli_name, ast.Constant) else "--" + field.replace("_", "-"), *(_constant_list(options.get("aliases")) or ())]
    action_options = options.get("action_kwargs")
    if isinstance(action_options, ast.Dict):
        options.update({key.value: value for key, value in zip(action_options.keys, action_options.values) if isinstance(key, ast.Constant)})
    nargs = options.get("nargs")
    many = isinstance(nargs, ast.Constant) and nargs.value in ("+", "*")
    choices, convert, takes_value = _constant_list(options.get("choices"), constants), None, True
    while True:  # Optional[X], X | None, Union[X, ...] -> X
        if isinstance(kind, ast.Subscript) and _name(kind.value) in ("Optional", "Union"):
            kind = kind.slice.elts[0] if isinstance(kind.slice, ast.Tuple) else kind.slice
        elif isinstance(kind, ast.BinOp) and isinstance(kind.op, ast.BitOr):
            kind = kind.right if isinstance(kind.left, ast.Constant) and kind.left.value is None else kind.left
        else:
            break
    if "action" in options:
        action = options["action"]
        takes_value = not (_is_switch_action(action) or _name(action) == "BooleanOptionalAction")
        if _name(action) == "BooleanOptionalAction":
            flags += ["--no-" + flag[2:] for flag in flags]
        convert = _TYPES.get(_name(options.get("type")))
    elif _name(kind) == "bool":
        takes_value = False
    elif isinstance(kind, ast.Subscript) and _name(kind.value) == "Literal":
        literal = _constant_list(kind.slice) if isinstance(kind.slice, ast.Tuple) else (kind.slice.value,)
        choices = choices or literal
        convert = None if "type_parser" in options else _TYPES.get(type(literal[0]).__name__, str)
    elif isinstance(kind, ast.Subscript) and _name(kind.value) in ("List", "list") and "type_parser" not in options:
        many, convert = nargs is None or many, _TYPES.get(_name(kind.slice), str)
    elif "type_parser" not in options:
        convert = _TYPES.get(_name(kind), str)
    argument = ServerArgument(name=field, flag=flags[0], takes_value=takes_value, convert=convert, choices=choices, many=many)
    return [dataclasses.replace(argument, flag=flag) for flag in flags]


def _add_argument_calls(tree: ast.AST, constants: Mapping[str, tuple[Any, ...]]) -> list[ServerArgument]:
    """Every ``parser.add_argument("--flag", ...)`` in a module, as the argument it declares (one per flag)."""
    arguments = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"):
            continue
        flags = [arg.value for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")]
        if not flags:
            continue
        options = _keywords(node)
        dest = options.get("dest")
        name = dest.value if isinstance(dest, ast.Constant) else flags[0][2:].replace("-", "_")
        nargs = options.get("nargs")
        argument = ServerArgument(
            name=name, flag=flags[0], takes_value=not _is_switch_action(options.get("action")),
            convert=_TYPES.get(_name(options.get("type"))), choices=_constant_list(options.get("choices"), constants),
            many=isinstance(nargs, ast.Constant) and nargs.value in ("+", "*"),
        )
        arguments += [dataclasses.replace(argument, flag=flag) for flag in flags]
    return arguments


def source_arguments(sglang_dir: Path) -> dict[str, ServerArgument]:
    """SGLang's server arguments read from its source under ``sglang_dir`` (the ``sglang`` package
    directory) without importing it: see the module docstring."""
    arguments: dict[str, ServerArgument] = {}
    constants = _module_constants(sglang_dir / "srt" / "arg_groups" / "choices.py")
    for path in sorted((sglang_dir / "srt" / "arg_groups" / "fields").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                for argument in _field_arguments(node.target.id, node.annotation, constants):
                    arguments.setdefault(argument.flag[2:].replace("-", "_"), argument)
                    arguments.setdefault(argument.name, argument)
    for argument in _add_argument_calls(ast.parse((sglang_dir / "srt" / "server_args.py").read_text()), constants):
        arguments.setdefault(argument.flag[2:].replace("-", "_"), argument)
        arguments.setdefault(argument.name, argument)
    return arguments


@dataclasses.dataclass(frozen=True, slots=True)
class SGLangArguments:
    """SGLang's server arguments, and where they were read."""

    arguments: dict[str, ServerArgument]
    source: str
    """``SGLang 0.5.x's argument parser`` or ``the ServerArgs fields of SGLang 0.5.x's source``."""


@functools.cache
def installed_sglang_arguments() -> SGLangArguments | None:
    """The installed SGLang's server arguments: from its parser when ``sglang.srt.server_args``
    imports (only tried with ``sgl_kernel`` installed: without it SGLang is a source-only install
    whose parser's imports fail), else from its source; None when SGLang is not installed."""
    spec = importlib.util.find_spec("sglang")
    if spec is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        name = f"SGLang {version('sglang')}"
    except PackageNotFoundError:
        name = "SGLang"
    if importlib.util.find_spec("sgl_kernel") is not None:
        try:
            server_args = importlib.import_module("sglang.srt.server_args")
            parser = argparse.ArgumentParser(add_help=False)
            server_args.ServerArgs.add_cli_args(parser)
            return SGLangArguments(parser_arguments(parser), f"{name}'s argument parser")
        except Exception:  # noqa: BLE001 - any import or parser failure falls back to the source
            pass
    return SGLangArguments(source_arguments(Path(spec.submodule_search_locations[0])), f"the ServerArgs fields of {name}'s source")


def _value_problem(argument: ServerArgument, value: Any) -> str | None:
    """What the argument refuses in ``value``, worded after the value; None: accepted."""
    if not argument.takes_value:
        return None if isinstance(value, bool) else f"({value!r}) must be true or false: {argument.flag} is a switch"
    if isinstance(value, list) and not argument.many:
        return f"({value!r}) must be one value: {argument.flag} takes one"
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool):
            return f"({value!r}): {argument.flag} takes a value, not true or false"
        if argument.convert is not None:
            try:
                converted = argument.convert(str(item))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
                return f"({item!r}) is refused by {argument.flag}'s {getattr(argument.convert, '__name__', 'converter')}: {error}"
        else:
            converted = item
        if argument.choices is not None and converted not in argument.choices and str(item) not in map(str, argument.choices):
            return f"({item!r}) must be one of {list(argument.choices)}"
    return None


def engine_kwargs_problems(engine: str, kwargs: Mapping[str, Any], sglang: SGLangArguments | None = None) -> list[str]:
    """Every problem with ``rollout.engine_kwargs`` for engines of kind ``engine``, one line each.

    Args:
        engine: ``hf`` or ``sglang`` (resolved).
        kwargs: the settings, by ``ServerArgs`` name.
        sglang: SGLang's arguments; None: :func:`installed_sglang_arguments`.
    """
    problems = []
    known = None
    if engine == "sglang" and kwargs:
        known = sglang or installed_sglang_arguments()
        if known is None:
            return ["`rollout.engine_kwargs` cannot be checked: SGLang is not installed (pip install sglang), and rollout.engine is sglang"]
    for name, value in kwargs.items():
        key = f"`rollout.engine_kwargs.{name}`"
        if name in SET_BY_MEGARL or (known is not None and name in known.arguments and known.arguments[name].name in SET_BY_MEGARL):
            megarl_name = name if name in SET_BY_MEGARL else known.arguments[name].name
            problems.append(f"{key} is set by megarl: use {SET_BY_MEGARL[megarl_name]} instead")
        elif engine == "hf":
            if name not in HF_HONOURED:
                problems.append(
                    f"{key}: the hf engine (rollout.engine resolves to hf) cannot honour it{did_you_mean(name, list(HF_HONOURED))}; "
                    f"it honours {', '.join(HF_HONOURED)}: remove it or use rollout.engine=sglang"
                )
            elif (problem := _value_problem(_HF_ARGUMENTS[name], value)) is not None:
                problems.append(f"{key} {problem}")
        elif name not in known.arguments:
            nearest = did_you_mean(name, sorted(known.arguments)) or " (python -m sglang.launch_server --help lists them)"
            problems.append(f"{key} is not an argument of SGLang's server (as read from {known.source}){nearest}")
        elif (problem := _value_problem(known.arguments[name], value)) is not None:
            problems.append(f"{key} {problem}")
    return problems


def _positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise ValueError("it must be >= 1")
    return number


_HF_ARGUMENTS = {
    "context_length": ServerArgument(name="context_length", flag="--context-length", takes_value=True, convert=_positive_int),
    "disable_cuda_graph": ServerArgument(name="disable_cuda_graph", flag="--disable-cuda-graph", takes_value=False),
}
""":data:`HF_HONOURED` as the ``hf`` server takes them."""


def command_line(engine: str, kwargs: Mapping[str, Any], sglang: SGLangArguments | None = None) -> list[str]:
    """The command-line arguments of ``kwargs`` (checked by :func:`engine_kwargs_problems`) for an
    engine of kind ``engine``: ``{"max_running_requests": 64, "disable_cuda_graph": True}`` ->
    ``["--max-running-requests", "64", "--disable-cuda-graph"]``; the ``hf`` server gets only what
    it acts on (``disable_cuda_graph`` is true of it already).

    Raises:
        ValueError: the problems :func:`engine_kwargs_problems` finds, one a line.
    """
    if not kwargs:
        return []
    problems = engine_kwargs_problems(engine, kwargs, sglang)
    if problems:
        raise ValueError("\n".join(problems))
    arguments = _HF_ARGUMENTS if engine == "hf" else (sglang or installed_sglang_arguments()).arguments
    line = []
    for name, value in kwargs.items():
        if value is False or (engine == "hf" and name == "disable_cuda_graph"):
            continue
        argument = arguments[name]
        if not argument.takes_value:
            line.append(argument.flag)
        else:
            line += [argument.flag, *(str(item) for item in (value if isinstance(value, list) else [value]))]
    return line
