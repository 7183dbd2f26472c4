"""The subset of SGLang's native HTTP API that megarl uses: paths, request bodies, responses.

Every engine, SGLang or the embedded ``hf`` server, is driven through these functions, so one
client serves both. Field names and shapes are SGLang's (``sglang.srt.managers.io_struct``:
``GenerateReqInput``, ``UpdateWeightsFromTensorReqInput``, ``UpdateWeightsFromDistributedReqInput``,
``InitWeightsUpdateGroupReqInput``, ``UpdateWeightFromDiskReqInput``,
``ReleaseMemoryOccupationReqInput``, ``PauseGenerationReqInput``, ``AbortReq``, ...; ``sglang.api.v1.api_types`` for ``/generate``), as of the
SGLang version pinned in ``tools/setup.sh``; ``tests/rollout/test_protocol.py`` checks them
against its source.

Weight updates on SGLang (>= 0.5.23) run inside a session: ``/begin_weight_update``, then any
number of ``/update_weights_from_tensor`` or ``/update_weights_from_distributed`` calls, then
``/end_weight_update``. megarl sends ``flush_cache: false`` with each bucket and flushes once after
the session, so the cache is not flushed once per bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import numpy as np

from megarl.rollout import routed_experts
from megarl.rollout.routed_experts import RoutingShape
from megarl.rollout.sampling import SamplingParams, WeightSegment
from megarl.weights.bucket import TensorMeta, dtype_name

GENERATE = "/generate"
HEALTH = "/health"
HEALTH_GENERATE = "/health_generate"
MODEL_INFO = "/get_model_info"
FLUSH_CACHE = "/flush_cache"
RELEASE_MEMORY = "/release_memory_occupation"
RESUME_MEMORY = "/resume_memory_occupation"
BEGIN_WEIGHT_UPDATE = "/begin_weight_update"
END_WEIGHT_UPDATE = "/end_weight_update"
UPDATE_FROM_TENSOR = "/update_weights_from_tensor"
UPDATE_FROM_DISK = "/update_weights_from_disk"
UPDATE_FROM_DISTRIBUTED = "/update_weights_from_distributed"
INIT_UPDATE_GROUP = "/init_weights_update_group"
DESTROY_UPDATE_GROUP = "/destroy_weights_update_group"
GET_WEIGHTS_BY_NAME = "/get_weights_by_name"
PAUSE_GENERATION = "/pause_generation"
CONTINUE_GENERATION = "/continue_generation"
ABORT_REQUEST = "/abort_request"
UPDATE_WEIGHT_VERSION = "/update_weight_version"
SERVER_INFO = "/server_info"
SERVER_INFO_DEPRECATED = "/get_server_info"
"""SGLang's older name of :data:`SERVER_INFO` (still served, deprecated)."""
SERVER_INFO_PATHS = (SERVER_INFO, SERVER_INFO_DEPRECATED)
"""Where to ask an engine for its server information, in order: the next only on a 404."""
RETURNS_ROUTED_EXPERTS = "enable_return_routed_experts"
"""The ``/server_info`` field (SGLang's ``ServerArgs`` field, flag ``--enable-return-routed-experts``)
saying the engine captures routed experts and answers ``return_routed_experts``."""

FLATTENED_BUCKET = "flattened_bucket"
"""``load_format`` of a bucket sent whole: one flat uint8 tensor plus per-tensor metadata."""
UPDATE_GROUP_NAME = "megarl_weight_update"
"""Name of the broadcast group between the trainer (rank 0) and the engines' ranks."""

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
"""SGLang's memory regions (``sglang.srt.constants.GPU_MEMORY_ALL_TYPES``)."""


