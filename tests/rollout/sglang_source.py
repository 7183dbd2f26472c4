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


RUNTIME_ONLY = ("pybase64", "zmq", "zmq.auth", "zmq.auth.thread", "IPython", "IPython.display")
"""Modules ``sglang.srt.server_args`` imports through SGLang's utilities that tools/setup.sh does not
install; its argument parser never calls them, so :func:`sglang_parser` stands in empty ones."""


def sglang_parser():
    """SGLang's own server argument parser (``ServerArgs.add_cli_args``), built from the installed
    source, with :data:`RUNTIME_ONLY` modules that are not installed stood in by empty ones.

    Run it in a subprocess of its own (:func:`run_sglang_parser`): the stand-ins and SGLang's
    modules stay in ``sys.modules``."""
    import argparse
    import sys
    from unittest import mock

    missing = {name.split(".")[0] for name in RUNTIME_ONLY if importlib.util.find_spec(name.split(".")[0]) is None}
    for name in RUNTIME_ONLY:
        if name.split(".")[0] in missing:
            stand_in = mock.MagicMock()
            stand_in.__path__, stand_in.__spec__ = [], None
            sys.modules[name] = stand_in
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    return parser


_PARSER_SCRIPT = """
import json, sys
from megarl.rollout.engine_args import parser_arguments
from tests.rollout.sglang_source import sglang_parser

request = json.load(sys.stdin)
parser = sglang_parser()
arguments = {
    name: [argument.name, argument.flag, argument.takes_value, argument.many,
           getattr(argument.convert, "__name__", None), None if argument.choices is None else sorted(map(str, argument.choices))]
    for name, argument in parser_arguments(parser).items()
}
parsed = [{key: value for key, value in vars(parser.parse_args(argv)).items() if key in request["keys"]} for argv in request["argvs"]]
print(json.dumps({"arguments": arguments, "parsed": parsed}, default=str))
"""


def run_sglang_parser(argvs: list[list[str]], keys: list[str]) -> dict:
    """In a subprocess: SGLang's parser's arguments, as ``{name: [dest, flag, takes_value, many,
    converter name, sorted choices]}`` (:func:`megarl.rollout.engine_args.parser_arguments`), and
    the ``keys`` of each of ``argvs`` parsed by it (``{"arguments", "parsed"}``)."""
    import json
    import subprocess
    import sys

    from tests.distributed import REPO

    request = json.dumps({"argvs": argvs, "keys": keys})
    done = subprocess.run([sys.executable, "-c", _PARSER_SCRIPT], input=request, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # SGLang may print before it
