"""HF <-> Megatron bridge: logits match transformers under every layout, and HF -> Megatron -> HF
is bitwise (real processes on gloo, shared with the other layout checks: tests/jobs.py)."""

from __future__ import annotations

import pytest
import torch
import transformers

from megarl.config import resolve_model_path
from tests.jobs import layout_job

pytestmark = pytest.mark.multirank

LOGIT_TOLERANCE = 1e-4

# (model, layouts): Megatron needs SP with TP on MoE models; EP only applies to MoE.
CASES = [
    ("bundled:tiny-dense", ["single", "tp2", "tp2-sp", "pp2", "pp2-vpp2", "cp2"]),
    ("bundled:tiny-moe", ["single", "tp2-sp", "pp2", "ep2", "cp2"]),
    ("bundled:tiny-qwen2-moe", ["single", "tp2-sp", "pp2", "ep2"]),
    ("llama", ["single", "tp2", "pp2"]),
    ("qwen2", ["single", "tp2-sp", "pp2"]),
]


def make_tiny(family: str, directory) -> None:
    """A random tiny HF checkpoint of a family that has no bundled asset."""
    common = dict(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
    )
    config = {
        "llama": transformers.LlamaConfig(**common, tie_word_embeddings=False),
        "qwen2": transformers.Qwen2Config(**common, tie_word_embeddings=True),
    }[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                # Random biases, so a dropped or misplaced bias shows in the logits.
                param.normal_()
    model.save_pretrained(directory)


def model_dir(directory, model: str) -> str:
    """A bundled model's directory, or the tiny checkpoint of a family made under ``directory``."""
    if model.startswith("bundled:"):
        return str(resolve_model_path(model))
    path = directory / "hf-models" / model
    if not path.exists():
        make_tiny(model, path)
    return str(path)


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