def sampling_body(sampling: SamplingParams, seed: int | None) -> dict[str, Any]:
    """SGLang ``sampling_params`` of one sample (``n`` is always 1: megarl sends each sample).

    Args:
        sampling: the call's sampling parameters.
        seed: this sample's ``sampling_seed`` (:func:`megarl.rollout.sampling.sample_seed`), or None.
    """
    body: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "stop_token_ids": list(sampling.stop_token_ids),
    }
    if seed is not None:
        body["sampling_seed"] = seed
    return body


def generate_body(
    input_ids: Sequence[Sequence[int]], sampling_params: Sequence[dict[str, Any]], rid: str | None = None, *, return_routed_experts: bool = False
) -> dict[str, Any]:
    """A batched ``/generate`` request: token ids in, token ids and output log-probs out.

    Args:
        input_ids: one prompt per request item.
        sampling_params: one :func:`sampling_body` per item.
        rid: the request's id, which :func:`abort_body` names; item ``i`` is ``{rid}_{i}``.
            None: the engine picks one per item.
        return_routed_experts: ask every item's routed experts (:mod:`megarl.rollout.routed_experts`),
            from its first input token on (SGLang's ``routed_experts_start_len`` 0, its default).
    """
    body = {
        "input_ids": [list(ids) for ids in input_ids],
        "sampling_params": list(sampling_params),
        "return_logprob": True,
    }
    if rid is not None:
        body["rid"] = rid
    if return_routed_experts:
        body["return_routed_experts"] = True
    return body


def routed_generate_body(
    input_ids: Sequence[int], sampling_params: dict[str, Any], rid: str | None = None, *, return_routed_experts: bool = False
) -> dict[str, Any]:
    """One sample's ``/generate`` request through SGLang's router: a batch of one item, with one
    ``sampling_params`` dict and ``rid`` one string (the router parses the body and refuses lists
    there, HTTP 422; it drops fields it does not know, ``return_routed_experts`` among them in
    sglang-router 0.3.2). The answer is read like a batch's (:func:`parse_generate_response`)."""
    body = generate_body([input_ids], [sampling_params], rid, return_routed_experts=return_routed_experts)
    body["sampling_params"] = sampling_params
    return body


@dataclasses.dataclass(frozen=True, slots=True)
class Generated:
    """One item of a ``/generate`` response."""

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length", "abort"]
    weight_version: str | None
    weight_segments: tuple[WeightSegment, ...]
    """``meta_info.weight_versions``; an engine that reports only ``weight_version`` gives one
    segment over every token; none when it reports no version."""
    routed_experts: np.ndarray | None = None
    """``[input tokens + len(output_ids) - 1, num_layers, topk]`` uint8 or int16 (``meta_info.routed_experts``,
    :func:`megarl.rollout.routed_experts.decode`) when asked for; None when not asked for, or for an
    item aborted before it generated a token."""


