"""The ``hf`` engine's routed experts: what its MoE routers chose for every token, as SGLang returns them.

transformers' MoE blocks (Qwen3-MoE, Qwen2-MoE, DeepSeek-V3, GLM-4.5) call their router as
``mlp.gate(hidden)``, which returns ``(router_logits, topk_weights, topk_indices)`` with
``topk_indices: [tokens, num_experts_per_tok]`` over the forward's ``batch x columns`` tokens, row
major. :class:`RouterRecorder` keeps the last forward's indices of every MoE layer through forward
hooks on those gates; :class:`BatchRoutes` files them into the batch's token columns as
:class:`~megarl.rollout.embedded.generate.BatchGenerator` runs its forwards (the prefill of the
distinct prompts, one column per decoding step, every column again after a dropped cache), so that
a row's routes are always those of the forward that last computed each of its tokens.

A row's routes (:meth:`BatchRoutes.of_row`) are SGLang's: ``[prompt + output - 1, num_layers, topk]``
int32, every prompt token and every generated token but the last (sampled, never fed). The rows
of dense layers are 0.
"""

from __future__ import annotations

import re

import torch

_GATE_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.gate$")
"""A decoder layer's MoE router in transformers (``model.layers.{i}.mlp.gate``); a dense MLP has ``gate_proj``."""


class RouterRecorder:
    """Forward hooks on every MoE layer's router of a transformers model.

    Args:
        model: a transformers causal LM with MoE layers.

    Raises:
        ValueError: the model has no MoE router to record.
    """

    def __init__(self, model: torch.nn.Module):
        config = model.config.get_text_config()
        self.num_layers: int = config.num_hidden_layers
        self.topk: int = getattr(config, "num_experts_per_tok", 0)
        self._captured: dict[int, torch.Tensor] = {}
        gates = {}
        for name, module in model.named_modules():
            match = _GATE_NAME.search(name)
            if match and int(match.group(1)) < self.num_layers:
                gates[int(match.group(1))] = module
        if not gates or not self.topk:
            raise ValueError(
                f"{type(model).__name__} has no MoE router (no `layers.N.mlp.gate` module), so the hf engine has no routed "
                "experts to return; start it without --enable-return-routed-experts"
            )
        for layer, gate in gates.items():
            gate.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def capture(module: torch.nn.Module, inputs, output) -> None:
            if not (isinstance(output, tuple) and len(output) == 3 and output[2].shape[-1] == self.topk):
                raise RuntimeError(
                    f"the router of layer {layer} ({type(module).__name__}) does not return (logits, weights, indices of "
                    f"{self.topk} experts); the hf engine cannot record this model's routed experts"
                )
            self._captured[layer] = output[2]

        return capture

    def take(self, rows: int, columns: int) -> torch.Tensor:
        """The last forward's routes, ``[rows, columns, num_layers, topk]`` int32 on the CPU (0 in
        dense layers), and forget them. ``rows x columns`` must be that forward's input shape."""
        routes = torch.zeros(rows, columns, self.num_layers, self.topk, dtype=torch.int32)
        for layer, indices in self._captured.items():
            routes[:, :, layer] = indices.reshape(rows, columns, self.topk).to("cpu", torch.int32)
        self._captured.clear()
        return routes


class BatchRoutes:
    """The routes of every token of one batch, in its left-padded columns: column ``c < width`` is
    prompt column ``c`` (a prompt of ``n`` tokens fills ``width - n ..``), column ``width + s`` is
    output token ``s``.

    Args:
        recorder: the model's recorder.
        prompt_lengths: tokens of each row's prompt.
        width: columns of the left-padded prompts.
        max_new_tokens: the most tokens a row may generate.
    """

    def __init__(self, recorder: RouterRecorder, prompt_lengths: list[int], width: int, max_new_tokens: int):
        self.recorder = recorder
        self.prompt_lengths = prompt_lengths
        self.width = width
        self.routes = torch.zeros(len(prompt_lengths), width + max_new_tokens, recorder.num_layers, recorder.topk, dtype=torch.int32)

    def prefilled(self, prompt_of: list[int], distinct: int) -> None:
        """File the prefill's routes: one forward over the ``distinct`` prompts, row ``r`` of the
        batch being prompt ``prompt_of[r]``."""
        self.routes[:, : self.width] = self.recorder.take(distinct, self.width)[prompt_of]

    def fed(self, first_column: int, columns: int) -> None:
        """File a forward over every row's columns ``first_column .. + columns``."""
        self.routes[:, first_column : first_column + columns] = self.recorder.take(len(self.prompt_lengths), columns)

    def of_row(self, row: int, output_tokens: int) -> torch.Tensor:
        """A copy of ``row``'s routes with ``output_tokens`` generated: ``[prompt + output_tokens - 1, num_layers, topk]``."""
        return self.routes[row, self.width - self.prompt_lengths[row] : self.width + output_tokens - 1].clone()
