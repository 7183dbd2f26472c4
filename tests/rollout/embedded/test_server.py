"""The hf engine's HTTP server on FastAPI + uvicorn, in this process: concurrent requests batched,
a lone request generated exactly as a direct batch, pause / continue / abort, weight versions, and
its answers checked against SGLang's own response contract and code."""

from __future__ import annotations

import ast
import concurrent.futures
import importlib.util
import json
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import load_file, save_file

from megarl.config import resolve_model_path
from megarl.rollout import protocol
from megarl.rollout.embedded.generate import BatchGenerator, Request
from megarl.rollout.embedded.scheduler import ABORTED
from megarl.rollout.embedded.hf_engine import HFEngine
from megarl.rollout.embedded.server import listening_socket, make_app, uvicorn_server
from tests.rollout.sglang_source import SGLANG, class_fields, load_source, needs_sglang

pytestmark = pytest.mark.cpu

MOE = resolve_model_path("bundled:tiny-moe")
LONG = 200
"""Tokens of a request long enough to be paused or aborted mid-way (no stop token)."""


@pytest.fixture(scope="module")
def served():
    """(engine, base URL) of an engine served on a thread, torn down after the module."""
    engine = HFEngine(str(MOE), "float32", seed=0)
    engine.scheduler.start()
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn_server(make_app(engine))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield engine, f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(autouse=True)
def unpaused(served):
    """Each test starts unpaused on an idle scheduler: a job whose answer has been delivered may
    still hold ``scheduler.running`` for a moment, and a test that waits for its own request to
    run would take that job for its own."""
    yield
    post(served[1], protocol.CONTINUE_GENERATION, protocol.continue_body())
    wait_until(lambda: not served[0].scheduler.running and not served[0].scheduler.queue)


