"""The OpenAI-compatible endpoint (megarl.agents.openai_server), driven over HTTP by an agent written
as an OpenAI client is: its trajectory is the built-in loop's for the same episode; Hermes calls
come back as OpenAI tool calls; requests the trajectory could not follow token-exactly are refused."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading

import httpx
import pytest
import torch
import transformers

from megarl.agents.environment import StepResult
from megarl.agents.episode import EpisodeContext, EpisodeLimits, run_episode
from megarl.agents.openai_server import ChatEndpoint
from megarl.agents.rendering import observation_ids, prompt_ids
from megarl.agents.toy import LOOKUP
from megarl.config import resolve_model_path
from megarl.rollout import EngineGroup
from megarl.rollout.embedded.hf_engine import HFEngine
from megarl.rollout.embedded.server import listening_socket, make_app, uvicorn_server
from megarl.rollout.sampling import SamplingParams, resume_seed
from megarl.rollout.errors import EngineDead
from tests.agents.chat_fixtures import QUESTION, TOOLS, qwen_like_tokenizer, sampled_ids
from tests.agents.test_episode import ScriptedEngine, ScriptedEnvironments

pytestmark = pytest.mark.cpu

SYSTEM = {"role": "system", "content": "Look it up."}
CALL = 'I will look it up.\n<tool_call>\n{"name": "lookup", "arguments": {"key": "47"}}\n</tool_call>'
ANSWER = "The answer is 1234."
SAMPLING = SamplingParams(max_new_tokens=64, temperature=0.7)
LIMITS = EpisodeLimits(max_turns=3, max_response_tokens=200)


@pytest.fixture(scope="module")
def qwen_like():
    """A tokenizer that behaves as Qwen3's does with tools (tests/agents/chat_fixtures.py)."""
    return qwen_like_tokenizer()


class LoopedEngine(ScriptedEngine):
    """A scripted engine awaited on an event loop of its own through ``run``, as an
    :class:`~megarl.rollout.EngineGroup`'s turns are; records each turn's seed."""

    def __init__(self, turns):
        super().__init__(turns)
        self.seeds = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def generate_turn(self, input_ids, sampling, *, max_new_tokens, seed, route):
        self.seeds.append(seed)
        return await super().generate_turn(input_ids, sampling, max_new_tokens=max_new_tokens, seed=seed, route=route)

    def run(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=1)


def endpoint_with(tokenizer, turns, limits=LIMITS):
    """A started Hermes endpoint over an engine that samples ``turns`` (texts, or ``(ids, finish_reason)``)."""
    engine = LoopedEngine([(sampled_ids(tokenizer, text), "stop") if isinstance(text, str) else text for text in turns])
    endpoint = ChatEndpoint(engine, tokenizer, SAMPLING, limits, "hermes", TOOLS.schemas())
    endpoint.start()
    return engine, endpoint


@pytest.fixture
def served(qwen_like):
    """An endpoint whose engine samples the Hermes call, then the answer; the episode ``e0``'s URL."""
    engine, endpoint = endpoint_with(qwen_like, [CALL, ANSWER])
    yield engine, endpoint, endpoint.open_episode("e0", route=0, seed=5)
    endpoint.close()
    engine.stop()


def lookup_agent(base_url: str, **request_fields) -> tuple[list[dict], list[dict]]:
    """An agent as one writes it against the OpenAI API: it sends the conversation with its tools,
    runs the tools the model calls, sends their results, and stops at a turn without calls.
    Returns the conversation and every completion."""
    messages, completions = [SYSTEM, QUESTION], []
    with httpx.Client(base_url=base_url, timeout=10) as client:
        while True:
            reply = client.post("/chat/completions", json={"model": "policy", "messages": messages, "tools": TOOLS.schemas(), **request_fields})
            assert reply.status_code == 200, reply.text
            completions.append(reply.json())
            message = completions[-1]["choices"][0]["message"]
            messages.append(message)
            if not message.get("tool_calls"):
                return messages, completions
            for call in message["tool_calls"]:
                result = TOOLS[call["function"]["name"]].invoke(json.loads(call["function"]["arguments"]))
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})


