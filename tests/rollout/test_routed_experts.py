"""Routed experts (routing replay R3) on the wire: SGLang's format and row count, megarl's compact
arrays, the request flag against SGLang's request classes, and a partial sample's array."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from megarl.rollout import protocol, routed_experts
from megarl.rollout.routed_experts import RoutingShape
from megarl.rollout.sampling import Sample, WeightSegment
from tests.rollout.sglang_source import SGLANG, class_fields, needs_sglang

pytestmark = pytest.mark.cpu

SHAPE = RoutingShape(num_layers=3, topk=2)


def item(output_ids, routes=None, reason="stop"):
    """A ``/generate`` item as SGLang answers it, with ``routes`` encoded as SGLang encodes them."""
    meta = {"finish_reason": {"type": reason}, "output_token_logprobs": [[-1.0, token, None] for token in output_ids]}
    if routes is not None:
        # SGLang: pybase64.b64encode(tensor.numpy().tobytes()) of its int32 capture (tokenizer_manager.py).
        meta["routed_experts"] = base64.b64encode(torch.as_tensor(routes, dtype=torch.int32).numpy().tobytes()).decode()
    return {"output_ids": output_ids, "meta_info": meta}


def test_decode_reads_sglangs_encoding_and_compacts():
    routes = np.random.default_rng(0).integers(0, 128, size=(7, 3, 2))
    [parsed] = protocol.parse_generate_response([item([5, 6, 2], routes)], 1, routing=SHAPE, input_lengths=[5])
    assert parsed.routed_experts.dtype == np.uint8 and parsed.routed_experts.shape == (7, 3, 2)
    assert np.array_equal(parsed.routed_experts, routes)
    wide = routes + 200  # 327 > 255: int16
    decoded = routed_experts.decode(routed_experts.encode(wide), SHAPE)
    assert decoded.dtype == np.int16 and np.array_equal(decoded, wide)


def test_encode_is_little_endian_int32_and_round_trips():
    routes = np.arange(24).reshape(4, 3, 2)
    raw = base64.b64decode(routed_experts.encode(routes))
    assert raw == np.asarray(routes, dtype="<i4").tobytes()
    assert np.array_equal(routed_experts.decode(routed_experts.encode(routes), SHAPE), routes)


def test_wrong_row_count_missing_or_malformed_routes_are_refused():
    routes = np.zeros((6, 3, 2), dtype=np.int64)
    with pytest.raises(ValueError, match=r"item 0: routed_experts has 6 rows for 5 input and 3 output tokens; expected 7"):
        protocol.parse_generate_response([item([5, 6, 2], routes)], 1, routing=SHAPE, input_lengths=[5])
    with pytest.raises(ValueError, match="item 1 lacks meta_info.routed_experts.*--enable-return-routed-experts"):
        protocol.parse_generate_response([item([5], np.zeros((2, 3, 2))), item([5])], 2, routing=SHAPE, input_lengths=[2, 2])
    with pytest.raises(ValueError, match="not a whole number of rows of 3 layers x 2 experts"):
        routed_experts.decode(base64.b64encode(b"\0" * 20).decode(), SHAPE)
    with pytest.raises(ValueError, match="not base64"):
        routed_experts.decode("%%%", SHAPE)
    # Not asked for: not read, even when present.
    assert protocol.parse_generate_response([item([5, 6, 2], routes)], 1)[0].routed_experts is None


def test_an_item_aborted_before_it_started_has_no_routes():
    [parsed] = protocol.parse_generate_response([item([], reason="abort")], 1, partial=True, routing=SHAPE, input_lengths=[4])
    assert parsed.routed_experts is None and parsed.finish_reason == "abort"


def test_routing_shape_comes_from_the_models_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "num_experts_per_tok": 2}))
    assert RoutingShape.from_model_dir(tmp_path) == RoutingShape(num_layers=4, topk=2)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 6, "num_experts_per_tok": 8}}))
    assert RoutingShape.from_model_dir(tmp_path) == RoutingShape(num_layers=6, topk=8)
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    with pytest.raises(ValueError, match="not a mixture of experts.*routing_replay to none"):
        RoutingShape.from_model_dir(tmp_path)
    with pytest.raises(ValueError, match="cannot read the model's config"):
        RoutingShape.from_model_dir(tmp_path / "missing")


def test_compact_refuses_ids_beyond_int16():
    assert routed_experts.compact(np.array([[[-1, 3]]])).dtype == np.int16
    with pytest.raises(ValueError, match="outside int16"):
        routed_experts.compact(np.array([[[40000]]]))


def test_a_resumed_sample_keeps_the_continuations_routes():
    partial = Sample(
        prompt_index=0, sample_index=1, response_ids=[5, 6], logprobs=[-1.0, -2.0], finish_reason="abort",
        weight_version="1", weight_segments=(WeightSegment("1", 0, 2),), routed_experts=np.zeros((4, 3, 2), np.uint8),
    )
    # Prompt of 3 tokens: the continuation's input is 3 + 2 tokens, its output 2: 6 rows cover the whole sample.
    continuation = Sample(
        prompt_index=0, sample_index=0, response_ids=[7, 2], logprobs=[-3.0, -4.0], finish_reason="stop",
        weight_version="2", weight_segments=(WeightSegment("2", 0, 2),), routed_experts=np.ones((6, 3, 2), np.uint8),
    )
    whole = partial.continued_by(continuation)
    assert whole.routed_experts is continuation.routed_experts
    assert len(whole.routed_experts) == 3 + len(whole.response_ids) - 1
    assert whole == partial.continued_by(continuation)  # arrays stay out of ==


@needs_sglang
def test_the_request_flag_and_the_server_info_field_are_sglangs():
    body = protocol.generate_body([[1, 2]], [{"max_new_tokens": 4}], return_routed_experts=True)
    fields, _ = class_fields(SGLANG / "srt" / "managers" / "io_struct.py", "GenerateReqInput")
    assert body["return_routed_experts"] is True and "return_routed_experts" in fields
    assert "return_routed_experts" not in protocol.generate_body([[1, 2]], [{"max_new_tokens": 4}])
    server_fields = set()
    for fields_file in (SGLANG / "srt" / "arg_groups" / "fields").glob("*.py"):
        server_fields |= {line.split(":")[0].strip() for line in fields_file.read_text().splitlines() if line.startswith("    ") and ": A[" in line}
    assert protocol.RETURNS_ROUTED_EXPERTS in server_fields
    source = (SGLANG / "srt" / "entrypoints" / "http_server.py").read_text()
    assert f'@app.get("{protocol.SERVER_INFO}")' in source and f'@app.get("{protocol.SERVER_INFO_DEPRECATED}")' in source
