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


class ReferencePolicy:
    """A frozen copy of the policy's initial weights.

    Args:
        chunks: the policy's model chunks (unwrapped), holding the initial weights.
    """

    def __init__(self, chunks: list):
        self._parameters = [param for chunk in chunks for param in chunk.parameters()]
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