def post(base_url: str, **body) -> httpx.Response:
    return httpx.post(f"{base_url}/chat/completions", json={"model": "policy", **body}, timeout=10)


def test_the_endpoint_records_the_trajectory_of_the_built_in_loop(qwen_like, served):
    engine, endpoint, base_url = served
    messages, _ = lookup_agent(base_url)
    assert messages[-1]["content"] == ANSWER
    trajectory = endpoint.trajectory("e0")

    reference_engine = ScriptedEngine([(sampled_ids(qwen_like, CALL), "stop"), (sampled_ids(qwen_like, ANSWER), "stop")])
    environments = ScriptedEnvironments([StepResult([{"role": "tool", "content": "1234"}]), StepResult(None, done=True)], first=[SYSTEM, QUESTION])
    context = EpisodeContext(engines=reference_engine, environments=environments, tokenizer=qwen_like, tools=tuple(TOOLS.schemas()), sampling=SAMPLING, limits=LIMITS)
    reference = asyncio.run(run_episode(context, {}, [], episode_id="e0", route=0, seed=5))

    assert trajectory == reference
    assert engine.inputs == reference_engine.inputs and engine.limits == reference_engine.limits
    observation = observation_ids(qwen_like, [{"role": "tool", "content": "1234"}], tools=TOOLS.schemas())
    call, answer = sampled_ids(qwen_like, CALL), sampled_ids(qwen_like, ANSWER)
    assert trajectory.prompt_ids == prompt_ids(qwen_like, [SYSTEM, QUESTION], TOOLS.schemas())
    assert trajectory.response_ids == call + observation + answer
    assert trajectory.loss_mask == [True] * len(call) + [False] * len(observation) + [True] * len(answer)
    assert trajectory.logprobs[len(call) : len(call) + len(observation)] == [0.0] * len(observation)
    assert (trajectory.turns, trajectory.final_text, trajectory.finish_reason) == (2, ANSWER, "stop")
    assert engine.seeds == [resume_seed(5, 0), resume_seed(5, len(call) + len(observation))]
    with pytest.raises(ValueError, match="episode 'e0' is not open"):
        endpoint.trajectory("e0")


def test_a_hermes_call_comes_back_as_an_openai_tool_call(qwen_like, served):
    engine, endpoint, base_url = served
    reply = post(base_url, messages=[SYSTEM, QUESTION], tools=TOOLS.schemas(), logprobs=True, max_tokens=40)
    assert reply.status_code == 200, reply.text
    completion = reply.json()
    assert completion["object"] == "chat.completion" and completion["id"].startswith("chatcmpl-") and completion["model"] == "policy"
    (choice,) = completion["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": "I will look it up.",
        "tool_calls": [{"id": "call_0_0", "type": "function", "function": {"name": "lookup", "arguments": '{"key": "47"}'}}],
    }
    sampled = sampled_ids(qwen_like, CALL)
    tokens = choice["logprobs"]["content"]
    assert [token["logprob"] for token in tokens] == pytest.approx([-0.1 * (index + 1) for index in range(len(sampled))])
    assert "".join(token["token"] for token in tokens) == qwen_like.decode(sampled)
    assert all(token["top_logprobs"] == [] and bytes(token["bytes"]).decode() == token["token"] for token in tokens)
    prompt = len(prompt_ids(qwen_like, [SYSTEM, QUESTION], TOOLS.schemas()))
    assert completion["usage"] == {"prompt_tokens": prompt, "completion_tokens": len(sampled), "total_tokens": prompt + len(sampled)}
    assert engine.limits == [40]


