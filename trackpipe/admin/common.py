"""Small helpers every admin route uses: JSON answers, JSON errors, query parameters."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from trackpipe.events import parse_ts

MAX_POSITION = 2**62
# Admin bodies are small objects ({"id": ...}, a replay's bounds); a larger one is
# refused before it is read whole, so a client cannot make the server hold it.
MAX_BODY_BYTES = 64 * 1024


def json_response(payload, status: int = 200) -> Response:
    return Response(msgspec.json.encode(payload), status, media_type="application/json")


def error(status: int, code: str, message: str) -> Response:
    return json_response({"code": code, "message": message}, status)


def cursor_param(q) -> int | None:
    raw = q.get("cursor")
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > MAX_POSITION:
        raise ValueError("`cursor` must be the `next` value of a previous page.")
    return int(raw)


def int_param(q, name: str, default: int, lo: int, hi: int) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not lo <= int(raw) <= hi:
        raise ValueError(f"`{name}` must be a whole number from {lo} to {hi}, got {raw!r}.")
    return int(raw)


def time_param(q, name: str) -> int:
    raw = q[name]
    if raw.isascii() and raw.isdigit():
        if len(raw) > 15:
            raise ValueError(f"`{name}` in epoch milliseconds has too many digits: {raw!r}.")
        return int(raw)
    ms = parse_ts(raw)
    if ms is None:
        raise ValueError(f"`{name}` must be an ISO-8601 time or epoch milliseconds, got {raw!r}.")
    return ms


async def json_body(request: Request, example: str) -> dict | Response:
    """The request's JSON object (an empty body is {}), or the error answer to send."""
    declared = request.headers.get("content-length", "")
    too_large = error(413, "payload_too_large", f"An admin request body is at most"
                      f" {MAX_BODY_BYTES} bytes.")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return too_large
        chunks.append(chunk)
    try:
        body = msgspec.json.decode(b"".join(chunks) or b"{}")
    except (msgspec.DecodeError, RecursionError):  # nested past msgspec's depth limit
        body = None
    if not isinstance(body, dict):
        return error(400, "invalid_json", f"The body must be a JSON object, e.g. {example}.")
    return body