def post(url: str, path: str, body: dict | None = None, method: str = "POST"):
    """(HTTP status, decoded answer: JSON, text, or None when empty)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw, kind = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        status, raw, kind = error.code, error.read(), error.headers.get("Content-Type", "")
    if not raw:
        return status, None
    return status, json.loads(raw) if kind.startswith("application/json") else raw.decode()


def generate_body(prompts, seed, max_new_tokens=12, rid=None):
    sampling = [
        {"max_new_tokens": max_new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "stop_token_ids": [], "ignore_eos": True, "sampling_seed": seed + index}
        for index in range(len(prompts))
    ]
    return protocol.generate_body(prompts, sampling, rid=rid)


def direct(engine: HFEngine, prompts, seed, max_new_tokens=12):
    """What a fresh BatchGenerator on the engine's model generates for this batch (today's engine)."""
    requests = [
        Request(input_ids=prompt, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=-1, stop_token_ids=frozenset(), seed=seed + index)
        for index, prompt in enumerate(prompts)
    ]
    with engine.lock:
        return BatchGenerator(engine.model, engine.generator.context_length, engine.generator.pad_token_id, random_seed=0).generate(requests)


def logprobs(item):
    return [triple[0] for triple in item["meta_info"]["output_token_logprobs"]]


def in_background(url, body):
    return concurrent.futures.ThreadPoolExecutor(1).submit(post, url, protocol.GENERATE, body)


def wait_until(condition, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_a_lone_request_is_generated_exactly_as_one_batch(served):
    engine, url = served
    prompts = [[5, 9, 13, 4], [7, 8], [20, 21, 22, 23, 24, 25, 26]]
    status, items = post(url, protocol.GENERATE, generate_body(prompts, seed=10))
    assert status == 200
    for item, expected in zip(items, direct(engine, prompts, seed=10)):
        assert item["output_ids"] == expected.output_ids and logprobs(item) == expected.logprobs  # bitwise
        assert item["meta_info"]["finish_reason"] == {"type": "length", "length": 12}


def test_concurrent_requests_share_a_batch_and_each_sample_keeps_its_tokens(served, monkeypatch):
    engine, url = served
    batch_sizes = []
    generate = engine.generator.generate
    monkeypatch.setattr(engine.generator, "generate", lambda requests, **kwargs: batch_sizes.append(len(requests)) or generate(requests, **kwargs))
    first, second = [[5, 9, 13, 4], [7, 8]], [[3, 30, 31], [44, 45, 46, 47, 48, 49, 50]]
    post(url, protocol.PAUSE_GENERATION, protocol.pause_body("in_place"))  # hold both in the queue
    futures = [in_background(url, generate_body(first, seed=20)), in_background(url, generate_body(second, seed=30))]
    wait_until(lambda: len(engine.scheduler.queue) == 2)
    post(url, protocol.CONTINUE_GENERATION, protocol.continue_body())
    (status_1, together_1), (status_2, together_2) = [future.result(timeout=120) for future in futures]
    assert status_1 == status_2 == 200 and batch_sizes == [4]
    for together, alone in zip(together_1 + together_2, direct(engine, first, seed=20) + direct(engine, second, seed=30)):
        assert together["output_ids"] == alone.output_ids
        # One batch of four rows pads and multiplies differently from two batches of two: the
        # log-probs agree to float rounding, and the drawn tokens (seeded per sample) are the same.
        assert torch.allclose(torch.tensor(logprobs(together)), torch.tensor(alone.logprobs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_a_paused_request_continues_with_the_tokens_it_would_have_drawn(served, mode):
    engine, url = served
    prompt = [[11, 12, 13, 14]]
    unpaused_run = direct(engine, prompt, seed=40, max_new_tokens=LONG)[0]
    future = in_background(url, generate_body(prompt, seed=40, max_new_tokens=LONG))
    wait_until(lambda: engine.scheduler.running)
    status, answer = post(url, protocol.PAUSE_GENERATION, protocol.pause_body(mode))
    assert (status, answer) == (200, {"message": "Generation paused successfully.", "status": "ok"})
    assert engine.scheduler.parked and not future.done()
    assert post(url, protocol.HEALTH_GENERATE, method="GET")[0] == 200  # paused is healthy
    status, answer = post(url, protocol.CONTINUE_GENERATION, protocol.continue_body())
    assert (status, answer) == (200, {"message": "Generation continued successfully.", "status": "ok"})
    status, [item] = future.result(timeout=120)
    assert item["output_ids"] == unpaused_run.output_ids
    if mode == "in_place":  # the KV cache is kept: nothing is recomputed
        assert logprobs(item) == unpaused_run.logprobs
    else:  # retract recomputes the cache in one forward over every token so far
        assert torch.allclose(torch.tensor(logprobs(item)), torch.tensor(unpaused_run.logprobs), atol=1e-5, rtol=0)


def test_an_aborted_request_returns_its_tokens_so_far(served):
    engine, url = served
    prompt = [[11, 12, 13, 14], [15, 16]]
    unaborted = direct(engine, prompt, seed=50, max_new_tokens=LONG)
    future = in_background(url, generate_body(prompt, seed=50, max_new_tokens=LONG, rid="long"))
    wait_until(lambda: engine.scheduler.running)
    assert post(url, protocol.ABORT_REQUEST, protocol.abort_body("long_1")) == (200, None)  # the second sample only
    status, items = future.result(timeout=120)
    assert status == 200 and [item["meta_info"]["id"] for item in items] == ["long_0", "long_1"]
    assert items[0]["output_ids"] == unaborted[0].output_ids
    assert items[0]["meta_info"]["finish_reason"] == {"type": "length", "length": LONG}
    partial = items[1]
    assert partial["meta_info"]["finish_reason"] == ABORTED
    tokens = len(partial["output_ids"])
    assert 0 < tokens < LONG and partial["meta_info"]["completion_tokens"] == tokens
    assert partial["output_ids"] == unaborted[1].output_ids[:tokens]
    assert logprobs(partial) == unaborted[1].logprobs[:tokens]


def test_pause_in_abort_mode_ends_running_requests_and_holds_new_ones(served):
    engine, url = served
    running = in_background(url, generate_body([[11, 12, 13]], seed=60, max_new_tokens=LONG))
    wait_until(lambda: engine.scheduler.running)
    assert post(url, protocol.PAUSE_GENERATION, protocol.pause_body("abort"))[0] == 200
    status, [item] = running.result(timeout=60)
    assert item["meta_info"]["finish_reason"]["type"] == "abort" and len(item["output_ids"]) < LONG
    held = in_background(url, generate_body([[11, 12, 13]], seed=60, max_new_tokens=4, rid="held"))
    wait_until(lambda: engine.scheduler.queue)
    assert not held.done()
    post(url, protocol.ABORT_REQUEST, protocol.abort_body("held"))  # aborted while queued: no tokens
    status, [item] = held.result(timeout=60)
    assert item["output_ids"] == [] and item["meta_info"]["finish_reason"] == {"type": "abort", "message": "Abort in waiting queue"}
    after = in_background(url, generate_body([[11, 12, 13]], seed=60, max_new_tokens=4))
    wait_until(lambda: engine.scheduler.queue)
    post(url, protocol.CONTINUE_GENERATION, protocol.continue_body())
    status, [item] = after.result(timeout=60)
    assert item["meta_info"]["finish_reason"] == {"type": "length", "length": 4}


def test_weight_versions_follow_updates_even_within_a_paused_request(served, tmp_path):
    engine, url = served
    base = load_file(MOE / "model.safetensors")
    draw = torch.Generator().manual_seed(0)
    save_file({name: tensor + 0.05 * torch.randn(tensor.shape, generator=draw) for name, tensor in base.items()}, tmp_path / "model.safetensors")
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    assert post(url, protocol.UPDATE_FROM_DISK, protocol.update_from_disk_body(str(tmp_path / "base"), "v1"))[1]["success"]
    status, [item] = post(url, protocol.GENERATE, generate_body([[5, 6, 7]], seed=70, max_new_tokens=5))
    assert item["meta_info"]["weight_version"] == "v1"
    assert item["meta_info"]["weight_versions"] == [{"version": "v1", "start": 0, "end": 5}]

    before = direct(engine, [[5, 6, 7]], seed=70, max_new_tokens=LONG)[0]
    future = in_background(url, generate_body([[5, 6, 7]], seed=70, max_new_tokens=LONG))
    wait_until(lambda: engine.scheduler.running)
    post(url, protocol.PAUSE_GENERATION, protocol.pause_body("in_place"))
    assert post(url, protocol.UPDATE_FROM_DISK, protocol.update_from_disk_body(str(tmp_path), "v2"))[1]["success"]
    assert post(url, protocol.MODEL_INFO, method="GET")[1]["weight_version"] == "v2"
    post(url, protocol.CONTINUE_GENERATION, protocol.continue_body())
    status, [item] = future.result(timeout=120)
    meta = item["meta_info"]
    [old, new] = meta["weight_versions"]
    assert meta["weight_version"] == "v2" and old["version"] == "v1" and new["version"] == "v2"
    assert old["start"] == 0 and 0 < old["end"] == new["start"] < new["end"] == LONG
    assert item["output_ids"][: old["end"]] == before.output_ids[: old["end"]]  # drawn before the update

    status, answer = post(url, protocol.UPDATE_WEIGHT_VERSION, protocol.update_weight_version_body("v3", abort_all_requests=True))
    assert (status, answer) == (200, {"success": True, "message": "Weight version updated to v3", "new_version": "v3"})
    status, [item] = post(url, protocol.GENERATE, generate_body([[5, 6, 7]], seed=70, max_new_tokens=2))
    assert item["meta_info"]["weight_version"] == "v3"


def test_bad_controls_are_refused_by_name(served):
    _, url = served
    status, answer = post(url, protocol.PAUSE_GENERATION, {"mode": "sleep"})
    assert status == 400 and "pause mode 'sleep' is not one of SGLang's" in answer["error"]["message"]
    status, answer = post(url, protocol.GENERATE, {"input_ids": [[1, 2], [3]], "rid": ["a"]})
    assert status == 400 and "rid must be a string or a list of 2 strings" in answer["error"]["message"]
    assert post(url, "/no_such_endpoint") == (404, {"error": {"message": "the hf engine does not serve /no_such_endpoint"}})


def test_server_info_is_served_under_both_of_sglangs_names(served):
    """sglang-router asks /server_info, then /get_server_info, when it registers a worker."""
    engine, url = served
    assert post(url, protocol.SERVER_INFO, method="GET") == post(url, protocol.SERVER_INFO_DEPRECATED, method="GET") == (200, engine.server_info({}))


def sglang_answers() -> dict[str, dict]:
    """What SGLang's http_server.py answers on /pause_generation and /continue_generation."""
    answers = {}
    for node in ast.walk(ast.parse((SGLANG / "srt" / "entrypoints" / "http_server.py").read_text())):
        if isinstance(node, ast.AsyncFunctionDef) and node.name in ("pause_generation", "continue_generation"):
            content = next(kw.value for call in ast.walk(node) if isinstance(call, ast.Call) for kw in call.keywords if kw.arg == "content")
            answers[node.name] = ast.literal_eval(content)
    return answers


