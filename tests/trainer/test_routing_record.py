"""R2's record (expert + 1, 0 where no rank wrote) back into the batch's routed experts."""

from __future__ import annotations

import pytest
import torch

from megarl.trainer.batch import routing_filler
from megarl.trainer.routing import recorded_experts

pytestmark = pytest.mark.cpu


@pytest.mark.parametrize("experts,wire,dtype", [(8, torch.uint8, torch.uint8), (256, torch.int32, torch.uint8), (384, torch.int32, torch.int16)])
def test_every_expert_id_comes_back_and_unwritten_tokens_get_the_filler(experts, wire, dtype):
    # Two rows of 5 tokens, 1 MoE layer, top 2; row 1's last two tokens were never written.
    ids = torch.tensor([[0, experts - 1], [1, experts - 2], [experts // 2, 3], [4, 5], [6, 7]])
    recorded = torch.stack([ids + 1, ids + 1])[:, :, None, :].to(wire)
    recorded[1, 3:] = 0
    routed = recorded_experts(recorded, topk=2, num_experts=experts)
    assert routed.dtype == dtype
    assert routed[0, :, 0].tolist() == ids.tolist()
    assert routed[1, :3, 0].tolist() == ids[:3].tolist()
    assert routed[1, 3:, 0].tolist() == routing_filler(5, 2, experts)[3:].tolist()
