"""Conversion tools: HF -> distributed checkpoint (EP2) -> HF loads in transformers, same logits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from megarl.config import resolve_model_path
from megarl.models.loader import CheckpointError, HFCheckpoint
from tests.distributed import REPO, run_python, run_torchrun
from tests.jobs import layout_job


@pytest.mark.multirank
def test_convert_round_trip_loads_in_transformers(tmp_path, jobs):
    source = resolve_model_path("bundled:tiny-moe")
    run_torchrun(
        REPO / "tools" / "convert_from_hf.py",
        ["--hf", str(source), "--out", str(tmp_path / "checkpoints"), "--ep", "2"],
        nproc=2,
    )
    out = tmp_path / "hf"
    # A tiny shard limit forces several shards and an index.
    run_python(
        REPO / "tools" / "convert_to_hf.py",
        ["--checkpoint", str(tmp_path / "checkpoints"), "--out", str(out), "--max-shard-gb", "0.0002"],
    )
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").exists()
    converted = transformers.AutoModelForCausalLM.from_pretrained(out)
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    tokens = torch.randint(0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(converted(tokens).logits, original(tokens).logits)
    # And the Megatron model built from the converted directory gives transformers' logits.
    check = layout_job(str(out), "single", {"logits": {}})
    jobs.run([check])
    assert jobs.report(check.name)["logits"]["max_logit_diff"] <= 1e-4


@pytest.mark.cpu
def test_convert_to_hf_without_checkpoint_names_the_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_to_hf.py"), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert str(tmp_path) in result.stderr and "no committed checkpoint" in result.stderr


@pytest.mark.cpu
def test_missing_hf_tensor_names_file_and_tensor(tmp_path):
    tensors = load_file(resolve_model_path("bundled:tiny-dense") / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    checkpoint = HFCheckpoint(tmp_path)
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight is missing"):
        checkpoint.read("model.layers.1.mlp.up_proj.weight", 0, 0, 1)
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.read("model.norm.weight", 0, 0, 10_000)
