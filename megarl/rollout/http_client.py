"""JSON over HTTP to one engine, with a timeout on every call and typed errors."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any

from megarl.rollout.errors import EngineDead, EngineRequestError, EngineTimeout

_DEAD_CONNECTION = (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead, http.client.BadStatusLine)


def request(engine: str, url: str, method: str, path: str, body: Any = None, *, timeout: float) -> Any:
    """Send one request and return the decoded JSON answer (or its text when it is not JSON).

    Args:
        engine: the engine's name for error messages.
        url: ``http://host:port`` of the engine.
        method: ``GET`` or ``POST``.
        path: e.g. ``/generate``.
        body: JSON-able request body, or None for none.
        timeout: seconds allowed for connecting and for each wait on the answer.

    Raises:
        EngineTimeout: no answer within ``timeout`` (the engine is stalled or overloaded).
        EngineDead: the connection was refused, reset or closed without an answer.
        EngineRequestError: the engine answered with an HTTP error, or ``"success": false``.
    """
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    payload = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except (socket.timeout, TimeoutError):
        raise EngineTimeout(engine, f"{method} {path} got no answer within {timeout:g} s; the engine is stalled or overloaded") from None
    except (*_DEAD_CONNECTION, OSError) as error:
        # Refused, reset, unreachable host, unknown name: the engine cannot be reached.
        raise EngineDead(engine, f"{method} {path} failed: {type(error).__name__}: {error}") from None
    finally:
        connection.close()
    text = raw.decode(errors="replace")
    try:
        answer = json.loads(text) if text else None
    except json.JSONDecodeError:
        answer = text
    if response.status >= 400:
        raise EngineRequestError(engine, f"{method} {path} answered HTTP {response.status}: {_message(answer)}")
    if isinstance(answer, dict) and answer.get("success") is False:
        raise EngineRequestError(engine, f"{method} {path} failed: {answer.get('message')}")
    return answer


def _message(answer: Any) -> str:
    """The error text of an error answer (SGLang: ``{"error": {"message": ...}}`` or ``{"message": ...}``)."""
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in answer:
            return str(answer["message"])
    return str(answer)[:2000]
