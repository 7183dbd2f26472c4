"""ReferencePolicy: the initial weights swapped in for a pass and the trained ones restored."""

from __future__ import annotations

import pytest
import torch

from megarl.trainer.reference import ReferencePolicy

pytestmark = pytest.mark.cpu


class Router(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 3))
        self.register_buffer("expert_bias", torch.zeros(2))
        self.register_buffer("local_tokens_per_expert", torch.zeros(2))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.router = Router()


class Chunk(torch.nn.Module):
    """Named as Megatron's: ``mlp.router.expert_bias``."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP()


def test_the_reference_holds_the_initial_weights_expert_bias_included_and_the_trained_ones_come_back():
    chunk = Chunk()
    reference = ReferencePolicy([chunk])
    with torch.no_grad():
        chunk.mlp.router.weight.add_(1.0)
        chunk.mlp.router.expert_bias.add_(0.5)  # Megatron's aux-loss-free balancing moved it
        chunk.mlp.router.local_tokens_per_expert.add_(7.0)
    with reference.swapped_in():
        assert torch.equal(chunk.mlp.router.weight, torch.ones(2, 3))
        assert torch.equal(chunk.mlp.router.expert_bias, torch.zeros(2))
        # A counter is no weight: it is left as it is.
        assert torch.equal(chunk.mlp.router.local_tokens_per_expert, torch.full((2,), 7.0))
    assert torch.equal(chunk.mlp.router.weight, torch.full((2, 3), 2.0))
    assert torch.equal(chunk.mlp.router.expert_bias, torch.full((2,), 0.5))
