"""uvicorn's protocol with each response's head held for its body: one write per answer,
and every answer still whole on the wire (keep-alive, HEAD, streamed, closing, a client
that half-closes)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from trackpipe.sources.oneshot import OneWriteHttpToolsProtocol, _HeldHeadTransport

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class RecordingTransport:
    def __init__(self):
        self.calls: list[tuple[str, bytes]] = []
        self.closed = False

    def write(self, data):
        self.calls.append(("write", bytes(data)))

    def writelines(self, parts):
        self.calls.append(("writelines", b"".join(parts)))

    def close(self):
        self.closed = True
        self.calls.append(("close", b""))

    def is_closing(self):
        return self.closed


def test_a_head_and_its_body_go_out_in_one_call_and_a_lone_head_a_moment_later():
    async def main():
        inner = RecordingTransport()
        t = _HeldHeadTransport(inner, asyncio.get_running_loop())
        t.write(HEAD)
        assert inner.calls == []
        t.write(b"ok")
        assert inner.calls == [("writelines", HEAD + b"ok")]
        t.write(HEAD)  # a HEAD request's answer: no body follows
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert inner.calls[1:] == [("write", HEAD)]
        t.write(b"100 bytes of something else")  # not a head: straight through
        assert inner.calls[2:] == [("write", b"100 bytes of something else")]
        t.write(HEAD)
        t.close()  # a held head goes out before the connection closes
        assert inner.calls[3:] == [("write", HEAD), ("close", b"")]
        assert t.is_closing()

    asyncio.run(main())


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/stream":  # head, then the body in two steps of the task
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"one,", "more_body": True})
        await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"two"})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop",
                                        http=OneWriteHttpToolsProtocol, lifespan="off",
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield port
    srv.should_exit = True
    thread.join(10)


def exchange(port: int, request: bytes, until: bytes, times: int = 1) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        got = b""
        while got.count(until) < times:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_keep_alive_answers_head_requests_and_streamed_bodies_arrive_whole(server):
    two = exchange(server, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
                   until=b"\r\n\r\nok", times=2)
    first, second = two.split(b"okHTTP/1.1")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 2\r\n" in first
    assert second.startswith(b" 200 OK\r\n") and second.endswith(b"\r\n\r\nok")
    head = exchange(server, b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n", until=b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert b"content-length: 2" in head
    streamed = exchange(server, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n", until=b"0\r\n\r\n")
    assert b"transfer-encoding: chunked" in streamed
    assert streamed.endswith(b"\r\n\r\n4\r\none,\r\n3\r\ntwo\r\n0\r\n\r\n")
    closing = exchange(server, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                       until=b"\r\n\r\nok")
    assert b"connection: close" in closing and closing.endswith(b"ok")


@pytest.mark.parametrize("path", ["HEAD /a", "GET /stream"])
def test_a_client_that_half_closes_after_its_request_still_gets_the_head(server, path):
    """uvloop closes the connection as soon as it reads the client's FIN, which comes
    before a lone head's callback would run: the head must be on its way by then."""
    method, target = path.split()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", server), timeout=5) as s:
            s.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        assert got.startswith(b"HTTP/1.1 200 OK\r\n")
