"""The real sglang-router (0.3.2, from the lock) as megarl runs it, in front of two hf engines
served in this process: registration, generation through it, removal, the R3 check, and a router
that dies with its launcher."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from megarl.config import resolve_model_path
from megarl.rollout import protocol
from megarl.rollout.embedded.hf_engine import HFEngine
from megarl.rollout.embedded.server import make_app
from megarl.rollout.engine import free_port
from megarl.rollout.errors import EngineMisconfigured, EngineStartError
from megarl.rollout.router import ROUTING_KEY_HEADER, Router
from tests.distributed import REPO, wait_until
from tests.rollout.fake_engines import serving

pytestmark = pytest.mark.cpu

MOE = resolve_model_path("bundled:tiny-moe")
SAMPLING = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "stop_token_ids": []}


class CountingEngine(HFEngine):
    """An hf engine that counts the ``/flush_cache`` calls it served."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flushes = 0

    def flush_cache(self, body: dict) -> str:
        self.flushes += 1
        return super().flush_cache(body)


@pytest.fixture(scope="module")
def engines():
    """URL -> engine of two hf engines on tiny-moe that return routed experts."""
    served = {}
    with contextlib.ExitStack() as stack:
        for _ in range(2):
            engine = CountingEngine(str(MOE), "float32", seed=0, return_routed_experts=True)
            engine.scheduler.start()
            served[stack.enter_context(serving(make_app(engine)))] = engine
        yield served


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    launched = Router.launch(log_dir=tmp_path_factory.mktemp("router"), startup_timeout_s=60)
    try:
        yield launched
    finally:
        launched.stop()
    assert not group_members(launched.process.pid), "router processes outlived Router.stop()"


