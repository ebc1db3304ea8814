"""uvicorn's httptools protocol, writing each response's head and body in one system call.

uvicorn writes a response's status line and headers when the app sends
`http.response.start`, and its body when the app sends `http.response.body`:
two send() system calls for every answer, which under /v1/track load were
about a quarter of the event loop's time. Here the head is held back until
the body follows (in the same step of the request's task, as every trackpipe
answer does) and both go out in one writev. A head that no body follows in
that step (a HEAD request, a streamed body) goes out on its own a moment
later, from a callback scheduled when it was held, and before anything else
written on the connection, or before the connection closes (including the
close uvloop makes when the client half-closes).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD_START, _HEAD_END = b"HTTP/1.1 ", b"\r\n\r\n"


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_HeldHeadTransport(transport, self.loop))

    def eof_received(self) -> bool | None:
        # A client that half-closes after its request: uvloop closes the connection
        # right after this returns, before a held head's callback would run.
        self.transport.flush()
        return super().eof_received()


class _HeldHeadTransport:
    """The connection's transport, but a response head waits for its body (see above)."""

    __slots__ = ("_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop, self._head = transport, loop, None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.writelines((head, data))
        elif data.startswith(_HEAD_START) and data.endswith(_HEAD_END):
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
