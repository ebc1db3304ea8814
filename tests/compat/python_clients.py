"""Drive the REAL Python analytics SDKs against a Segment-compatible server.

One function per client. Each takes ``(base_url, write_key, run_id)``, makes
exactly one identify, track, page, screen, group and alias call with ids
derived from ``run_id``, flushes and shuts the client down, and returns a
:class:`SendResult` that unpacks as ``(calls, errors)``:

* ``calls``: the six calls in order, in Segment field names (the same shape as
  ``node/send.mjs`` prints), each with the ``messageId`` and ``timestamp`` the
  client put on the message.
* ``errors``: every send error the client reported through ``on_error`` (plus a
  refused enqueue or a flush that did not finish), as strings.

``SendResult.http`` additionally lists every HTTP attempt the client made
(``{"status", "events", "retryHeader"}``), observed through a response hook on
the client's own ``requests`` session, so a caller can check that nothing was
retried. ``SendResult.library`` is ``{"name", "version"}`` of the client.

All three clients offer all six calls, including ``screen``. The clients run in
their default asynchronous mode (a consumer thread posting batches of up to 100
to ``/v1/batch``); ``flush()`` then ``shutdown()`` make sure everything is
sent. Retries are switched off through the documented ``max_retries=0`` so a
non-success answer becomes an ``on_error`` report instead of a hidden retry;
every other setting is the client's default (gzip: off for segment-python and
cio-python, on for rudder-python).

cio-python quirk: a write key matching ``^(pk|sk)_(us|eu)_`` is sent as
``Authorization: Bearer <key>`` instead of Basic auth; ``send_cio_python``
with a plain key exercises Basic auth, ``send_cio_python_bearer`` expects a
``sk_us_...`` key that the server knows.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import threading
from typing import Any, Callable, Iterator, NamedTuple

FLUSH_TIMEOUT_S = 30.0


def expected_calls(run_id: str) -> list[dict[str, Any]]:
    """The six calls every client makes, in Segment field names."""
    user_id = f"u-{run_id}"
    anonymous_id = f"anon-{run_id}"
    return [
        {
            "type": "identify",
            "userId": user_id,
            "traits": {"email": f"{run_id}@example.com", "name": "Ada"},
        },
        {
            "type": "track",
            "userId": user_id,
            "event": "Order Completed",
            "properties": {"revenue": 9.99, "currency": "USD", "order_id": f"o-{run_id}"},
        },
        {
            "type": "page",
            "userId": user_id,
            "category": "Docs",
            "name": "Intro",
            "properties": {"path": "/x"},
        },
        {"type": "screen", "anonymousId": anonymous_id, "name": "Home"},
        {"type": "group", "userId": user_id, "groupId": f"g-{run_id}", "traits": {"name": "Acme"}},
        {"type": "alias", "previousId": anonymous_id, "userId": user_id},
    ]


class _Result(NamedTuple):
    calls: list[dict[str, Any]]
    errors: list[str]


class SendResult(_Result):
    """``(calls, errors)`` plus ``.http`` and ``.library`` attributes."""

    http: list[dict[str, Any]]
    library: dict[str, str]


def _make_result(calls, errors, http, library) -> SendResult:
    result = SendResult(calls, errors)
    result.http = http
    result.library = library
    return result


def _batch_size(body: Any) -> int | None:
    if body is None:
        return None
    if isinstance(body, str):
        body = body.encode()
    try:
        if body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)
        parsed = json.loads(body)
    except (ValueError, OSError, TypeError):
        return None
    batch = parsed.get("batch") if isinstance(parsed, dict) else None
    return len(batch) if isinstance(batch, list) else None


@contextlib.contextmanager
def _record_http(session) -> Iterator[list[dict[str, Any]]]:
    """Record every response of a ``requests`` session via its response hook."""
    attempts: list[dict[str, Any]] = []
    lock = threading.Lock()

    def hook(response, *args, **kwargs):
        request = response.request
        with lock:
            attempts.append(
                {
                    "status": response.status_code,
                    "events": _batch_size(request.body),
                    "retryHeader": request.headers.get("X-Retry-Count"),
                }
            )
        return response

    hooks = session.hooks.setdefault("response", [])
    hooks.append(hook)
    try:
        yield attempts
    finally:
        hooks.remove(hook)


def _drive(
    client,
    library: dict[str, str],
    session,
    run_id: str,
    errors: list[str],
    call: Callable[[Any, dict[str, Any]], Any],
) -> SendResult:
    """Make the six calls through ``call(client, spec)``, flush, shut down."""
    calls: list[dict[str, Any]] = []
    with _record_http(session) as http:
        try:
            for spec in expected_calls(run_id):
                success, msg = call(client, spec)
                if not success:
                    errors.append(f"{spec['type']}: client refused to enqueue (queue full)")
                calls.append({**spec, "messageId": msg.get("messageId"), "timestamp": msg.get("timestamp")})
        finally:
            # flush() blocks on queue.join(); bound it so a server that keeps
            # answering 429/503 + Retry-After cannot hang the test run.
            flusher = threading.Thread(target=client.flush, daemon=True)
            flusher.start()
            flusher.join(FLUSH_TIMEOUT_S)
            if flusher.is_alive():
                errors.append(f"flush did not finish within {FLUSH_TIMEOUT_S:.0f}s")
                for consumer in client.consumers or []:
                    consumer.pause()
            else:
                client.shutdown()
    return _make_result(calls, errors, list(http), library)


def _on_error(errors: list[str]):
    def on_error(error, batch):
        kinds = ",".join(str(m.get("type")) for m in batch)
        errors.append(f"on_error for batch [{kinds}]: {type(error).__name__}: {error}")

    return on_error


def _segment_style_call(client, spec: dict[str, Any]):
    """All three Python clients share this keyword API (rudder-python moves
    identify traits into context.traits by itself)."""
    t = spec["type"]
    if t == "identify":
        return client.identify(user_id=spec["userId"], traits=spec["traits"])
    if t == "track":
        return client.track(user_id=spec["userId"], event=spec["event"], properties=spec["properties"])
    if t == "page":
        return client.page(
            user_id=spec["userId"],
            category=spec["category"],
            name=spec["name"],
            properties=spec["properties"],
        )
    if t == "screen":
        return client.screen(anonymous_id=spec["anonymousId"], name=spec["name"])
    if t == "group":
        return client.group(user_id=spec["userId"], group_id=spec["groupId"], traits=spec["traits"])
    if t == "alias":
        return client.alias(previous_id=spec["previousId"], user_id=spec["userId"])
    raise ValueError(t)


def send_segment_python(base_url: str, write_key: str, run_id: str) -> SendResult:
    """segment-analytics-python 2.4.0: Basic auth + body writeKey, no gzip."""
    from segment.analytics import Client
    from segment.analytics import request as seg_request
    from segment.analytics.version import VERSION

    errors: list[str] = []
    client = Client(write_key=write_key, host=base_url, on_error=_on_error(errors), max_retries=0)
    library = {"name": "analytics-python", "version": VERSION}
    return _drive(client, library, seg_request._session, run_id, errors, _segment_style_call)


def send_cio_python(base_url: str, write_key: str, run_id: str) -> SendResult:
    """customerio-cdp-analytics 1.1.0. A plain key gives Basic auth; a
    ``pk_``/``sk_`` + ``us_``/``eu_`` key gives ``Bearer <key>``."""
    from customerio.analytics import Client
    from customerio.analytics import request as cio_request
    from customerio.analytics.version import VERSION

    errors: list[str] = []
    client = Client(write_key=write_key, host=base_url, on_error=_on_error(errors), max_retries=0)
    library = {"name": "analytics-python", "version": VERSION}
    return _drive(client, library, cio_request._session, run_id, errors, _segment_style_call)


def send_cio_python_bearer(base_url: str, write_key: str, run_id: str) -> SendResult:
    """cio-python with an ``sk_us_...`` key, i.e. ``Authorization: Bearer``."""
    if not write_key.startswith("sk_us_"):
        raise ValueError(f"the Bearer variant needs an sk_us_ key, got {write_key!r}")
    return send_cio_python(base_url, write_key, run_id)


def send_rudder_python(base_url: str, write_key: str, run_id: str) -> SendResult:
    """rudder-sdk-python 2.1.9: Basic auth, gzip on by default, µs timestamps."""
    from rudderstack.analytics import Client
    from rudderstack.analytics import request as rs_request
    from rudderstack.analytics.version import VERSION

    errors: list[str] = []
    client = Client(write_key=write_key, host=base_url, on_error=_on_error(errors), max_retries=0)
    library = {"name": "analytics-python", "version": VERSION}
    return _drive(client, library, rs_request._session, run_id, errors, _segment_style_call)


CLIENTS: dict[str, Callable[[str, str, str], SendResult]] = {
    "segment-python": send_segment_python,
    "cio-python": send_cio_python,
    "cio-python-bearer": send_cio_python_bearer,
    "rudder-python": send_rudder_python,
}


if __name__ == "__main__":  # manual use: python python_clients.py <client> <url> <key> <run>
    import sys

    name, url, key, run = sys.argv[1:5]
    res = CLIENTS[name](url, key, run)
    print(json.dumps({"client": name, "library": res.library, "calls": res.calls, "http": res.http, "errors": res.errors}))
    sys.exit(1 if res.errors else 0)
