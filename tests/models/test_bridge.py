"""HF <-> Megatron bridge: logits match transformers under every layout, and HF -> Megatron -> HF
is bitwise (real processes on gloo)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from megarl.config import resolve_model_path
from tests.distributed import REPO, run_python, run_torchrun

pytestmark = pytest.mark.multirank

WORKER = REPO / "tests" / "workers" / "bridge_check.py"
LOGIT_TOLERANCE = 1e-4

LAYOUTS = {
    "single": [],
    "tp2": ["--tp", "2"],
    "tp2-sp": ["--tp", "2", "--sp"],
    "pp2": ["--pp", "2"],
    "pp2-vpp2": ["--pp", "2", "--vpp", "2"],
    "ep2": ["--ep", "2"],
    "cp2": ["--cp", "2"],
}
# (model, layouts): Megatron needs SP with TP on MoE models; EP only applies to MoE.
CASES = [
    ("bundled:tiny-dense", ["single", "tp2", "tp2-sp", "pp2", "pp2-vpp2", "cp2"]),
    ("bundled:tiny-moe", ["single", "tp2-sp", "pp2", "ep2", "cp2"]),
    ("bundled:tiny-qwen2-moe", ["single", "tp2-sp", "pp2", "ep2"]),
    ("llama", ["single", "tp2", "pp2"]),
    ("qwen2", ["single", "tp2-sp", "pp2"]),
]


def make_tiny(family: str, directory) -> str:
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
    return str(directory)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    directories = {}
    for model, _ in CASES:
        if model.startswith("bundled:"):
            directories[model] = str(resolve_model_path(model))
        else:
            directories[model] = make_tiny(model, tmp_path_factory.mktemp(model))
    return directories


@pytest.mark.parametrize(
    "model,layout", [(model, layout) for model, layouts in CASES for layout in layouts]
)
def test_logits_and_round_trip(model, layout, model_dirs, tmp_path):
    report_path = tmp_path / "report.json"
    args = ["--model", model_dirs[model], "--report", str(report_path), *LAYOUTS[layout]]
    if layout == "single":
        run_python(WORKER, args)
    else:
        run_torchrun(WORKER, args, nproc=2)
    report = json.loads(report_path.read_text())
    assert report["max_logit_diff"] <= LOGIT_TOLERANCE, report
    assert report["missing"] == [] and report["extra"] == [], report
    assert report["unequal"] == [], report
