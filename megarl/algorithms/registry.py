"""Named registries of algorithm functions (advantage estimators, losses, KL estimators, ...)."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions registered under names; ``get`` of an unknown name lists the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._functions: dict[str, F] = {}

    def register(self, *names: str) -> Callable[[F], F]:
        """Decorator: register the function under each of ``names``."""

        def decorate(function: F) -> F:
            for name in names:
                if name in self._functions:
                    raise ValueError(f"{self.kind} {name!r} is already registered")
                self._functions[name] = function
            return function

        return decorate

    def get(self, name: str) -> F:
        if name not in self._functions:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {', '.join(sorted(self._functions))}")
        return self._functions[name]

    def names(self) -> list[str]:
        return sorted(self._functions)
