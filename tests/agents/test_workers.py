"""The environment pool: concurrent multi-turn episodes over worker processes; a step that raises,
hangs, exits or returns nonsense fails its episode alone (the right kind, counted), and the other
episodes of a replaced worker go on from where they were (rebuilt by replay); load failures are
raised once at start-up; nothing outlives the pool.

Episodes go to the worker with the fewest open episodes, the first on a tie, so with two workers
the episodes reset in the order e0, e1, e2, e3 live on workers 0, 1, 0, 1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megarl.agents.environment import Environment, EnvironmentLoadError, StepResult, register_environment
from megarl.agents.workers import KINDS, EnvironmentPool, EpisodeFailure

pytestmark = pytest.mark.cpu

COUNTER = '''
import os
import subprocess
import time
from pathlib import Path

from megarl.agents.environment import Environment, StepResult


class Counter(Environment):
    """Counts the model's turns up to ``limit``; some turns ask for trouble."""

    def __init__(self, limit: int = 3):
        self.limit = limit

    def reset(self, row):
        if Path(row.get("refuse_if_exists", "/no/such/file")).exists():
            raise RuntimeError("reset refused")
        self.name, self.turns = row["name"], 0
        return [{"role": "user", "content": f"count, {self.name}"}]

    def step(self, model_turn):
        if model_turn == "raise":
            raise ValueError("asked to raise")
        if model_turn == "hang":
            time.sleep(60)
        if model_turn == "exit":
            os._exit(3)
        if model_turn == "nan":
            return StepResult(None, reward=float("nan"), done=True)
        if model_turn == "number":
            return StepResult(42)
        if model_turn == "spawn":
            return StepResult("spawned", info={"pid": subprocess.Popen(["sleep", "60"]).pid})
        if model_turn == "slow":
            time.sleep(0.3)
        self.turns += 1
        done = self.turns == self.limit
        observation = None if done else [{"role": "tool", "content": f"{self.name} {self.turns}"}]
        return StepResult(observation, reward=float(self.turns) if done else None, done=done, info={"turns": self.turns})
