"""Engine faults with real processes: killed and stalled engines, the restart budget, orphans."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megarl.config import resolve_model_path
from megarl.rollout import EngineGroup, EngineTimeout, RestartBudgetExhausted, SamplingParams
from megarl.rollout.engine import Engine, LaunchOptions
from megarl.weights.bucket import Bucket
from tests.distributed import REPO, wait_until
from tests.workers.engine_weights import read_weights

pytestmark = pytest.mark.multirank

MODEL = resolve_model_path("bundled:tiny-moe")
HEALTH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 5.0
STALL_TIMEOUT_S = 1.5
PROMPTS = [torch.randint(3, 52, (8,), generator=torch.Generator().manual_seed(index)).tolist() for index in range(16)]
SAMPLING = SamplingParams(max_new_tokens=48, n=8, seed=11)


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def launch(log_dir: Path, **options) -> EngineGroup:
    return EngineGroup.launch("hf", MODEL, hf_threads=1, log_dir=log_dir, startup_timeout_s=120, **options)


@pytest.fixture(scope="module")
def supervised(tmp_path_factory):
    """One engine under a fast health monitor; its processes and the client's threads must be gone after shutdown."""
    threads_before = set(threading.enumerate())
    group = launch(tmp_path_factory.mktemp("supervised"), health_check_interval_s=HEALTH_INTERVAL_S, health_timeout_s=HEALTH_TIMEOUT_S, request_timeout_s=120)
    started = []
    try:
        yield group, started
    finally:
        group.shutdown()
    started.extend(group.pids().values())
    assert all(gone(pid) for pid in started), "engine processes outlived EngineGroup.shutdown()"
    left = [thread.name for thread in set(threading.enumerate()) - threads_before if thread.name in ("megarl-engine-client", "megarl-engine-health")]
    assert not left, f"threads outlived EngineGroup.shutdown(): {left}"


@pytest.fixture(scope="module")
def current_weights():
    draw = torch.Generator().manual_seed(3)
    weights = {name: tensor + 0.05 * torch.randn(tensor.shape, generator=draw) for name, tensor in load_file(MODEL / "model.safetensors").items()}
    return [Bucket.from_named_tensors(sorted(weights.items()))]


def generate_in_background(group: EngineGroup, lead_s: float) -> tuple[threading.Thread, dict]:
    """Generate PROMPTS in a thread; return ``lead_s`` seconds after it started."""
    outcome: dict = {}

    def run():
        try:
            outcome["samples"] = group.generate(PROMPTS, SAMPLING)
        except Exception as error:  # reported by the test
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(lead_s)
    return thread, outcome


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stalled"])
def test_failed_engine_is_restarted_with_current_weights_and_the_batch_completes(supervised, current_weights, fault):
    group, started = supervised
    group.update_weights(current_weights, version=7)
    batch_began = time.monotonic()
    expected = group.generate(PROMPTS, SAMPLING)
    # The same batch again, the fault a quarter of its time in: mid-generation however fast it is.
    restarts = group.restarts
    thread, outcome = generate_in_background(group, lead_s=(time.monotonic() - batch_began) / 4)
    pid = group.pids()["hf-0"]
    started.append(pid)
    assert thread.is_alive(), "the batch finished before the fault; make it longer"
    os.kill(pid, fault)
    began = time.monotonic()
    thread.join(timeout=180)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["samples"] == expected and all(sample.weight_version == "7" for sample in outcome["samples"])
    assert group.restarts == restarts + 1 and group.pids()["hf-0"] != pid and gone(pid)
    assert time.monotonic() - began < 120


@pytest.mark.parametrize("transport", ["tensor", "nccl"])
def test_an_engine_killed_during_a_weight_update_is_restarted_with_the_new_weights(supervised, current_weights, transport):
    # nccl: the broadcast group (gloo on CPU) loses a member mid-update; it must be torn down, not
    # waited on, and rebuilt with the restarted engine.
    group, started = supervised
    group.weight_transport = transport
    group.restart_budget = group.restarts + 1
    draw = torch.Generator().manual_seed(4)
    new_weights = {name: tensor + 0.05 * torch.randn(tensor.shape, generator=draw) for name, tensor in current_weights[0].named_tensors()}
    named = sorted(new_weights.items())
    pid = group.pids()["hf-0"]
    started.append(pid)

    def buckets_with_a_fault():
        yield Bucket.from_named_tensors(named[:40])
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: gone(pid), timeout_s=10)
        yield Bucket.from_named_tensors(named[40:])

    restarts = group.restarts
    group.update_weights(buckets_with_a_fault(), version=8)
    assert group.restarts == restarts + 1 and group.pids()["hf-0"] != pid
    held = read_weights(group, new_weights)
    assert all(torch.equal(held[name], tensor) for name, tensor in named)
    assert group.generate(PROMPTS[:2], SAMPLING)[0].weight_version == "8"
    group.update_weights(current_weights, version=9)  # the group works again (a new broadcast group for nccl)
    assert group.generate(PROMPTS[:2], SAMPLING)[0].weight_version == "9"
    group.weight_transport = "tensor"


