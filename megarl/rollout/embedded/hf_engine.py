"""The ``hf`` engine's state behind SGLang's endpoints: a transformers model, its weight versions,
its update sessions, and the scheduler that generates on it.

Each endpoint is one method taking the request body and returning the answer SGLang gives
(:mod:`megarl.rollout.embedded.server` puts them on HTTP), with SGLang's request and response
fields (:mod:`megarl.rollout.protocol`):

- ``/generate``: ``input_ids`` (one prompt or a batch), ``sampling_params`` (``max_new_tokens``,
  ``temperature``, ``top_p``, ``top_k``, ``stop_token_ids``, ``n``, ``sampling_seed``,
  ``ignore_eos``), ``return_logprob``, ``rid``; answers ``output_ids`` and ``meta_info`` with
  ``id`` (the rid), ``finish_reason``, ``output_token_logprobs``, ``weight_version`` and
  ``weight_versions`` (which version produced which tokens); with ``return_routed_experts`` (a
  server started with ``--enable-return-routed-experts``, else refused) ``routed_experts`` in
  SGLang's format (:mod:`megarl.rollout.routed_experts`, :mod:`megarl.rollout.embedded.routing`). Queued for
  :mod:`megarl.rollout.embedded.scheduler`, which batches what is queued;
  :mod:`megarl.rollout.embedded.generate` generates. With ``max_new_tokens`` 0 in every item it
  scores the prompts instead (SGLang's ``logprob_start_len`` -> ``input_token_logprobs``, what a
  distillation teacher answers), in one forward outside the scheduler.
- ``/pause_generation`` (``mode`` ``abort``, ``in_place``, ``retract``), ``/continue_generation``,
  ``/abort_request`` (``rid`` or ``abort_all``): an aborted request answers with its tokens so
  far and ``finish_reason`` type ``abort``. ``/update_weight_version`` renames the weights held.
- ``/begin_weight_update``, ``/update_weights_from_tensor`` (``load_format: flattened_bucket``;
  each payload is a handle to a bucket file in shared memory, :mod:`megarl.rollout.bucket_files`),
  ``/update_weights_from_distributed`` and ``/init_weights_update_group`` (any torch backend,
  gloo on CPU), ``/end_weight_update``, ``/update_weights_from_disk`` (a directory of safetensors),
  ``/get_weights_by_name``; each may carry ``weight_version``, which the engine then reports.
  Weights are addressed by HF checkpoint names (:class:`megarl.rollout.embedded.weights.HFWeightMap`).
- ``/release_memory_occupation`` and ``/resume_memory_occupation``: the CPU engine frees nothing,
  but refuses to generate while its weights are released, as SGLang cannot.
- ``/flush_cache`` (no cache to flush), ``/health_generate``, ``/get_model_info``, ``/server_info``
  and its older name ``/get_server_info`` (the server's settings under SGLang's ``ServerArgs`` names).

Generation, weight loading and the health probe take turns on one lock (a paused batch releases
it, so weights load at once while paused, as in SGLang). ``/health_generate`` generates one token
when idle, answers healthy while paused (the engine waits for ``/continue_generation`` by design;
SGLang's probe would wait too), and while a batch or a weight load runs, reports whether it
advanced (a decoding step, a tensor) within the last :data:`STALL_S` seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from megarl.rollout import protocol, routed_experts
from megarl.rollout.bucket_files import open_handle
from megarl.rollout.embedded.generate import BatchGenerator, Request
from megarl.rollout.embedded.routing import RouterRecorder
from megarl.rollout.embedded.scheduler import GenerationScheduler
from megarl.rollout.embedded.weights import HFWeightMap
from megarl.rollout.update_group import join_update_group, leave_update_group
from megarl.weights.bucket import Bucket, dtype_from_name, pack_layout

STALL_S = 20.0
"""A running batch that advanced no step for this long fails ``/health_generate`` (SGLang's
``SGLANG_HEALTH_CHECK_TIMEOUT`` default)."""
GROUP_TIMEOUT_S = 600.0
"""Limit of the weight-update group's rendezvous and broadcasts."""