def test_a_rewritten_history_is_refused_naming_the_first_differing_message(qwen_like, served):
    engine, endpoint, base_url = served
    message = post(base_url, messages=[SYSTEM, QUESTION]).json()["choices"][0]["message"]
    result = {"role": "tool", "tool_call_id": "call_0_0", "content": "1234"}
    edited = {**message, "tool_calls": [{**message["tool_calls"][0], "function": {"name": "lookup", "arguments": '{"key": "5"}'}}]}
    reply = post(base_url, messages=[SYSTEM, QUESTION, edited, result])
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "messages[2]" and error["message"].startswith("messages[2] (role 'assistant') differs from it")
    assert "cannot be trained token-exactly" in error["message"]
    reply = post(base_url, messages=[QUESTION, message, result])
    assert reply.status_code == 400 and reply.json()["error"]["message"].startswith("messages[0] (role 'user') differs")
    reply = post(base_url, messages=[SYSTEM, QUESTION])
    assert reply.status_code == 400 and reply.json()["error"]["message"].startswith("messages[2] is missing")
    reply = post(base_url, messages=[SYSTEM, QUESTION, message, {"role": "assistant", "content": "1234"}])
    assert reply.status_code == 400 and "messages[3] has role 'assistant'" in reply.json()["error"]["message"]
    reply = post(base_url, messages=[SYSTEM, QUESTION, message, result], tools=[])
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tools"
    # The history sent back as it was, with the content null and arguments re-serialised, goes on.
    echoed = {**message, "tool_calls": [{**message["tool_calls"][0], "function": {"name": "lookup", "arguments": '{ "key":"47" }'}}]}
    reply = post(base_url, messages=[SYSTEM, QUESTION, echoed, result])
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == ANSWER
    assert endpoint.trajectory("e0").turns == 2


@pytest.mark.parametrize(
    "fields, param, message",
    [
        ({"stream": True}, "stream", "stream true is not served: leave it out or send false"),
        ({"temperature": 1.0}, "temperature", "temperature 1.0 differs from the run's sampling (0.7): training needs the log-probs"),
        ({"n": 2}, "n", "n 2 is not served"),
        ({"top_logprobs": 3}, "top_logprobs", "top_logprobs 3 is not served"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be a positive integer, got 0"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "messages[0].content", "messages[0].content must be a string, got array"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]", "tools[0]: tool name 'bad name'"),
    ],
)
def test_requests_outside_the_served_protocol_are_refused(served, fields, param, message):
    engine, endpoint, base_url = served
    reply = post(base_url, **{"messages": [SYSTEM, QUESTION], **fields})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == param and error["message"].startswith(message) and error["type"] == "invalid_request_error"
    assert engine.inputs == []


def test_max_turns_and_the_token_budget_end_an_episode(qwen_like):
    engine, endpoint = endpoint_with(qwen_like, [CALL, CALL], limits=EpisodeLimits(max_turns=1, max_response_tokens=200))
    try:
        base_url = endpoint.open_episode("turns", route=0, seed=None)
        message = post(base_url, messages=[QUESTION], temperature=0.7).json()["choices"][0]["message"]
        reply = post(base_url, messages=[QUESTION, message, {"role": "tool", "content": "1234"}])
        assert reply.status_code == 400 and reply.json()["error"]["message"].startswith("max turns: the episode took its 1 model turns")
        trajectory = endpoint.trajectory("turns")
        assert trajectory.max_turns_reached and trajectory.turns == 1 and engine.seeds == [None]
    finally:
        endpoint.close()
        engine.stop()
    # A turn cut by the budget ends with finish_reason length; no observation fits after it.
    call = sampled_ids(qwen_like, CALL)
    engine, endpoint = endpoint_with(qwen_like, [(call, "length")], limits=EpisodeLimits(max_turns=3, max_response_tokens=5))
    try:
        base_url = endpoint.open_episode("budget", route=0, seed=1)
        first = post(base_url, messages=[QUESTION], max_tokens=50).json()["choices"][0]
        assert first["finish_reason"] == "length" and engine.limits == [5]
        reply = post(base_url, messages=[QUESTION, first["message"], {"role": "user", "content": "Try again."}])
        assert reply.status_code == 400 and reply.json()["error"]["message"].startswith("token budget spent")
        trajectory = endpoint.trajectory("budget")
        assert trajectory.response_ids == call[:5] and trajectory.finish_reason == "length"
    finally:
        endpoint.close()
        engine.stop()


