"""uvicorn's httptools protocol, writing each response's head and body in one system call,
with deadlines, a connection cap and a header size limit against hostile clients.

One write. uvicorn writes a response's status line and headers when the app
sends `http.response.start`, and its body when the app sends
`http.response.body`: two send() system calls for every answer, which under
/v1/track load were about a quarter of the event loop's time. Here the head is
held back until the body follows (in the same step of the request's task, as
every trackpipe answer does) and both go out in one writev. A head that no body
follows in that step (a HEAD request, a streamed body) goes out on its own a
moment later, from a callback scheduled when it was held, and before anything
else written on the connection, or before the connection closes.

Deadlines (uvicorn has only its keep-alive timer, armed after a response, so a
client that never finishes a request held its socket forever). A connection is
in one of four phases, and three of them have a deadline:

  idle     no request begun (a new connection, or kept alive after a response):
           closed without a word after `idle` seconds (server.idle_timeout_seconds)
  headers  from a request's first byte: its headers must be in within
           server.header_timeout_seconds
  body     from the end of the headers: the body must be in within
           server.body_timeout_seconds, plus one second for every KB received,
           at most ten times the timeout in all: a body that keeps coming at
           1 KB/s is cut off only at 5 minutes (by default), and a 500 KB
           batch gets through on a slow mobile link at 2 KB/s
  busy     the request is whole and the app answers it: no deadline, unless the
           answers do not go out: a connection whose write buffer has not shrunk
           for server.body_timeout_seconds (a client that sends requests and never
           reads the answers) is aborted

A request over its deadline is answered 408 request_timeout (JSON, `connection:
close`) and the connection closed; if the app has started its answer already,
that answer goes out whole and the connection closes after it. The cost is one
timer per connection, armed at its start and re-armed only when it fires (at
most once a deadline) or when an idle spell begins before it; a phase change
is a few attribute writes (~15k requests/s on one core go through here).
A connection being closed is closed only once its write buffer is out (uvloop),
so a client that does not read would hold it for ever: one whose buffer has not
shrunk for the idle deadline is aborted.

An answer that starts while its request's body is not all in (a refusal, on any
route) carries `connection: close`, and the connection closes after it: kept
alive, the parser would take whatever the client sends next for that body.

Connection cap. `limit_concurrency` (server.max_connections) counts connections:
one accepted while that many are open is overflow: its request, once its headers
are in, is answered 503 overloaded with Retry-After, and it gets
OVERFLOW_SECONDS, not the usual deadlines, to send them. Beyond
OVERFLOW_CONNECTIONS of those, a new connection is closed at once (a connection
error, which the SDKs retry). So silent sockets cannot use up the file
descriptors: the process holds at most max_connections + OVERFLOW_CONNECTIONS,
those within the cap go after their deadline, those beyond it within a second.

Header size. A request whose URL and headers come to more than
`max_header_bytes` is answered 431 headers_too_large; bytes of a header still
being received count too, so a header that never ends is cut off as well.

Half-close. A client may shut down its sending side once its request is out
(shutdown(SHUT_WR)); uvloop then closes the connection when eof_received returns,
so while a whole request is still being answered it returns True: the answer
goes out, and the connection closes after it.

Every refusal of the HTTP layer has the JSON {"code", "message"} body of the
tracking API (responses.py), including a request that is not valid HTTP (400
invalid_http, where uvicorn answered in plain text), and goes out after the
answers to the requests before it on the connection.
"""

from __future__ import annotations

import asyncio
import logging

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from trackpipe.sources import responses

_HEAD_START, _HEAD_END = b"HTTP/1.1 ", b"\r\n\r\n"

# The phases (see above); small ints compare fastest.
_IDLE, _HEADERS, _BODY, _BUSY = 0, 1, 2, 3
# A slow body earns one more second of its deadline for every this many bytes ...
BODY_GRACE_BYTES = 1024
# ... up to this many times server.body_timeout_seconds in all.
BODY_MAX_FACTOR = 10
# Seconds an overflow connection (one over the cap) gets to send its request's headers,
OVERFLOW_SECONDS = 1.0
# and how many there may be; one more is closed at once, unanswered.
OVERFLOW_CONNECTIONS = 32

