"""megarl/trainer/rollout.py: ReMax's greedy baselines, from the round's prompts to the advantages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megarl.config import load_config
from megarl.data.datasets import Prompt
from megarl.rollout.sampling import Sample, SamplingParams
from megarl.trainer.batch import ScoredSample, TrainBatch
from megarl.trainer.experience import compute_advantages
from megarl.trainer.rollout import with_greedy_baselines

pytestmark = pytest.mark.cpu


class GreedyEngines:
    """Answers prompt ``i`` with the token ``10 + i`` and records each call's sampling."""

    def __init__(self):
        self.calls: list[SamplingParams] = []

    def generate(self, prompt_ids, sampling):
        self.calls.append(sampling)
        return [
            Sample(prompt_index=index, sample_index=0, response_ids=[10 + index], logprobs=[-0.1], finish_reason="stop",
                   weight_version=None, weight_segments=())
            for index in range(len(prompt_ids))
        ]


def test_every_sample_gets_its_prompts_greedy_score_as_the_remax_baseline():
    config = load_config(None, ["algorithm.advantage_estimator=remax"])
    engines = GreedyEngines()
    # The reward of a greedy answer "[10 + i]" is i / 4: prompt i's baseline.
    scorer = lambda kwargs: SimpleNamespace(scores=[(int(k["response"].strip("[]")) - 10) / 4 for k in kwargs], failures=0, timeouts=0, extras={}, sample_extras=[{}] * len(kwargs))
    run = SimpleNamespace(config=config, engines=engines, score=scorer, tokenizer=SimpleNamespace(decode=lambda ids, **_: str(ids)))
    prompts = [Prompt(prompt_ids=[1 + index], text=f"p{index}", answer=None, metadata={}, source=f"x:{index}") for index in range(3)]
    sampled = [
        ScoredSample(prompt_ids=[1 + prompt], response_ids=[5, 6], rollout_log_probs=[-1.0, -1.0], finish_reason="stop", group=7 + prompt, score=score)
        for prompt, score in [(0, 1.0), (0, 0.0), (1, 1.0), (2, 0.0), (2, 1.0)]
    ]
    sampling = SamplingParams(max_new_tokens=4, temperature=1.0, n=2, seed=3)
    records, greedy_mean = with_greedy_baselines(run, prompts, sampled, sampling, first_group=7, label="step 0")
    assert engines.calls == [SamplingParams(max_new_tokens=4, temperature=0.0, n=1, seed=3)]
    assert [record.baseline for record in records] == [0.0, 0.0, 0.25, 0.5, 0.5]
    assert greedy_mean.value == pytest.approx(0.25) and not greedy_mean.adds_up
    # The baselines travel in the batch (and through share_batch's tensors) to the estimator.
    batch = TrainBatch.from_scored(records, pad_token_id=0, pad_multiple=1)
    batch = TrainBatch.from_tensors(batch.tensors(), pad_multiple=1)
    assert batch.reward_baselines.tolist() == [0.0, 0.0, 0.25, 0.5, 0.5]
    compute_advantages(batch, torch.tensor([record.score for record in records]), config.algorithm, SimpleNamespace(value=0.0))
    advantages = batch.token_values["advantages"]
    expected = [1.0, 0.0, 0.75, -0.5, 0.5]
    for row, value in enumerate(expected):
        assert advantages[row][batch.response_mask[row]].tolist() == pytest.approx([value, value])
