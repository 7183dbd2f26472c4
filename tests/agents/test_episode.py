"""Multi-turn episodes (megarl.agents.episode, megarl.agents.play): trajectories are the engine's ids
plus the rendered observations, never re-tokenised text; masks, log-probs, limits and failures."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
import transformers

from megarl.agents.environment import StepResult
from megarl.agents.episode import EpisodeContext, EpisodeLimits, Trajectory, run_episode
from megarl.agents.play import episode_metrics
from megarl.agents.rendering import observation_ids
from megarl.agents.workers import EpisodeFailure
from megarl.algorithms.policy_losses import policy_loss
from megarl.config import resolve_model_path
from megarl.rollout.sampling import Sample, SamplingParams, WeightSegment
from megarl.trainer.batch import ScoredSample, TrainBatch

pytestmark = pytest.mark.cpu

TOOLS = ({"type": "function", "function": {"name": "lookup", "description": "", "parameters": {"type": "object", "properties": {}}}},)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(resolve_model_path("bundled:tiny-moe"), local_files_only=True)


class ScriptedEngine:
    """Answers each turn with the next scripted ``(ids, finish_reason)``; records what it was sent."""

    def __init__(self, turns, version="3"):
        self.turns, self.version, self.inputs, self.limits = list(turns), version, [], []

    async def generate_turn(self, input_ids, sampling, *, max_new_tokens, seed, route):
        self.inputs.append(list(input_ids))
        self.limits.append(max_new_tokens)
        ids, reason = self.turns.pop(0)
        ids = ids[:max_new_tokens]
        logprobs = [-0.1 * (index + 1) for index in range(len(ids))]
        # Routed experts as an engine returns them: every input token and every output token but the last, marked with the turn.
        routes = np.full((len(input_ids) + len(ids) - 1, 1, 1), len(self.inputs), np.uint8)
        return Sample(0, 0, list(ids), logprobs, reason, self.version, (WeightSegment(self.version, 0, len(ids)),), routed_experts=routes)


class ScriptedEnvironments:
    """An environment pool that answers each step with the next scripted result (or raises it)."""

    def __init__(self, steps, first=None):
        self.steps, self.first, self.turns, self.closed = list(steps), first, [], []

    async def reset(self, episode_id, row):
        if isinstance(self.first, Exception):
            raise self.first
        return self.first

    async def step(self, episode_id, model_turn):
        self.turns.append(model_turn)
        result = self.steps.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    async def close_episode(self, episode_id):
        self.closed.append(episode_id)


def play_one(tokenizer, engine, environments, *, max_turns=3, max_response_tokens=20, max_tokens_per_turn=None, prompt=(1, 14, 2)):
    context = EpisodeContext(
        engines=engine, environments=environments, tokenizer=tokenizer, tools=TOOLS, sampling=SamplingParams(max_new_tokens=4),
        limits=EpisodeLimits(max_turns=max_turns, max_response_tokens=max_response_tokens, max_tokens_per_turn=max_tokens_per_turn),
    )
    return asyncio.run(run_episode(context, {"prompt": "key 4 7", "answer": "7"}, list(prompt), episode_id="e0", route=0, seed=5))


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_tool_turn_then_an_answer_is_the_sampled_ids_and_the_rendered_observation(tokenizer):
    eos = tokenizer.eos_token_id
    first, second = ids_of(tokenizer, "lookup") + [eos], ids_of(tokenizer, "7") + [eos]
    engine = ScriptedEngine([(first, "stop"), (second, "stop")])
    tool_answer = [{"role": "tool", "content": "7"}]
    environments = ScriptedEnvironments([
        StepResult(tool_answer, info={"tool_calls": 1.0}), StepResult(None, reward=1.0, done=True, info={"tool_calls": 0.0}),
    ])
    trajectory = play_one(tokenizer, engine, environments)
    observation = observation_ids(tokenizer, tool_answer, tools=list(TOOLS))
    assert trajectory.response_ids == first + observation + second
    assert trajectory.loss_mask == [True] * len(first) + [False] * len(observation) + [True] * len(second)
    assert trajectory.logprobs == [-0.1, -0.2] + [0.0] * len(observation) + [-0.1, -0.2]
    # The second turn continues exactly the ids so far: the prompt, the sampled turn, the observation.
    assert engine.inputs == [[1, 14, 2], [1, 14, 2] + first + observation]
    assert environments.turns == ["lookup", "7"] and trajectory.final_text == "7"
    assert (trajectory.turns, trajectory.reward, trajectory.finish_reason, trajectory.failure) == (2, 1.0, "stop", None)
    assert trajectory.weight_segments == [WeightSegment("3", 0, 2), WeightSegment("3", 2 + len(observation), 4 + len(observation))]
    assert trajectory.info == {"tool_calls": 1.0} and environments.closed == ["e0"]
    # The last turn's routed experts cover the whole trajectory but its last sampled token.
    assert trajectory.routed_experts.shape[0] == len(trajectory.prompt_ids) + len(trajectory.response_ids) - 1
    assert (trajectory.routed_experts == 2).all()


def test_sampled_ids_are_trained_even_when_their_text_does_not_encode_back_to_them(tokenizer):
    # <|unk|> decodes to nothing once special tokens are skipped, and "lookup" decodes to a word
    # that would encode the same; the trajectory holds what was sampled, whatever the text says.
    eos, unk = tokenizer.eos_token_id, tokenizer.unk_token_id
    sampled = [unk, ids_of(tokenizer, "lookup")[0], unk, eos]
    text = tokenizer.decode(sampled, skip_special_tokens=True)
    assert ids_of(tokenizer, text) + [eos] != sampled
    engine = ScriptedEngine([(sampled, "stop")])
    trajectory = play_one(tokenizer, engine, ScriptedEnvironments([StepResult(None, reward=0.0, done=True)]))
    assert trajectory.response_ids == sampled
    record = ScoredSample(
        prompt_ids=trajectory.prompt_ids, response_ids=trajectory.response_ids, rollout_log_probs=trajectory.logprobs,
        finish_reason=trajectory.finish_reason, group=0, score=0.0, loss_mask=trajectory.loss_mask,
    )
    batch = TrainBatch.from_scored([record], pad_token_id=tokenizer.pad_token_id, pad_multiple=1)
    assert batch.tokens[0].tolist()[: len(trajectory.prompt_ids) + len(sampled)] == trajectory.prompt_ids + sampled


def test_observation_tokens_carry_no_loss_weight_and_no_gradient(tokenizer):
    eos = tokenizer.eos_token_id
    engine = ScriptedEngine([(ids_of(tokenizer, "lookup") + [eos], "stop"), (ids_of(tokenizer, "3") + [eos], "stop")])
    environments = ScriptedEnvironments([StepResult([{"role": "tool", "content": "3"}]), StepResult(None, done=True)])
    trajectory = play_one(tokenizer, engine, environments)
    record = ScoredSample(
        prompt_ids=trajectory.prompt_ids, response_ids=trajectory.response_ids, rollout_log_probs=trajectory.logprobs,
        finish_reason="stop", group=0, score=1.0, loss_mask=trajectory.loss_mask,
    )
    batch = TrainBatch.from_scored([record], pad_token_id=tokenizer.pad_token_id, pad_multiple=1)
    start = len(trajectory.prompt_ids) - 1  # label space: column t predicts token t + 1
    expected = torch.zeros_like(batch.response_mask)
    expected[0, start : start + len(trajectory.loss_mask)] = torch.tensor(trajectory.loss_mask)
    assert torch.equal(batch.response_mask, expected)
    logits = torch.randn(*batch.tokens.shape, len(tokenizer), dtype=torch.float64, requires_grad=True)
    labels = torch.cat([batch.tokens[:, 1:], batch.tokens[:, -1:]], dim=1)
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None])[..., 0]
    per_token, _ = policy_loss(
        "ppo", log_probs=log_probs, old_log_probs=log_probs.detach() - 0.1, advantages=torch.ones_like(log_probs),
        response_mask=batch.response_mask, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
    )
    per_token.sum().backward()
    gradient_rows = logits.grad[0].abs().sum(-1)
    assert (gradient_rows[~batch.response_mask[0]] == 0).all()
    assert (gradient_rows[batch.response_mask[0]] > 0).all()


def test_limits_end_an_episode_after_a_model_turn(tokenizer):
    eos = tokenizer.eos_token_id
    call = ids_of(tokenizer, "lookup") + [eos]
    answer = [{"role": "tool", "content": "5"}]
    # max_turns: the second tool call is the last turn, with no observation after it.
    environments = ScriptedEnvironments([StepResult(answer), StepResult(answer)])
    trajectory = play_one(tokenizer, ScriptedEngine([(call, "stop"), (call, "stop")]), environments, max_turns=2)
    assert trajectory.max_turns_reached and trajectory.turns == 2 and trajectory.loss_mask[-1]
    # A turn cut by the episode's budget ends the episode without a step.
    engine = ScriptedEngine([([11, 12, 13, 14], "length")])
    environments = ScriptedEnvironments([])
    trajectory = play_one(tokenizer, engine, environments, max_response_tokens=3)
    assert engine.limits == [3] and trajectory.response_ids == [11, 12, 13] and trajectory.finish_reason == "length"
    assert environments.turns == []
    # A turn cut by the per-turn limit is answered; the end-of-turn token it lacks comes before the
    # observation, masked.
    lookup = ids_of(tokenizer, "lookup")
    engine = ScriptedEngine([(lookup + [11, 12, 13], "length"), (ids_of(tokenizer, "5") + [eos], "stop")])
    environments = ScriptedEnvironments([StepResult(answer), StepResult(None, reward=1.0, done=True)])
    trajectory = play_one(tokenizer, engine, environments, max_tokens_per_turn=3)
    observation = observation_ids(tokenizer, answer, tools=list(TOOLS))
    assert engine.limits == [3, 3] and environments.turns[0].startswith("lookup")
    assert trajectory.response_ids == lookup + [11, 12] + [eos] + observation + ids_of(tokenizer, "5") + [eos]
    assert trajectory.loss_mask == [True] * 3 + [False] * (1 + len(observation)) + [True] * 2
    assert trajectory.finish_reason == "stop" and trajectory.reward == 1.0
    # An observation that leaves no room for another token is not appended.
    environments = ScriptedEnvironments([StepResult(answer)])
    trajectory = play_one(tokenizer, ScriptedEngine([(call, "stop")]), environments, max_response_tokens=len(call) + 6)
    assert trajectory.response_ids == call and trajectory.finish_reason == "length"


def test_an_environment_failure_ends_the_episode_and_keeps_what_was_sampled(tokenizer):
    eos = tokenizer.eos_token_id
    call = ids_of(tokenizer, "lookup") + [eos]
    environments = ScriptedEnvironments([EpisodeFailure("e0", "timeout", "step took longer than 1 s")])
    trajectory = play_one(tokenizer, ScriptedEngine([(call, "stop")]), environments)
    assert (trajectory.failure, trajectory.response_ids, environments.closed) == ("timeout", call, ["e0"])
    environments = ScriptedEnvironments([], first=EpisodeFailure("e0", "error", "ValueError: bad row"))
    trajectory = play_one(tokenizer, ScriptedEngine([]), environments)
    assert trajectory.failure == "error" and trajectory.response_ids == [] and trajectory.prompt_ids == [1, 14, 2]
    metrics = episode_metrics([trajectory, dataclasses.replace(trajectory, failure=None, turns=2, info={"tool_calls": 2.0})])
    # env/<name> is the mean over the episodes that reported it.
    assert metrics["agent/env_failures"] == 1 and metrics["agent/env_timeouts"] == 0 and metrics["env/tool_calls"] == 2.0


def test_a_first_observation_from_the_environment_replaces_the_dataset_prompt(tokenizer):
    eos = tokenizer.eos_token_id
    messages = [{"role": "user", "content": "key 1 2"}]
    environments = ScriptedEnvironments([StepResult(None, reward=1.0, done=True)], first=messages)
    trajectory = play_one(tokenizer, ScriptedEngine([(ids_of(tokenizer, "4") + [eos], "stop")]), environments)
    rendered = tokenizer.apply_chat_template(messages, tools=list(TOOLS), add_generation_prompt=True, tokenize=False)
    assert trajectory.prompt_ids == ids_of(tokenizer, rendered)


def test_trajectory_metrics():
    trajectories = [
        Trajectory(prompt_ids=[1], response_ids=[5, 6, 7, 8], loss_mask=[True, False, False, True], turns=2, max_turns_reached=True),
        Trajectory(prompt_ids=[1], response_ids=[5, 2], loss_mask=[True, True], turns=1, failure="timeout"),
    ]
    metrics = episode_metrics(trajectories)
    assert metrics["agent/turns_mean"] == 1.5 and metrics["agent/turns_max"] == 2
    assert metrics["agent/observation_token_share"] == pytest.approx(2 / 6) and metrics["agent/episode_length_mean"] == 3
    assert metrics["agent/max_turns_reached"] == 0.5 and metrics["agent/env_timeouts"] == 1
