"""Small helpers every admin route uses: JSON answers, JSON errors, query parameters."""

from __future__ import annotations

import msgspec
from starlette.responses import Response

from trackpipe.events import parse_ts

MAX_POSITION = 2**62


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

