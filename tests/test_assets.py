"""The bundled tokenizer, tiny models and toy datasets."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import transformers

from megarl.config import PACKAGE_DIR, resolve_data_path, resolve_model_path
from megarl.rewards.toy import toy_reward
from tests.distributed import REPO

pytestmark = pytest.mark.cpu

ASSETS = PACKAGE_DIR / "assets"
MODELS = ["tiny-dense", "tiny-moe", "tiny-qwen2-moe"]


def digest(root):
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.parts[-1] != "__init__.py" and "__pycache__" not in path.parts
    }


def test_assets_regenerate_bit_for_bit(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_assets.py"), "--out", str(tmp_path)],
        check=True, capture_output=True, timeout=300,
    )
    assert digest(tmp_path) == digest(ASSETS)


def test_tokenizer_chat_template_and_round_trip():
    tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "max 3 8 1"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nmax 3 8 1<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for row in load_rows("bundled:toy/train.jsonl")[:50]:
        ids = tokenizer(row["prompt"])["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == row["prompt"]


@pytest.mark.parametrize("name", MODELS)
def test_models_load_in_transformers(name):
    directory = resolve_model_path(f"bundled:{name}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.vocab_size == len(tokenizer)
    logits = model(torch.tensor([tokenizer("max 3 8 1")["input_ids"]])).logits
    assert torch.isfinite(logits).all()


def test_moe_asset_shape():
    config = json.loads((resolve_model_path("bundled:tiny-moe") / "config.json").read_text())
    assert config["num_local_experts"] >= 8 and config["num_experts_per_tok"] == 2
    qwen2_moe = json.loads((resolve_model_path("bundled:tiny-qwen2-moe") / "config.json").read_text())
    assert qwen2_moe["shared_expert_intermediate_size"] > 0


def load_rows(name):
    return [json.loads(line) for line in resolve_data_path(name).read_text().splitlines()]


def test_toy_datasets():
    train, val = load_rows("bundled:toy/train.jsonl"), load_rows("bundled:toy/val.jsonl")
    assert (len(train), len(val)) == (800, 200)
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in val}
    for row in train + val:
        assert set(row) == {"prompt", "answer", "task"}
        assert toy_reward(row["answer"], row["answer"]) == 1.0
    assert {row["task"] for row in train + val} == {"max"}
    assert all(row["answer"] == max(row["prompt"].split()[1:]) for row in train + val)