'''

LOOKUP_SCHEMA = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}


class LookupTool:
    def schema(self):
        return LOOKUP_SCHEMA


@register_environment("test-workers-measure")
class Measure(Environment):
    """One turn: the reward is the turn's length."""

    tools = (LookupTool(),)

    def reset(self, row):
        return None

    def step(self, model_turn):
        return StepResult(None, reward=float(len(model_turn)), done=True)


@pytest.fixture
def counter(tmp_path):
    path = tmp_path / "counter.py"
    path.write_text(COUNTER)
    return f"{path}:Counter"


def row(name, **fields):
    return {"prompt": "count", "answer": "3", "name": name, **fields}


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a process in the middle of exiting
    counts as running: its ``stat`` may read ESRCH before it becomes a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    except ProcessLookupError:
        return True
    return state not in ("Z", "X")


def wait_until_gone(pids, timeout_s=3.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [pid for pid in pids if running(pid)]


async def open_episodes(pool, count, turns=1):
    """Reset e0 .. e<count-1> and step each ``turns`` times."""
    await asyncio.gather(*(pool.reset(f"e{index}", row(f"n{index}")) for index in range(count)))
    for _ in range(turns):
        await asyncio.gather(*(pool.step(f"e{index}", "go") for index in range(count)))


def failure(outcome, kind, *phrases):
    assert isinstance(outcome, EpisodeFailure) and outcome.kind == kind, outcome
    assert all(phrase in outcome.message for phrase in phrases), outcome.message
    return outcome


def test_many_episodes_run_concurrently_to_the_end(counter):
    async def episode(pool, name):
        observations = [await pool.reset(name, row(name))]
        while True:
            result = await pool.step(name, "go")
            observations.append(result.observation)
            if result.done:
                return observations, result

    with EnvironmentPool(counter, env_kwargs={"limit": 3}, num_workers=2, step_timeout_s=5.0) as pool:
        assert pool.tool_schemas() == [] and pool.environment_name == "Counter"

        async def all_episodes():
            return await asyncio.wait_for(asyncio.gather(*(episode(pool, f"x{index}") for index in range(48))), 20)

        outcomes = asyncio.run(all_episodes())
        for index, (observations, last) in enumerate(outcomes):
            name = f"x{index}"
            assert observations == [
                [{"role": "user", "content": f"count, {name}"}],
                [{"role": "tool", "content": f"{name} 1"}],
                [{"role": "tool", "content": f"{name} 2"}],
                None,
            ]
            assert (last.reward, last.done, last.info) == (3.0, True, {"turns": 3.0})
        assert pool.open_episodes == 0 and pool.counts() == dict.fromkeys(KINDS, 0) and pool.replaced == 0


def test_a_registered_environment_runs_in_the_workers_with_its_tools():
    with EnvironmentPool("test-workers-measure", num_workers=1) as pool:
        assert pool.tool_schemas() == [LOOKUP_SCHEMA]

        async def one_episode():
            assert await pool.reset("m", {"prompt": "say"}) is None
            return await pool.step("m", "four")

        assert asyncio.run(one_episode()) == StepResult(None, 4.0, True, {})


@pytest.mark.parametrize(
    ("turn", "kind", "phrases", "replaced"),
    [
        ("raise", "error", ["Counter.step raised ValueError: asked to raise", "counter.py"], 0),
        ("hang", "timeout", ["Counter.step did not answer within 0.5 s; the worker was killed and replaced"], 1),
        ("exit", "died", ["Counter.step ended with its worker process, which died (exit code 3)"], 1),
        ("nan", "error", ["Counter.step returned reward = nan: it must be a finite number"], 0),
        ("number", "error", ["Counter.step returned an observation of type int"], 0),
    ],
)
def test_a_failing_step_fails_its_episode_alone(counter, turn, kind, phrases, replaced):
    with EnvironmentPool(counter, env_kwargs={"limit": 10}, num_workers=2, step_timeout_s=0.5) as pool:

        async def scenario():
            await open_episodes(pool, 4)
            # e2 shares e0's worker and waits behind the failing call; e1 and e3 run on the other.
            outcomes = await asyncio.gather(*(pool.step(name, turn if name == "e0" else "go") for name in ("e0", "e1", "e2", "e3")), return_exceptions=True)
            return outcomes, await pool.step("e2", "go")

        started = time.monotonic()
        (failed, *others), next_step = asyncio.run(scenario())
        failure(failed, kind, *phrases)
        assert [result.info["turns"] for result in others] == [2.0, 2.0, 2.0]
        assert next_step.info["turns"] == 3.0 and next_step.observation == [{"role": "tool", "content": "n2 3"}]
        assert pool.counts() == {**dict.fromkeys(KINDS, 0), kind: 1} and pool.counts() == dict.fromkeys(KINDS, 0)
        assert (pool.replaced, pool.alive, pool.open_episodes) == (replaced, 2, 3)
        with pytest.raises(KeyError, match="episode 'e0' is not open"):
            asyncio.run(pool.step("e0", "go"))
        assert time.monotonic() - started < 5


def test_a_worker_killed_between_calls_is_replaced_and_no_episode_fails(counter):
    with EnvironmentPool(counter, env_kwargs={"limit": 10}, num_workers=2, step_timeout_s=2.0) as pool:
        asyncio.run(open_episodes(pool, 4, turns=2))
        killed = pool.pids[0]
        os.kill(killed, signal.SIGKILL)
        # Until every thread of the worker has exited it cannot be reaped, though /proc may show
        # it as a zombie already: wait for that, without reaping it (WNOWAIT).
        deadline = time.monotonic() + 3
        while os.waitid(os.P_PID, killed, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None and time.monotonic() < deadline:
            time.sleep(0.01)

        async def next_turns():
            return await asyncio.gather(*(pool.step(f"e{index}", "go") for index in range(4)))

        results = asyncio.run(next_turns())
        assert [result.observation for result in results] == [[{"role": "tool", "content": f"n{index} 3"}] for index in range(4)]
        assert pool.replaced == 1 and pool.counts() == dict.fromkeys(KINDS, 0) and killed not in pool.pids


def test_a_replay_that_fails_fails_that_episode_with_kind_replay(counter, tmp_path):
    refuse = tmp_path / "refuse"
    with EnvironmentPool(counter, num_workers=1, step_timeout_s=2.0) as pool:

        async def scenario():
            await pool.reset("kept", row("kept"))
            await pool.reset("refused", row("refused", refuse_if_exists=str(refuse)))
            await asyncio.gather(pool.step("kept", "go"), pool.step("refused", "go"))
            refuse.touch()  # from now on, resetting "refused" raises: its replay will fail
            await pool.reset("doomed", row("doomed"))
            died = await asyncio.gather(pool.step("doomed", "exit"), return_exceptions=True)
            return died[0], await asyncio.gather(pool.step("refused", "go"), pool.step("kept", "go"), return_exceptions=True)

        died, (refused, kept) = asyncio.run(scenario())
        failure(died, "died", "exit code 3")
        failure(refused, "replay", "rebuilding it on a replaced worker failed: Counter.reset raised RuntimeError: reset refused")
        assert kept.info["turns"] == 2.0
        assert pool.counts() == {"error": 0, "timeout": 0, "died": 1, "replay": 1}


def test_a_cancelled_call_closes_its_episode_and_the_worker_serves_on(counter):
    with EnvironmentPool(counter, num_workers=1, step_timeout_s=2.0) as pool:

        async def scenario():
            await open_episodes(pool, 2)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.step("e0", "slow"), 0.05)
            # The worker still owes the slow step's answer: it is read and dropped first.
            return await pool.step("e1", "go")

        assert asyncio.run(scenario()) == StepResult([{"role": "tool", "content": "n1 2"}], None, False, {"turns": 2.0})
        assert pool.open_episodes == 1 and pool.replaced == 0 and pool.counts() == dict.fromkeys(KINDS, 0)
        with pytest.raises(KeyError):
            asyncio.run(pool.step("e0", "go"))


def test_load_failures_are_raised_once_at_start_up(counter, tmp_path):
    path = counter.rpartition(":")[0]
    with pytest.raises(EnvironmentLoadError) as error:
        EnvironmentPool(f"{path}:Countr", num_workers=2)
    assert str(error.value) == f"agent.environment = '{path}:Countr': {path} has no class named 'Countr' (it defines ['Counter'])"
    with pytest.raises(EnvironmentLoadError, match=r"Counter\(limit: int = 3\) cannot be created with env_kwargs \{'limits': 2\}"):
        EnvironmentPool(counter, env_kwargs={"limits": 2})
    exits = tmp_path / "exits.py"
    exits.write_text("import os\nos._exit(7)\n")
    with pytest.raises(EnvironmentLoadError, match=r"an environment worker exited while loading it \(exit code 7\)"):
        EnvironmentPool(f"{exits}:Env")
    with pytest.raises(EnvironmentLoadError, match="env_kwargs .* cannot be sent to the worker processes"):
        EnvironmentPool(counter, env_kwargs={"limit": lambda: 3})


def test_close_leaves_no_process_alive(counter):
    pool = EnvironmentPool(counter, num_workers=2, step_timeout_s=0.5)

    async def scenario():
        await open_episodes(pool, 2)
        spawned = await pool.step("e1", "spawn")  # a process the environment started
        first_workers = pool.pids
        await asyncio.gather(pool.step("e0", "hang"), return_exceptions=True)
        return int(spawned.info["pid"]), first_workers

    grandchild, first_workers = asyncio.run(scenario())
    assert running(grandchild) and pool.replaced == 1
    pool.close()
    assert pool.alive == 0
    assert wait_until_gone([*first_workers, *pool.pids, grandchild]) == []
    with pytest.raises(RuntimeError, match="is closed"):
        asyncio.run(pool.step("e1", "go"))
    pool.close()


def test_workers_die_with_the_pools_process_even_when_it_is_killed(counter, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(
        "import asyncio, os, signal, sys\n"
        "from megarl.agents.workers import EnvironmentPool\n\n"
        "async def main(pool):\n"
        "    await pool.reset('e', {'name': 'e'})\n"
        "    asyncio.ensure_future(pool.step('e', 'hang'))\n"
        "    await asyncio.sleep(0.2)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n\n"
        "if __name__ == '__main__':\n"
        "    pool = EnvironmentPool(sys.argv[1], num_workers=2)\n"
        "    print(*pool.pids, flush=True)\n"
        "    asyncio.run(main(pool))\n"
    )
    finished = subprocess.run([sys.executable, str(script), counter], capture_output=True, text=True, timeout=30)
    assert finished.returncode == -9, finished.stderr
    pids = [int(pid) for pid in finished.stdout.split()]
    assert len(pids) == 2 and wait_until_gone(pids) == []
