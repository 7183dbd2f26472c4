"""The hf engine's weight map: HF checkpoint names onto a transformers model's parameters, read and
written bitwise, unknown names and shapes refused."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from megarl.config import resolve_model_path
from megarl.rollout.embedded.weights import HFWeightMap

pytestmark = pytest.mark.cpu

MOE = resolve_model_path("bundled:tiny-moe")
DENSE = resolve_model_path("bundled:tiny-dense")


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("path", [MOE, DENSE], ids=["moe", "dense-tied"])
def test_weight_map_reads_and_writes_checkpoint_tensors_bitwise(path, tmp_path):
    model = load(path)
    weights = HFWeightMap(model)
    checkpoint = load_file(path / "model.safetensors")
    assert set(checkpoint) <= weights.names()
    assert all(torch.equal(weights.read(name), tensor) for name, tensor in checkpoint.items())
    draw = torch.Generator().manual_seed(1)
    changed = {name: tensor + torch.randn(tensor.shape, generator=draw) for name, tensor in checkpoint.items()}
    for name, tensor in changed.items():
        weights.load(name, tensor)
    assert all(torch.equal(weights.read(name), tensor) for name, tensor in changed.items())
    directory = tmp_path / "changed"
    directory.mkdir()
    for source in path.iterdir():
        if source.suffix != ".safetensors":
            (directory / source.name).write_bytes(source.read_bytes())
    save_file(changed, directory / "model.safetensors")
    tokens = torch.tensor([[41, 45, 26, 18, 19, 44, 48, 7, 36, 19]])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, load(directory)(tokens).logits)


def test_weight_map_rejects_unknown_names_and_shapes():
    weights = HFWeightMap(load(MOE))
    with pytest.raises(KeyError, match="no checkpoint tensor named"):
        weights.load("model.layers.0.mlp.experts.99.up_proj.weight", torch.zeros(1))
    with pytest.raises(ValueError, match="got shape"):
        weights.load("model.norm.weight", torch.zeros(3))