logger = logging.getLogger("trackpipe.http")


class _Refusal(Exception):
    """Raised in a parser callback to stop parsing and answer `code`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    # Defaults; `configured()` makes a subclass with the server's settings.
    header_seconds = 10.0
    body_seconds = 30.0
    max_header_bytes = 64 * 1024

    @classmethod
    def configured(cls, *, header_seconds: float, body_seconds: float,
                   max_header_bytes: int) -> type[OneWriteHttpToolsProtocol]:
        """This protocol with other deadlines and header limit (the idle deadline is
        uvicorn's timeout_keep_alive, the connection cap its limit_concurrency)."""
        return type(cls.__name__, (cls,), {"header_seconds": header_seconds,
                                           "body_seconds": body_seconds,
                                           "max_header_bytes": max_header_bytes})

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn's own check answers in plain text and counts the connection itself.
        self.max_connections, self.limit_concurrency = self.limit_concurrency, None
        self.idle_seconds = float(self.timeout_keep_alive)
        self._phase = _IDLE
        self._since = 0.0  # loop time the phase began
        self._header_size = 0  # URL and headers the parser handed over, in bytes
        self._header_chunks = 0  # bytes received wholly inside the headers
        self._fresh = False  # a request began in the chunk being parsed
        self._body_bytes = 0  # bytes received since the headers ended
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._overflow = False
        self._stall_size = 0  # write buffer bytes when it was last seen not shrinking
        self._stall_since = 0.0  # ... and since when
        self._answer: bytes | None = None  # a refusal waiting for the answers before it

    # -- the connection -------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_HeldHeadTransport(transport, self.loop, self))
        if self.max_connections is not None:
            over = len(self.connections) - self.max_connections
            if over > OVERFLOW_CONNECTIONS:  # no room left even to answer 503
                self.transport.close()
                return
            if over > 0:
                self._overflow = True
                self.idle_seconds = self.header_seconds = OVERFLOW_SECONDS
        self._since = now = self.loop.time()
        self._arm(now + self.idle_seconds)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        # uvloop closes the connection right after this returns None, before a held
        # head's callback would run, and before the app has answered a whole request.
        self.transport.flush()
        if self._answer is not None:
            return True  # the refusal closes once the answers before it are out
        cycle = self.cycle
        if self._phase != _BODY and (self.pipeline or (
                cycle is not None and not cycle.response_complete and not cycle.disconnected)):
            cycle.keep_alive = False  # answer, then close
            return True  # keep our half open for the answer
        return None  # nothing to answer, or a body that can no longer arrive

    def data_received(self, data: bytes) -> None:
        if self._answer is not None:  # refused: nothing more is parsed
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                if self._timer is not None:  # the websocket protocol takes over
                    self._timer.cancel()
                    self._timer = None
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refusal):
                self._refuse(cause.code, cause.message)
            else:  # the request is not HTTP/1.1, or a callback found it unusable
                reason = (str(cause or exc) or type(cause or exc).__name__)[:200]
                if cause is None or isinstance(cause, httptools.HttpParserError):
                    logger.debug("invalid HTTP request: %s", reason)
                else:  # not the client's doing
                    logger.warning("HTTP parser callback failed", exc_info=cause)
                self._refuse("invalid_http", f"The request is not valid HTTP/1.1 ({reason}).")
            return
        phase = self._phase
        if phase == _HEADERS:
            if self._fresh:  # the request began in this chunk: how much of it is
                self._fresh = False  # headers only the parser knows (on_header counts)
                return
            # Bytes of a header still arriving, which the parser buffers unseen.
            self._header_chunks += len(data)
            if self._header_chunks > self.max_header_bytes:
                self._refuse("headers_too_large", self._too_large(self._header_chunks))
        elif phase == _BODY:
            self._body_bytes += len(data)

    # -- parser callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase, self._since = _HEADERS, self.loop.time()
        self._header_size = self._header_chunks = 0
        self._fresh = True

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's, with the size counted.
        self._header_size += len(name) + len(value)
        name = name.lower()
        # llhttp keeps trailing OWS, which RFC 9110 section 5.5 excludes from the value.
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        size = self._header_size + len(self.url)
        if size > self.max_header_bytes:
            raise _Refusal("headers_too_large", self._too_large(size))
        # Only connections count (connection_made decides): a task that has finished but
        # not yet left server_state.tasks, or the one before a pipelined request, is no load.
        if self._overflow:
            app, self.app = self.app, _overloaded
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        self._phase, self._since = _BODY, self.loop.time()
        self._body_bytes = 0

    def on_message_complete(self) -> None:
        super().on_message_complete()
        cycle = self.cycle
        if cycle is not None and cycle.response_complete:  # answered before the body was in
            self._idle()
        else:
            self._phase = _BUSY

    def on_response_complete(self) -> None:
        # uvicorn's, with the idle phase in place of its keep-alive timer.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._answer is not None:
            self._send_answer()
        elif self._phase == _BUSY:
            self._idle()

    # -- deadlines --------------------------------------------------------------------

    def _idle(self) -> None:
        self._phase, self._since = _IDLE, self.loop.time()
        now = self._since
        if now + self.idle_seconds < self._timer_at and self._timer is not None:
            self._timer.cancel()
            self._arm(now + self.idle_seconds)

    def _arm(self, at: float) -> None:
        self._timer = self.loop.call_at(at, self._check)
        self._timer_at = at

    def _check(self) -> None:
        self._timer = None
        now = self.loop.time()
        if self.transport.is_closing():
            # uvloop closes only once the write buffer is out, which a peer that never
            # reads (a zero receive window) prevents for ever: the slot, the descriptor
            # and the kernel's send buffer with it.
            if self.transport.get_write_buffer_size():
                if self._stalled(now, self.idle_seconds):
                    self.transport.abort()
                else:
                    self._arm(self._stall_since + self.idle_seconds)
            return
        phase = self._phase
        if phase == _IDLE:
            deadline = self._since + self.idle_seconds
        elif phase == _HEADERS:
            deadline = self._since + self.header_seconds
        elif phase == _BODY:
            grace = min(self._body_bytes / BODY_GRACE_BYTES,
                        (BODY_MAX_FACTOR - 1) * self.body_seconds)
            deadline = self._since + self.body_seconds + grace
        else:  # busy: the app's turn; look again later
            deadline = now + self.idle_seconds
            # unless its answers do not go out: a client that does not read them
            if self.flow.write_paused or self.transport.get_write_buffer_size():
                if self._stalled(now, self.body_seconds):
                    logger.debug("a client that does not read its answers; connection aborted")
                    self.transport.abort()
                    return
                deadline = min(deadline, self._stall_since + self.body_seconds)
            else:
                self._stall_size = 0
        if now < deadline:
            self._arm(deadline)
        else:
            self._expire()
            if self._timer is None:  # closed, or waiting for answers: keep watching
                self._arm(now + self.idle_seconds)

    def _stalled(self, now: float, limit: float) -> bool:
        """Whether the write buffer has not shrunk for `limit` seconds."""
        size = self.transport.get_write_buffer_size()
        if self._stall_size == 0 or size < self._stall_size:  # a new stall, or progress
            self._stall_size, self._stall_since = max(size, 1), now
            return False
        return now - self._stall_since >= limit

    def _expire(self) -> None:
        phase, cycle = self._phase, self.cycle
        if phase == _IDLE:
            self.transport.close()  # as uvicorn's keep-alive timeout does
            return
        if phase == _BODY and cycle is not None and not self.pipeline:
            if cycle.response_complete:  # answered already; the rest of the body is moot
                self.transport.close()
                return
            if cycle.response_started:  # let the answer finish; it closes the connection
                cycle.keep_alive = False
                self._arm(self.loop.time() + self.idle_seconds)
                return
        what = "headers" if phase == _HEADERS else "body"
        limit = self.header_seconds if phase == _HEADERS else self.body_seconds
        self._refuse("request_timeout", f"The request's {what} did not arrive in time (within "
                     f"{limit:g} s{'' if phase == _HEADERS else ', plus 1 s per KB received'});"
                     " the connection is closed.")

    def _answer_before_body(self, head: bytes) -> bytes:
        """`head`, of an answer that starts before the request's body is read (a refusal
        of any route), with `connection: close`: kept alive, the parser would take what
        the client sends next (after Expect: 100-continue, its next request) for the body."""
        cycle = self.cycle
        if (self.pipeline or cycle is None or not cycle.keep_alive
                or head.startswith(b"HTTP/1.1 1")):  # not this request's, closing, or 100
            return head
        cycle.keep_alive = False  # uvicorn closes the connection once the answer is out
        return head[:-2] + b"connection: close\r\n\r\n"

    # -- refusals ---------------------------------------------------------------------

    def _too_large(self, size: int) -> str:
        return (f"The request's URL and headers are over {size} bytes, more than the "
                f"{self.max_header_bytes} allowed; the connection is closed.")

    def _refuse(self, code: str, message: str) -> None:
        """Answer `code` and close the connection, once the requests before this one
        are answered. The parser is done with the connection (it fails on anything more)."""
        if self._answer is not None or self.transport.is_closing():
            return
        self._answer = responses.closing_answer(code, message, self.server_state.default_headers)
        was, self._phase = self._phase, _BUSY  # no deadline: what is left is the app's
        cycle = self.cycle
        if was == _BODY and cycle is not None:  # the refused request is `cycle`
            if self.pipeline and self.pipeline[0][0] is cycle:  # queued, never started:
                self.pipeline.popleft()  # the one before it is being answered, and
                return  # on_response_complete sends ours after the last of those
            if not cycle.response_complete:
                cycle.disconnected = True  # its app is told the client went away
                cycle.message_event.set()
                if cycle.response_started:  # half an answer is out: nothing can follow it
                    self.transport.close()
                    return
        if self.pipeline or (cycle is not None and not cycle.response_complete
                             and not cycle.disconnected):
            return  # on_response_complete sends it after the last of those answers
        self._send_answer()

    def _send_answer(self) -> None:
        self.transport.write(self._answer)
        self.transport.close()


async def _overloaded(scope, receive, send) -> None:
    """The answer to a request on a connection over server.max_connections."""
    body = responses.error_body("overloaded", "trackpipe has as many connections open as it "
                                "takes (server.max_connections); retry in a few seconds.")
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
        (b"retry-after", b"%d" % responses.RETRY_AFTER_SECONDS), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _NoProtocol:
    """A _HeldHeadTransport's protocol when it has none (tests): never in the body phase."""

    _phase = _IDLE


class _HeldHeadTransport:
    """The connection's transport, but a response head waits for its body (see above)."""

    __slots__ = ("_head", "_loop", "_protocol", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop,
                 protocol: OneWriteHttpToolsProtocol | None = None):
        self._transport, self._loop, self._head = transport, loop, None
        self._protocol = _NoProtocol if protocol is None else protocol

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.writelines((head, data))
        elif data.startswith(_HEAD_START) and data.endswith(_HEAD_END):
            if self._protocol._phase == _BODY:
                data = self._protocol._answer_before_body(data)
            self._head = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send a held head now."""
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    # What uvicorn's protocol and flow control call on every request, spelled out
    # (cheaper than __getattr__); anything else is the transport's own.
    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_extra_info(self, name, default=None):
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name):
        return getattr(self._transport, name)
