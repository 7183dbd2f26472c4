"""Tools an agent may call: a name, a description, a JSON schema of the arguments and the Python
function that runs.

A tool is declared once and used twice: ``Tool.schema()`` is the OpenAI function-calling
declaration that chat templates render into the prompt (``apply_chat_template(..., tools=[...])``),
and ``Tool.invoke(arguments)`` checks the arguments a parsed call carries against the same schema
before calling the function.

The schema is the subset of JSON Schema that tool declarations use: an object whose ``properties``
each have one ``type`` (``string``, ``integer``, ``number``, ``boolean``, ``array``, ``object``) and
optionally an ``enum``; ``required`` names some of them. Only the top-level types are checked (the
items of an array or the fields of an object are the function's to check).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda value: isinstance(value, str),
    "integer": lambda value: (isinstance(value, int) and not isinstance(value, bool))
    or (isinstance(value, float) and value.is_integer()),
    "number": lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
    "boolean": lambda value: isinstance(value, bool),
    "array": lambda value: isinstance(value, list),
    "object": lambda value: isinstance(value, dict),
}
"""A property's JSON type -> whether a decoded value (``json.loads``) has it. ``True`` is not an
integer and ``"4"`` is not one either; ``4.0`` is (JSON Schema's rule; the function receives 4)."""

TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
"""A tool's name: a Python-identifier-like word of at most 64 characters (the OpenAI API's limit)."""

ERROR_TEXT_CHARS = 200
"""A function's exception text is cut to this many characters in the ``ToolError`` the model reads:
enough for the usual one-line message, short enough not to flood the context with a long repr."""


class ToolError(Exception):
    """A call the tool could not answer: bad arguments, or the function raised. The message is short
    and written for the model, which reads it as the tool's result; the episode counts these."""


def json_type_of(value: Any) -> str:
    """The JSON type name of a decoded value (``"integer"`` for 4, ``"null"`` for None), for messages."""
    names = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"), (dict, "object"))
    for python_type, name in names:
        if isinstance(value, python_type):
            return name
    return "null" if value is None else type(value).__name__


@dataclasses.dataclass(frozen=True)
class Tool:
    """One tool. ``parameters`` is a JSON schema object, e.g. ``{"type": "object", "properties":
    {"key": {"type": "string", "description": "..."}}, "required": ["key"]}``; ``function`` is
    called with the arguments as keywords. Raises ``ValueError`` naming the tool and the field when
    the declaration is malformed or the function cannot take the declared parameters."""

    name: str
    description: str
    parameters: dict
    function: Callable[..., Any]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TOOL_NAME.fullmatch(self.name):
            raise ValueError(
                f"tool name {self.name!r}: must be a word of letters, digits and '_' (not starting with a digit), "
                f"at most 64 characters"
            )
        where = f"tool {self.name!r}"
        if not isinstance(self.description, str):
            raise ValueError(f"{where}: description must be a string, got {type(self.description).__name__}")
        if not callable(self.function):
            raise ValueError(f"{where}: function must be callable, got {type(self.function).__name__}")
        _check_parameters(self.parameters, where)
        _check_signature(self.function, self.parameters, where)

    @property
    def properties(self) -> dict[str, dict]:
        """Parameter name -> its schema, in declaration order."""
        return self.parameters.get("properties", {})

    @property
    def required(self) -> list[str]:
        """The names of the parameters a call must give."""
        return self.parameters.get("required", [])

    def schema(self) -> dict:
        """The OpenAI function-calling declaration: ``{"type": "function", "function": {"name",
        "description", "parameters"}}``, what chat templates take in ``tools=``."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def invoke(self, arguments: Any) -> str:
        """Checks ``arguments`` against the schema, calls ``function(**arguments)`` and returns the
        result as text: a ``dict`` or ``list`` JSON-encoded (values JSON cannot hold as their
        ``str``), anything else as ``str(result)`` (a ``str`` as is).

        Raises:
            ToolError: ``arguments`` is not an object, misses a required argument, names an unknown
                one or gives one of the wrong type ("lookup: missing argument 'key'"), or the
                function raised ("lookup raised KeyError: 'x'").
        """
        problem = self.argument_problem(arguments)
        if problem:
            raise ToolError(f"{self.name}: {problem}")
        keywords = {
            name: int(value) if self.properties[name]["type"] == "integer" else value for name, value in arguments.items()
        }
        try:
            result = self.function(**keywords)
        except Exception as error:
            raise ToolError(f"{self.name} raised {type(error).__name__}: {str(error)[:ERROR_TEXT_CHARS]}") from error
        if isinstance(result, (dict, list)):
            return json.dumps(result, ensure_ascii=False, default=str)
        return str(result)

    def argument_problem(self, arguments: Any) -> str:
        """What is wrong with ``arguments`` for this tool's schema, in a few words, or ``""``."""
        if not isinstance(arguments, dict):
            return f"arguments must be an object, got {json_type_of(arguments)}"
        for name in self.required:
            if name not in arguments:
                return f"missing argument {name!r}"
        for name, value in arguments.items():
            declared = self.properties.get(name)
            if declared is None:
                takes = ", ".join(self.properties) or "no arguments"
                return f"unknown argument {name!r} (takes {takes})"
            if not JSON_TYPES[declared["type"]](value):
                return f"argument {name!r} must be of type {declared['type']}, got {json_type_of(value)} {_shown(value)}"
            if "enum" in declared and value not in declared["enum"]:
                return f"argument {name!r} must be one of {json.dumps(declared['enum'])}, got {_shown(value)}"
        return ""


def _shown(value: Any) -> str:
    """A value as the model would write it (JSON; ``repr`` for what JSON cannot hold), cut to 40 characters."""
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):
        return repr(value)[:40]


