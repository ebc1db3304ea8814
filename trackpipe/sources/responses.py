"""The one table of ingest error codes, and the bytes every response is made of.

Every error body is {"code": ..., "message": ...}: cio-python and rudder-python
raise KeyError (and retry) on a JSON error body without both keys.
"""

from http import HTTPStatus

import msgspec

from trackpipe.errors import RequestRejected

# code -> HTTP status. Statuses follow the SDKs' retry tables: 400/401 are
# dropped by every client, 503/429 are retried.
STATUS = {
    "invalid_json": 400,
    "invalid_payload": 400,
    "bad_encoding": 400,
    "too_deep": 400,
    "payload_too_large": 400,
    "validation_failed": 400,
    "missing_write_key": 400,
    "invalid_write_key": 401,
    "rate_limited": 429,
    "unsupported_encoding": 415,
    "not_found": 404,
    "method_not_allowed": 405,
    "store_unavailable": 503,
    "shutting_down": 503,
    # Answered by the HTTP layer (sources/oneshot.py), on any path, before the app runs:
    "invalid_http": 400,
    "request_timeout": 408,
    "headers_too_large": 431,
    "overloaded": 503,
}

RETRY_AFTER_SECONDS = 5

SUCCESS_BODY = b'{"success":true}'

_encode = msgspec.json.encode


def error_body(code: str, message: str, errors: list[dict] | None = None) -> bytes:
    body: dict = {"success": False, "code": code, "message": message}
    if errors is not None:
        body["errors"] = errors
    return _encode(body)


def rejection(exc: RequestRejected) -> tuple[int, bytes]:
    return STATUS[exc.code], error_body(exc.code, exc.message, exc.errors)


def closing_answer(code: str, message: str, head: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 error response, head and body, that ends the connection: what
    the HTTP layer writes itself when it refuses a request the app never sees (`head`:
    the server's default headers, date and server)."""
    status = STATUS[code]
    body = error_body(code, message)
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
    lines += [name + b": " + value + b"\r\n" for name, value in head]
    lines.append(b"content-type: application/json\r\ncontent-length: %d\r\n"
                 b"connection: close\r\n\r\n" % len(body))
    lines.append(body)
    return b"".join(lines)
