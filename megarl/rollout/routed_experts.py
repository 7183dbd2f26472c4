"""Routed experts (routing replay, R3): SGLang's wire format, its row count, and megarl's compact array.

An engine started with ``--enable-return-routed-experts`` answers a ``/generate`` item that asked
``return_routed_experts: true`` with ``meta_info["routed_experts"]``: the base64 of a little-endian
int32 array of shape ``[tokens, num_hidden_layers, num_experts_per_tok]`` (SGLang's
``srt/state_capturer/routed_experts.py`` captures it, ``tokenizer_manager.py`` encodes it), whose
rows are the tokens ``[0, prompt + output - 1)``: every input token and every generated token but
the last, which was sampled and never fed through the model. Row ``t`` holds the ``k`` experts
the router of each layer chose for token ``t``; the rows of dense layers hold whatever the engine's
buffer holds (the trainer reads the MoE layers only). The ``hf`` engine answers in the same format.

megarl keeps the array compact: uint8 when every expert id is below 256, else int16.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import numpy as np

WIRE_DTYPE = np.dtype("<i4")
"""SGLang's element type on the wire: little-endian int32."""


@dataclasses.dataclass(frozen=True, slots=True)
class RoutingShape:
    """The last two dimensions of a model's routed experts: ``[tokens, num_layers, topk]``."""

    num_layers: int
    """``num_hidden_layers`` of the model's HF config: every layer has a row, dense ones too."""
    topk: int
    """``num_experts_per_tok``: experts each token is routed to in an MoE layer."""

    @classmethod
    def from_model_dir(cls, model_path: str | Path) -> RoutingShape:
        """Read it from ``model_path/config.json`` (a multimodal model's ``text_config`` if it has one,
        as SGLang reads ``hf_text_config``).

        Raises:
            ValueError: no config.json, or the model routes no experts (a dense model).
        """
        path = Path(model_path) / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the model's config {path} for its routed experts' shape: {error}") from None
        config = config.get("text_config") or config
        layers, topk = config.get("num_hidden_layers"), config.get("num_experts_per_tok")
        if not isinstance(layers, int) or not isinstance(topk, int) or topk < 1:
            raise ValueError(
                f"{path} has no num_hidden_layers and num_experts_per_tok (got {layers!r}, {topk!r}): the model is not a "
                "mixture of experts, so its engines route no experts; set algorithm.routing_replay to none"
            )
        return cls(num_layers=layers, topk=topk)


def compact(routed_experts: np.ndarray) -> np.ndarray:
    """``routed_experts`` as uint8 when every value is in [0, 256), else int16.

    Raises:
        ValueError: a value outside int16's range (no model has 32768 experts).
    """
    if routed_experts.size == 0 or (routed_experts.min() >= 0 and routed_experts.max() < 256):
        return routed_experts.astype(np.uint8)
    low, high = int(routed_experts.min()), int(routed_experts.max())
    if low < np.iinfo(np.int16).min or high > np.iinfo(np.int16).max:
        raise ValueError(f"routed expert ids span [{low}, {high}], outside int16's range")
    return routed_experts.astype(np.int16)


def decode(encoded: str, shape: RoutingShape) -> np.ndarray:
    """``meta_info["routed_experts"]`` -> a compact ``[tokens, num_layers, topk]`` array.

    Raises:
        ValueError: not base64, or not a whole number of ``[num_layers, topk]`` int32 rows.
    """
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (ValueError, TypeError) as error:
        raise ValueError(f"routed_experts is not base64: {error}") from None
    row_bytes = shape.num_layers * shape.topk * WIRE_DTYPE.itemsize
    if len(raw) % row_bytes:
        raise ValueError(
            f"routed_experts holds {len(raw)} bytes, not a whole number of rows of {shape.num_layers} layers x {shape.topk} "
            f"experts x int32 ({row_bytes} bytes); the engine serves another model than {shape}"
        )
    return compact(np.frombuffer(raw, dtype=WIRE_DTYPE).reshape(-1, shape.num_layers, shape.topk))


def encode(routed_experts: np.ndarray) -> str:
    """A ``[tokens, num_layers, topk]`` array in SGLang's wire format (base64 of little-endian int32)."""
    return base64.b64encode(np.ascontiguousarray(routed_experts, dtype=WIRE_DTYPE).tobytes()).decode("ascii")


def expected_rows(input_tokens: int, output_tokens: int) -> int:
    """Rows of a ``/generate`` item's routed experts: its input tokens and every output token but the last."""
    return input_tokens + output_tokens - 1
