"""A batched webhook request byte for byte: its body, its signatures, and what making
it costs the process that sends it (no import per request)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import sys

import msgspec
import pytest

from destinations.sink_webhook import Recorder, new_secret, verify
from trackpipe.destinations.base import DELIVERED, Event
from trackpipe.destinations.webhook import Webhook, WebhookSettings, sign


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


def stored(*ids: str) -> list[Event]:
    """Events as the worker hands over a message routing left unchanged: its stored JSON."""
    return [Event(k + 1, i, None, None, None, None, msgspec.json.encode(
        {"type": "track", "event": "Order Completed", "messageId": i, "userId": "u\u00e9",
         "properties": {"seq": k, "note": "a \"quoted\" line\n"}}))
        for k, i in enumerate(ids)]


def send(url: str, batches, **fields):
    async def go():
        hook = Webhook("hook", msgspec.convert({"url": url, "allow_private_targets": True,
                                                **fields}, WebhookSettings))
        await hook.start()
        try:
            return [await hook.send(batch) for batch in batches]
        finally:
            await hook.close()

    return asyncio.run(go())


def test_a_batch_body_is_the_stored_messages_joined(recorder):
    batch = stored("m1", "m2", "m3")
    assert send(recorder.url(), [batch]) == [DELIVERED]
    assert recorder.requests[0]["body"] == \
        b'{"batch":[' + b",".join(e.json for e in batch) + b"]}"


def test_a_batch_of_one_and_the_same_body_again(recorder):
    batch = stored("m1")
    send(recorder.url(), [batch, batch])
    a, b = recorder.requests
    assert a["body"] == b["body"] == b'{"batch":[' + batch[0].json + b"]}"


def test_the_signature_is_the_hmac_of_id_timestamp_and_body():
    keys = [b"k" * 32, b"\x00\xff" * 16]
    body = b'{"batch":[' + b"x" * 100_000 + b"]}"
    expected = " ".join(
        "v1," + base64.b64encode(hmac.new(key, b"batch_1.1700000000." + body,
                                          hashlib.sha256).digest()).decode() for key in keys)
    assert sign(keys, "batch_1", "1700000000", body) == expected


def test_a_large_batch_verifies_with_every_secret(recorder):
    old, new = new_secret(), new_secret()
    batch = stored(*(f"m{i}" for i in range(500)))
    send(recorder.url(), [batch], secret=[new, old])
    req = recorder.requests[0]
    assert verify(old, req["headers"], req["body"]) == verify(new, req["headers"], req["body"])


class ImportSpy:
    """A meta path finder that finds nothing and remembers what was looked for."""

    def __init__(self):
        self.asked: list[str] = []

    def find_spec(self, name, path=None, target=None):
        self.asked.append(name)
        return None


def test_a_request_imports_nothing(recorder):
    """httpcore imports the optional sniffio for each lock it sets up; while it is not
    installed each of those was a search of sys.path, four per request."""
    batches = [stored("m1"), stored("m2"), stored("m3")]
    spy = ImportSpy()

    async def go():
        hook = Webhook("hook", msgspec.convert({"url": recorder.url(),
                                                "allow_private_targets": True},
                                               WebhookSettings))
        await hook.start()
        try:
            await hook.send(batches[0])  # the first request may import what it needs once
            sys.meta_path.insert(0, spy)
            try:
                return [await hook.send(b) for b in batches[1:]]
            finally:
                sys.meta_path.remove(spy)
        finally:
            await hook.close()

    assert asyncio.run(go()) == [DELIVERED, DELIVERED]
    assert spy.asked == []