def parse_generate_response(
    response: Any, expected_items: int, *, partial: bool = False, routing: RoutingShape | None = None, input_lengths: Sequence[int] = ()
) -> list[Generated]:
    """Read a batched ``/generate`` response.

    Args:
        response: the decoded JSON: a list with one object per request item, each with
            ``output_ids`` and ``meta_info`` (``finish_reason``, ``output_token_logprobs`` as
            ``[logprob, token_id, text]`` triples, ``weight_version``, ``weight_versions`` spans
            ``[{version, start, end}]``).
        expected_items: how many items the request had.
        partial: keep an aborted item (``finish_reason`` type ``abort``: a pause or an abort
            stopped it) as a partial sample with its tokens so far, instead of raising.
        routing: the model's routed-experts shape when the request asked ``return_routed_experts``:
            every item must then carry ``meta_info.routed_experts`` with one row per input token
            and per output token but the last.
        input_lengths: with ``routing``, each item's input tokens.

    Raises:
        ValueError: a malformed response, a count mismatch, an aborted item (with its message)
            unless ``partial``, or routed experts asked for and missing or of the wrong size.
    """
    if not isinstance(response, list) or len(response) != expected_items:
        count = len(response) if isinstance(response, list) else type(response).__name__
        raise ValueError(f"/generate answered {count} items for a batch of {expected_items}")
    finished = ("stop", "length", "abort") if partial else ("stop", "length")
    items = []
    for index, item in enumerate(response):
        try:
            meta = item["meta_info"]
            reason = meta["finish_reason"]
            output_ids = [int(token) for token in item["output_ids"]]
            triples = meta["output_token_logprobs"]
            kind = reason.get("type") if isinstance(reason, dict) else None
            if kind not in finished:
                raise ValueError(f"/generate item {index} did not finish: finish_reason={reason}")
            if [int(triple[1]) for triple in triples] != output_ids:
                raise ValueError(f"/generate item {index}: output_token_logprobs do not cover output_ids")
            version = meta.get("weight_version")
            version = None if version is None else str(version)
            segments = _weight_segments(meta.get("weight_versions"), version, len(output_ids))
            routes = None if routing is None else _routed_experts(meta, index, routing, input_lengths[index], len(output_ids))
        except (KeyError, TypeError) as missing:
            raise ValueError(f"/generate item {index} lacks {missing}: {str(item)[:300]}") from None
        items.append(
            Generated(
                output_ids=output_ids,
                logprobs=[float(triple[0]) for triple in triples],
                finish_reason=kind,
                weight_version=version,
                weight_segments=segments,
                routed_experts=routes,
            )
        )
    return items


def prompt_logprobs_body(input_ids: Sequence[Sequence[int]], logprob_start_lens: Sequence[int]) -> dict[str, Any]:
    """A batched ``/generate`` that generates nothing and answers the log-probs of the input
    tokens: SGLang's prompt scoring (``max_new_tokens`` 0, ``return_logprob``,
    ``logprob_start_len``), how a distillation teacher scores the policy's sequences.

    Args:
        input_ids: one token sequence per item (prompt + response, exactly as sampled).
        logprob_start_lens: per item, the first position answered: item ``i`` gets the log-probs
            of its tokens ``logprob_start_lens[i] + 1`` to the last (SGLang answers ``None`` for
            the token at the start itself, having nothing before it to condition on when it is 0);
            ``len(prompt) - 1`` gives a response's tokens.
    """
    return {
        "input_ids": [list(ids) for ids in input_ids],
        "sampling_params": [{"max_new_tokens": 0} for _ in input_ids],
        "return_logprob": True,
        "logprob_start_len": list(logprob_start_lens),
    }


def parse_prompt_logprobs_response(response: Any, input_ids: Sequence[Sequence[int]], logprob_start_lens: Sequence[int]) -> list[list[float]]:
    """Read the answer to :func:`prompt_logprobs_body`.

    Args:
        response: the decoded JSON: one object per item, each with ``meta_info.input_token_logprobs``,
            ``[logprob, token_id, text]`` for tokens ``logprob_start_len`` to the last, the first
            logprob ``None`` (SGLang's ``[None] + logprobs[:-1]``: ``logprob_start_len`` is the
            position whose logits predict the next token).
        input_ids, logprob_start_lens: the request's.

    Returns:
        per item, the log-probs of its tokens ``logprob_start_lens[i] + 1`` to the last.

    Raises:
        ValueError: a count mismatch, a missing field, or token ids other than those sent (0 stands
            for any: SGLang answers 0 for the vocabulary's last ids).
    """
    if not isinstance(response, list) or len(response) != len(input_ids):
        count = len(response) if isinstance(response, list) else type(response).__name__
        raise ValueError(f"/generate answered {count} items for a prompt-scoring batch of {len(input_ids)}")
    values = []
    for index, (item, ids, start) in enumerate(zip(response, input_ids, logprob_start_lens)):
        try:
            triples = item["meta_info"]["input_token_logprobs"]
            # SGLang reports id 0 for the vocabulary's last ids (its input_token_logprobs_idx
            # clips ids >= vocab_size - 1), so a 0 stands for any sent id.
            answered = [int(triple[1]) for triple in triples]
            if len(answered) != len(ids) - start or any(got not in (0, sent) for got, sent in zip(answered, ids[start:])):
                raise ValueError(
                    f"/generate item {index}: input_token_logprobs name {len(triples)} tokens that are not the {len(ids) - start} "
                    f"sent from position {start}: the engine does not answer prompt log-probs as SGLang does"
                )
            values.append([float(triple[0]) for triple in triples[1:]])
        except (KeyError, TypeError) as missing:
            raise ValueError(f"/generate item {index} lacks {missing}: {str(item)[:300]}") from None
    return values


