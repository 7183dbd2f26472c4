"""The hf engine in another dtype than its checkpoint (``rollout.dtype``): the model runs in it, the
fp32 weights it is sent are cast to it, and it still generates with its routed experts."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from megarl.config import resolve_model_path
from megarl.rollout import protocol, routed_experts
from megarl.rollout.embedded.hf_engine import HFEngine
from megarl.rollout.routed_experts import RoutingShape

pytestmark = pytest.mark.cpu

MOE = resolve_model_path("bundled:tiny-moe")


def test_a_bf16_engine_runs_in_bf16_and_casts_the_fp32_weights_it_is_sent(tmp_path):
    engine = HFEngine(str(MOE), "bfloat16", seed=0, return_routed_experts=True)
    engine.scheduler.start()
    assert {parameter.dtype for parameter in engine.model.parameters()} == {torch.bfloat16}
    assert engine.server_info({})["dtype"] == "bfloat16" and engine.server_info({})[protocol.RETURNS_ROUTED_EXPERTS] is True
    weights = {name: tensor + 0.01 for name, tensor in load_file(MOE / "model.safetensors").items()}
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    save_file(weights, tmp_path / "model.safetensors")
    engine.update_weights_from_disk({"model_path": str(tmp_path), "weight_version": "1"})
    name = "model.layers.0.mlp.gate.weight"
    assert torch.equal(torch.tensor(engine.get_weights_by_name({"name": name, "truncate_size": 100})), weights[name].to(torch.bfloat16).float())
    body = protocol.generate_body([[5, 9, 13, 4]], [{"max_new_tokens": 6, "sampling_seed": 1}], return_routed_experts=True)
    [item] = asyncio.run(engine.generate(body))
    routes = routed_experts.decode(item["meta_info"]["routed_experts"], RoutingShape(num_layers=4, topk=2))
    assert len(routes) == 4 + len(item["output_ids"]) - 1 and routes.dtype == np.uint8 and routes.max() < 8
