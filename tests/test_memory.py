"""The memory table (megarl/config/memory.py) and ``python -m megarl.config --memory``: parameter
counts equal the tensors of the bundled checkpoints, the bytes per GPU follow a hand count on the
tiny MoE, and the command prints the Qwen3-30B-A3B recipe's table from the architecture kept
beside it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from safetensors import safe_open

from megarl.config import load_config, resolve_model_path
from megarl.config.memory import GIB, activation_bytes, memory_rows, parameter_counts
from tests.distributed import REPO

pytestmark = pytest.mark.cpu


def hf_config(name: str) -> dict:
    return json.loads((resolve_model_path(f"bundled:{name}") / "config.json").read_text())


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense", "tiny-qwen2-moe", "tiny-glm4-moe", "tiny-deepseek-v3"])
def test_parameter_counts_equal_the_checkpoints_tensors(name):
    directory = resolve_model_path(f"bundled:{name}")
    stored = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            stored += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    assert parameter_counts(hf_config(name)).total == stored


def test_bytes_per_gpu_follow_the_hand_count_on_the_tiny_moe():
    # tiny-moe: h 64, 4 layers, 8 experts of width 32, 4 heads / 2 key-value groups of 16, untied output layer.
    config = hf_config("tiny-moe")
    h, layers, experts, width, vocab = config["hidden_size"], config["num_hidden_layers"], config["num_local_experts"], config["moe_intermediate_size"], config["vocab_size"]
    heads, groups, head = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    counts = parameter_counts(config)
    assert counts.experts == layers * experts * 3 * h * width
    assert counts.split == layers * (2 * h * heads * head + 2 * h * groups * head) + 2 * vocab * h
    assert counts.replicated == layers * (2 * h + 2 * head + experts * h) + h
    run = load_config(None, ["model.dtype=bf16", "parallel.tensor=2", "parallel.expert=4", "parallel.expert_tensor=1", "train.offload=[params,optimizer]"])
    rows = {row.name: row for row in memory_rows(run, 8, config)}
    dense = counts.split / 2 + counts.replicated  # TP 2, PP 1
    expert = counts.experts / 4  # EP 4 x ETP 1
    assert rows["parameters"].bytes == 2 * (dense + expert) and rows["parameters"].offloaded
    assert rows["gradients"].bytes == 4 * (dense + expert) and not rows["gradients"].offloaded
    # fp32 main weights and two moments, over DP 4 (8 / TP 2) for dense weights, 2 (8 / EP 4) for experts.
    assert rows["optimizer: main weights"].bytes == 4 * (dense / 4 + expert / 2) and rows["optimizer: main weights"].offloaded
    assert rows["optimizer: Adam moments"].bytes == 8 * (dense / 4 + expert / 2) and rows["optimizer: Adam moments"].offloaded
    # An fp32 model's parameters are the main weights.
    assert "optimizer: main weights" not in {row.name for row in memory_rows(load_config(None, []), 2, config)}
    tokens = run.train.micro_batch_size * (run.data.max_prompt_length + run.data.max_response_length)
    assert rows["activations"].bytes == activation_bytes(run, config) == layers * 34 * tokens * h


def test_megarl_config_prints_the_recipes_memory_table_from_the_architecture_beside_it():
    result = subprocess.run(
        [sys.executable, "-m", "megarl.config", "--config", "configs/recipes/qwen3_30b_a3b_8xh100.yaml", "--world-size", "8", "--memory"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "architecture: configs/recipes/architectures/Qwen3-30B-A3B/config.json"
    assert lines[1] == "per GPU, world size 8 (TP 4, PP 1, EP 8, ETP 1, DP 2), device 80 GiB:"
    table = {line[2:33].strip(): float(line[33:].split("GiB")[0]) for line in lines[2:]}
    # 30.53B parameters (Qwen3-30B-A3B's published 30.5B), 4.02B on each GPU.
    assert "4.02B of 30.53B, bf16; offloaded" in result.stdout
    assert table["engines (rollout.mem_fraction)"] == 0.45 * 80
    trainer = table["parameters"] + table["gradients"] + table["optimizer: main weights"] + table["optimizer: Adam moments"]
    assert table["generation, no offload"] == pytest.approx(trainer + 36.0, abs=0.15) and table["generation, no offload"] > 80
    assert table["generation, train.offload"] == 36.0
    assert table["training peak"] == pytest.approx(trainer + table["activations"], abs=0.15) and table["training peak"] < 80
    assert table["start-up"] == pytest.approx(trainer - table["optimizer: Adam moments"] + 36.0, abs=0.15) and table["start-up"] < 80
    # What does not fit is marked: here only the generation without offload.
    assert [line.split()[0] for line in lines if " OVER " in line] == ["generation,"]
    # An absent model without an architecture beside the config: one line saying what is needed.
    missing = subprocess.run(
        [sys.executable, "-m", "megarl.config", "--world-size", "8", "--memory", "model.path=/nowhere/Model"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "megarl.config: `model.path` = '/nowhere/Model': no config.json there (nor architectures/Model/config.json beside the config file): "
        "--memory needs the model's config.json alone, no weights"
    )
    assert GIB == 2**30
