"""The HTTP layer against hostile and broken clients, over raw sockets against a real
server (sources/oneshot.py): deadlines, the connection cap, the header size limit, JSON
answers to malformed requests, early refusals that close, half-closing clients.

The deadlines are set short through the environment (TRACKPIPE_SERVER_*), which a
server without them ignores, so each test also shows what happens without the fix."""

from __future__ import annotations

import json
import os
import resource
import socket
import time
import uuid

import pytest
from support import ServerProcess, basic, wait_for

IDLE, HEADERS, BODY = 0.5, 1.0, 1.5
SHORT = {"TRACKPIPE_SERVER_IDLE_TIMEOUT_SECONDS": str(IDLE),
         "TRACKPIPE_SERVER_HEADER_TIMEOUT_SECONDS": str(HEADERS),
         "TRACKPIPE_SERVER_BODY_TIMEOUT_SECONDS": str(BODY)}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("hostile") / "data", env=SHORT).start()
    yield proc
    proc.stop()


def mid() -> str:
    return f"hostile-{uuid.uuid4().hex[:12]}"


def request(server, message_id: str | None = None, *, path="/v1/track", body=None,
            headers=(), method="POST") -> bytes:
    if body is None:
        body = json.dumps({"userId": "u", "event": "E", "messageId": message_id or mid()})
    body = body.encode() if isinstance(body, str) else body
    lines = [f"{method} {path} HTTP/1.1", "Host: x", f"Authorization: {basic(server.write_key)}",
             *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def connect(server, timeout: float = 4.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_to_end(sock: socket.socket) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes, and when (seconds from now) it closed;
    None if it kept the connection past the socket's timeout."""
    start, got = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        return got, None
    except ConnectionResetError:
        pass
    return got, time.monotonic() - start


def answers(data: bytes) -> list[tuple[int, dict, bytes]]:
    """The responses in `data`: (status, headers lower-cased, body)."""
    found = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        size = int(headers.get("content-length", 0))
        found.append((int(lines[0].split()[1]), headers, rest[:size]))
        data = rest[size:]
    return found


def refused(answer: tuple[int, dict, bytes], status: int, code: str) -> dict:
    """A refusal with the project's JSON error body that closes the connection."""
    got, headers, body = answer
    assert got == status, answer
    assert headers["content-type"] == "application/json", headers
    assert headers.get("connection") == "close", headers
    parsed = json.loads(body)
    assert parsed["code"] == code and parsed["message"], parsed
    return parsed


def stored(server, message_id: str) -> bool:
    return bool(server.events(message_id=message_id))


# -- 1. deadlines ----------------------------------------------------------------------


def test_a_silent_connection_is_closed_and_so_is_one_kept_alive_after_its_answer(srv):
    with connect(srv) as s:
        got, closed = read_to_end(s)
    assert got == b"" and closed is not None and closed < IDLE + 1.5
    with connect(srv) as s:
        s.sendall(request(srv))
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        got, closed = read_to_end(s)
    assert got == b"" and closed is not None and closed < IDLE + 1.5


@pytest.mark.parametrize("how", ["half the headers", "a header byte every 0.2 s"])
def test_headers_that_never_end_are_answered_408_and_the_connection_closed(srv, how):
    with connect(srv) as s:
        start = time.monotonic()
        s.sendall(b"POST /v1/track HTTP/1.1\r\nHost: x\r\n")
        if how != "half the headers":
            s.settimeout(0.2)
            for byte in b"X-Slow: " + b"a" * 40:  # would take 9.6 s
                s.sendall(bytes([byte]))
                try:
                    if s.recv(1, socket.MSG_PEEK):
                        break
                except TimeoutError:
                    pass
            s.settimeout(4)
        got, closed = read_to_end(s)
        elapsed = time.monotonic() - start
    assert closed is not None, "the connection was kept open"
    refused(answers(got)[0], 408, "request_timeout")
    assert HEADERS - 0.2 < elapsed < HEADERS + 2


def test_a_body_that_stops_coming_is_answered_408_and_nothing_is_stored(srv):
    message_id = mid()
    whole = request(srv, message_id)
    with connect(srv) as s:
        start = time.monotonic()
        s.sendall(whole[:-10])
        got, closed = read_to_end(s)
        elapsed = time.monotonic() - start
    assert closed is not None, "the connection was kept open"
    body = refused(answers(got)[0], 408, "request_timeout")
    assert "body" in body["message"]
    assert BODY - 0.2 < elapsed < BODY + 2
    assert not stored(srv, message_id)


def test_a_slow_body_gets_through_while_it_keeps_coming(srv):
    """1 s more per KB received: 8 KB at 4 KB/s takes longer than the body deadline."""
    message_id = mid()
    whole = request(srv, body=json.dumps({"userId": "u", "event": "E", "messageId": message_id,
                                          "properties": {"pad": "x" * 8000}}))
    head, body = whole.split(b"\r\n\r\n", 1)
    with connect(srv) as s:
        s.sendall(head + b"\r\n\r\n")
        start = time.monotonic()
        for i in range(0, len(body), 512):
            s.sendall(body[i:i + 512])
            time.sleep(0.125)
        assert time.monotonic() - start > BODY
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert stored(srv, message_id)


# -- 2. the connection cap ----------------------------------------------------------------


def test_over_the_connection_cap_a_request_gets_a_json_503_and_extra_sockets_are_closed(
        fresh_server):
    proc = fresh_server(env={"TRACKPIPE_SERVER_MAX_CONNECTIONS": "8"}).start()
    held = [connect(proc) for _ in range(8)]
    try:
        time.sleep(0.2)
        with connect(proc) as s:
            s.sendall(request(proc))
            got, closed = read_to_end(s)
        assert closed is not None
        answer = answers(got)[0]
        refused(answer, 503, "overloaded")
        assert int(answer[1]["retry-after"]) > 0
        held += [connect(proc) for _ in range(40)]  # 32 overflow connections may wait
        time.sleep(0.3)
        with connect(proc) as s:
            got, closed = read_to_end(s)
        assert got == b"" and closed is not None and closed < 0.9, "not closed at once"
    finally:
        for s in held:
            s.close()
    time.sleep(0.5)
    with connect(proc) as s:
        s.sendall(request(proc))
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_silent_sockets_cannot_use_up_the_file_descriptors(fresh_server):
    """With ulimit -n 256 the cap is 128: 300 silent sockets leave the server room for its
    own files and a new client an answer; they are all gone after the idle deadline."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = fresh_server(preexec_fn=limit, env={"TRACKPIPE_SERVER_IDLE_TIMEOUT_SECONDS": "2"})
    proc.start()
    held = []
    try:
        for _ in range(300):
            held.append(connect(proc))
        fds = len(os.listdir(f"/proc/{proc.proc.pid}/fd"))
        assert fds < 230, f"{fds} descriptors open"
        time.sleep(1.3)  # the overflow connections are gone; the 128 within the cap stay
        with connect(proc) as s:
            s.sendall(request(proc))
            got, _ = read_to_end(s)
        refused(answers(got)[0], 503, "overloaded")
        message_id = mid()
        wait_for(lambda: proc.post("/v1/track", {"userId": "u", "event": "E",
                                                 "messageId": message_id}).status_code == 200,
                 timeout=5, what="a 200 once the silent sockets are closed")
        with proc.admin() as admin:
            assert admin.get("/api/v1/events", params={"limit": 1}).status_code == 200
        assert len(os.listdir(f"/proc/{proc.proc.pid}/fd")) < 60
    finally:
        for s in held:
            s.close()


# -- 3. header size -------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["100,000 headers", "one 1 MB header", "a 70 KB URL"])
def test_headers_over_64_kb_are_answered_431(srv, what):
    if what == "100,000 headers":
        headers = [f"X-H{i}: v" for i in range(100_000)]
        path = "/v1/track"
    elif what == "one 1 MB header":
        headers, path = ["X-Big: " + "a" * (1 << 20)], "/v1/track"
    else:
        headers, path = [], "/v1/track?" + "a" * 70_000
    message_id = mid()
    with connect(srv) as s:
        try:
            s.sendall(request(srv, message_id, path=path, headers=headers))
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off; the answer was sent before
        got, closed = read_to_end(s)
    assert closed is not None
    refused(answers(got)[0], 431, "headers_too_large")
    assert not stored(srv, message_id)


def test_headers_under_64_kb_are_fine(srv):
    message_id = mid()
    with connect(srv) as s:
        s.sendall(request(srv, message_id, headers=["X-Big: " + "a" * 60_000]))
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert stored(srv, message_id)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def test_a_header_that_never_ends_is_cut_off_without_being_held_in_memory(srv):
    before = rss_mb(srv.proc.pid)
    sent = 0
    with connect(srv) as s:
        s.sendall(b"POST /v1/track HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(64):
                s.sendall(b"a" * (1 << 19))
                sent += 1 << 19
        except (BrokenPipeError, ConnectionResetError):
            pass
        got, _ = read_to_end(s)
        grown = rss_mb(srv.proc.pid) - before
    assert sent < 32 << 20 or got, "the server took 32 MB of header without a word"
    assert grown < 16, f"the server grew by {grown:.0f} MB"
    if got:
        refused(answers(got)[0], 431, "headers_too_large")


# -- 4. malformed requests ------------------------------------------------------------------

BODY_JSON = b'{"userId":"u","event":"E"}'
MALFORMED = {
    "Content-Length and Transfer-Encoding": [f"Content-Length: {len(BODY_JSON) + 5}",
                                             "Transfer-Encoding: chunked"],
    "two Content-Lengths": [f"Content-Length: {len(BODY_JSON)}",
                            f"Content-Length: {len(BODY_JSON) + 1}"],
    "bad chunk size": ["Transfer-Encoding: chunked"],
    "obs-fold": ["X-A: b\r\n c"],
    "bare LF": None,
    "unknown method": None,
    "invalid URL": None,
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_request_gets_a_json_400_and_the_connection_closed(srv, case):
    extra = MALFORMED[case]
    if case == "bad chunk size":
        data = request(srv, headers=extra, body=b"zz\r\n" + BODY_JSON + b"\r\n0\r\n\r\n")
    elif case == "Content-Length and Transfer-Encoding":
        data = request(srv, headers=extra, body=b"0\r\n\r\n" + BODY_JSON)
    elif extra:
        data = request(srv, headers=extra, body=BODY_JSON)
    elif case == "bare LF":
        data = request(srv, body=BODY_JSON).replace(b"\r\n", b"\n")
    elif case == "unknown method":
        data = request(srv, method="FOO", body=BODY_JSON)
    else:
        data = request(srv, path="http://[::1/v1/track", body=BODY_JSON)
    with connect(srv) as s:
        s.sendall(data)
        got, closed = read_to_end(s)
    assert closed is not None
    [answer] = answers(got)
    body = refused(answer, 400, "invalid_http")
    assert "HTTP/1.1" in body["message"]


@pytest.mark.parametrize("size", ["one event", "a batch that takes turns"])
def test_garbage_after_a_valid_request_comes_after_its_answer(srv, size):
    message_id = mid()
    if size == "one event":
        first = request(srv, message_id)
    else:
        events = [{"type": "track", "userId": "u", "event": "E", "messageId": f"{message_id}-{i}",
                   "properties": {"x": "y" * 100}} for i in range(2000)]
        first = request(srv, path="/v1/batch", body=json.dumps({"batch": events}))
        message_id += "-1999"
    with connect(srv) as s:
        s.sendall(first + b"GARBAGE\r\n\r\n")
        got, closed = read_to_end(s)
    assert closed is not None
    ok, bad = answers(got)
    assert ok[0] == 200 and json.loads(ok[2]) == {"success": True}, ok
    refused(bad, 400, "invalid_http")
    assert stored(srv, message_id)


# -- 5. early refusals close the connection ------------------------------------------------


@pytest.mark.parametrize("case", ["Expect: 100-continue, over the size limit",
                                  "unsupported Content-Encoding"])
def test_a_refusal_before_the_body_is_read_closes_the_connection(srv, case):
    if case.startswith("Expect"):
        head = ["Expect: 100-continue", "Content-Length: 600000"]
        status, code = 400, "payload_too_large"
    else:
        head = ["Content-Encoding: br", "Content-Length: 600"]
        status, code = 415, "unsupported_encoding"
    second = mid()
    with connect(srv) as s:
        s.sendall(request(srv, headers=head, body=b""))
        time.sleep(0.3)
        try:  # with the connection kept open, this would be taken for the first one's body
            s.sendall(request(srv, second))
        except (BrokenPipeError, ConnectionResetError):
            pass
        got, closed = read_to_end(s)
    [answer] = answers(got)
    refused(answer, status, code)  # with `connection: close` ...
    assert closed is not None and closed < IDLE + 0.5  # ... and closed then, not at a deadline
    assert not stored(srv, second)


# -- 6. a client that half-closes --------------------------------------------------------


@pytest.mark.parametrize("close", [False, True])
def test_a_client_that_half_closes_after_its_request_gets_the_whole_answer(srv, close):
    for _ in range(3):
        message_id = mid()
        with connect(srv) as s:
            s.sendall(request(srv, message_id, headers=["Connection: close"] if close else []))
            s.shutdown(socket.SHUT_WR)
            got, closed = read_to_end(s)
        assert closed is not None
        [answer] = answers(got)
        assert answer[0] == 200 and json.loads(answer[2]) == {"success": True}, got
        assert stored(srv, message_id)


def test_pipelined_requests_are_still_answered_in_order(srv):
    ids = [mid() for _ in range(3)]
    data = b"".join(request(srv, i) for i in ids) + request(srv, path="/v1/nope")
    with connect(srv) as s:
        s.sendall(data)
        got = b""
        while got.count(b"HTTP/1.1 ") < 4:
            got += s.recv(65536)
    assert [a[0] for a in answers(got)] == [200, 200, 200, 404]
    for i in ids:
        assert stored(srv, i)



# -- 7. review fixes: slow readers, refusals on any route, the cap and pipelining -----------


def test_a_client_that_never_reads_its_answers_is_cut_off_and_frees_its_slot(fresh_server):
    """Requests pipelined by a client with a tiny receive window that never reads: the
    answers fill the send buffers, the app waits to write for ever, and the connection
    (its slot under server.max_connections) stayed; it is aborted after the body deadline."""
    proc = fresh_server(env={**SHORT, "TRACKPIPE_SERVER_MAX_CONNECTIONS": "2"}).start()
    data = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 5000  # ~20 MB of answers

    def two_fresh_requests() -> list[int]:
        """The statuses two new connections, open at once, get."""
        with connect(proc) as one, connect(proc) as two:
            time.sleep(0.05)
            for c in (one, two):
                c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return [answers(read_to_end(c)[0])[0][0] for c in (one, two)]

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    try:
        s.connect(("127.0.0.1", proc.port))
        s.settimeout(0.5)
        try:
            for i in range(0, len(data), 4096):
                s.sendall(data[i:i + 4096])
        except (TimeoutError, OSError):
            pass  # the server stopped reading: its answers are not going out
        stopped = time.monotonic()
        assert two_fresh_requests() == [200, 503]  # one slot is the client's that does not read
        wait_for(lambda: two_fresh_requests() == [200, 200], timeout=BODY + IDLE + 6,
                 what="both slots free once the connection that does not read is aborted")
        assert time.monotonic() - stopped < BODY + IDLE + 6
    finally:
        s.close()


@pytest.mark.parametrize("path", ["/v1/nope", "/api/v1/events"])
def test_any_answer_before_the_body_is_read_closes_the_connection(srv, path):
    """Expect: 100-continue and a body never sent, on a route that refuses without reading
    it: kept alive, the next request was taken for that body and never answered."""
    second = mid()
    with connect(srv) as s:
        s.sendall(request(srv, path=path, headers=["Expect: 100-continue",
                                                   "Content-Length: 600"], body=b""))
        time.sleep(0.3)
        try:
            s.sendall(request(srv, second))
        except (BrokenPipeError, ConnectionResetError):
            pass
        got, closed = read_to_end(s)
    first = answers(got)[0]
    assert 400 <= first[0] < 500, got
    assert first[1].get("connection") == "close", first
    assert closed is not None and closed < IDLE + 0.5, "closed only at a deadline"
    if len(answers(got)) == 1:
        assert not stored(srv, second)


def test_pipelined_requests_within_the_cap_are_not_answered_overloaded(fresh_server):
    proc = fresh_server(env={"TRACKPIPE_SERVER_MAX_CONNECTIONS": "1"}).start()
    with connect(proc) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        got = b""
        while got.count(b"HTTP/1.1 ") < 3 or not got.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    assert [a[0] for a in answers(got)] == [200, 200, 200], got



UPGRADE = ("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/api/v1/events", 401, "unauthorized"),  # admin: the token is still asked for
    ("GET", "/health/nope", 404, "not_found"),
    ("GET", "/v1/track", 405, "method_not_allowed"),
])
def test_a_websocket_upgrade_is_answered_as_any_request_in_json(srv, method, path, status,
                                                                code):
    """trackpipe has no WebSocket routes; uvicorn answered an upgrade an empty 403."""
    with connect(srv) as s:
        s.sendall(request(srv, path=path, method=method, body=b"", headers=UPGRADE))
        got, _ = read_to_end(s)
    [(answered, headers, body)] = answers(got)
    assert answered == status and headers["content-type"] == "application/json", got
    assert json.loads(body)["code"] == code
