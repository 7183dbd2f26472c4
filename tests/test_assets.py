"""The bundled tokenizer, tiny models and toy datasets."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megarl.config import PACKAGE_DIR, resolve_data_path, resolve_model_path
from megarl.rewards.toy import toy_reward
from tests.distributed import REPO

pytestmark = pytest.mark.cpu

ASSETS = PACKAGE_DIR / "assets"
MODELS = ["tiny-dense", "tiny-moe", "tiny-qwen2-moe", "tiny-glm4-moe", "tiny-deepseek-v3"]


VERSION_STAMPS = {"transformers_version"}
"""Keys of a saved config that name the library version that wrote it, not the model."""


def load_make_assets():
    spec = importlib.util.spec_from_file_location("make_assets", REPO / "tools" / "make_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def contents(path: Path):
    """What a file of the assets holds, independent of the versions of the libraries that wrote
    it: tensors (name -> dtype, shape, bytes) for safetensors, parsed values without version
    stamps for JSON, the bytes of anything else."""
    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as handle:
            return {
                name: (str(tensor.dtype), tuple(tensor.shape), tensor.contiguous().view(torch.uint8).numpy().tobytes())
                for name in sorted(handle.keys())
                for tensor in [handle.get_tensor(name)]
            }
    if path.suffix == ".json":
        return {key: value for key, value in json.loads(path.read_text()).items() if key not in VERSION_STAMPS}
    return path.read_bytes()


def tree(root: Path) -> dict[str, object]:
    return {
        str(path.relative_to(root)): contents(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "__init__.py" and "__pycache__" not in path.parts
    }


def test_assets_regenerate_with_the_same_tensors_configs_and_files(tmp_path):
    make_assets = load_make_assets()
    tokenizer = make_assets.build_tokenizer(tmp_path / "tokenizer")
    make_assets.build_models(tmp_path / "models", tmp_path / "tokenizer", tokenizer)
    make_assets.build_toy_data(tmp_path / "data" / "toy")
    make_assets.build_data(tmp_path / "data" / "lookup", make_assets.lookup_rows())
    generated, bundled = tree(tmp_path), tree(ASSETS)
    assert generated.keys() == bundled.keys()
    assert [name for name in bundled if generated[name] != bundled[name]] == []


def test_the_asset_comparison_sees_weights_and_configs_but_not_version_stamps(tmp_path):
    model = ASSETS / "models" / "tiny-dense"
    for file in model.iterdir():
        shutil.copy2(file, tmp_path / file.name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["transformers_version"] = "0.0.1"
    (tmp_path / "config.json").write_text(json.dumps(config, indent=3))
    assert tree(tmp_path) == tree(model)
    config["rms_norm_eps"] = 1e-5
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert tree(tmp_path)["config.json"] != tree(model)["config.json"]
    tensors = load_file(model / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = torch.nextafter(tensors[name].view(-1)[0], torch.tensor(1.0))
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert tree(tmp_path)["model.safetensors"] != tree(model)["model.safetensors"]


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
    glm = json.loads((resolve_model_path("bundled:tiny-glm4-moe") / "config.json").read_text())
    # Group-limited routing, a dense first layer, half the head dims rotary.
    assert glm["n_group"] > glm["topk_group"] and glm["first_k_dense_replace"] == 1
    assert glm["rope_parameters"]["partial_rotary_factor"] == 0.5 and glm["n_shared_experts"] == 1
    bias = load_file(resolve_model_path("bundled:tiny-glm4-moe") / "model.safetensors")["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert (bias != 0).all()


def test_deepseek_v3_asset_routes_with_groups_and_a_non_zero_expert_bias():
    directory = resolve_model_path("bundled:tiny-deepseek-v3")
    config = json.loads((directory / "config.json").read_text())
    assert config["q_lora_rank"] and config["first_k_dense_replace"] == 1 and config["routed_scaling_factor"] != 1
    assert config["topk_group"] < config["n_group"] and config["n_shared_experts"] == 1
    with safe_open(directory / "model.safetensors", "pt") as checkpoint:
        biases = [checkpoint.get_tensor(name) for name in checkpoint.keys() if name.endswith("e_score_correction_bias")]
    assert len(biases) == config["num_hidden_layers"] - 1 and all(bias.abs().min() > 0 for bias in biases)
    assert (directory / "model.safetensors").stat().st_size < 2**20


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


def test_lookup_dataset_hides_the_answer_behind_a_key():
    train, val = load_rows("bundled:lookup/train.jsonl"), load_rows("bundled:lookup/val.jsonl")
    assert (len(train), len(val)) == (800, 200)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    for row in train + val:
        assert set(row) == {"prompt", "answer", "task"} and row["answer"] in list("0123456789")
        assert tokenizer.unk_token_id not in tokenizer(row["prompt"])["input_ids"]
        if row["task"] == "copy":
            assert row["prompt"] == f"copy {row['answer']}"
        else:
            # A lookup prompt names its key in words: no digit, so the answer is not in it.
            assert row["task"] == "lookup" and row["prompt"].startswith("key ") and not any(c.isdigit() for c in row["prompt"])
    assert {row["task"] for row in val} == {"lookup"} and sum(row["task"] == "copy" for row in train) == 400
    # Validation keys are not trained on.
    assert not {row["prompt"] for row in val} & {row["prompt"] for row in train}


def test_chat_template_lists_the_tools_and_renders_tool_turns():
    tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    lookup = {"type": "function", "function": {"name": "lookup", "description": "", "parameters": {"type": "object", "properties": {}}}}
    messages = [{"role": "user", "content": "key 4 7"}, {"role": "assistant", "content": "lookup"}, {"role": "tool", "content": "3"}]
    text = tokenizer.apply_chat_template(messages, tools=[lookup], add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\ntool lookup\n<|im_end|>\n<|im_start|>user\nkey 4 7<|im_end|>\n"
        "<|im_start|>assistant\nlookup<|im_end|>\n<|im_start|>tool\n3<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokens_added_after_the_first_release_leave_the_earlier_weights_as_they_were():
    # A model of the first release's vocabulary, filled the same way, is the bundled one without the
    # rows of the added tokens: every earlier weight kept its value.
    make_assets = load_make_assets()
    first = make_assets.FIRST_VOCABULARY
    assert make_assets.VOCABULARY[first:] == make_assets.AGENT_WORDS
    configs = make_assets.model_configs(first, eos=2, pad=0)
    for seed, (name, config) in enumerate(configs.items()):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        make_assets.fill_deterministically(model, seed)
        bundled = load_file(resolve_model_path(f"bundled:{name}") / "model.safetensors")
        for key, value in model.state_dict().items():
            if key in bundled:
                assert torch.equal(bundled[key][: value.shape[0]], value), (name, key)
        assert bundled["model.embed_tokens.weight"].shape[0] == first + len(make_assets.AGENT_WORDS)
