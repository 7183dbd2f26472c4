"""The environment interface: loading a class by path or registered name (each mistake refused with
one clear message), tool schemas, and the checks of what ``reset`` and ``step`` return."""

from __future__ import annotations

import math

import pytest

from megarl.agents.environment import (
    ENVIRONMENTS,
    Environment,
    EnvironmentLoadError,
    EnvironmentResultError,
    StepResult,
    check_env_kwargs,
    checked_first_observation,
    checked_step_result,
    load_environment_class,
    register_environment,
    tool_schemas,
)

pytestmark = pytest.mark.cpu

GUESS = '''
from megarl.agents.environment import Environment, StepResult


class Guess(Environment):
    def __init__(self, tries: int = 2):
        self.tries = tries

    def reset(self, row):
        self.secret = row["answer"]
        return None

    def step(self, model_turn):
        self.tries -= 1
        done = model_turn == self.secret or self.tries == 0
        return StepResult(None if done else "again", reward=float(model_turn == self.secret) if done else None, done=done)


class Duck:
    """Not a subclass: having reset and step is enough."""

    def reset(self, row):
        return None

    def step(self, model_turn):
        return StepResult(None, done=True)


class HalfDone(Environment):
    def reset(self, row):
        return None


class NoStep:
    def reset(self, row):
        return None


not_a_class = 3
'''


@register_environment("test-environment-echo")
class Echo(Environment):
    """Says back what the model said, once."""

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, model_turn):
        return StepResult([{"role": "tool", "content": model_turn}], done=False)


class Tool:
    def __init__(self, schema):
        self._schema = schema

    def schema(self):
        return self._schema


@pytest.fixture
def guess_file(tmp_path):
    path = tmp_path / "guess.py"
    path.write_text(GUESS)
    return path


def test_a_class_loads_by_path_and_plays_an_episode(guess_file):
    environment_class = load_environment_class(f"{guess_file}:Guess")
    environment = environment_class(tries=3)
    assert environment.reset({"prompt": "guess", "answer": "7"}) is None
    assert environment.step("3") == StepResult("again", None, False, {})
    assert environment.step("7") == StepResult(None, 1.0, True, {})
    assert load_environment_class(f"{guess_file}:Duck").__name__ == "Duck"


def test_a_registered_name_loads_and_a_taken_name_is_refused():
    assert load_environment_class("test-environment-echo") is Echo
    with pytest.raises(ValueError, match=r"the name is taken by .*Echo; choose another name for .*Other"):

        @register_environment("test-environment-echo")
        class Other(Echo):
            pass

    assert ENVIRONMENTS["test-environment-echo"] is Echo


def test_each_load_mistake_gives_one_clear_message(guess_file, tmp_path):
    def refused(spec):
        with pytest.raises(EnvironmentLoadError) as error:
            load_environment_class(spec)
        message = str(error.value)
        assert message.startswith(f"agent.environment = {spec!r}") and "\n" not in message
        return message

    assert refused(f"{tmp_path}/missing.py:Guess").endswith("missing.py does not exist")
    assert "guess.py has no class named 'Gues' (it defines ['Duck', 'Guess', 'HalfDone', 'NoStep'])" in refused(f"{guess_file}:Gues")
    assert "'not_a_class' is a int, not a class" in refused(f"{guess_file}:not_a_class")
    assert "class NoStep does not define step: an environment defines reset(self, row) and step(self, model_turn)" in refused(f"{guess_file}:NoStep")
    assert "class HalfDone does not define step" in refused(f"{guess_file}:HalfDone")
    broken = tmp_path / "broken.py"
    broken.write_text("class Broken:\n    def reset(self, row)\n")
    assert f"{broken}:2: syntax error" in refused(f"{broken}:Broken")
    failing = tmp_path / "failing.py"
    failing.write_text("import no_such_package\n")
    assert "importing" in refused(f"{failing}:Env") and "No module named 'no_such_package'" in refused(f"{failing}:Env")
    unknown = refused("test-environment-ecko")
    assert "is neither a registered environment (registered: " in unknown and "did you mean `test-environment-echo`?" in unknown
    assert unknown.endswith("nor path/to/file.py:ClassName")


