"""A HF checkpoint is read whole or not at all: every tensor is one the model uses, every file is
complete, and a problem names the directory, file or tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megarl.config import resolve_model_path
from megarl.models.loader import CheckpointError, HFCheckpoint, load_hf_config

pytestmark = pytest.mark.cpu

DENSE = resolve_model_path("bundled:tiny-dense")


def copy_with(tmp_path, change) -> HFCheckpoint:
    """The bundled tiny dense model in ``tmp_path``, its tensors changed by ``change(dict)``."""
    for file in DENSE.iterdir():
        if file.name != "model.safetensors":
            shutil.copy2(file, tmp_path / file.name)
    tensors = load_file(DENSE / "model.safetensors")
    change(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return HFCheckpoint(tmp_path)


def test_a_tensor_the_model_would_not_use_is_refused_by_name(tmp_path):
    # The shape of the bug this catches: a Llama with attention_bias=True has o_proj biases that
    # a loader without the rule would drop.
    checkpoint = copy_with(tmp_path, lambda tensors: tensors.update({"model.layers.1.self_attn.o_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: 1 tensor\(s\) the qwen3 model would not use \(model.layers.1.self_attn.o_proj.bias\)"):
        checkpoint.check_names(load_hf_config(DENSE))


def test_missing_tensors_are_named_with_a_count(tmp_path):
    def drop(tensors):
        for name in [name for name in tensors if name.startswith("model.layers.1.mlp.")]:
            del tensors[name]

    checkpoint = copy_with(tmp_path, drop)
    with pytest.raises(CheckpointError, match=r"3 tensor\(s\) the model needs are missing \(model.layers.1.mlp.down_proj.weight, "):
        checkpoint.check_names(load_hf_config(DENSE))


def test_tied_output_and_rotary_buffers_are_what_transformers_ignores_too(tmp_path):
    def add(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    copy_with(tmp_path, add).check_names(load_hf_config(DENSE))


def test_a_truncated_file_is_named_when_the_checkpoint_is_opened(tmp_path):
    copy_with(tmp_path, lambda tensors: None)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{weights}: not a complete safetensors file \(.*\); copy or download it again"):
        HFCheckpoint(tmp_path)


def test_an_index_naming_an_absent_shard_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: listed in model.safetensors.index.json but does not exist"):
        HFCheckpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a safetensors index"):
        HFCheckpoint(tmp_path)


def test_multi_token_prediction_layers_are_accepted_where_the_config_announces_them(tmp_path):
    glm = resolve_model_path("bundled:tiny-glm4-moe")
    for file in glm.iterdir():
        shutil.copy2(file, tmp_path / file.name)
    tensors = load_file(glm / "model.safetensors")
    # The bundled model has 4 layers: GLM-4.5 stores its MTP layer as layer 4.
    tensors.update({"model.layers.4.eh_proj.weight": torch.zeros(64, 128), "model.layers.4.mlp.gate.weight": torch.zeros(8, 64)})
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\) the glm4_moe model would not use \(model.layers.4.eh_proj.weight, model.layers.4.mlp.gate.weight\)"):
        HFCheckpoint(tmp_path).check_names(load_hf_config(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    HFCheckpoint(tmp_path).check_names(load_hf_config(tmp_path))
