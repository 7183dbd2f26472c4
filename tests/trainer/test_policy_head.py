"""The policy's hidden-states head in the output layer's place (tests/workers/head_check.py): the
same parameters under the same names, the same checkpoint layout, and hidden states that give the
logits when multiplied by the output weight, and the sum of squared probabilities the reference
gives from either, with tied and untied embeddings, under pipeline and sequence parallelism."""

from __future__ import annotations

import pytest

from tests.hf_models import model_dir
from tests.jobs import layout_job

pytestmark = pytest.mark.multirank

LOGIT_TOLERANCE = 1e-5
SUM_PI_SQUARED_TOLERANCE = 1e-6

CASES = [
    ("bundled:tiny-dense", "single"),  # tied: the first stage's output weight is the embedding
    ("bundled:tiny-dense", "pp2"),  # tied: the last stage holds its own copy
    ("bundled:tiny-dense", "tp2-sp"),  # the head gathers the sequence
    ("bundled:tiny-moe", "single"),  # untied
]


def head_jobs(directory, model, layout):
    return [layout_job(model_dir(directory, model), layout, {"head": {}})]


@pytest.mark.jobs(planner=head_jobs)
@pytest.mark.parametrize("model,layout", CASES)
def test_the_hidden_states_head_keeps_the_output_layer_weight_and_checkpoint(model, layout, jobs):
    (job,) = head_jobs(jobs.directory, model, layout)
    report = jobs.report(job.name)["head"]
    ranks = report["ranks"]
    assert all(rank["same_parameters"] and rank["same_checkpoint_layout"] and rank["checkpoint_keys"] > 0 for rank in ranks), report
    last_stage = [rank for rank in ranks if rank["outputs"]]
    assert last_stage and all(rank["outputs"] == 2 and rank["hidden_size"] == report["hidden_size"] for rank in last_stage), report
    assert max(rank["max_logit_diff"] for rank in last_stage) <= LOGIT_TOLERANCE, report
    assert max(rank["max_sum_pi_squared_error"] for rank in last_stage) <= SUM_PI_SQUARED_TOLERANCE, report
