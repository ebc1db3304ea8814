"""The one table of ingest error codes, and the bytes every response is made of.

Every error body is {"code": ..., "message": ...}: cio-python and rudder-python
raise KeyError (and retry) on a JSON error body without both keys.
"""

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
