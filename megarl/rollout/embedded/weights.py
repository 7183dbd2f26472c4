"""Where each HF checkpoint tensor lives in a transformers model, for in-place weight updates.

transformers (>= 5) does not always keep checkpoint tensors as they are saved: Qwen3-MoE fuses
the per-expert ``mlp.experts.{e}.gate_proj/up_proj.weight`` into one ``mlp.experts.gate_up_proj``
parameter ``[experts, 2 * moe_intermediate, hidden]`` and stacks ``down_proj``. Its own
``revert_weight_conversion`` (what ``save_pretrained`` uses) maps parameters back to checkpoint
names. Running it over *element indices* instead of weights shows where every checkpoint tensor's
elements sit in the parameters; each one found to be a contiguous range becomes a view, so an
update is a plain ``copy_`` and reading a weight back gives exactly its bytes. Tied weights
(``lm_head`` tied to ``embed_tokens``) share one storage, so updating either name updates both.
"""

from __future__ import annotations

import bisect

import torch
from transformers.core_model_loading import revert_weight_conversion


class HFWeightMap:
    """HF checkpoint names -> views of a model's parameters (and persistent buffers)."""

    def __init__(self, model: torch.nn.Module):
        state = model.state_dict()
        owners: list[torch.Tensor] = []
        starts: list[int] = []
        first_index: dict[tuple[int, int, tuple[int, ...]], int] = {}
        index_state = {}
        total = 0
        for name, tensor in state.items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key not in first_index:
                first_index[key] = total
                owners.append(tensor)
                starts.append(total)
                total += tensor.numel()
            base = first_index[key]
            index_state[name] = torch.arange(base, base + tensor.numel()).view(tensor.shape)
        self._views: dict[str, torch.Tensor] = {}
        for hf_name, indices in revert_weight_conversion(model, index_state).items():
            flat = indices.reshape(-1)
            first = int(flat[0]) if flat.numel() else 0
            owner_index = bisect.bisect_right(starts, first) - 1
            owner, start = owners[owner_index], starts[owner_index]
            expected = torch.arange(first, first + flat.numel())
            if not torch.equal(flat, expected) or first + flat.numel() > start + owner.numel():
                raise NotImplementedError(
                    f"hf engine: checkpoint tensor {hf_name} is not a contiguous range of one parameter of "
                    f"{type(model).__name__}; in-place updates of this model family are not supported by the hf engine"
                )
            local = first - start
            self._views[hf_name] = owner.reshape(-1)[local : local + flat.numel()].view(indices.shape)

    def names(self) -> set[str]:
        """Every checkpoint name the model accepts."""
        return set(self._views)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of checkpoint tensor ``name`` (KeyError if the model has none)."""
        return tuple(self._views[name].shape)

    def load(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor into the model (cast to the parameter's dtype).

        Raises:
            KeyError: the model has no such checkpoint tensor.
            ValueError: the shape differs from the checkpoint's.
        """
        view = self._views.get(name)
        if view is None:
            raise KeyError(f"the model has no checkpoint tensor named {name!r}")
        if tuple(tensor.shape) != tuple(view.shape):
            raise ValueError(f"checkpoint tensor {name}: got shape {list(tensor.shape)}, the model holds {list(view.shape)}")
        with torch.no_grad():
            view.copy_(tensor)

    def read(self, name: str) -> torch.Tensor:
        """A copy of one checkpoint tensor as the model holds it.

        Raises:
            KeyError: the model has no such checkpoint tensor.
        """
        if name not in self._views:
            raise KeyError(f"the model has no checkpoint tensor named {name!r}")
        return self._views[name].clone()
