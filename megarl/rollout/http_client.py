"""JSON over HTTP to a group's engines: many requests in flight, a timeout on every call, typed errors.

One :class:`EngineClient` serves one engine group: an ``httpx.AsyncClient`` (a connection pool
sized to the engines) driven by an asyncio event loop on a thread the client owns, so that the
synchronous trainer and the group's worker threads can use it as well as code on the loop::

    client = EngineClient(num_engines=2)
    answer = await client.request_async("hf-0 (http://...)", url, "POST", "/generate", body, timeout=600)  # on the loop
    future = client.run(coroutine)          # from any other thread: a concurrent.futures.Future
    answer = client.wait(coroutine)         # from any other thread: block until it is done
    client.close()                          # cancels what is in flight, closes the pool, ends the thread

:class:`megarl.rollout.engine.Engine` wraps these per engine (``call_async``, ``submit``, ``call``).
At most :data:`MAX_IN_FLIGHT_PER_ENGINE` requests run against one engine at a time; more wait for
a free slot, within their own timeout.

Errors, whatever the HTTP library raised:

- :class:`EngineTimeout`: no connection, or no answer, within ``timeout`` seconds (each wait on
  the socket is bounded, not the whole exchange, so a long answer that keeps arriving is not cut);
- :class:`EngineDead`: the connection was refused, reset or closed without a (complete) answer,
  or the host is unknown; the message names the operating system's error where there is one;
- :class:`EngineRequestError`: an HTTP error status, or ``"success": false`` in the answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
from typing import Any, Coroutine, TypeVar

import httpx

from megarl.rollout.errors import EngineDead, EngineRequestError, EngineTimeout

log = logging.getLogger(__name__)
Result = TypeVar("Result")

MAX_IN_FLIGHT_PER_ENGINE = 64
"""Requests one engine serves at once. SGLang batches whatever is queued, so more in flight costs
the engine nothing; 64 is far above what the trainer keeps in flight (one generate batch per
engine in sync mode, a few in async mode, plus health checks) and bounds the sockets per engine."""
_CLOSE_TIMEOUT_S = 30.0


class EngineClient:
    """An HTTP client for a group of engines, with its event loop on its own thread.

    Args:
        num_engines: engines in the group; the connection pool keeps up to
            ``num_engines * max_in_flight_per_engine`` connections alive. The pool itself sets no
            limit: the slots of each URL bound its connections, so a busy URL (a router with a
            whole batch in flight) never holds up a call to another (a health check).
        max_in_flight_per_engine: requests one engine serves at once (more wait for a slot).
    """

    def __init__(self, num_engines: int, *, max_in_flight_per_engine: int = MAX_IN_FLIGHT_PER_ENGINE):
        self.max_in_flight_per_engine = max_in_flight_per_engine
        connections = num_engines * max_in_flight_per_engine
        self._http = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=connections))
        self._slots: dict[str, asyncio.Semaphore] = {}
        """Per engine URL (a restarted engine may listen on a new port); touched only on the loop."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="megarl-engine-client", daemon=True)
        self._thread.start()
        self._closed = False
        self._close_lock = threading.Lock()

    def set_capacity(self, url: str, max_in_flight: int) -> None:
        """Let ``url`` serve ``max_in_flight`` requests at once (a router: the slots of every
        engine behind it). Before its first request."""
        self._slots[url] = asyncio.Semaphore(max_in_flight)

    @property
    def thread(self) -> threading.Thread:
        """The thread that runs the event loop (it ends in :meth:`close`)."""
        return self._thread

    async def request_async(
        self, engine: str, url: str, method: str, path: str, body: Any = None, *, timeout: float, headers: dict[str, str] | None = None
    ) -> Any:
        """Send one request and return the decoded JSON answer (or its text when it is not JSON).

        Runs on the client's loop (use :meth:`run` or :meth:`wait` from other threads).

        Args:
            engine: the engine's name for error messages.
            url: ``http://host:port`` of the engine.
            method: ``GET`` or ``POST``.
            path: e.g. ``/generate``.
            body: JSON-able request body, or None for none.
            timeout: seconds allowed for a slot and a connection, and for each wait on the answer.
            headers: more request headers (e.g. the router's routing key).

        Raises:
            EngineTimeout: no answer within ``timeout`` (the engine is stalled or overloaded).
            EngineDead: the connection was refused, reset or closed without an answer.
            EngineRequestError: the engine answered with an HTTP error, or ``"success": false``.
        """
        payload = None if body is None else json.dumps(body).encode()
        headers = {**({"Content-Type": "application/json"} if payload is not None else {}), **(headers or {})}
        stalled = EngineTimeout(engine, f"{method} {path} got no answer within {timeout:g} s; the engine is stalled or overloaded")
        slots = self._slots.get(url)
        if slots is None:
            slots = self._slots[url] = asyncio.Semaphore(self.max_in_flight_per_engine)
        try:
            await asyncio.wait_for(slots.acquire(), timeout)
        except asyncio.TimeoutError:
            raise stalled from None
        try:
            response = await self._http.request(method, url + path, content=payload, headers=headers, timeout=timeout)
        except httpx.TimeoutException:
            raise stalled from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as error:
            # Refused, reset, closed mid-answer, unknown host: the engine cannot be reached.
            cause = _operating_system_error(error)
            raise EngineDead(engine, f"{method} {path} failed: {type(cause).__name__}: {cause}") from None
        finally:
            slots.release()
        text = response.content.decode(errors="replace")
        try:
            answer = json.loads(text) if text else None
        except json.JSONDecodeError:
            answer = text
        if response.status_code >= 400:
            raise EngineRequestError(engine, f"{method} {path} answered HTTP {response.status_code}: {_message(answer)}", status=response.status_code)
        if isinstance(answer, dict) and answer.get("success") is False:
            raise EngineRequestError(engine, f"{method} {path} failed: {answer.get('message')}")
        return answer

    def run(self, coroutine: Coroutine[Any, Any, Result]) -> concurrent.futures.Future[Result]:
        """Schedule ``coroutine`` on the client's loop; cancelling the future cancels it.

        Raises:
            RuntimeError: the client is closed.
        """
        if self._closed:
            coroutine.close()
            raise RuntimeError("the engine client is closed (its EngineGroup was shut down)")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def wait(self, coroutine: Coroutine[Any, Any, Result]) -> Result:
        """Run ``coroutine`` on the client's loop and return its result (from any other thread).

        Raises:
            RuntimeError: called on the loop's own thread, where it would wait forever (await the
                coroutine instead), or the client is closed.
        """
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a blocking engine call on the engine client's own event loop would wait forever; await its async form")
        return self.run(coroutine).result()

    def close(self) -> None:
        """Cancel the requests still in flight, close the connections and end the loop's thread. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if threading.current_thread() is self._thread:
            raise RuntimeError("the engine client cannot be closed from its own event loop")
        try:
            asyncio.run_coroutine_threadsafe(self._cancel_and_close(), self._loop).result(timeout=_CLOSE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            log.warning("engine client: in-flight requests did not end within %g s of close; stopping the loop under them", _CLOSE_TIMEOUT_S)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=_CLOSE_TIMEOUT_S)
            if not self._thread.is_alive():
                self._loop.close()

    async def _cancel_and_close(self) -> None:
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._http.aclose()


def _operating_system_error(error: BaseException) -> BaseException:
    """The innermost operating-system error under an HTTP library error (refused, reset, unknown
    host), else the error itself (e.g. the server closed the connection without an answer)."""
    cause, found = error, error
    while cause is not None:
        if isinstance(cause, OSError) and str(cause):
            found = cause
        cause = cause.__cause__ or cause.__context__
    return found


def _message(answer: Any) -> str:
    """The error text of an error answer (SGLang: ``{"error": {"message": ...}}`` or ``{"message": ...}``)."""
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in answer:
            return str(answer["message"])
    return str(answer)[:2000]
