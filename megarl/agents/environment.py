"""Environments: what a multi-turn episode talks to, written by users.

An environment is a class with ``reset(row)`` and ``step(model_turn)``. The trainer creates one
instance per episode (``EnvironmentClass(**env_kwargs)``, in an environment worker process:
:mod:`megarl.agents.workers`), calls ``reset`` with the episode's dataset row, then ``step`` with
each turn the model generates, until ``step`` says the episode is done::

    import re

    from megarl.agents.environment import Environment, StepResult


    class GuessTheNumber(Environment):
        \"\"\"The model guesses the row's answer; each wrong guess is told "higher" or "lower".\"\"\"

        def __init__(self, max_guesses: int = 4):
            self.max_guesses = max_guesses

        def reset(self, row):
            self.secret, self.guesses = int(row["answer"]), 0
            return None  # start from the row's prompt, rendered as the dataset renders it

        def step(self, model_turn):
            self.guesses += 1
            numbers = re.findall(r"-?\\d+", model_turn)
            guess = int(numbers[-1]) if numbers else None
            if guess == self.secret or self.guesses == self.max_guesses:
                return StepResult(None, reward=float(guess == self.secret), done=True, info={"guesses": self.guesses})
            hint = "no number found" if guess is None else ("higher" if guess < self.secret else "lower")
            return StepResult([{"role": "user", "content": hint}], reward=None, done=False)

named in the config as ``agent.environment: path/to/guess.py:GuessTheNumber``, or by the name it
was registered under (:func:`register_environment`). The episode's reward is the one returned with
``done=True``; ``None`` leaves scoring to the reward section, which scores the final turn.

An environment runs isolated: whatever it raises or returns wrongly, or a step that hangs or kills
its process, ends that episode alone as failed (:class:`megarl.agents.workers.EpisodeFailure`).
After a worker process is replaced, the episodes it hosted are rebuilt by calling ``reset(row)``
and then ``step`` with each earlier model turn again, so an environment should be deterministic
given its row and the turns so far (seed any randomness from the row).
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import json
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from megarl.config.base import did_you_mean
from megarl.rewards.functions import import_user_file

Messages = list[dict[str, Any]]
"""Chat messages: ``[{"role": "user", "content": "..."}, ...]`` (other keys, such as a tool
message's ``name``, pass through to the chat template)."""

OBSERVATION_ROLES = ("tool", "user")
"""The roles a step's observation messages may have: only the model writes ``assistant`` turns."""


class EnvironmentLoadError(ValueError):
    """``agent.environment`` cannot be used: an unknown name, a missing file, a syntax or import
    error, no such class, a class without ``reset`` and ``step``, ``env_kwargs`` it does not take,
    or tools whose schemas are not JSON objects."""


class EnvironmentResultError(ValueError):
    """An environment's ``reset`` or ``step`` returned something that breaks the contract; the
    message names the class, the method and the problem."""


@dataclasses.dataclass(frozen=True, slots=True)
class StepResult:
    """What :meth:`Environment.step` returns after one model turn."""

    observation: Messages | str | None
    """What the model sees before its next turn: chat messages (role ``tool`` or ``user``) rendered
    with the chat template after the model's turn, or a string appended as it is (tokenised raw),
    or None once the episode is done. Not rendered when ``done`` is True: no model turn follows."""
    reward: float | None = None
    """The episode's reward, read when ``done`` is True; None leaves it to the reward section,
    which scores the final turn. Must be finite."""
    done: bool = False
    """Whether the episode ends with this turn."""
    info: dict[str, float] = dataclasses.field(default_factory=dict)
    """Numbers logged as metrics (``env/<name>``, the mean over episodes), e.g. ``tool_calls``."""


class Environment(abc.ABC):
    """The base class of user environments (see the module docstring for an example).

    Instances are created per episode as ``EnvironmentClass(**env_kwargs)`` in a worker process, so
    an instance holds one episode's state and the constructor takes only the configured keyword
    arguments.
    """

    tools: ClassVar[Sequence[Any]] = ()
    """Tools the model may call (:class:`megarl.agents.tools.Tool`, or any object whose
    ``schema()`` returns a JSON-schema dict): their schemas are rendered into the prompt through
    the chat template's ``tools`` argument. ``step`` receives the model's turn as text, its tool
    calls included."""

    @abc.abstractmethod
    def reset(self, row: dict[str, Any]) -> Messages | None:
        """Start an episode for one dataset row.

        Args:
            row: the row's fields as the dataset gives them: ``prompt``, ``answer`` and any others.

        Returns:
            The first observation: chat messages that replace the row's prompt, or None to start
            from the row's prompt as the dataset renders it.
        """

    @abc.abstractmethod
    def step(self, model_turn: str) -> StepResult:
        """Answer one model turn.

        Args:
            model_turn: the turn the model generated, decoded with special tokens skipped.

        Returns:
            The observation for the next turn, the episode's reward when done, whether it is done,
            and metrics (:class:`StepResult`).
        """


ENVIRONMENTS: dict[str, type] = {}
"""Registered environments by name (:func:`register_environment`): ``agent.environment: NAME``."""


def register_environment(name: str) -> Callable[[type], type]:
    """Class decorator: register an environment as ``agent.environment: name``.

    The worker processes find it by importing the module that defines it, so register classes at
    the top level of an importable module.

    Raises:
        ValueError: ``name`` is taken by another class.
        EnvironmentLoadError: the class lacks ``reset`` or ``step``.
    """

    def register(environment_class: type) -> type:
        where = f"register_environment({name!r})"
        check_environment_class(environment_class, where)
        taken = ENVIRONMENTS.get(name)
        # The same class registering again (its module imported twice) is not a clash.
        if taken is not None and _qualified_name(taken) != _qualified_name(environment_class):
            raise ValueError(f"{where}: the name is taken by {_qualified_name(taken)}; choose another name for {_qualified_name(environment_class)}")
        ENVIRONMENTS[name] = environment_class
        return environment_class

    return register


def _qualified_name(environment_class: type) -> str:
    return f"{environment_class.__module__}.{environment_class.__qualname__}"


def load_environment_class(spec: str) -> type:
    """``agent.environment`` -> the environment class: a registered name, or
    ``path/to/file.py:ClassName`` (the file is imported).

    Raises:
        EnvironmentLoadError: naming the setting, the file (and line of a syntax error), the class
            and what to do.
    """
    if spec in ENVIRONMENTS:
        return ENVIRONMENTS[spec]
    where = f"agent.environment = {spec!r}"
    path_text, separator, name = spec.rpartition(":")
    if not separator or not path_text or not name:
        registered = f"registered: {', '.join(sorted(ENVIRONMENTS))}" if ENVIRONMENTS else "none is registered"
        raise EnvironmentLoadError(
            f"{where} is neither a registered environment ({registered}){did_you_mean(spec, list(ENVIRONMENTS))} "
            f"nor path/to/file.py:ClassName"
        )
    path = Path(path_text)
    module = import_user_file(path, f"megarl_user_environment_{path.stem}", where, EnvironmentLoadError)
    environment_class = getattr(module, name, None)
    if environment_class is None:
        defined = sorted(key for key, value in vars(module).items() if isinstance(value, type) and value.__module__ == module.__name__)
        raise EnvironmentLoadError(f"{where}: {path} has no class named {name!r} (it defines {defined or 'none'})")
    if not isinstance(environment_class, type):
        raise EnvironmentLoadError(f"{where}: {path}: {name!r} is a {type(environment_class).__name__}, not a class")
    check_environment_class(environment_class, f"{where}: {path}")
    return environment_class


def check_environment_class(environment_class: type, where: str) -> None:
    """Refuse a class that cannot serve as an environment: one without ``reset`` and ``step``
    methods, or a subclass of :class:`Environment` that leaves either abstract.

    Raises:
        EnvironmentLoadError: starting with ``where``, naming what is missing and the fix.
    """
    missing = [name for name in ("reset", "step") if not callable(getattr(environment_class, name, None))]
    missing += sorted(getattr(environment_class, "__abstractmethods__", ()))
    if missing:
        raise EnvironmentLoadError(
            f"{where}: class {environment_class.__name__} does not define {' and '.join(dict.fromkeys(missing))}: an environment "
            f"defines reset(self, row) and step(self, model_turn) (subclass megarl.agents.environment.Environment)"
        )


def check_env_kwargs(environment_class: type, env_kwargs: dict[str, Any], where: str) -> None:
    """Refuse ``env_kwargs`` that ``environment_class(**env_kwargs)`` cannot take, before any
    episode would fail on them.

    Raises:
        EnvironmentLoadError: starting with ``where``, naming the class's signature and the problem.
    """
    try:
        signature = inspect.signature(environment_class)
    except (TypeError, ValueError):
        return  # a class whose signature cannot be read (an extension type): its calls will tell
    try:
        signature.bind(**env_kwargs)
    except TypeError as error:
        raise EnvironmentLoadError(
            f"{where}: {environment_class.__name__}{signature} cannot be created with env_kwargs {env_kwargs}: {error}"
        ) from None


def tool_schemas(environment_class: type, where: str) -> list[dict[str, Any]]:
    """The JSON schemas of ``environment_class.tools`` (each tool's ``schema()``), in order.

    Raises:
        EnvironmentLoadError: starting with ``where``: ``tools`` is not a sequence, a tool has no
            ``schema()``, it raised, or it returned something other than a JSON object.
    """
    tools = getattr(environment_class, "tools", ())
    owner = f"{environment_class.__name__}.tools"
    if isinstance(tools, (str, bytes, dict)) or not isinstance(tools, Sequence):
        raise EnvironmentLoadError(f"{where}: {owner} must be a list of tools; got a {type(tools).__name__}")
    schemas = []
    for index, tool in enumerate(tools):
        if not callable(getattr(tool, "schema", None)):
            raise EnvironmentLoadError(f"{where}: {owner}[{index}] is a {type(tool).__name__} without a schema() method: declare tools as megarl.agents.tools.Tool")
        try:
            schema = tool.schema()
        except Exception as error:  # noqa: BLE001 - user code: reported as a load problem
            raise EnvironmentLoadError(f"{where}: {owner}[{index}].schema() raised {type(error).__name__}: {error}") from None
        if not isinstance(schema, dict) or not _is_json(schema):
            raise EnvironmentLoadError(f"{where}: {owner}[{index}].schema() must return a JSON object (a dict of JSON values); got {schema!r:.200}")
        schemas.append(schema)
    return schemas


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def checked_first_observation(environment_name: str, value: Any) -> Messages | None:
    """What ``reset`` returned, checked: None or chat messages (copied as plain dicts).

    Raises:
        EnvironmentResultError: naming ``environment_name.reset`` and the problem.
    """
    if value is None:
        return None
    return _checked_messages(value, f"{environment_name}.reset", roles=None)


def checked_step_result(environment_name: str, value: Any) -> StepResult:
    """What ``step`` returned, checked and made plain: a :class:`StepResult` whose reward is a
    finite float or None, ``done`` a bool, ``info`` finite floats by str keys, and observation
    chat messages (role ``tool`` or ``user``), a string, or None once done.

    Raises:
        EnvironmentResultError: naming ``environment_name.step`` and the problem.
    """
    where = f"{environment_name}.step"
    if not isinstance(value, StepResult):
        raise EnvironmentResultError(
            f"{where} returned a {type(value).__name__}; it must return "
            f"StepResult(observation, reward, done, info) (megarl.agents.environment.StepResult)"
        )
    done = value.done.item() if hasattr(value.done, "item") else value.done  # a numpy or torch bool
    if not isinstance(done, bool):
        raise EnvironmentResultError(f"{where} returned done = {value.done!r}: it must be True or False")
    if isinstance(value.reward, bool):
        raise EnvironmentResultError(f"{where} returned reward = {value.reward}: a reward is a number (1.0, not True)")
    reward = None if value.reward is None else _finite(value.reward, f"{where} returned reward")
    observation = value.observation
    if isinstance(observation, (list, tuple)):
        observation = _checked_messages(observation, where, roles=OBSERVATION_ROLES)
    elif observation is None:
        if not done:
            raise EnvironmentResultError(f"{where} returned observation None with done=False: return the next observation, or done=True")
    elif isinstance(observation, str):
        observation = str(observation)  # a plain str, were it a subclass
    else:
        raise EnvironmentResultError(
            f"{where} returned an observation of type {type(observation).__name__}: it must be a list of chat "
            f"messages, a string, or None when done"
        )
    if not isinstance(value.info, dict):
        raise EnvironmentResultError(f"{where} returned info of type {type(value.info).__name__}: it must be a dict of numbers")
    info = {}
    for key, number in value.info.items():
        if not isinstance(key, str):
            raise EnvironmentResultError(f"{where} returned an info key {key!r}: keys must be strings (metric names)")
        info[key] = _finite(number, f"{where} returned info[{key!r}]")
    return StepResult(observation=observation, reward=reward, done=done, info=info)


def _finite(value: Any, what: str) -> float:
    """``value`` as a float when it is a finite number (a bool counts as 0 or 1)."""
    if hasattr(value, "item") and not isinstance(value, numbers.Real):
        value = value.item()  # a one-element tensor
    if not isinstance(value, numbers.Real):
        raise EnvironmentResultError(f"{what} = {value!r:.100}: it must be a number")
    if not math.isfinite(value):
        raise EnvironmentResultError(f"{what} = {value}: it must be a finite number")
    return float(value)


def _checked_messages(value: Any, where: str, roles: Sequence[str] | None) -> Messages:
    """``value`` as a list of chat messages with str ``role`` (one of ``roles`` unless None) and
    str ``content``, each a plain JSON object."""
    if not isinstance(value, (list, tuple)):
        raise EnvironmentResultError(f"{where} returned a {type(value).__name__}: it must return a list of chat messages or None")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise EnvironmentResultError(f"{where} returned message {index} as a {type(message).__name__}: a message is a dict with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise EnvironmentResultError(
                f"{where} returned message {index} with role {role!r:.50} and content of type {type(content).__name__}: both must be strings"
            )
        if roles is not None and role not in roles:
            raise EnvironmentResultError(f"{where} returned message {index} with role {role!r}: an observation's roles are {' or '.join(roles)}")
        try:
            # Through JSON and back: plain dicts and strings, which unpickle in any process.
            messages.append(json.loads(json.dumps(message, allow_nan=False)))
        except (TypeError, ValueError):
            raise EnvironmentResultError(f"{where} returned message {index}, which is not JSON-serialisable: {message!r:.200}") from None
    return messages