_SAMPLING_DEFAULTS = {
    "max_new_tokens": 128,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "stop_token_ids": None,
    "n": 1,
    "sampling_seed": None,
    "ignore_eos": False,
}
"""The SGLang sampling parameters this engine implements, with SGLang's defaults."""
_GREEDY_BELOW = 1e-6
"""Temperatures below this are greedy, as in SGLang."""


class RequestFailed(Exception):
    """A request the engine refuses or cannot carry out; answered with HTTP 400 and the message."""


def _eos_token_ids(model) -> set[int]:
    ids = set()
    for source in (model.generation_config, model.config):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return ids


def _scores_prompts(body: dict) -> bool:
    """Whether a ``/generate`` body asks for no new token in any item (prompt scoring)."""
    sampling = body.get("sampling_params") or {}
    items = [sampling] if isinstance(sampling, dict) else sampling
    return bool(items) and all(isinstance(params, dict) and params.get("max_new_tokens") == 0 for params in items)


def _request_ids(rid: Any, prompts: int, single: bool) -> list[str]:
    """One id per prompt from ``/generate``'s ``rid``, normalised as SGLang does: none gives fresh
    ids, a string names a single prompt or prefixes a batch's (``{rid}_{i}``), a list names each."""
    if rid is None:
        return [uuid.uuid4().hex for _ in range(prompts)]
    if isinstance(rid, str):
        return [rid] if single else [f"{rid}_{index}" for index in range(prompts)]
    if isinstance(rid, list) and len(rid) == prompts and all(isinstance(one, str) for one in rid):
        return list(rid)
    raise RequestFailed(f"rid must be a string or a list of {prompts} strings (one per prompt), got {str(rid)[:100]}")


