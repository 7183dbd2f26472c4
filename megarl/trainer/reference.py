"""The reference policy for KL terms, without a second model on the device.

The reference is the policy at the start of the run. Its weights are kept as a host copy of this
rank's shards; :meth:`ReferencePolicy.swapped_in` parks the trained weights on the host, copies the
reference into the policy's parameters for a forward pass and restores the trained weights
afterwards: the reference costs host memory (two copies of the local shards) and four
host-device copies per use, not a second model's device memory. Build it before loading a
checkpoint, so that a resumed run keeps the run's initial policy as its reference.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from megarl.models.loader import model_weights


class ReferencePolicy:
    """A frozen copy of the policy's initial weights.

    Args:
        chunks: the policy's model chunks (unwrapped), holding the initial weights (parameters and
            weight buffers, :func:`megarl.models.loader.model_weights`).
    """

    def __init__(self, chunks: list):
        # Parameters and the buffers that are weights (a sigmoid router's expert bias, which
        # Megatron's aux-loss-free balancing moves with model.moe_router_bias_update_rate).
        self._parameters = [tensor for chunk in chunks for _, tensor in model_weights(chunk)]
        self._reference = [param.detach().to("cpu", copy=True) for param in self._parameters]
        if torch.cuda.is_available():
            self._reference = [tensor.pin_memory() for tensor in self._reference]

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the policy's parameters hold the reference weights."""
        trained = [param.detach().to("cpu", copy=True) for param in self._parameters]
        with torch.no_grad():
            for param, reference in zip(self._parameters, self._reference):
                param.copy_(reference, non_blocking=True)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, weights in zip(self._parameters, trained):
                    param.copy_(weights)
