"""The distillation teacher in Megatron (``algorithm.opd_type: megatron``) under training layouts
(real processes on gloo, the ``teacher`` check of tests/workers/teacher_check.py): the policy's own
model as the teacher gives the policy's old log-probs, and any teacher gives transformers' log-probs
of the same tokens, packed or padded, fused or from the logits, whether the teacher is dense
beside an MoE policy under expert parallelism (the moe_distill layout), split over tensor-parallel
ranks with sequence parallelism, or cut into pipeline stages; and the teacher is forward only.

The training loop's use of it (every step, the synchronous and the asynchronous rollouts, against
the engine teacher) is in tests/test_train.py and tests/trainer/test_async_rollout.py."""

from __future__ import annotations

import pytest

from tests.hf_models import model_dir
from tests.jobs import layout_job

pytestmark = pytest.mark.multirank

CASES = [
    ("bundled:tiny-moe", "ep2", "bundled:tiny-moe"),  # the policy's own model: the old log-probs
    ("bundled:tiny-moe", "ep2", "bundled:tiny-teacher"),  # dense, twice as wide, beside the MoE under EP 2
    ("bundled:tiny-moe", "tp2-sp", "bundled:tiny-teacher"),
    ("bundled:tiny-dense", "pp2", "bundled:tiny-dense"),  # tied embeddings, the last stage's copy; from the logits
]
UNFUSED = {("bundled:tiny-dense", "pp2")}
"""The policies and layouts run with ``train.fused_linear_logprob`` false (the vocab-parallel logits)."""
SAME_MODEL_TOLERANCE = 1e-5
TRANSFORMERS_TOLERANCE = 1e-5
"""fp32: rounding only."""


def teacher_jobs(directory, model, layout):
    """One job per policy and layout, for all the teachers :data:`CASES` give them."""
    teachers = [model_dir(directory, teacher) for case_model, case_layout, teacher in CASES if (case_model, case_layout) == (model, layout)]
    options = {"teachers": teachers, "fused_linear_logprob": (model, layout) not in UNFUSED}
    return [layout_job(model_dir(directory, model), layout, {"teacher": options})]


@pytest.mark.jobs(planner=teacher_jobs)
@pytest.mark.parametrize("model,layout,teacher", CASES)
def test_the_megatron_teacher_scores_the_batch_as_transformers_and_as_the_policy_when_it_is_the_policy(model, layout, teacher, jobs):
    (job,) = teacher_jobs(jobs.directory, model, layout)
    report = jobs.report(job.name)["teacher"][model_dir(jobs.directory, teacher)]
    assert report["tokens"] > 0 and report["log_prob_mean"] < 0 and report["outside_mask"] == 0, report
    assert report["transformers_diff"] <= TRANSFORMERS_TOLERANCE, report
    if teacher == model:
        assert report["policy_diff"] <= SAME_MODEL_TOLERANCE, report
    else:
        assert report["policy_diff"] > 0.1, report  # another model
    # A dense teacher is built without the layout's expert parallelism, an MoE one with it.
    expert_parallel = 2 if layout == "ep2" and teacher == "bundled:tiny-moe" else 1
    for rank in report["ranks"]:
        assert rank["frozen"] and rank["eval"] and rank["no_optimizer"] and rank["update_refused"] and rank["no_ddp"], report
        assert rank["own_parameters"], report
        assert rank["expert_parallel"] == expert_parallel and rank["fused"] == ((model, layout) not in UNFUSED), report
