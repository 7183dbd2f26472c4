"""The ``hf`` rollout engine: a transformers model behind SGLang's native HTTP API.

::

    python -m megarl.rollout.embedded.server --model PATH [--port 0 --ready-file FILE --seed 0 ...]

It serves the subset of SGLang's endpoints that megarl's client uses, with SGLang's request and
response fields (:mod:`megarl.rollout.protocol`), so the client, its weight transports, health
checks and restarts run unchanged on a laptop or in CI:

- ``/generate``: ``input_ids`` (one prompt or a batch), ``sampling_params`` (``max_new_tokens``,
  ``temperature``, ``top_p``, ``top_k``, ``stop_token_ids``, ``n``, ``sampling_seed``,
  ``ignore_eos``), ``return_logprob``; answers ``output_ids`` and ``meta_info`` with
  ``finish_reason``, ``output_token_logprobs`` and ``weight_version``. Generation:
  :mod:`megarl.rollout.embedded.generate`.
- ``/begin_weight_update``, ``/update_weights_from_tensor`` (``load_format: flattened_bucket``;
  each payload is a handle to a bucket file in shared memory, :mod:`megarl.rollout.bucket_files`),
  ``/update_weights_from_distributed`` and ``/init_weights_update_group`` (any torch backend,
  gloo on CPU), ``/end_weight_update``, ``/update_weights_from_disk`` (a directory of safetensors),
  ``/get_weights_by_name``. Weights are addressed by HF checkpoint names
  (:class:`megarl.rollout.embedded.weights.HFWeightMap`).
- ``/release_memory_occupation`` and ``/resume_memory_occupation``: the CPU engine frees nothing,
  but refuses to generate while its weights are released, as SGLang cannot.
- ``/flush_cache`` (no cache to flush), ``/health``, ``/health_generate``, ``/get_model_info``.

Requests are served on threads; generation and weight loading take turns on one lock, so
``/health`` answers while a batch generates. ``/health_generate`` generates one token when idle
and, while a batch or a weight load runs, reports whether it advanced (a decoding step, a tensor)
within the last :data:`STALL_S` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from megarl.rollout import protocol
from megarl.rollout.bucket_files import open_handle
from megarl.rollout.embedded.generate import BatchGenerator, Request
from megarl.rollout.embedded.weights import HFWeightMap
from megarl.rollout.update_group import join_update_group, leave_update_group
from megarl.rollout.watchdog import start_parent_watchdog
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


class HFEngine:
    """A transformers model and the state behind SGLang's endpoints.

    Args:
        model_path: HF model directory.
        dtype: ``auto`` (the checkpoint's) or a torch dtype name.
        seed: seed of the draws of requests without ``sampling_seed``.
    """

    def __init__(self, model_path: str, dtype: str, seed: int):
        self.model_path = model_path
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype if dtype == "auto" else getattr(torch, dtype)).eval()
        self.weights = HFWeightMap(self.model)
        self.eos_token_ids = _eos_token_ids(self.model)
        pad = self.model.generation_config.pad_token_id
        pad = self.model.config.pad_token_id if pad is None else pad
        self.generator = BatchGenerator(
            self.model,
            context_length=self.model.config.max_position_embeddings,
            pad_token_id=0 if pad is None else int(pad),
            random_seed=seed,
        )
        self.lock = threading.Lock()
        self.weight_version = "default"
        self.released: set[str] = set()
        self.session_open = False
        self.update_groups: dict[str, Any] = {}
        self.last_progress = time.monotonic()

    def _progress(self) -> None:
        self.last_progress = time.monotonic()

    def generate(self, body: dict) -> Any:
        """``/generate``."""
        if "weights" in self.released:
            raise RequestFailed("the engine's weights are released; call /resume_memory_occupation first")
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
        requests, owners = [], []
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
            requests.extend([request] * int(params["n"]))
            owners.extend([index] * int(params["n"]))
        with self.lock:
            # The stall detector measures from here: the prefill comes before the first step.
            self._progress()
            try:
                results = self.generator.generate(requests, on_step=self._progress)
            except ValueError as error:
                raise RequestFailed(str(error)) from None
            version = self.weight_version
        items = []
        for request, owner, result in zip(requests, owners, results):
            meta = {
                "id": uuid.uuid4().hex,
                "finish_reason": result.finish_reason,
                "prompt_tokens": len(request.input_ids),
                "completion_tokens": len(result.output_ids),
                "cached_tokens": 0,
                "weight_version": version,
            }
            if return_logprob[owner]:
                meta["output_token_logprobs"] = [[logprob, token, None] for logprob, token in zip(result.logprobs, result.output_ids)]
            items.append({"output_ids": result.output_ids, "meta_info": meta})
        return items[0] if single and len(items) == 1 else items

    def health_generate(self) -> int:
        """``/health_generate``: the HTTP status."""
        if not self.lock.acquire(blocking=False):
            return HTTPStatus.OK if time.monotonic() - self.last_progress < STALL_S else HTTPStatus.SERVICE_UNAVAILABLE
        try:
            if "weights" not in self.released:
                probe = Request(input_ids=[0], max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=-1, stop_token_ids=frozenset(), seed=None)
                self.generator.generate([probe], on_step=self._progress)
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


def _routes(engine: HFEngine) -> dict[str, Callable[[dict], Any]]:
    return {
        protocol.GENERATE: engine.generate,
        protocol.MODEL_INFO: engine.model_info,
        "/model_info": engine.model_info,
        protocol.BEGIN_WEIGHT_UPDATE: engine.begin_weight_update,
        protocol.END_WEIGHT_UPDATE: engine.end_weight_update,
        protocol.UPDATE_FROM_TENSOR: engine.update_weights_from_tensor,
        protocol.UPDATE_FROM_DISK: engine.update_weights_from_disk,
        protocol.UPDATE_FROM_DISTRIBUTED: engine.update_weights_from_distributed,
        protocol.INIT_UPDATE_GROUP: engine.init_weights_update_group,
        protocol.DESTROY_UPDATE_GROUP: engine.destroy_weights_update_group,
        protocol.GET_WEIGHTS_BY_NAME: engine.get_weights_by_name,
        protocol.RELEASE_MEMORY: engine.release_memory,
        protocol.RESUME_MEMORY: engine.resume_memory,
        protocol.FLUSH_CACHE: engine.flush_cache,
    }


_STATUS_STYLE = {
    protocol.BEGIN_WEIGHT_UPDATE, protocol.END_WEIGHT_UPDATE, protocol.UPDATE_FROM_TENSOR, protocol.UPDATE_FROM_DISK,
    protocol.UPDATE_FROM_DISTRIBUTED, protocol.INIT_UPDATE_GROUP, protocol.DESTROY_UPDATE_GROUP,
}
"""Endpoints that SGLang answers with ``{"success", "message"}`` (others: ``{"error": {"message"}}``)."""


def make_handler(engine: HFEngine) -> type[BaseHTTPRequestHandler]:
    """The HTTP handler class serving ``engine``."""
    routes = _routes(engine)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            """Quiet: the client reports failures with the engine's name."""

        def _answer(self, status: int, answer: Any) -> None:
            raw = answer.encode() if isinstance(answer, str) else b"" if answer is None else json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _serve(self, body: dict) -> None:
            path = self.path.split("?", 1)[0]
            if path == protocol.HEALTH:
                return self._answer(HTTPStatus.OK, None)
            if path == protocol.HEALTH_GENERATE:
                return self._answer(engine.health_generate(), None)
            if path not in routes:
                return self._answer(HTTPStatus.NOT_FOUND, {"error": {"message": f"the hf engine does not serve {path}"}})
            try:
                self._answer(HTTPStatus.OK, routes[path](body))
            except RequestFailed as error:
                answer = {"success": False, "message": str(error)} if path in _STATUS_STYLE else {"error": {"message": str(error)}}
                self._answer(HTTPStatus.BAD_REQUEST, answer)
            except Exception as error:
                traceback.print_exc()
                self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {"message": f"{type(error).__name__}: {error}"}})

        def do_GET(self):
            self._serve({})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except json.JSONDecodeError as error:
                return self._answer(HTTPStatus.BAD_REQUEST, {"error": {"message": f"the body is not JSON: {error}"}})
            self._serve(body)

    return Handler


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megarl.rollout.embedded.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (see --ready-file)")
    parser.add_argument("--ready-file", help="written with {port, pid} once the engine serves")
    parser.add_argument("--seed", type=int, default=0, help="seed of requests without sampling_seed")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.parent_pid is not None:
        start_parent_watchdog(args.parent_pid)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = HFEngine(args.model, args.dtype, args.seed)
    engine.health_generate()  # warm-up: the first forward of a fresh process is the slowest
    server = ThreadingHTTPServer((args.host, args.port), make_handler(engine))
    server.daemon_threads = True
    if args.ready_file:
        partial = Path(args.ready_file + ".partial")
        partial.write_text(json.dumps({"port": server.server_address[1], "pid": os.getpid()}))
        os.replace(partial, args.ready_file)
    print(f"hf engine serving {args.model} on http://{args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