class HFEngine:
    """A transformers model and the state behind SGLang's endpoints.

    Args:
        model_path: HF model directory.
        dtype: ``auto`` (the checkpoint's) or a torch dtype name.
        seed: seed of the draws of requests without ``sampling_seed``.
        step_delay_s: seconds to wait after each decoding step (a GPU engine's latency, modelled).
        return_routed_experts: record the routers' choices of every token and answer
            ``return_routed_experts`` (SGLang's ``--enable-return-routed-experts``).
        context_length: the longest prompt + response it serves (SGLang's ``--context-length``:
            a longer prompt is refused, a response stops there); None: the model's
            ``max_position_embeddings``.

    Raises:
        ValueError: ``context_length`` exceeds the model's ``max_position_embeddings`` (positions
            past it were never trained; SGLang refuses it too).
    """

    def __init__(
        self, model_path: str, dtype: str, seed: int, *, step_delay_s: float = 0.0, return_routed_experts: bool = False, context_length: int | None = None,
    ):
        self.model_path = model_path
        self.dtype = dtype
        self.seed = seed
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype if dtype == "auto" else getattr(torch, dtype)).eval()
        self.return_routed_experts = return_routed_experts
        self.weights = HFWeightMap(self.model)
        self.eos_token_ids = _eos_token_ids(self.model)
        pad = self.model.generation_config.pad_token_id
        pad = self.model.config.pad_token_id if pad is None else pad
        longest = self.model.config.max_position_embeddings
        if context_length is not None and not 1 <= context_length <= longest:
            raise ValueError(f"context_length ({context_length}) must be in [1, {longest}], the model's max_position_embeddings")
        self.generator = BatchGenerator(
            self.model,
            context_length=longest if context_length is None else context_length,
            pad_token_id=0 if pad is None else int(pad),
            random_seed=seed,
            recorder=RouterRecorder(self.model) if return_routed_experts else None,
        )
        self.lock = threading.Lock()
        self.weight_version = "default"
        self.released: set[str] = set()
        self.session_open = False
        self.update_groups: dict[str, Any] = {}
        self.last_progress = time.monotonic()
        self.scheduler = GenerationScheduler(self.generator, self.lock, lambda: self.weight_version, self._progress, step_delay_s=step_delay_s)

    def _progress(self) -> None:
        self.last_progress = time.monotonic()

    def generate_requests(self, body: dict) -> tuple[list[Request], list[str], list[bool], bool]:
        """Read a ``/generate`` body: (one :class:`Request` per sample, their ids, whether each
        returns log-probs, whether the body was a single prompt)."""
        if "weights" in self.released:
            raise RequestFailed("the engine's weights are released; call /resume_memory_occupation first")
        if body.get("return_routed_experts") and not self.return_routed_experts:
            raise RequestFailed("return_routed_experts needs an engine started with --enable-return-routed-experts; restart it with that flag")
        if body.get("routed_experts_start_len", 0):
            raise RequestFailed("the hf engine returns routed experts from the first token only: send routed_experts_start_len 0")
        input_ids = body.get("input_ids")
        if input_ids is None:
            raise RequestFailed("the hf engine takes `input_ids` only (token ids in, token ids out)")
        if body.get("stream"):
            raise RequestFailed("the hf engine does not stream; send stream: false")
        single = bool(input_ids) and isinstance(input_ids[0], int)
        prompts = [input_ids] if single else input_ids
        sampling = body.get("sampling_params") or {}
        sampling = [sampling] * len(prompts) if isinstance(sampling, dict) else sampling
        if len(sampling) != len(prompts):
            raise RequestFailed(f"{len(sampling)} sampling_params for {len(prompts)} prompts")
        return_logprob = body.get("return_logprob") or False
        return_logprob = [return_logprob] * len(prompts) if isinstance(return_logprob, bool) else return_logprob
        rids = _request_ids(body.get("rid"), len(prompts), single)
        requests, sample_rids, sample_logprob = [], [], []
        for index, (prompt, params) in enumerate(zip(prompts, sampling)):
            unsupported = sorted(set(params) - set(_SAMPLING_DEFAULTS))
            if unsupported:
                raise RequestFailed(f"sampling_params {unsupported} are not supported by the hf engine; it implements {sorted(_SAMPLING_DEFAULTS)}")
            params = {**_SAMPLING_DEFAULTS, **params}
            stops = set(params["stop_token_ids"] or ()) | (set() if params["ignore_eos"] else self.eos_token_ids)
            temperature = float(params["temperature"])
            request = Request(
                input_ids=[int(token) for token in prompt],
                max_new_tokens=int(params["max_new_tokens"]),
                temperature=0.0 if temperature < _GREEDY_BELOW else temperature,
                top_p=float(params["top_p"]),
                top_k=int(params["top_k"]),
                stop_token_ids=frozenset(stops),
                seed=params["sampling_seed"],
            )
            copies = int(params["n"])
            requests.extend([request] * copies)
            sample_rids.extend([rids[index]] if copies == 1 else [f"{rids[index]}_{copy}" for copy in range(copies)])
            sample_logprob.extend([bool(return_logprob[index])] * copies)
        try:
            self.generator.check(requests)
        except ValueError as error:
            raise RequestFailed(str(error)) from None
        return requests, sample_rids, sample_logprob, single

    async def generate(self, body: dict) -> Any:
        """``/generate``: queued for the scheduler, which may batch it with other queued requests;
        with ``max_new_tokens`` 0 for every item, prompt scoring (:meth:`score_prompts`)."""
        if _scores_prompts(body):
            return await asyncio.to_thread(self.score_prompts, body)
        if body.get("logprob_start_len", -1) not in (-1, None):
            raise RequestFailed("the hf engine answers input log-probs (logprob_start_len) only with max_new_tokens 0 for every item")
        requests, rids, return_logprob, single = self.generate_requests(body)
        completions = await asyncio.wrap_future(self.scheduler.submit(requests, rids))
        items = []
        for request, rid, logprob, completion in zip(requests, rids, return_logprob, completions):
            result = completion.result
            meta = {
                "id": rid,
                "finish_reason": result.finish_reason,
                "prompt_tokens": len(request.input_ids),
                "completion_tokens": len(result.output_ids),
                "cached_tokens": 0,
                "weight_version": completion.weight_versions[-1].version,
                "weight_versions": [dataclasses.asdict(span) for span in completion.weight_versions],
            }
            if logprob:
                meta["output_token_logprobs"] = [[logprob, token, None] for logprob, token in zip(result.logprobs, result.output_ids)]
            if body.get("return_routed_experts") and result.routed_experts is not None:
                meta["routed_experts"] = routed_experts.encode(result.routed_experts.numpy())
            items.append({"output_ids": result.output_ids, "meta_info": meta})
        return items[0] if single and len(items) == 1 else items

    def score_prompts(self, body: dict) -> Any:
        """``/generate`` with ``max_new_tokens`` 0 for every item (SGLang's prompt scoring): nothing
        is generated; with ``return_logprob`` and ``logprob_start_len`` ``s`` >= 0 (one, or one per
        item) an item's ``meta_info.input_token_logprobs`` holds ``[logprob, token_id, None]`` for
        its tokens from position ``s`` on, the first logprob None as SGLang answers it, the others
        from one batched forward (:meth:`BatchGenerator.prompt_logprobs`)."""
        if "weights" in self.released:
            raise RequestFailed("the engine's weights are released; call /resume_memory_occupation first")
        input_ids = body.get("input_ids")
        if not input_ids:
            raise RequestFailed("the hf engine takes `input_ids` only (token ids in, token ids out)")
        single = isinstance(input_ids[0], int)
        prompts = [[int(token) for token in prompt] for prompt in ([input_ids] if single else input_ids)]
        starts = body.get("logprob_start_len", -1)
        starts = [-1 if starts is None else int(starts)] * len(prompts) if not isinstance(starts, list) else [int(start) for start in starts]
        if len(starts) != len(prompts):
            raise RequestFailed(f"{len(starts)} logprob_start_len for {len(prompts)} prompts")
        scored = [row for row, start in enumerate(starts) if start >= 0] if body.get("return_logprob") else []
        with self.lock:
            self._progress()
            try:
                values = self.generator.prompt_logprobs([prompts[row] for row in scored], [starts[row] for row in scored]) if scored else []
            except ValueError as error:
                raise RequestFailed(str(error)) from None
            self._progress()
        logprobs = dict(zip(scored, values))
        items = []
        for row, (prompt, rid) in enumerate(zip(prompts, _request_ids(body.get("rid"), len(prompts), single))):
            meta = {
                "id": rid, "finish_reason": {"type": "length", "length": 0}, "prompt_tokens": len(prompt), "completion_tokens": 0,
                "cached_tokens": 0, "weight_version": self.weight_version, "output_token_logprobs": [],
            }
            if row in logprobs:
                tokens = prompt[starts[row] :]
                meta["input_token_logprobs"] = [[value, token, None] for value, token in zip([None, *logprobs[row]], tokens)]
            items.append({"output_ids": [], "meta_info": meta})
        return items[0] if single else items

    def pause_generation(self, body: dict) -> dict:
        """``/pause_generation``: ``mode`` ``abort`` (default), ``in_place`` or ``retract``."""
        try:
            self.scheduler.pause(body.get("mode", "abort"))
        except ValueError as error:
            raise RequestFailed(str(error)) from None
        return {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body: dict) -> dict:
        """``/continue_generation`` (``torch_empty_cache`` has nothing to free on CPU)."""
        self.scheduler.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    def abort_request(self, body: dict) -> None:
        """``/abort_request``: by ``rid`` (a prefix of the samples' ids) or ``abort_all``."""
        self.scheduler.abort(str(body.get("rid") or ""), bool(body.get("abort_all")))

    def update_weight_version(self, body: dict) -> dict:
        """``/update_weight_version``: name the weights held now ``new_version``."""
        if "new_version" not in body:
            raise RequestFailed("/update_weight_version needs new_version")
        if body.get("abort_all_requests", True):
            self.scheduler.abort("", abort_all=True)
        with self.lock:
            self.weight_version = str(body["new_version"])
        return {"success": True, "message": f"Weight version updated to {self.weight_version}", "new_version": self.weight_version}

    def health_generate(self) -> int:
        """``/health_generate``: the HTTP status. A paused engine is healthy (it waits for
        ``/continue_generation`` by design) and generates no probe."""
        if self.scheduler.paused:
            return HTTPStatus.OK
        if not self.lock.acquire(blocking=False):
            return HTTPStatus.OK if time.monotonic() - self.last_progress < STALL_S else HTTPStatus.SERVICE_UNAVAILABLE
        try:
            if "weights" not in self.released:
                probe = Request(input_ids=[0], max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=-1, stop_token_ids=frozenset(), seed=None)
                self.generator.generate([probe], on_step=lambda decoding: self._progress())
            return HTTPStatus.OK
        finally:
            self.lock.release()

    def model_info(self, body: dict) -> dict:
        """``/get_model_info``."""
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "weight_version": self.weight_version,
            "model_type": self.model.config.model_type,
            "architectures": self.model.config.architectures,
        }

    def server_info(self, body: dict) -> dict:
        """``/server_info`` (and ``/get_server_info``): the settings megarl reads, under SGLang's ``ServerArgs`` names."""
        return {
            "model_path": self.model_path,
            "dtype": self.dtype,
            "random_seed": self.seed,
            "context_length": self.generator.context_length,
            protocol.RETURNS_ROUTED_EXPERTS: self.return_routed_experts,
        }

    def _load(self, named_tensors: list[tuple[str, torch.Tensor]], weight_version: str | None) -> None:
        """Check every name and shape, then copy all tensors in (nothing is loaded on a bad one)."""
        known = self.weights.names()
        unknown = [name for name, _ in named_tensors if name not in known]
        if unknown:
            raise RequestFailed(f"{len(unknown)} tensors the model does not have, e.g. {unknown[:3]}; the names must be HF checkpoint names")
        misshapen = [(name, list(tensor.shape), list(self.weights.shape(name))) for name, tensor in named_tensors if tuple(tensor.shape) != self.weights.shape(name)]
        if misshapen:
            name, got, held = misshapen[0]
            raise RequestFailed(f"{len(misshapen)} tensors with the wrong shape, e.g. {name}: got {got}, the model holds {held}; nothing was loaded")
        with self.lock:
            self._progress()
            for name, tensor in named_tensors:
                self.weights.load(name, tensor)
                self._progress()
            if weight_version is not None:
                self.weight_version = str(weight_version)

    def _require_session(self, endpoint: str) -> None:
        if not self.session_open:
            raise RequestFailed(f"{endpoint} must run between /begin_weight_update and /end_weight_update")

    def begin_weight_update(self, body: dict) -> dict:
        """``/begin_weight_update``."""
        if self.session_open:
            raise RequestFailed("a weight-update session is already open; call /end_weight_update first")
        self.session_open = True
        return {"success": True, "message": "Success"}

    def end_weight_update(self, body: dict) -> dict:
        """``/end_weight_update``."""
        if not self.session_open:
            raise RequestFailed("no weight-update session is open; call /begin_weight_update first")
        self.session_open = False
        return {"success": True, "message": "Success"}

    def update_weights_from_tensor(self, body: dict) -> dict:
        """``/update_weights_from_tensor``: one bucket file per payload (tensor-parallel rank 0's)."""
        self._require_session(protocol.UPDATE_FROM_TENSOR)
        if body.get("load_format") != protocol.FLATTENED_BUCKET:
            raise RequestFailed(f"the hf engine loads load_format {protocol.FLATTENED_BUCKET!r} only, got {body.get('load_format')!r}")
        payloads = body.get("serialized_named_tensors") or []
        if not payloads:
            raise RequestFailed("serialized_named_tensors is empty")
        try:
            bucket = open_handle(payloads[0])
        except (ValueError, OSError) as error:
            raise RequestFailed(str(error)) from None
        self._load(bucket.named_tensors(), body.get("weight_version"))
        return {"success": True, "message": "Success"}

    def update_weights_from_disk(self, body: dict) -> dict:
        """``/update_weights_from_disk``: every ``*.safetensors`` file of ``model_path``."""
        model_path = body.get("model_path")
        files = sorted(Path(model_path).glob("*.safetensors")) if model_path else []
        if not files:
            raise RequestFailed(f"no *.safetensors files in model_path {model_path!r}")
        named_tensors = []
        for file in files:
            with safe_open(file, framework="pt") as handle:
                named_tensors.extend((name, handle.get_tensor(name)) for name in handle.keys())
        self._load(named_tensors, body.get("weight_version"))
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    def init_weights_update_group(self, body: dict) -> dict:
        """``/init_weights_update_group``: blocks until every rank has joined."""
        name = body.get("group_name", "weight_update_group")
        if name in self.update_groups:
            raise RequestFailed(f"weight-update group {name!r} exists; destroy it first")
        try:
            self.update_groups[name] = join_update_group(
                body["master_address"], int(body["master_port"]), int(body["rank_offset"]), int(body["world_size"]),
                body.get("backend", "nccl"), name, GROUP_TIMEOUT_S,
            )
        except (RuntimeError, ValueError) as error:
            raise RequestFailed(f"could not join weight-update group {name!r}: {error}") from None
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def destroy_weights_update_group(self, body: dict) -> dict:
        """``/destroy_weights_update_group``."""
        name = body.get("group_name", "weight_update_group")
        if name not in self.update_groups:
            raise RequestFailed(f"weight-update group {name!r} does not exist")
        leave_update_group(self.update_groups.pop(name))
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    def update_weights_from_distributed(self, body: dict) -> dict:
        """``/update_weights_from_distributed``: receive the broadcast(s) from rank 0, then load."""
        self._require_session(protocol.UPDATE_FROM_DISTRIBUTED)
        group = self.update_groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            raise RequestFailed("no such weight-update group; call /init_weights_update_group first")
        metas = pack_layout(
            (name, dtype_from_name(dtype), tuple(shape)) for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"])
        )
        if body.get("load_format") == protocol.FLATTENED_BUCKET:
            buffer = torch.empty(metas[-1].end if metas else 0, dtype=torch.uint8)
            dist.broadcast(buffer, group_src=0, group=group)
            named_tensors = Bucket(buffer=buffer, metas=metas).named_tensors()
        else:
            named_tensors = []
            for meta in metas:
                tensor = torch.empty(meta.shape, dtype=meta.dtype)
                dist.broadcast(tensor, group_src=0, group=group)
                named_tensors.append((meta.name, tensor))
        self._load(named_tensors, body.get("weight_version"))
        return {"success": True, "message": "Succeeded to update parameter online."}

    def get_weights_by_name(self, body: dict) -> Any:
        """``/get_weights_by_name``: the first ``truncate_size`` rows of a checkpoint tensor."""
        try:
            tensor = self.weights.read(body["name"])
        except KeyError as error:
            raise RequestFailed(str(error.args[0])) from None
        return tensor[: int(body.get("truncate_size", 100))].tolist()

    def release_memory(self, body: dict) -> None:
        """``/release_memory_occupation``."""
        self.released.update((body or {}).get("tags") or protocol.MEMORY_TAGS)

    def resume_memory(self, body: dict) -> None:
        """``/resume_memory_occupation``; as in SGLang, resuming a region that is not released fails."""
        tags = (body or {}).get("tags") or protocol.MEMORY_TAGS
        held = sorted(set(tags) - self.released)
        if held:
            raise RequestFailed(f"memory regions {held} are not released; resume only what /release_memory_occupation released")
        self.released.difference_update(tags)

    def flush_cache(self, body: dict) -> str:
        """``/flush_cache``: this engine keeps no cache between requests."""
        return "Cache flushed.\n"