def _check_parameters(parameters: Any, where: str) -> None:
    """Raises ``ValueError`` unless ``parameters`` is an object schema of typed properties whose
    ``required`` names are properties."""
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise ValueError(f'{where}: parameters must be a JSON schema object {{"type": "object", "properties": {{...}}}}, got {parameters!r:.80}')
    properties = parameters.get("properties", {})
    if not isinstance(properties, dict):
        raise ValueError(f"{where}: parameters.properties must be an object mapping names to schemas, got {properties!r:.80}")
    for name, schema in properties.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{where}: parameters.properties name {name!r} must be a Python identifier (it becomes a keyword argument)")
        if not isinstance(schema, dict) or not isinstance(schema.get("type"), str) or schema["type"] not in JSON_TYPES:
            raise ValueError(
                f"{where}: parameters.properties.{name} must have a type, one of {', '.join(JSON_TYPES)}, got {schema!r:.80}"
            )
        if "enum" in schema and not isinstance(schema["enum"], list):
            raise ValueError(f"{where}: parameters.properties.{name}.enum must be a list, got {schema['enum']!r:.80}")
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        raise ValueError(f"{where}: parameters.required must be a list of property names, got {required!r:.80}")
    unknown = [name for name in required if name not in properties]
    if unknown:
        raise ValueError(f"{where}: parameters.required names {unknown} not in parameters.properties ({', '.join(properties) or 'none'})")
    if len(set(required)) != len(required):
        raise ValueError(f"{where}: parameters.required lists a name twice: {required}")


def _check_signature(function: Callable[..., Any], parameters: dict, where: str) -> None:
    """Raises ``ValueError`` when ``function`` cannot take every declared property as a keyword, or
    needs an argument that a valid call may leave out. Functions whose signature Python cannot read
    (some builtins) are not checked."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return
    properties, required = parameters.get("properties", {}), set(parameters.get("required", []))
    function_name = getattr(function, "__name__", repr(function))
    try:
        signature.bind_partial(**dict.fromkeys(properties))
    except TypeError as error:
        raise ValueError(f"{where}: function {function_name} cannot take the declared parameters {list(properties)}: {error}") from None
    for name, parameter in signature.parameters.items():
        needed = parameter.default is inspect.Parameter.empty and parameter.kind not in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        )
        if needed and name not in required:
            raise ValueError(
                f"{where}: function {function_name} needs argument {name!r} but parameters.required does not list it: "
                f"add it to required (and properties) or give it a default"
            )


class ToolSet(Mapping[str, Tool]):
    """Tools by name, in the order given. Raises ``ValueError`` for a duplicate name or an item that
    is not a ``Tool``."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            if not isinstance(tool, Tool):
                raise ValueError(f"a tool set holds Tool objects, got {type(tool).__name__} {tool!r:.60}")
            if tool.name in self._tools:
                raise ValueError(f"two tools are named {tool.name!r}: tool names must be unique")
            self._tools[tool.name] = tool

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tools)

    def __len__(self) -> int:
        return len(self._tools)

    def schemas(self) -> list[dict]:
        """Every tool's ``Tool.schema()``, in order: the ``tools`` argument of a chat template."""
        return [tool.schema() for tool in self._tools.values()]
