"""One request's events through validate and enrich, into log records and discards."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from trackpipe.config import Limits
from trackpipe.errors import RequestRejected
from trackpipe.events import read_ts
from trackpipe.log.base import Discard, Record
from trackpipe.pipeline.decode import check_depth, decode_object
from trackpipe.pipeline.enrich import RequestContext, enrich, mask_ip
from trackpipe.pipeline.validate import validate

DISCARD_PAYLOAD_CHARS = 2048
# The 32 KB limit is on an event as the client sent it (the SDKs measure it so; one
# that fits must not be refused for what trackpipe adds). What trackpipe adds is a
# few hundred bytes; a batch's context merged into each item can be more, so the
# stored form may exceed the limit by this much and no more.
STORED_ALLOWANCE = 8 * 1024

_encode = msgspec.json.encode
_encoder = msgspec.json.Encoder()
# Accepted events are encoded here, then copied out: growing a fresh buffer for each
# (what msgspec.json.encode does) costs more than the copy. Holds the largest event's size.
_scratch = bytearray()


def _encode_event(ev: dict) -> bytes:
    _encoder.encode_into(ev, _scratch)
    return bytes(_scratch)


def items_of(body: dict, type_: str | None, limits: Limits) -> list:
    """The events a request carries; `type_` None means a batch path."""
    if type_ is not None:
        return [body]
    items = body.get("batch")
    if type(items) is not list:
        raise RequestRejected("invalid_payload", "A batch request needs a `batch` array of events.")
    if len(items) > limits.max_batch_events:
        raise RequestRejected("payload_too_large", f"Exceed payload limit: the batch holds "
                              f"{len(items)} events, more than {limits.max_batch_events}.")
    return items


def batch_context(body: dict, rc: RequestContext) -> None:
    """Batch-level sentAt, context and integrations apply to every item (the item wins)."""
    for key, value in body.items():  # the items themselves are checked one by one
        if key != "batch" and (type(value) is dict or type(value) is list):
            check_depth(_encode(value), value)
    sent = read_ts(body.get("sentAt"))
    if sent is not None:
        rc.batch_sent_at, rc.batch_sent_at_text = sent
    context, integrations = body.get("context"), body.get("integrations")
    rc.batch_context = context if type(context) is dict else None
    rc.batch_integrations = integrations if type(integrations) is dict else None


def prepare(items: list, type_: str | None, rc: RequestContext, limits: Limits, strict: bool,
            sent: Callable[[int], bytes] | None = None) -> tuple[list[Record], list[Discard]]:
    """`sent(index)` is that event as the client sent it, encoded (see AsSent); it is
    asked for only when an event's stored form is over the limit."""
    records: list[Record] = []
    discards: list[Discard] = []
    errors: list[dict] = []
    max_bytes = limits.max_event_bytes
    if not items:
        discards.append(Discard(rc.received_at, rc.source_id, None, "empty_batch",
                                "The batch holds no events.", "[]"))
    for index, ev in enumerate(items):
        if type(ev) is not dict:
            problem = ("event_not_object", "Each batch item must be a JSON object.")
        else:
            problem = validate(ev, type_)
        if problem is not None:
            if type(ev) is dict:
                ev.pop("writeKey", None)
            payload = _encode(ev)
            _check_size(payload, max_bytes, index)
            check_depth(payload, ev)
            if rc.truncate_ip:
                payload, problem = _without_full_ip(ev, payload, problem)
            errors.append({"index": index, "code": problem[0], "message": problem[1]})
            message_id = ev.get("messageId") if type(ev) is dict else None
            discards.append(Discard(rc.received_at, rc.source_id,
                                    message_id if type(message_id) is str else None,
                                    problem[0], problem[1],
                                    payload[:DISCARD_PAYLOAD_CHARS].decode("utf-8", "replace")))
            continue
        ts = enrich(ev, rc)
        body = _encode_event(ev)
        if len(body) > max_bytes:
            _check_stored_size(body, sent, max_bytes, index)
        # Its depth is checked by the log writer (LogWriter.commit), off the event loop.
        message_id = ev["messageId"]
        event = ev.get("event") if ev["type"] == "track" else None
        records.append(Record(message_id, rc.received_at, ev["type"], event, ev.get("userId"),
                              ev.get("anonymousId"), rc.source_id, body, ts))
    if strict and errors:
        raise RequestRejected("validation_failed", f"{len(errors)} of {len(items)} events are "
                              "invalid; nothing was stored (strict mode).", errors)
    return records, discards


class AsSent:
    """The events of a request as the client sent them, encoded again: decoded anew from
    the request, because enrichment changed the ones in hand. A rare path (see prepare),
    so the request is decoded only when an event is asked for, and once."""

    def __init__(self, raw: bytes, batch: bool):
        self.raw, self.batch = raw, batch
        self._body: dict | None = None

    def __call__(self, index: int) -> bytes:
        if self._body is None:
            self._body = decode_object(self.raw)
        return _encode(self._body["batch"][index] if self.batch else self._body)


def _without_full_ip(ev, payload: bytes, problem: tuple[str, str]
                     ) -> tuple[bytes, tuple[str, str]]:
    """A discard keeps the event as sent (its limits were checked on that form), but
    under truncate_ip only the network part of its context.ip, as an accepted event.
    It is given no peer address: that is filled in by enrich, for valid events only.
    An item that is no object, or a `context` that is none, may hold an address
    anywhere: neither is kept, nor quoted in the reason's message."""
    if type(ev) is not dict:
        return b"null", problem
    context = ev.get("context")
    if context is not None and type(context) is not dict:
        ev["context"] = None
        return _encode(ev), (problem[0], "`context` must be an object.")
    if context is None or context.get("ip") is None:
        return payload, problem
    mask_ip(context)
    return _encode(ev), problem


def _check_stored_size(body: bytes, sent: Callable[[int], bytes] | None, limit: int,
                       index: int) -> None:
    if len(body) > limit + STORED_ALLOWANCE:
        raise RequestRejected("payload_too_large", f"Exceed payload limit: event {index} is "
                              f"{len(body)} bytes once stored with the batch's context, more"
                              f" than {limit + STORED_ALLOWANCE}.")
    _check_size(body if sent is None else sent(index), limit, index)


def _check_size(encoded: bytes, limit: int, index: int) -> None:
    if len(encoded) > limit:
        raise RequestRejected("payload_too_large", f"Exceed payload limit: event {index} is "
                              f"{len(encoded)} bytes, more than {limit}.")