def test_stalled_engine_raises_a_typed_timeout_naming_it(supervised):
    group, _ = supervised
    url, pid = group.engines[0].url, group.pids()["hf-0"]
    with EngineGroup.connect([url], engine="hf", model_path=MODEL, request_timeout_s=STALL_TIMEOUT_S, health_check_interval_s=3600) as client:
        os.kill(pid, signal.SIGSTOP)
        began = time.monotonic()
        try:
            with pytest.raises(EngineTimeout, match=rf"rollout engine hf-0 \({url}\).*no answer within {STALL_TIMEOUT_S:g} s"):
                client.generate(PROMPTS, SAMPLING)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert time.monotonic() - began < STALL_TIMEOUT_S + 1


def test_a_failure_past_the_restart_budget_stops_the_run_naming_the_engine(supervised):
    group, started = supervised
    group.restart_budget = group.restarts
    pid = group.pids()["hf-0"]
    started.append(pid)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RestartBudgetExhausted, match=rf"rollout engine hf-0 .*pid {pid}.*rollout\.restart_budget={group.restarts}"):
        group.generate(PROMPTS, SAMPLING)
    with pytest.raises(RestartBudgetExhausted):
        group.update_weights([], version=8)


LAUNCHER_SCRIPT = """
import os, subprocess, sys, time
engine = subprocess.Popen(
    [sys.executable, "-m", "megarl.rollout.embedded.server", "--model", sys.argv[1], "--threads", "1", "--parent-pid", str(os.getpid())],
    start_new_session=True,
)
print(engine.pid, flush=True)
time.sleep(600)
"""


def test_an_engine_exits_when_its_launcher_is_killed(tmp_path):
    """What EngineGroup launches carries ``--parent-pid``: killing the launcher outright (no atexit,
    no finally) still ends the engine, even one that is still starting."""
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER_SCRIPT)
    launcher = subprocess.Popen([sys.executable, str(script), str(MODEL)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    engine_pid = None
    try:
        ready, _, _ = select.select([launcher.stdout], [], [], 60)
        assert ready, "the launcher did not start its engine"
        engine_pid = int(launcher.stdout.readline())
        launcher.kill()
        launcher.wait()
        assert wait_until(lambda: gone(engine_pid), timeout_s=120), "the engine outlived its launcher"
    finally:
        launcher.kill()
        if engine_pid is not None and not gone(engine_pid):
            os.killpg(engine_pid, signal.SIGKILL)


def test_launched_engines_watch_the_launching_process(tmp_path):
    options = LaunchOptions(engine="hf", model_path=str(MODEL), log_dir=tmp_path)
    command = Engine("hf-0", "hf", 1, launch=options).command(0, tmp_path / "ready")
    assert command[command.index("--parent-pid") + 1] == str(os.getpid())


def _remote_engine_serving(versions: list[str]):
    """A remote engine stand-in whose ``/get_model_info`` answers ``versions`` in turn (the last one from then on)."""
    import fastapi

    from megarl.rollout import protocol

    app, answers = fastapi.FastAPI(), iter(versions)
    last = {"version": versions[0]}

    def model_info():
        last["version"] = next(answers, last["version"])
        return {"weight_version": last["version"]}

    app.get(protocol.MODEL_INFO)(model_info)
    app.get(protocol.HEALTH_GENERATE)(lambda: None)
    return app


@pytest.mark.cpu
@pytest.mark.parametrize("comes_back", [True, False])
def test_a_remote_engine_is_waited_for_until_it_holds_the_current_weights(comes_back):
    import concurrent.futures

    from megarl.rollout.errors import EngineDead
    from megarl.rollout.http_client import EngineClient
    from megarl.rollout.supervision import EngineSupervisor
    from tests.rollout.fake_engines import serving

    versions = ["default", "2", "3"] if comes_back else ["2"]
    with serving(_remote_engine_serving(versions)) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
        client = EngineClient(1)
        engine = Engine("hf-n1-0", "hf", 1, url=url, remote=True)
        engine.client = client
        supervisor = EngineSupervisor([], pool=pool, reload=lambda engine: None, health_check_interval_s=60, health_timeout_s=5, restart_budget=0,
                                      version=lambda: "3", remote_wait_s=5 if comes_back else 0.5)
        try:
            cause = EngineDead(engine.label, "connection refused")
            if comes_back:
                supervisor.recover(engine, 0, cause)
                # Waited for, not restarted: no budget is spent (it is 0 here).
                assert (engine.incarnation, supervisor.restarts) == (1, 0)
            else:
                with pytest.raises(EngineDead, match="did not come back with the current weights within 0.5 s; its node's first rank restarts it"):
                    supervisor.recover(engine, 0, cause)
        finally:
            client.close()
