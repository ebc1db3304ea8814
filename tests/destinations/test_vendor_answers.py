"""Answers from a vendor's API are untrusted input: one nested deeper than the JSON
decoder reads (a broken proxy, a hostile api_url) is an unreadable answer, classified
like any other, never an exception out of the destination."""

from __future__ import annotations

import asyncio

import pytest

from destinations.sink_webhook import Recorder
from trackpipe import config
from trackpipe.destinations.amplitude import rejected_events
from trackpipe.destinations.base import Event
from trackpipe.destinations.build import build_destination
from trackpipe.destinations.mixpanel import failed_records

NESTED = b"[" * 5000 + b"]" * 5000
IDENTIFY = {"type": "identify", "userId": "u1", "messageId": "m1",
            "timestamp": "2026-03-01T12:00:00.000Z", "traits": {"plan": "pro"}}


@pytest.mark.parametrize("read", [failed_records, rejected_events])
def test_a_400_answer_nested_too_deep_names_no_event(read):
    assert read(NESTED) == {}
    assert read(b'{"a":' * 3000 + b"1" + b"}" * 3000) == {}


def test_a_200_engage_answer_nested_too_deep_is_retried():
    recorder = Recorder([(200, {"content-type": "application/json"}, NESTED)])
    dest = build_destination(config.Destination(name="mp", type="mixpanel", settings={
        "project_token": "tok", "api_url": recorder.url("/"), "allow_private_targets": True}))

    async def go():
        await dest.start()
        try:
            return await dest.send([Event(0, "m1", IDENTIFY, None, None, None)])
        finally:
            await dest.close()
    try:
        [outcome] = asyncio.run(go())
    finally:
        recorder.close()
    assert outcome.state == "retry" and "unreadable body" in outcome.detail
    assert [r["path"] for r in recorder.requests] == ["/engage?verbose=1"]
