"""The segment (forwarding) destination: against a local /v1/batch endpoint that checks
requests as Segment documents them, and end to end into a second, real trackpipe."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import uuid

import pytest

from trackpipe import config
from trackpipe.destinations.base import DELIVERED, DestinationError, Event
from trackpipe.destinations.build import build_destination, masked
from trackpipe.destinations.forward import chunk_by_size
from trackpipe.dsn import MASK
from trackpipe.errors import ConfigError
from trackpipe.events import parse_ts

from destinations.vendor_mocks import SegmentMock
from support import wait_for, write_config


@pytest.fixture
def mock():
    m = SegmentMock(write_key="wk-1")
    yield m
    m.close()


def cfg(url: str, **settings) -> config.Destination:
    return config.Destination(name="fwd", type="segment", settings={
        "write_key": "wk-1", "api_url": url, "allow_private_targets": True, **settings})


def send(url: str, messages: list[dict], **settings):
    dest = build_destination(cfg(url, **settings))
    batch = [Event(k, m["messageId"], m, None, None, None) for k, m in enumerate(messages)]

    async def go():
        await dest.start()
        try:
            return await dest.send(batch)
        finally:
            await dest.close()
    return asyncio.run(go())


def stored(mid: str, **extra) -> dict:
    """A message as the log holds it."""
    return {"type": "track", "event": "Signed Up", "messageId": mid, "userId": "user-1",
            "sourceId": "src_1", "timestamp": "2026-03-01T12:00:00.250Z",
            "originalTimestamp": "2026-03-01T12:00:03.000Z", "sentAt": "2026-03-01T12:00:03.100Z",
            "receivedAt": "2026-03-01T12:00:00.350Z", "context": {"library": {"name": "x"}},
            "properties": {"plan": "pro"}, "integrations": {}, **extra}


def test_forwards_a_batch_as_segment_documents_it(mock):
    outcomes = send(mock.url, [stored("m-1"), stored("m-2", type="page", name="Home")])
    assert [o.state for o in outcomes] == ["delivered", "delivered"]
    [req] = mock.requests
    assert req.path == "/v1/batch" and req.headers["content-type"] == "application/json"
    assert req.headers["authorization"] == "Basic " + base64.b64encode(b"wk-1:").decode()
    body = json.loads(req.body)
    assert set(body) == {"batch", "sentAt"} and body["sentAt"].endswith("+00:00")
    first, page = body["batch"]
    assert first == {"type": "track", "event": "Signed Up", "messageId": "m-1",
                     "userId": "user-1", "timestamp": "2026-03-01T12:00:00.250Z",
                     "context": {"library": {"name": "x"}}, "properties": {"plan": "pro"},
                     "integrations": {}}
    assert page["type"] == "page" and page["name"] == "Home"


def test_gzip_bodies(mock):
    [outcome] = send(mock.url, [stored("m-1")], gzip=True)
    assert outcome.state == "delivered"
    req = mock.requests[0]
    assert req.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(req.raw))["batch"][0]["messageId"] == "m-1"


def test_an_oversize_event_fails_and_the_rest_go(mock):
    big = stored("m-big", properties={"blob": "x" * 33_000})
    outcomes = send(mock.url, [stored("m-1"), big, stored("m-2")])
    assert [o.state for o in outcomes] == ["delivered", "failed", "delivered"]
    assert "32768 bytes" in outcomes[1].detail and "Trim" in outcomes[1].detail
    assert mock.received() == ["m-1", "m-2"]


def test_requests_stay_under_500_kb(mock):
    messages = [stored(f"m-{k}", properties={"blob": "y" * 20_000}) for k in range(40)]
    outcomes = send(mock.url, messages)
    assert all(o.state == "delivered" for o in outcomes)
    assert len(mock.requests) == 2 and all(len(r.body) <= 475_000 for r in mock.requests)
    assert mock.received() == [f"m-{k}" for k in range(40)]


def test_chunks_respect_count_and_size():
    items = [b"x" * 10] * 7
    assert [list(r) for r in chunk_by_size(items, 3, 1000)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [len(r) for r in chunk_by_size(items, 100, 25)] == [2, 2, 2, 1]
    assert [len(r) for r in chunk_by_size([b"x" * 50, b"y"], 100, 25)] == [1, 1]


@pytest.mark.parametrize("odd", [{"type": {"v": 1}}, {"type": "purchase"}, {"type": None},
                                 {"event": ["x"]}, {"userId": {"id": 7}}, {"groupId": True}])
def test_a_mapped_field_of_the_wrong_type_fails_that_event_alone(mock, odd):
    """The receiver drops such a message (a trackpipe) or refuses the whole request for it
    (Customer.io's strict mode, the mock): it fails here, and the others go."""
    outcomes = send(mock.url, [stored("m-1"), stored("m-2", **odd), stored("m-3")])
    assert [o.state for o in outcomes] == ["delivered", "failed", "delivered"]
    assert f"`{next(iter(odd))}`" in outcomes[1].detail
    assert mock.received() == ["m-1", "m-3"] and len(mock.requests) == 1


def test_a_message_without_timestamp_goes_with_the_stored_events_time(mock):
    """An action may build a message without `timestamp`: the receiver would date it on
    arrival, differently on each retry. It goes with the stored event's time instead."""
    built = {"type": "track", "event": "Bought", "messageId": "m-1", "userId": "user-1"}
    dest = build_destination(cfg(mock.url))

    async def go():
        await dest.start()
        try:
            for _ in range(2):  # a first attempt and its retry
                event = Event(1, "m-1", dict(built), None, None, "a", stored_time=1772366400250)
                [outcome] = await dest.send([event])
                assert outcome.state == DELIVERED.state
        finally:
            await dest.close()
    asyncio.run(go())
    sent = [json.loads(r.body)["batch"][0] for r in mock.requests]
    assert [m["timestamp"] for m in sent] == ["2026-03-01T12:00:00.250Z"] * 2
    assert "timestamp" not in built


def test_failures_are_classified(mock):
    mock.break_()
    assert send(mock.url, [stored("m-1")])[0].state == "retry"
    mock.break_(terminal=True)
    assert send(mock.url, [stored("m-1")])[0].state == "failed"
    mock.heal()
    [wrong_key] = send(mock.url, [stored("m-1")], write_key="other")
    assert wrong_key.state == "failed" and wrong_key.status == 401
    [unreachable] = send("http://127.0.0.1:9", [stored("m-1")])
    assert unreachable.state == "retry" and "cannot reach" in unreachable.detail


def test_a_write_key_echoed_as_its_basic_auth_header_is_masked(mock):
    """The receiver quotes the header it got: base64 of "wk-1-secret:"."""
    header = "Basic " + base64.b64encode(b"wk-1-secret:").decode()
    mock.answer_next(401, {"error": f"no source for authorization {header}"})
    dest = build_destination(cfg(mock.url, write_key="wk-1-secret"))
    [outcome] = dest.scrub_outcomes(send(mock.url, [stored("m-1")], write_key="wk-1-secret"))
    assert outcome.detail == f'{{"error": "no source for authorization {MASK}"}}'


def test_check(mock):
    assert "accepted an empty batch" in asyncio.run(build_destination(cfg(mock.url)).check())
    with pytest.raises(DestinationError, match="answered 401"):
        asyncio.run(build_destination(cfg(mock.url, write_key="other")).check())


@pytest.mark.parametrize("settings,message", [({"write_key": ""}, "write_key is empty"),
                                              ({"api_url": "api.segment.io"}, "must start")])
def test_bad_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_destination(cfg("http://127.0.0.1:1", **settings))


def test_write_key_is_masked():
    assert masked(cfg("http://127.0.0.1:1"))["write_key"] == "********"


def test_forwards_into_a_second_trackpipe(fresh_server, tmp_path):
    plain = write_config(tmp_path / "receiver.toml", identity={"enabled": False})
    receiver = fresh_server(config=plain).start()
    table = {"name": "relay", "type": "segment", "retry_initial_seconds": 0.2,
             "settings": {"write_key": receiver.write_key, "api_url": receiver.url,
                          "allow_private_targets": True}}
    path = write_config(tmp_path / "forwarder.toml", [table], identity={"enabled": False})
    forwarder = fresh_server(config=path).start()
    # /health answers before the destinations start at the log's head; events sent in
    # between would count as older than the destination (see the report to the lead).
    wait_for(lambda: b"consumers ready" in forwarder.log_path.read_bytes(), 20,
             what="the forwarder's destinations to start")
    run = uuid.uuid4().hex[:8]
    batch = [{"type": "track", "event": "Order Completed", "userId": "user-1",
              "messageId": f"{run}-t", "timestamp": "2026-03-01T12:00:00.250Z",
              "properties": {"revenue": 12.5, "currency": "EUR"},
              "context": {"locale": "fr-FR"}},
             {"type": "identify", "anonymousId": "anon-7", "messageId": f"{run}-i",
              "traits": {"email": "a@example.com"}},
             {"type": "page", "userId": "user-1", "name": "Home", "messageId": f"{run}-p"}]
    assert forwarder.post("/v1/batch", {"batch": batch}).status_code == 200

    def arrived():
        got = {e["messageId"]: e for e in receiver.events() if e["messageId"].startswith(run)}
        return got if len(got) == 3 else None
    got = wait_for(arrived, 30, what="the forwarded events at the second trackpipe")
    sent = {e["messageId"]: e for e in forwarder.events() if e["messageId"].startswith(run)}
    for mid, event in got.items():
        assert event["type"] == sent[mid]["type"]
        # The event time survives the hop: as the receiver's originalTimestamp exactly, and as
        # its timestamp up to the request's latency (receivedAt - sentAt, Segment's formula).
        assert event["originalTimestamp"] == sent[mid]["timestamp"]
        assert 0 <= parse_ts(event["timestamp"]) - parse_ts(sent[mid]["timestamp"]) < 5000
    track = got[f"{run}-t"]
    assert track["properties"] == {"revenue": 12.5, "currency": "EUR"}
    assert track["context"]["locale"] == "fr-FR" and track["event"] == "Order Completed"
    assert got[f"{run}-i"]["traits"] == {"email": "a@example.com"}
    assert got[f"{run}-p"]["name"] == "Home"