def test_many_episodes_at_once_and_episodes_not_open(qwen_like):
    episodes = [f"step 3 round 0/{index}/0" for index in range(6)]
    engine, endpoint = endpoint_with(qwen_like, [ANSWER] * len(episodes))
    try:
        urls = [endpoint.open_episode(episode, route=index, seed=index) for index, episode in enumerate(episodes)]
        with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
            conversations = list(pool.map(lambda url: lookup_agent(url)[0], urls))
        assert all(conversation[-1]["content"] == ANSWER for conversation in conversations)
        for episode in episodes:
            trajectory = endpoint.trajectory(episode)
            assert trajectory.turns == 1 and trajectory.response_ids == sampled_ids(qwen_like, ANSWER)
        reply = post(urls[0], messages=[QUESTION])
        assert reply.status_code == 404 and "is not open" in reply.json()["error"]["message"]
        endpoint.open_episode("twice", route=0, seed=None)
        with pytest.raises(ValueError, match="already open"):
            endpoint.open_episode("twice", route=0, seed=None)
    finally:
        endpoint.close()
        engine.stop()


class GatedEngine(LoopedEngine):
    """Holds every turn until ``release`` is set."""

    def __init__(self, turns):
        super().__init__(turns)
        self.release = concurrent.futures.Future()

    async def generate_turn(self, input_ids, sampling, **options):
        self.inputs.append(list(input_ids))
        await asyncio.wrap_future(self.release)
        self.inputs.pop()
        return await super().generate_turn(input_ids, sampling, **options)


def test_calls_of_one_episode_come_one_at_a_time_and_closing_drops_a_call_in_flight(qwen_like):
    engine = GatedEngine([(sampled_ids(qwen_like, ANSWER), "stop")])
    with ChatEndpoint(engine, qwen_like, SAMPLING, LIMITS, "hermes", TOOLS.schemas()) as endpoint:
        base_url = endpoint.open_episode("e", route=0, seed=None)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, base_url, messages=[QUESTION])
            while not engine.inputs:
                threading.Event().wait(0.01)
            second = post(base_url, messages=[QUESTION])
            assert second.status_code == 409 and "its calls must come one after another" in second.json()["error"]["message"]
            with pytest.raises(ValueError, match="made no answered call"):
                endpoint.trajectory("e")
            engine.release.set_result(None)
            reply = first.result(timeout=5)
        assert reply.status_code == 404 and "was closed while its turn generated" in reply.json()["error"]["message"]
    engine.stop()


def test_a_malformed_call_is_answered_as_text(qwen_like):
    malformed = '<tool_call>\n{"name": "lookup", "arguments": {"key": 47\n</tool_call>'
    engine, endpoint = endpoint_with(qwen_like, [malformed])
    try:
        base_url = endpoint.open_episode("e", route=0, seed=None)
        choice = post(base_url, messages=[QUESTION]).json()["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": malformed} and choice["finish_reason"] == "stop"
    finally:
        endpoint.close()
        engine.stop()


def test_bad_endpoint_arguments_are_refused(qwen_like):
    with pytest.raises(ValueError, match="agent.tool_parser 'hermez' is not a known tool-call parser"):
        ChatEndpoint(None, qwen_like, SAMPLING, LIMITS, "hermez")
    with pytest.raises(ValueError, match="ChatEndpoint tools\\[0\\] must be"):
        ChatEndpoint(None, qwen_like, SAMPLING, LIMITS, "hermes", [{"name": "lookup"}])


