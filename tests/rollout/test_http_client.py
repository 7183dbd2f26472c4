"""The engine HTTP client against real local servers that answer, refuse, close, reset, stall or
take their time: the typed errors, many requests in flight, and a clean close."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megarl.rollout import EngineDead, EngineRequestError, EngineTimeout
from megarl.rollout.engine import Engine
from megarl.rollout.http_client import EngineClient
from tests.distributed import REPO

pytestmark = pytest.mark.cpu

ENGINE = "fake-0"
SLOW_S = 1.0
IN_FLIGHT = 32


class Answers(BaseHTTPRequestHandler):
    """``/echo`` answers the request's JSON, ``/slow`` the same after :data:`SLOW_S` seconds,
    ``/text`` plain text, ``/empty`` nothing, ``/refuse`` HTTP 400 in SGLang's error shape,
    ``/fail`` ``"success": false``, ``/crash`` HTTP 500 with a plain message."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.answer(200, b"")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/slow":
            time.sleep(SLOW_S)
        if self.path in ("/echo", "/slow"):
            self.answer(200, json.dumps({"got": json.loads(body), "content_type": self.headers["Content-Type"]}).encode())
        elif self.path == "/text":
            self.answer(200, b"plain words")
        elif self.path == "/empty":
            self.answer(200, b"")
        elif self.path == "/refuse":
            self.answer(400, json.dumps({"error": {"message": "the prompt is longer than the context"}}).encode())
        elif self.path == "/fail":
            self.answer(200, json.dumps({"success": False, "message": "tensors the model does not have"}).encode())
        elif self.path == "/crash":
            self.answer(500, b"Internal Server Error")

    def answer(self, status: int, content: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)


class Server(ThreadingHTTPServer):
    request_queue_size = 2 * IN_FLIGHT  # the default backlog (5) resets connections past it
    daemon_threads = True


@pytest.fixture(scope="module")
def server():
    httpd = Server(("127.0.0.1", 0), Answers)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def client():
    client = EngineClient(num_engines=1)
    yield client
    client.close()


def raw_server(behaviour: str) -> tuple[str, socket.socket]:
    """A listening socket whose connections are closed (``close``), reset (``reset``), cut mid-answer
    (``cut``) or left unanswered (``stall``) once the request has arrived."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            read_request(connection)
            if behaviour == "reset":
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if behaviour == "cut":
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial\"")
            if behaviour == "stall":
                held.append(connection)
            else:
                connection.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", listener


def read_request(connection: socket.socket) -> None:
    """Read one whole request (unread bytes would make the close a reset)."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += connection.recv(65536)
    head, body = received.split(b"\r\n\r\n", 1)
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += connection.recv(65536)


def closed_port_url() -> str:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def request(client: EngineClient, url: str, path: str, body=None, *, method: str = "POST", timeout: float = 10.0):
    return client.wait(client.request_async(ENGINE, url, method, path, body, timeout=timeout))


def test_answers_are_decoded_and_the_body_is_sent_as_json(client, server):
    body = {"input_ids": [[1, 2, 3]], "sampling_params": [{"temperature": 1.0, "sampling_seed": 7}]}
    assert request(client, server, "/echo", body) == {"got": body, "content_type": "application/json"}
    assert request(client, server, "/text", {}) == "plain words"
    assert request(client, server, "/empty", {}) is None
    assert request(client, server, "/health", method="GET") is None


@pytest.mark.parametrize(
    "path, message",
    [
        ("/refuse", r"rollout engine fake-0: POST /refuse answered HTTP 400: the prompt is longer than the context$"),
        ("/crash", r"rollout engine fake-0: POST /crash answered HTTP 500: Internal Server Error$"),
        ("/fail", r"rollout engine fake-0: POST /fail failed: tensors the model does not have$"),
    ],
)
def test_error_answers_raise_a_request_error_with_the_engines_message(client, server, path, message):
    with pytest.raises(EngineRequestError, match=message):
        request(client, server, path, {})


def test_a_refused_connection_is_a_dead_engine(client):
    url = closed_port_url()
    with pytest.raises(EngineDead, match=r"rollout engine fake-0: POST /generate failed: ConnectionRefusedError: .*Connect"):
        request(client, url, "/generate", {})


def test_an_unknown_host_is_a_dead_engine(client):
    with pytest.raises(EngineDead, match=r"rollout engine fake-0: GET /health failed: gaierror: "):
        request(client, "http://megarl-no-such-host.invalid:1", "/health", method="GET")


@pytest.mark.parametrize(
    "behaviour, cause",
    [
        ("close", r"RemoteProtocolError: Server disconnected without sending a response"),
        ("reset", r"ConnectionResetError: \[Errno 104\] Connection reset by peer"),
        ("cut", r"RemoteProtocolError: peer closed connection without sending complete message body"),
    ],
)
def test_a_connection_closed_without_a_whole_answer_is_a_dead_engine(client, behaviour, cause):
    url, listener = raw_server(behaviour)
    with listener, pytest.raises(EngineDead, match=rf"rollout engine fake-0: POST /generate failed: {cause}"):
        request(client, url, "/generate", {"input_ids": [[1]]})