def test_env_kwargs_the_class_does_not_take_are_refused(guess_file):
    environment_class = load_environment_class(f"{guess_file}:Guess")
    check_env_kwargs(environment_class, {"tries": 4}, "here")
    with pytest.raises(EnvironmentLoadError, match=r"here: Guess\(tries: int = 2\) cannot be created with env_kwargs \{'retries': 4\}: .*'retries'"):
        check_env_kwargs(environment_class, {"retries": 4}, "here")


def test_tool_schemas_come_from_the_class_and_bad_ones_are_refused():
    lookup = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}

    class WithTools(Echo):
        tools = [Tool(lookup)]

    assert tool_schemas(Echo, "here") == []
    assert tool_schemas(WithTools, "here") == [lookup]
    for tools, problem in [
        (Tool(lookup), r"WithTools.tools must be a list of tools; got a Tool"),
        ([lookup], r"WithTools.tools\[0\] is a dict without a schema\(\) method"),
        ([Tool(lookup), Tool("lookup")], r"WithTools.tools\[1\].schema\(\) must return a JSON object"),
        ([Tool({"default": math.nan})], r"WithTools.tools\[0\].schema\(\) must return a JSON object"),
    ]:
        WithTools.tools = tools
        with pytest.raises(EnvironmentLoadError, match=rf"^here: {problem}"):
            tool_schemas(WithTools, "here")


def test_first_observations_are_checked():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "ann"}]
    assert checked_first_observation("Env", None) is None
    assert checked_first_observation("Env", tuple(messages)) == messages
    for value, problem in [
        ("hi", r"Env.reset returned a str: it must return a list of chat messages or None"),
        ([{"role": "user"}], r"Env.reset returned message 0 with role 'user' and content of type NoneType: both must be strings"),
        (["hi"], r"Env.reset returned message 0 as a str"),
        ([{"role": "user", "content": "hi", "extra": object()}], r"Env.reset returned message 0, which is not JSON-serialisable"),
    ]:
        with pytest.raises(EnvironmentResultError, match=f"^{problem}"):
            checked_first_observation("Env", value)


class Scalar:
    """A numpy- or torch-like scalar: ``item()`` gives the Python value."""

    def __init__(self, value):
        self.value = value

    def item(self):
        return self.value


def test_step_results_are_checked_and_made_plain():
    tool_message = [{"role": "tool", "content": "42"}]
    assert checked_step_result("Env", StepResult(tool_message, None, False, {"tool_calls": 1})) == StepResult(tool_message, None, False, {"tool_calls": 1.0})
    assert checked_step_result("Env", StepResult(None, Scalar(1), Scalar(True), {"ok": True})) == StepResult(None, 1.0, True, {"ok": 1.0})
    assert checked_step_result("Env", StepResult(" raw text", done=False)).observation == " raw text"
    for value, problem in [
        ((None, 1.0, True, {}), r"Env.step returned a tuple; it must return StepResult\(observation, reward, done, info\)"),
        (StepResult(None, math.nan, True), r"Env.step returned reward = nan: it must be a finite number"),
        (StepResult(None, "1", True), r"Env.step returned reward = '1': it must be a number"),
        (StepResult(None, True, True), r"Env.step returned reward = True: a reward is a number \(1.0, not True\)"),
        (StepResult(42, None, False), r"Env.step returned an observation of type int: it must be a list of chat messages, a string, or None when done"),
        (StepResult(None, None, False), r"Env.step returned observation None with done=False"),
        (StepResult([{"role": "assistant", "content": "x"}], None, False), r"Env.step returned message 0 with role 'assistant': an observation's roles are tool or user"),
        (StepResult("x", None, "no"), r"Env.step returned done = 'no': it must be True or False"),
        (StepResult("x", None, False, {"calls": math.inf}), r"Env.step returned info\['calls'\] = inf: it must be a finite number"),
        (StepResult("x", None, False, {1: 1.0}), r"Env.step returned an info key 1: keys must be strings"),
        (StepResult("x", None, False, [1.0]), r"Env.step returned info of type list"),
    ]:
        with pytest.raises(EnvironmentResultError, match=f"^{problem}"):
            checked_step_result("Env", value)
