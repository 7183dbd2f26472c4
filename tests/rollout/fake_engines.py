"""Engine stand-ins served in the test process: any FastAPI app on a thread, and an SGLang fake
that answers its server information."""

from __future__ import annotations

import contextlib
import threading

import fastapi

from megarl.rollout import protocol
from megarl.rollout.embedded.server import listening_socket, uvicorn_server


@contextlib.contextmanager
def serving(app):
    """``app`` served on a thread; yields its base URL."""
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def fake_sglang(server_info: dict | None, old_server_info: dict | None) -> fastapi.FastAPI:
    """An SGLang stand-in for the start-up checks: /health, and each /server_info name answering
    its dict or 404."""
    app = fastapi.FastAPI()
    app.get(protocol.HEALTH)(lambda: None)
    for path, answer in ((protocol.SERVER_INFO, server_info), (protocol.SERVER_INFO_DEPRECATED, old_server_info)):
        if answer is not None:
            app.get(path)(lambda answer=answer: answer)
    return app
