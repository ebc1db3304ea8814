"""The ingest counters only ever go up: Prometheus reads a counter that went down as a
restart of the process, and rate() then jumps by the counter's whole value."""

from __future__ import annotations

import asyncio
import base64
import json

from trackpipe import metrics
from trackpipe.config import load as load_config
from trackpipe.pipeline.store import Outcome
from trackpipe.sources.auth import SourceRegistry
from trackpipe.sources.catalog import Source
from trackpipe.sources.http import TrackingAPI

WRITE_KEY = "counters"


class Writer:
    """Notes events_received as the log writer gets the request, then answers `outcome`."""

    healthy = True
    last_failed_bytes = 0

    def __init__(self, outcome: Outcome):
        self.outcome = outcome
        self.received_at_submit: list[int] = []

    async def submit(self, records, discards) -> Outcome:
        self.received_at_submit.append(received())
        return self.outcome


def received() -> int:
    return sum(metrics.EVENTS_RECEIVED.counts.values())


def post(writer: Writer, events: int) -> int:
    """POST a batch of `events`; returns the status answered."""
    api = TrackingAPI(load_config(None, {}), SourceRegistry([
        Source("src", "counters", WRITE_KEY, True, False, 0)]), writer)
    body = json.dumps({"batch": [{"type": "track", "event": "E", "userId": "u"}] * events})
    scope = {"type": "http", "path": "/v1/batch", "method": "POST",
             "client": ("127.0.0.1", 5555),
             "headers": [(b"authorization", b"Basic " + base64.b64encode(b"counters:"))]}
    status = []

    async def receive():
        return {"type": "http.request", "body": body.encode(), "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    asyncio.run(api(scope, receive, send))
    return status[0]


def test_a_request_the_log_writer_finds_too_deep_never_counted_as_received():
    writer = Writer(Outcome(too_deep=True))
    before = received()
    assert post(writer, 3) == 400
    assert writer.received_at_submit == [before] and received() == before


def test_a_stored_request_counts_its_events_once():
    writer = Writer(Outcome(stored=3))
    before = received()
    assert post(writer, 3) == 200
    assert received() == before + 3