def sglang_finish_abort() -> dict:
    """``FINISH_ABORT().to_json()``, run from SGLang's schedule_batch.py."""
    tree = ast.parse((SGLANG / "srt" / "managers" / "schedule_batch.py").read_text())
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name in ("BaseFinishReason", "FINISH_ABORT")]
    namespace: dict = {}
    exec(compile(ast.Module(body=classes, type_ignores=[]), "schedule_batch.py", "exec"), namespace)
    return namespace["FINISH_ABORT"]().to_json()


@needs_sglang
def test_answers_fit_sglangs_contract_and_code(served, monkeypatch):
    pytest.importorskip("msgspec", reason="SGLang's contract decoder needs msgspec (an SGLang dependency)")
    engine, url = served
    api_types = load_source("api/v1/api_types.py", "sglang_api_types_under_test")
    for name in ("sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.utils.msgspec_utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["sglang.srt.utils.msgspec_utils"].msgspec_struct_pydantic_core_schema = None
    spec = importlib.util.spec_from_file_location("sglang_weight_versions_under_test", SGLANG / "srt" / "utils" / "weight_versions.py")
    weight_versions = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, weight_versions)  # its dataclasses look themselves up there
    spec.loader.exec_module(weight_versions)

    # One batch: a sample that spans two weight versions and one aborted while paused; and a
    # request aborted in the queue.
    post(url, protocol.UPDATE_WEIGHT_VERSION, protocol.update_weight_version_body("c1", abort_all_requests=False))
    spanning = in_background(url, generate_body([[5, 6, 7], [8, 9]], seed=80, max_new_tokens=LONG, rid="spans"))
    wait_until(lambda: engine.scheduler.running)
    assert post(url, protocol.PAUSE_GENERATION, protocol.pause_body("in_place"))[1] == sglang_answers()["pause_generation"]
    post(url, protocol.UPDATE_WEIGHT_VERSION, protocol.update_weight_version_body("c2", abort_all_requests=False))
    post(url, protocol.ABORT_REQUEST, protocol.abort_body("spans_1"))
    queued = in_background(url, generate_body([[5]], seed=1, max_new_tokens=3, rid="queued"))
    wait_until(lambda: engine.scheduler.queue)
    post(url, protocol.ABORT_REQUEST, protocol.abort_body("queued"))
    assert post(url, protocol.CONTINUE_GENERATION, protocol.continue_body())[1] == sglang_answers()["continue_generation"]
    (_, [finished, aborted]), (_, [never_started]) = spanning.result(timeout=120), queued.result(timeout=60)

    contract = SGLANG / "api" / "v1" / "api_types.py"
    response_fields, meta_fields = class_fields(contract, "GenerateResponse")[0], class_fields(contract, "GenerateMetaInfo")[0]
    for item in (finished, aborted, never_started):
        api_types.GenerateResponse.from_json_value(item)
        assert set(item) <= response_fields and set(item["meta_info"]) <= meta_fields
    assert isinstance(api_types.decode_FinishReason(aborted["meta_info"]["finish_reason"]), api_types.FinishAbort)
    assert aborted["meta_info"]["finish_reason"] == sglang_finish_abort()

    # Spans as SGLang's scheduler and tokenizer manager compute them: the version changed once,
    # after `paused_at` tokens; the aborted sample stopped before the change.
    paused_at = finished["meta_info"]["weight_versions"][0]["end"]
    assert 0 < paused_at < LONG and len(aborted["output_ids"]) == paused_at
    for item, events, current in (
        (finished, [weight_versions.WeightVersionEvent(old_version="c1", num_output_tokens=paused_at)], "c2"),
        (aborted, [], "c1"),
        (never_started, [], "c2"),
    ):
        tokens = len(item["output_ids"])
        expected: dict = {}
        weight_versions.add_weight_versions_to_meta_info(expected, weight_versions.compute_weight_version_spans(events, current, tokens), tokens)
        assert {key: item["meta_info"][key] for key in expected} == expected


def test_the_listening_socket_says_tcp_so_that_answers_are_not_held_back():
    # asyncio turns Nagle off (TCP_NODELAY) on accepted connections only when the listening
    # socket's protocol is TCP; otherwise each answer on a kept-alive connection waits for the
    # client's delayed acknowledgement (~40 ms a request).
    for host in ("127.0.0.1", "::1"):
        try:
            sock = listening_socket(host, 0)
        except OSError:  # no IPv6 on this machine
            continue
        with sock:
            assert sock.proto == socket.IPPROTO_TCP and sock.type == socket.SOCK_STREAM