def _routed_experts(meta: dict, index: int, routing: RoutingShape, input_tokens: int, output_tokens: int) -> np.ndarray | None:
    """An item's ``meta_info.routed_experts``, decoded and checked to cover its tokens."""
    encoded = meta.get("routed_experts")
    if encoded is None:
        if output_tokens == 0 and meta["finish_reason"].get("type") == "abort":
            return None  # aborted before it started: nothing ran through the model
        raise ValueError(
            f"/generate item {index} lacks meta_info.routed_experts although the request asked return_routed_experts: "
            "the engine does not return routed experts (start it with --enable-return-routed-experts)"
        )
    try:
        routes = routed_experts.decode(encoded, routing)
    except ValueError as error:
        raise ValueError(f"/generate item {index}: {error}") from None
    rows = routed_experts.expected_rows(input_tokens, output_tokens)
    if len(routes) != rows:
        raise ValueError(
            f"/generate item {index}: routed_experts has {len(routes)} rows for {input_tokens} input and {output_tokens} output "
            f"tokens; expected {rows} (every input token and every output token but the last)"
        )
    return routes


def _weight_segments(spans: Any, version: str | None, tokens: int) -> tuple[WeightSegment, ...]:
    """SGLang's ``weight_versions`` spans as segments (checked to cover the ``tokens`` in order)."""
    if spans is None:
        return () if version is None else (WeightSegment(version, 0, tokens),)
    segments = tuple(WeightSegment(str(span["version"]), int(span["start"]), int(span["end"])) for span in spans)
    bounds = [0] + [bound for segment in segments for bound in (segment.start, segment.end)] + [tokens]
    if not segments or any(bounds[i] != bounds[i + 1] for i in range(0, len(bounds), 2)) or any(
        segment.end < segment.start for segment in segments
    ):
        raise ValueError(f"weight_versions {spans} do not cover the {tokens} output tokens in order")
    return segments


ROUTED_EXPERTS_FIX = "restart it with --enable-return-routed-experts, or set algorithm.routing_replay to r2 or none"
"""What to do about an engine that does not return routed experts when R3 needs them."""


def routed_experts_refusal(path: str, server_info: Any) -> str | None:
    """Why an engine whose ``path`` (``/server_info`` or ``/get_server_info``) answered
    ``server_info`` cannot serve routing replay (R3), with the fix; None when it returns routed experts."""
    reported = server_info.get(RETURNS_ROUTED_EXPERTS) if isinstance(server_info, dict) else None
    if reported is True:
        return None
    return f"does not return routed experts ({path} reports {RETURNS_ROUTED_EXPERTS}={reported}), which algorithm.routing_replay=r3 needs: {ROUTED_EXPERTS_FIX}"


def update_from_tensor_body(serialized_named_tensors: list[str], weight_version: str) -> dict[str, Any]:
    """``/update_weights_from_tensor`` with one flattened bucket.

    Args:
        serialized_named_tensors: one base64 payload per engine tensor-parallel rank.
        weight_version: recorded by the engine and reported with each generation.
    """
    return {
        "serialized_named_tensors": serialized_named_tensors,
        "load_format": FLATTENED_BUCKET,
        "flush_cache": False,
        "weight_version": weight_version,
    }


