"""A 2-process (EP2) Megatron model's weights reach an engine through the weight stream, over
the tensor and the broadcast transports: the engine then holds exactly the exporter's HF tensors
and generates accordingly."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from megarl.config import resolve_model_path
from megarl.rollout import EngineGroup, SamplingParams
from megarl.rollout.embedded.weights import HFWeightMap
from tests.distributed import REPO, run_torchrun
from tests.workers.engine_weights import read_weights

pytestmark = pytest.mark.multirank

MODEL = resolve_model_path("bundled:tiny-moe")
WORKER = REPO / "tests" / "workers" / "rollout_update_check.py"
PROMPTS = [[5, 9, 13, 4], [7, 8], [20, 21, 22, 23, 24], [30, 31, 32]]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


def test_megatron_weights_stream_into_the_engine_bitwise(tmp_path):
    with EngineGroup.launch("hf", MODEL, hf_threads=1, log_dir=tmp_path / "logs", health_check_interval_s=3600, startup_timeout_s=120) as engines:
        before = engines.generate(PROMPTS, GREEDY)
        run_torchrun(
            WORKER,
            [
                "--model", str(MODEL), "--ep", "2", "--engine-url", engines.engines[0].url, "--transports", "tensor,nccl",
                "--report", str(tmp_path / "report.json"), "--exported", str(tmp_path / "exported.safetensors"),
            ],
            nproc=2,
        )
        after = engines.generate(PROMPTS, GREEDY)
        exported = load_file(tmp_path / "exported.safetensors")
        last_weights = read_weights(engines, exported)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report == {"tensor": [], "nccl": []}, f"the engine's weights differ from the exporter's: {report}"
    assert set(exported) == set(load_file(MODEL / "model.safetensors"))
    assert all(torch.equal(last_weights[name], tensor) for name, tensor in exported.items())
    assert all(sample.weight_version == "2" for sample in after)
    assert [sample.response_ids for sample in after] != [sample.response_ids for sample in before]
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    weight_map = HFWeightMap(model)
    for name, tensor in exported.items():
        weight_map.load(name, tensor)
    for sample in after:
        prompt = PROMPTS[sample.prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + sample.response_ids])).logits[0, len(prompt) - 1 : -1]
        assert sample.response_ids == logits.argmax(-1).tolist()
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(sample.response_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-5, rtol=0)