@pytest.fixture
def registered(router, engines):
    """The router with both engines registered (a test may have removed one)."""
    for url in engines:
        router.add_worker(url, timeout_s=10)
    return router


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes of process group ``group``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def post(url: str, path: str, body: dict | None = None, headers: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="POST", headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_the_router_starts_without_workers_on_megarls_flags(router):
    with urllib.request.urlopen(router.url + protocol.HEALTH, timeout=5) as response:
        assert response.status == 200
    command = Path(f"/proc/{router.process.pid}/cmdline").read_text().split("\0")
    assert command[command.index("--parent-pid") + 1] == str(os.getpid())
    assert command[command.index("--prometheus-port") + 1] != "29000"
    assert command[command.index("--shutdown-grace-period-secs") + 1] == "1"
    assert "--disable-circuit-breaker" in command and "--worker-urls" not in command


def test_both_engines_register_healthy(registered, engines):
    assert registered.workers() == {url: True for url in engines}


def test_a_sample_through_the_router_equals_the_same_request_to_an_engine(registered, engines):
    direct_url = next(iter(engines))
    for seed in (3, 4, 5):
        body = protocol.routed_generate_body([5, 6, 7, 8], {**SAMPLING, "sampling_seed": seed}, rid=f"step0_0_{seed}")
        [routed] = protocol.parse_generate_response(post(registered.url, protocol.GENERATE, body), 1)
        [direct] = protocol.parse_generate_response(post(direct_url, protocol.GENERATE, body), 1)
        assert (routed.output_ids, routed.logprobs, routed.finish_reason) == (direct.output_ids, direct.logprobs, direct.finish_reason)
        assert routed.output_ids


def test_the_routing_key_header_is_accepted(registered):
    body = protocol.routed_generate_body([9, 10], {**SAMPLING, "sampling_seed": 1})
    answers = [post(registered.url, protocol.GENERATE, body, headers={ROUTING_KEY_HEADER: "1-0"}) for _ in range(2)]
    assert answers[0][0]["output_ids"] == answers[1][0]["output_ids"]


def test_flush_cache_through_the_router_reaches_every_engine(registered, engines):
    before = {url: engine.flushes for url, engine in engines.items()}
    answer = post(registered.url, protocol.FLUSH_CACHE)
    assert answer["workers_flushed"] == 2
    assert {url: engine.flushes - before[url] for url, engine in engines.items()} == {url: 1 for url in engines}


def test_a_removed_worker_is_gone_and_removing_it_again_is_no_error(registered, engines):
    """Through a handle of the kind other nodes' first ranks hold (Router.connect), whose stop()
    leaves the router running."""
    removed, kept = list(engines)
    handle = Router.connect(registered.url + "/")
    handle.remove_worker(removed)
    assert registered.workers() == {kept: True}
    handle.remove_worker(removed)
    handle.stop()
    assert handle.workers() == {kept: True}


def test_a_worker_that_never_answers_fails_its_registration_naming_its_url(router):
    dead = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    with pytest.raises(EngineStartError, match=rf"(?s)worker {dead} was not listed healthy within 0.5 s.*last lines of .*router.log"):
        router.add_worker(dead, timeout_s=0.5)


def test_routed_experts_do_not_pass_sglang_router_0_3_2(registered, engines):
    """The engines return routed experts when asked directly, but sglang-router 0.3.2 re-serialises
    /generate into its own request type, which has no return_routed_experts field: the answer
    through it carries none, so routing replay R3 cannot run behind it (the preflight refuses it)."""
    body = protocol.routed_generate_body([5, 6], {"max_new_tokens": 1, "temperature": 0.0}, return_routed_experts=True)
    assert "routed_experts" in post(next(iter(engines)), protocol.GENERATE, body)[0]["meta_info"]
    assert "routed_experts" not in post(registered.url, protocol.GENERATE, body)[0]["meta_info"]


LAUNCHER_SCRIPT = """
import os, subprocess, sys, time, urllib.request
port, metrics_port = sys.argv[1:]
router = subprocess.Popen(
    [sys.executable, "-m", "megarl.rollout.router_entry", "--parent-pid", str(os.getpid()),
     "--host", "127.0.0.1", "--port", port, "--prometheus-port", metrics_port],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
)
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
        break
    except OSError:
        time.sleep(0.05)
print(router.pid, flush=True)
time.sleep(600)
"""


def test_the_router_exits_when_its_launcher_is_killed(tmp_path):
    """What Router.launch starts carries --parent-pid (test above): killing the launcher outright (no
    atexit, no finally) ends the router's whole process group, though the router's Rust server
    holds the GIL (so the watchdog runs in a process of its own, router_entry)."""
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER_SCRIPT)
    ports = [str(free_port("127.0.0.1")) for _ in range(2)]
    launcher = subprocess.Popen([sys.executable, str(script), *ports], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    group = None
    try:
        ready, _, _ = select.select([launcher.stdout], [], [], 60)
        assert ready, "the launcher did not start its router"
        group = int(launcher.stdout.readline())
        assert len(group_members(group)) == 2, "router_entry and the router it runs"
        launcher.kill()
        launcher.wait()
        assert wait_until(lambda: not group_members(group), timeout_s=2), "the router outlived its launcher"
    finally:
        launcher.kill()
        if group is not None and group_members(group):
            os.killpg(group, signal.SIGKILL)


def test_a_router_that_exits_at_start_quotes_its_log(tmp_path):
    with pytest.raises(EngineStartError, match=r"(?s)exited with code 2 while starting.*router\.log.*unrecognized arguments: --no-such-flag"):
        Router.launch(log_dir=tmp_path, extra_args=["--no-such-flag"], startup_timeout_s=60)


def test_bad_policies_and_fixed_flags_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"rollout.router_policy: 'power_of_two' is not one of"):
        Router.launch(log_dir=tmp_path, policy="power_of_two")
    with pytest.raises(ValueError, match=r"\['--port=1'\] are set by megarl"):
        Router.launch(log_dir=tmp_path, extra_args=["--cache-threshold", "0.5", "--port=1"])


def test_without_the_package_launch_says_how_to_install_it(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "sglang_router" else find_spec(name, *args))
    with pytest.raises(EngineMisconfigured, match=r"needs the sglang-router package, which is not installed: pip install sglang-router==0\.3\.2"):
        Router.launch(log_dir=tmp_path)