def update_from_distributed_body(
    metas: Sequence[TensorMeta], weight_version: str, load_format: str | None
) -> dict[str, Any]:
    """``/update_weights_from_distributed``: the tensors that the next broadcast(s) carry.

    Args:
        metas: the bucket's tensors in buffer order.
        weight_version: see :func:`update_from_tensor_body`.
        load_format: :data:`FLATTENED_BUCKET` (one broadcast of the whole buffer) or None (one
            broadcast per tensor, in order).
    """
    return {
        "names": [meta.name for meta in metas],
        "dtypes": [dtype_name(meta.dtype) for meta in metas],
        "shapes": [list(meta.shape) for meta in metas],
        "group_name": UPDATE_GROUP_NAME,
        "load_format": load_format,
        "flush_cache": False,
        "weight_version": weight_version,
    }


def update_from_disk_body(model_path: str, weight_version: str) -> dict[str, Any]:
    """``/update_weights_from_disk``: reload every safetensors file of ``model_path``."""
    return {"model_path": model_path, "weight_version": weight_version, "flush_cache": True}


def init_update_group_body(master_address: str, master_port: int, rank_offset: int, world_size: int, backend: str) -> dict[str, Any]:
    """``/init_weights_update_group``: the engine's ranks join the trainer's broadcast group.

    Args:
        master_address: host of the trainer process that is rank 0 (it hosts the rendezvous store).
        master_port: port of that store.
        rank_offset: the engine's first rank (its tensor-parallel ranks follow).
        world_size: 1 + the tensor-parallel size of every engine in the group.
        backend: ``nccl`` (SGLang on GPUs) or ``gloo`` (the ``hf`` engine on CPU).
    """
    return {
        "master_address": master_address,
        "master_port": master_port,
        "rank_offset": rank_offset,
        "world_size": world_size,
        "group_name": UPDATE_GROUP_NAME,
        "backend": backend,
    }


def destroy_update_group_body() -> dict[str, Any]:
    """``/destroy_weights_update_group`` for megarl's group."""
    return {"group_name": UPDATE_GROUP_NAME}


def memory_body(tags: Sequence[str] | None) -> dict[str, Any]:
    """``/release_memory_occupation`` and ``/resume_memory_occupation``; None means every region."""
    if tags is not None:
        unknown = sorted(set(tags) - set(MEMORY_TAGS))
        if unknown:
            raise ValueError(f"unknown engine memory tags {unknown}; expected a subset of {list(MEMORY_TAGS)}")
        return {"tags": list(tags)}
    return {"tags": None}


def get_weights_body(name: str, truncate_size: int) -> dict[str, Any]:
    """``/get_weights_by_name``: the first ``truncate_size`` rows of a weight, as nested lists."""
    return {"name": name, "truncate_size": truncate_size}


def pause_body(mode: Literal["abort", "retract", "in_place"]) -> dict[str, Any]:
    """``/pause_generation``: stop generating until ``/continue_generation``.

    Args:
        mode: ``abort`` ends every running request (each answers with its tokens so far and
            ``finish_reason`` type ``abort``); ``in_place`` holds them with their KV cache;
            ``retract`` holds them and recomputes their KV cache when they continue.
    """
    return {"mode": mode}


def continue_body() -> dict[str, Any]:
    """``/continue_generation``: paused requests go on; queued ones start."""
    return {}


def abort_body(rid: str | None) -> dict[str, Any]:
    """``/abort_request``: the requests whose ``rid`` starts with ``rid``, or all when None.

    An aborted request answers its ``/generate`` call with the tokens generated so far and
    ``finish_reason`` ``{"type": "abort", ...}``."""
    return {"abort_all": True} if rid is None else {"rid": rid, "abort_all": False}


def update_weight_version_body(new_version: str, abort_all_requests: bool) -> dict[str, Any]:
    """``/update_weight_version``: rename the weights the engine holds (no weights move)."""
    return {"new_version": new_version, "abort_all_requests": abort_all_requests}