def test_a_stalled_engine_times_out_within_the_timeout(client):
    url, listener = raw_server("stall")
    began = time.monotonic()
    with listener, pytest.raises(EngineTimeout, match=r"rollout engine fake-0: POST /generate got no answer within 0\.5 s; the engine is stalled or overloaded"):
        request(client, url, "/generate", {}, timeout=0.5)
    assert time.monotonic() - began < 2.0


def test_many_requests_in_flight_take_the_time_of_one(client, server):
    request(client, server, "/echo", {})  # the first connection, outside the timing
    began = time.monotonic()
    futures = [client.run(client.request_async(ENGINE, server, "POST", "/slow", {"index": index}, timeout=30)) for index in range(IN_FLIGHT)]
    answers = [future.result() for future in futures]
    elapsed = time.monotonic() - began
    assert [answer["got"]["index"] for answer in answers] == list(range(IN_FLIGHT))
    assert elapsed < 4 * SLOW_S, f"{IN_FLIGHT} requests of {SLOW_S:g} s each took {elapsed:.1f} s: they were not in flight together"


def test_requests_past_the_per_engine_limit_wait_for_a_slot_within_their_timeout(server):
    client = EngineClient(num_engines=1, max_in_flight_per_engine=2)
    try:
        began = time.monotonic()
        futures = [client.run(client.request_async(ENGINE, server, "POST", "/slow", {}, timeout=30)) for _ in range(4)]
        concurrent.futures.wait(futures)
        assert all(future.exception() is None for future in futures)
        assert 2 * SLOW_S <= time.monotonic() - began < 4 * SLOW_S
        busy = [client.run(client.request_async(ENGINE, server, "POST", "/slow", {}, timeout=30)) for _ in range(2)]
        with pytest.raises(EngineTimeout, match=r"POST /echo got no answer within 0\.3 s"):
            request(client, server, "/echo", {}, timeout=0.3)
        assert all(future.result()["got"] == {} for future in busy)
    finally:
        client.close()


def test_a_url_with_more_slots_than_the_pool_keeps_does_not_hold_up_calls_to_others(server):
    # A router with a batch in flight holds the slots of every engine behind it; a health check
    # of one engine (here the same server under another name) still gets a connection at once.
    client = EngineClient(num_engines=1, max_in_flight_per_engine=2)
    try:
        client.set_capacity(server, 4)
        busy = [client.run(client.request_async(ENGINE, server, "POST", "/slow", {}, timeout=30)) for _ in range(4)]
        time.sleep(SLOW_S / 4)
        other = server.replace("127.0.0.1", "localhost")
        assert request(client, other, "/echo", {"a": 1}, timeout=SLOW_S / 2)["got"] == {"a": 1}
        assert all(future.result()["got"] == {} for future in busy)
    finally:
        client.close()


def test_a_blocking_call_on_the_loop_itself_is_refused(client, server):
    async def blocking_inside_the_loop():
        return client.wait(client.request_async(ENGINE, server, "POST", "/echo", {}, timeout=5))

    with pytest.raises(RuntimeError, match="would wait forever; await its async form"):
        client.wait(blocking_inside_the_loop())


def test_engine_calls_in_three_forms(client, server):
    engine = Engine("fake-0", "hf", 1, url=server)
    with pytest.raises(RuntimeError, match="belongs to no EngineGroup"):
        engine.call("POST", "/echo", {}, timeout=5)
    engine.client = client
    assert engine.call("POST", "/echo", {"a": 1}, timeout=5)["got"] == {"a": 1}
    assert engine.submit("POST", "/echo", {"a": 2}, timeout=5).result()["got"] == {"a": 2}
    assert client.wait(engine.call_async("POST", "/echo", {"a": 3}, timeout=5))["got"] == {"a": 3}
    engine.url = closed_port_url()
    with pytest.raises(EngineDead, match=r"rollout engine fake-0 \(http://127\.0\.0\.1:\d+\): POST /generate failed"):
        engine.call("POST", "/generate", {}, timeout=5)


def test_close_cancels_what_is_in_flight_and_ends_the_thread(server):
    client = EngineClient(num_engines=2)
    url, listener = raw_server("stall")
    with listener:
        stalled = client.run(client.request_async(ENGINE, url, "POST", "/generate", {}, timeout=60))
        assert request(client, server, "/echo", {"x": 1})["got"] == {"x": 1}
        began = time.monotonic()
        client.close()
        assert time.monotonic() - began < 5
    assert stalled.cancelled()
    assert not client.thread.is_alive()
    client.close()  # idempotent
    with pytest.raises(RuntimeError, match="the engine client is closed"):
        request(client, server, "/echo", {})


EXIT_SCRIPT = """
import atexit, sys, threading
from megarl.config import resolve_model_path
from megarl.rollout import EngineGroup

def report():  # registered first, so it runs after the group's own exit handler
    alive = [thread.name for thread in threading.enumerate() if thread.name == "megarl-engine-client"]
    print("client threads at exit:", alive, flush=True)

atexit.register(report)
group = EngineGroup.connect([sys.argv[1]], engine="hf", model_path=resolve_model_path("bundled:tiny-moe"), health_check_interval_s=3600)
print("answer:", group.engines[0].call("POST", "/echo", {"x": 1}, timeout=10)["got"], flush=True)
"""


def test_a_group_left_open_closes_its_client_at_interpreter_exit(server):
    ran = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, server], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["answer: {'x': 1}", "client threads at exit: []"]
