"""Prompt scoring, what a distillation teacher answers: ``/generate`` with ``max_new_tokens`` 0 and
``logprob_start_len`` gives each input token's log-prob, as transformers' own forward gives it."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from megarl.config import resolve_model_path
from megarl.rollout import protocol
from megarl.rollout.embedded.hf_engine import HFEngine, RequestFailed
from tests.rollout.sglang_source import SGLANG, class_fields, needs_sglang

pytestmark = pytest.mark.cpu

DENSE = resolve_model_path("bundled:tiny-dense")
SEQUENCES = [[5, 9, 13], [4, 8, 15, 16, 23, 42, 7], [3, 11, 19, 27, 35, 43, 51, 6, 10, 14, 18]]
"""Odd lengths, so that the batch pads two rows of three."""
STARTS = [0, 3, 6]


@pytest.fixture(scope="module")
def engine():
    return HFEngine(str(DENSE), "float32", seed=0)


def transformers_logprobs(sequence: list[int]) -> list[float]:
    """Each token's log-prob given the tokens before it: one sequence alone through transformers."""
    model = AutoModelForCausalLM.from_pretrained(DENSE, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0].tolist()


def test_the_batched_prompt_logprobs_equal_transformers_own_forward_of_each_sequence(engine):
    body = protocol.prompt_logprobs_body(SEQUENCES, STARTS)
    answer = asyncio.run(engine.generate(body))
    for item, sequence, start in zip(answer, SEQUENCES, STARTS):
        triples = item["meta_info"]["input_token_logprobs"]
        # SGLang's shape: one entry per token from the start, the first without a log-prob.
        assert [token for _, token, _ in triples] == sequence[start:] and triples[0][0] is None
        assert item["output_ids"] == [] and item["meta_info"]["finish_reason"]["type"] == "length"
    parsed = protocol.parse_prompt_logprobs_response(answer, SEQUENCES, STARTS)
    for values, sequence, start in zip(parsed, SEQUENCES, STARTS):
        assert len(values) == len(sequence) - start - 1
        torch.testing.assert_close(torch.tensor(values), torch.tensor(transformers_logprobs(sequence)[start:]), atol=1e-5, rtol=1e-5)


def test_prompt_scoring_refuses_bad_starts_and_logprob_start_len_with_generation(engine):
    with pytest.raises(RequestFailed, match="logprob_start_len"):
        asyncio.run(engine.generate(protocol.prompt_logprobs_body([[5, 9]], [2])))
    body = protocol.generate_body([[5, 9]], [{"max_new_tokens": 2}])
    with pytest.raises(RequestFailed, match="only with max_new_tokens 0"):
        asyncio.run(engine.generate({**body, "logprob_start_len": 0}))


def test_the_parser_refuses_token_ids_other_than_those_sent_and_short_answers():
    item = {"output_ids": [], "meta_info": {"input_token_logprobs": [[None, 9, None], [-0.5, 13, None]]}}
    assert protocol.parse_prompt_logprobs_response([item], [[5, 9, 13]], [1]) == [[-0.5]]
    with pytest.raises(ValueError, match="not the 3 sent from position 0"):
        protocol.parse_prompt_logprobs_response([item], [[5, 9, 13]], [0])
    with pytest.raises(ValueError, match="answered 1 items for a prompt-scoring batch of 2"):
        protocol.parse_prompt_logprobs_response([item], [[5, 9, 13], [5, 9]], [1, 1])
    with pytest.raises(ValueError, match="lacks 'input_token_logprobs'"):
        protocol.parse_prompt_logprobs_response([{"meta_info": {}}], [[5, 9, 13]], [1])
    # SGLang answers id 0 for the vocabulary's last ids; any other id that differs is refused.
    clipped = {"output_ids": [], "meta_info": {"input_token_logprobs": [[None, 9, None], [-0.5, 0, None]]}}
    assert protocol.parse_prompt_logprobs_response([clipped], [[5, 9, 54]], [1]) == [[-0.5]]
    other = {"output_ids": [], "meta_info": {"input_token_logprobs": [[None, 9, None], [-0.5, 7, None]]}}
    with pytest.raises(ValueError, match="not the 2 sent from position 1"):
        protocol.parse_prompt_logprobs_response([other], [[5, 9, 13]], [1])


@needs_sglang
def test_the_prompt_scoring_body_uses_only_fields_of_sglangs_generate_request():
    fields, _ = class_fields(SGLANG / "srt" / "managers" / "io_struct.py", "GenerateReqInput")
    assert set(protocol.prompt_logprobs_body(SEQUENCES, STARTS)) <= fields
