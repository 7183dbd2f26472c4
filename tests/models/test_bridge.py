"""HF <-> Megatron bridge: logits match transformers under every layout, and HF -> Megatron -> HF
is bitwise (real processes on gloo, shared with the other layout checks: tests/jobs.py)."""

from __future__ import annotations

import pytest

from tests.hf_models import model_dir
from tests.jobs import layout_job

pytestmark = pytest.mark.multirank

LOGIT_TOLERANCE = 1e-4

# (model, layouts): Megatron needs SP with TP on MoE models; EP only applies to MoE. Models without
# "bundled:" are made in the test (tests/hf_models.py).
CASES = [
    ("bundled:tiny-dense", ["single", "tp2", "tp2-sp", "pp2", "pp2-vpp2", "cp2"]),
    ("bundled:tiny-moe", ["single", "tp2-sp", "pp2", "ep2", "cp2"]),
    ("bundled:tiny-qwen2-moe", ["single", "tp2-sp", "pp2", "ep2"]),
    ("bundled:tiny-glm4-moe", ["single", "tp2-sp", "pp2", "ep2"]),
    # 2 key/value heads over 4 ranks: each goes to two of them.
    ("llama", ["single", "tp2", "pp2", "tp4"]),
    ("qwen2", ["single", "tp2-sp", "pp2"]),
    ("llama-attention-bias", ["single", "tp2-sp"]),
    ("qwen3-attention-bias", ["single", "tp2"]),
    ("llama3-rope", ["single", "pp2"]),
    ("llama-1-kv-head", ["tp2"]),
    ("glm4-moe-variant", ["single", "tp2-sp"]),
    # Multi-latent attention, sigmoid routing with expert bias, group-limited top-k, shared experts.
    ("bundled:tiny-deepseek-v3", ["single", "tp2-sp", "pp2", "ep2"]),
    ("moonlight", ["single", "tp2-sp"]),
]


def bridge_jobs(directory, model, layout):
    return [layout_job(model_dir(directory, model), layout, {"logits": {}})]


@pytest.mark.jobs(planner=bridge_jobs)
@pytest.mark.parametrize(
    "model,layout", [(model, layout) for model, layouts in CASES for layout in layouts]
)
def test_logits_and_round_trip(model, layout, jobs):
    (job,) = bridge_jobs(jobs.directory, model, layout)
    report = jobs.report(job.name)["logits"]
    assert report["max_logit_diff"] <= LOGIT_TOLERANCE, report
    assert report["missing"] == [] and report["extra"] == [], report
    assert report["unequal"] == [], report


@pytest.mark.jobs(planner=lambda directory: bridge_jobs(directory, "glm4-moe-variant", "single"))
def test_multi_token_prediction_layers_are_loaded_past_and_not_exported(jobs):
    (job,) = bridge_jobs(jobs.directory, "glm4-moe-variant", "single")
    report = jobs.report(job.name)["logits"]
    # Layer 2 of a two-layer model: its tensors are in the checkpoint, in no export.
    assert report["ignored"] and all(name.startswith("model.layers.2.") for name in report["ignored"]), report
    assert report["missing"] == [] and report["extra"] == [], report
