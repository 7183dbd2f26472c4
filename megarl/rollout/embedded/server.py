"""The ``hf`` rollout engine's HTTP server: :class:`~megarl.rollout.embedded.hf_engine.HFEngine`
behind SGLang's native HTTP API, on FastAPI + uvicorn as SGLang serves.

::

    python -m megarl.rollout.embedded.server --model PATH [--port 0 --ready-file FILE --seed 0 ...]

It serves the subset of SGLang's endpoints that megarl's client uses (listed in
:mod:`~megarl.rollout.embedded.hf_engine`), so the client, its weight transports, health checks
and restarts run unchanged on a laptop or in CI. ``/generate`` awaits the scheduler on the event
loop, so any number of requests wait at once and are batched together; ``/health`` answers at
once; every other endpoint runs on a worker thread, so ``/health`` answers while a batch
generates or weights load.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import traceback
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable

import torch
import uvicorn
from fastapi import FastAPI, Request as HTTPRequest, Response
from starlette.concurrency import run_in_threadpool

from megarl.rollout import protocol
from megarl.rollout.embedded.hf_engine import HFEngine, RequestFailed
from megarl.rollout.watchdog import start_parent_watchdog


def _routes(engine: HFEngine) -> dict[str, Callable[[dict], Any]]:
    """Every endpoint but ``/generate`` and the health checks: a blocking call on a worker thread."""
    return {
        protocol.MODEL_INFO: engine.model_info,
        protocol.SERVER_INFO: engine.server_info,
        protocol.SERVER_INFO_DEPRECATED: engine.server_info,
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
        protocol.PAUSE_GENERATION: engine.pause_generation,
        protocol.CONTINUE_GENERATION: engine.continue_generation,
        protocol.ABORT_REQUEST: engine.abort_request,
        protocol.UPDATE_WEIGHT_VERSION: engine.update_weight_version,
    }


_STATUS_STYLE = {
    protocol.BEGIN_WEIGHT_UPDATE, protocol.END_WEIGHT_UPDATE, protocol.UPDATE_FROM_TENSOR, protocol.UPDATE_FROM_DISK,
    protocol.UPDATE_FROM_DISTRIBUTED, protocol.INIT_UPDATE_GROUP, protocol.DESTROY_UPDATE_GROUP, protocol.UPDATE_WEIGHT_VERSION,
}
"""Endpoints that SGLang answers with ``{"success", "message"}`` (others: ``{"error": {"message"}}``)."""


def _answer(status: int, answer: Any) -> Response:
    """``answer`` as SGLang sends it: JSON, plain text for a string, an empty body for None."""
    if isinstance(answer, str):
        return Response(answer, status_code=status, media_type="text/plain")
    return Response(b"" if answer is None else json.dumps(answer), status_code=status, media_type="application/json")


def _failure(path: str, error: Exception) -> Response:
    if isinstance(error, RequestFailed):
        answer = {"success": False, "message": str(error)} if path in _STATUS_STYLE else {"error": {"message": str(error)}}
        return _answer(HTTPStatus.BAD_REQUEST, answer)
    traceback.print_exception(error)
    return _answer(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {"message": f"{type(error).__name__}: {error}"}})


async def _json_body(request: HTTPRequest) -> dict:
    raw = await request.body()
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError as error:
        raise RequestFailed(f"the body is not JSON: {error}") from None


def make_app(engine: HFEngine) -> FastAPI:
    """The FastAPI application serving ``engine`` (every path answers GET and POST, as before).

    ``/generate`` awaits the scheduler on the event loop, so any number of requests can wait at
    once; the other endpoints block (weight loads, pauses) and run on Starlette's worker threads.
    """
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    async def generate(request: HTTPRequest) -> Response:
        try:
            return _answer(HTTPStatus.OK, await engine.generate(await _json_body(request)))
        except Exception as error:
            return _failure(protocol.GENERATE, error)

    async def health(request: HTTPRequest) -> Response:
        return _answer(HTTPStatus.OK, None)

    async def health_generate(request: HTTPRequest) -> Response:
        return _answer(await run_in_threadpool(engine.health_generate), None)

    def blocking(path: str, handler: Callable[[dict], Any]):
        async def endpoint(request: HTTPRequest) -> Response:
            try:
                return _answer(HTTPStatus.OK, await run_in_threadpool(handler, await _json_body(request)))
            except Exception as error:
                return _failure(path, error)

        return endpoint

    methods = ["GET", "POST"]
    app.add_api_route(protocol.GENERATE, generate, methods=methods)
    app.add_api_route(protocol.HEALTH, health, methods=methods)
    app.add_api_route(protocol.HEALTH_GENERATE, health_generate, methods=methods)
    for path, handler in _routes(engine).items():
        app.add_api_route(path, blocking(path, handler), methods=methods)

    @app.exception_handler(HTTPStatus.NOT_FOUND)
    async def not_found(request: HTTPRequest, error: Exception) -> Response:
        return _answer(HTTPStatus.NOT_FOUND, {"error": {"message": f"the hf engine does not serve {request.url.path}"}})

    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound and listening on ``host:port`` (0: any free port): connections queue from now on.

    Its protocol is named (TCP): asyncio sets ``TCP_NODELAY`` on accepted connections only when the
    listening socket says TCP, and without it every answer on a kept-alive connection waited ~40 ms
    for the client's delayed acknowledgement."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


SHUTDOWN_GRACE_S = 1.0
"""On SIGTERM, requests still generating after this long are dropped: a stopped engine's answers
are not awaited (``Engine.stop`` kills what is left soon after)."""


def uvicorn_server(app: FastAPI) -> uvicorn.Server:
    """A quiet uvicorn server for ``app`` (failures reach the client with the engine's name)."""
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=60, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    return uvicorn.Server(config)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megarl.rollout.embedded.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (see --ready-file)")
    parser.add_argument("--ready-file", help="written with {port, pid} once the engine serves")
    parser.add_argument("--seed", type=int, default=0, help="seed of requests without sampling_seed")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--step-delay-s", type=float, default=0.0, help="wait after each decoding step (a GPU's latency, modelled)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    parser.add_argument("--context-length", type=int, help="the longest prompt + response served (SGLang's flag); default the model's max_position_embeddings")
    parser.add_argument(
        "--enable-return-routed-experts", action="store_true", help="record the routers' top-k of every token and answer return_routed_experts (SGLang's flag)"
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.parent_pid is not None:
        start_parent_watchdog(args.parent_pid)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = HFEngine(
        args.model, args.dtype, args.seed, step_delay_s=args.step_delay_s, return_routed_experts=args.enable_return_routed_experts,
        context_length=args.context_length,
    )
    engine.health_generate()  # warm-up: the first forward of a fresh process is the slowest
    engine.scheduler.start()
    sock = listening_socket(args.host, args.port)
    port = sock.getsockname()[1]
    if args.ready_file:
        partial = Path(args.ready_file + ".partial")
        partial.write_text(json.dumps({"port": port, "pid": os.getpid()}))
        os.replace(partial, args.ready_file)
    print(f"hf engine serving {args.model} on http://{args.host}:{port}", file=sys.stderr, flush=True)
    uvicorn_server(make_app(engine)).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