def test_a_real_hf_engine_behind_the_endpoint_samples_the_ids_the_trainer_scores():
    """The engine group's turns, awaited from the endpoint's loop on the group's own, with the
    bundled model and its compact tool calls: the recorded log-probs are the model's on the
    recorded ids (a teacher-forced forward, as the trainer computes them)."""
    model_path = resolve_model_path("bundled:tiny-moe")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine's forwards share the test's cores
    engine = HFEngine(str(model_path), "float32", seed=0)
    engine.scheduler.start()
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn_server(make_app(engine))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    limits = EpisodeLimits(max_turns=2, max_response_tokens=40, max_tokens_per_turn=6)
    try:
        with EngineGroup.connect([f"http://127.0.0.1:{sock.getsockname()[1]}"], engine="hf", model_path=model_path, health_check_interval_s=3600) as engines:
            with ChatEndpoint(engines, tokenizer, SamplingParams(max_new_tokens=6), limits, "compact", [LOOKUP.schema()]) as endpoint:
                base_url = endpoint.open_episode("real", route=0, seed=11)
                messages = [{"role": "user", "content": "key 4 7"}]
                for _ in range(2):
                    messages.append(post(base_url, messages=messages).json()["choices"][0]["message"])
                    messages.append({"role": "tool", "content": "7"})
                trajectory = endpoint.trajectory("real")
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(torch.tensor([trajectory.prompt_ids + trajectory.response_ids]), use_cache=False).logits[0, len(trajectory.prompt_ids) - 1 : -1]
        scored = torch.log_softmax(logits, -1).gather(1, torch.tensor(trajectory.response_ids)[:, None])[:, 0]
        model_tokens = torch.tensor(trajectory.loss_mask)
        assert trajectory.turns == 2 and 0 < model_tokens.sum() < len(trajectory.response_ids)
        assert torch.allclose(scored[model_tokens], torch.tensor(trajectory.logprobs)[model_tokens], atol=1e-5, rtol=0)
        first = trajectory.loss_mask.index(False)
        observation = observation_ids(tokenizer, [{"role": "tool", "content": "7"}], tools=[LOOKUP.schema()])
        cut = [tokenizer.eos_token_id] if trajectory.response_ids[first - 1] != tokenizer.eos_token_id else []
        assert trajectory.response_ids[first : first + len(cut) + len(observation)] == cut + observation
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        torch.set_num_threads(threads)


def test_an_episode_opened_with_its_own_sampling_is_held_to_it(qwen_like):
    engine, endpoint = endpoint_with(qwen_like, [ANSWER])
    try:
        validation = SamplingParams(max_new_tokens=64, temperature=0.0)
        base_url = endpoint.open_episode("greedy", route=0, seed=None, sampling=validation)
        refused = post(base_url, messages=[QUESTION], temperature=0.7)
        assert refused.status_code == 400 and "differs from the run's sampling (0.0)" in refused.json()["error"]["message"]
        assert post(base_url, messages=[QUESTION], temperature=0.0).status_code == 200
    finally:
        endpoint.close()
        engine.stop()


class FailingEngine(LoopedEngine):
    """An engine whose group gave up on it: every turn raises the group's error."""

    async def generate_turn(self, input_ids, sampling, *, max_new_tokens, seed, route):
        raise EngineDead("hf-0", "connection refused; the restart budget is spent")


def test_an_engine_failure_answers_500_and_is_kept_for_the_round(qwen_like):
    engine = FailingEngine([])
    endpoint = ChatEndpoint(engine, qwen_like, SAMPLING, LIMITS, "hermes", TOOLS.schemas())
    endpoint.start()
    try:
        base_url = endpoint.open_episode("e0", route=0, seed=5)
        reply = post(base_url, messages=[SYSTEM, QUESTION], tools=TOOLS.schemas())
        assert reply.status_code == 500 and "the engine failed: EngineDead" in reply.text
        assert isinstance(endpoint.engine_failure, EngineDead)
    finally:
        endpoint.close()
        engine.stop()
