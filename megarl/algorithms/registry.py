"""Named registries of algorithm functions (advantage estimators, policy losses, KL estimators).

A registry maps configuration names (``algorithm.advantage_estimator: grpo``) to pure functions.
:meth:`Registry.call` lets one call site serve every registered function although they take
different inputs: the caller passes everything it has, each function receives the arguments it
names, and a keyword no registered function takes (a typo) is an error rather than silently dropped.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any, Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions registered under names; looking up an unknown name lists the valid ones.

    Args:
        kind: what the registry holds, for error messages ("advantage estimator").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._functions: dict[str, F] = {}

    def register(self, *names: str) -> Callable[[F], F]:
        """Decorator: register the function under each of ``names`` (a name and its aliases).

        The function declares its inputs by name: ``*args`` / ``**kwargs`` would hide them from
        :meth:`call` and are refused.
        """

        def decorate(function: F) -> F:
            variadic = [p.name for p in _parameters(function).values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            if variadic:
                raise TypeError(f"{self.kind} {function.__name__} must name its inputs, not take {', '.join(variadic)}")
            for name in names:
                if name in self._functions:
                    raise ValueError(f"{self.kind} {name!r} is already registered")
                self._functions[name] = function
            return function

        return decorate

    @contextlib.contextmanager
    def temporarily(self, name: str, function: F) -> Iterator[F]:
        """Register ``function`` as ``name`` inside a ``with`` block only, as :meth:`register` does
        (tests add an example without leaving it behind for the tests after them)."""
        self.register(name)(function)
        try:
            yield function
        finally:
            del self._functions[name]

    def get(self, name: str) -> F:
        """The function registered as ``name``; ``KeyError`` listing the valid names otherwise."""
        if name not in self._functions:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._functions[name]

    def names(self) -> list[str]:
        """Every registered name (aliases included), sorted."""
        return sorted(self._functions)

    def takes(self, name: str, input_name: str) -> bool:
        """Whether the function registered as ``name`` declares the input ``input_name`` (so that
        a caller computes an expensive input only for the functions that read it)."""
        return input_name in _parameters(self.get(name))

    def call(self, name: str, **inputs: Any) -> Any:
        """Call the function registered as ``name`` with the keyword ``inputs`` it declares.

        Inputs the function does not declare are left out (the trainer passes one superset to every
        estimator); an input that no registered function declares raises ``TypeError``, and so does
        a required parameter that is missing or ``None``.
        """
        function = self.get(name)
        known = {parameter for registered in self._functions.values() for parameter in _parameters(registered)}
        unknown = sorted(set(inputs) - known)
        if unknown:
            raise TypeError(f"no {self.kind} takes {', '.join(unknown)}; known inputs: {', '.join(sorted(known))}")
        parameters = _parameters(function)
        arguments = {key: value for key, value in inputs.items() if key in parameters}
        missing = [
            key
            for key, parameter in parameters.items()
            if parameter.default is inspect.Parameter.empty and arguments.get(key) is None
        ]
        if missing:
            raise TypeError(f"{self.kind} {name!r} needs {', '.join(missing)}")
        return function(**arguments)


def _parameters(function: Callable) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(function).parameters)
