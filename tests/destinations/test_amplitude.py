"""The amplitude destination against a local Amplitude HTTP V2 API (vendor_mocks)."""

from __future__ import annotations

import asyncio
import json

import pytest

from trackpipe import config
from trackpipe.destinations.base import DestinationError, Event
from trackpipe.destinations.build import build_destination, masked
from trackpipe.errors import ConfigError

from destinations.vendor_mocks import AmplitudeMock

TS = "2026-03-01T12:00:00.250Z"
TS_MS = 1772366400250


@pytest.fixture
def mock():
    m = AmplitudeMock(api_key="key-1")
    yield m
    m.close()


def cfg(mock, **settings) -> config.Destination:
    return config.Destination(name="amp", type="amplitude", settings={
        "api_key": "key-1", "api_url": mock.url, "allow_private_targets": True, **settings})


def send(mock, messages: list[dict], options: dict | None = None, **settings):
    dest = build_destination(cfg(mock, **settings))
    batch = [Event(k, m.get("messageId", f"m{k}"), m, None, options, None)
             for k, m in enumerate(messages)]

    async def go():
        await dest.start()
        try:
            return await dest.send(batch)
        finally:
            await dest.close()
    return asyncio.run(go())


def track(mid="m-1", **extra) -> dict:
    return {"type": "track", "event": "Order Completed", "messageId": mid, "userId": "u1",
            "anonymousId": "anon-1", "timestamp": TS,
            "properties": {"revenue": 39.5, "price": 19.75, "quantity": 2, "product_id": "p-9",
                           "currency": "EUR"},
            "context": {"ip": "203.0.113.9", "os": {"name": "Android", "version": "14"},
                        "device": {"model": "Pixel 8", "manufacturer": "Google"},
                        "app": {"version": "3.1.0"}, "locale": "de-DE"},
            **extra}


def test_track_becomes_an_httpapi_event(mock):
    [outcome] = send(mock, [track()], options={"session_id": 1772366000000})
    assert outcome.state == "delivered"
    [req] = mock.requests
    body = json.loads(req.body)
    assert req.path == "/2/httpapi" and req.headers["content-type"] == "application/json"
    assert body["api_key"] == "key-1" and body["options"] == {"min_id_length": 1}
    [e] = mock.accepted
    assert e["event_type"] == "Order Completed" and e["insert_id"] == "m-1"
    assert e["user_id"] == "u1" and e["device_id"] == "anon-1"  # "u1" is short: min_id_length
    assert e["time"] == TS_MS and e["session_id"] == 1772366000000
    assert e["revenue"] == 39.5 and e["price"] == 19.75 and e["quantity"] == 2
    assert e["productId"] == "p-9"
    assert e["event_properties"]["currency"] == "EUR"
    assert e["ip"] == "203.0.113.9" and e["os_name"] == "Android" and e["os_version"] == "14"
    assert e["device_model"] == "Pixel 8" and e["device_manufacturer"] == "Google"
    assert e["app_version"] == "3.1.0" and e["language"] == "de-DE"
    assert e["library"] == "trackpipe"


@pytest.mark.parametrize("message,name", [
    ({"type": "page", "name": "Pricing"}, "Viewed Pricing Page"),
    ({"type": "page", "properties": {"url": "https://x.example/"}}, "Loaded a Page"),
    ({"type": "screen", "name": "Home"}, "Viewed Home Screen"),
])
def test_pages_and_screens_are_named_as_segment_names_them(mock, message, name):
    send(mock, [{**message, "messageId": "p1", "anonymousId": "anon-1", "timestamp": TS}])
    assert mock.accepted[0]["event_type"] == name


def test_identify_sets_user_properties(mock):
    [outcome] = send(mock, [{"type": "identify", "messageId": "i1", "userId": "user-1",
                             "timestamp": TS, "traits": {"email": "a@example.com", "plan": "pro"}}])
    assert outcome.state == "delivered"
    [e] = mock.accepted
    assert e["event_type"] == "$identify"
    assert e["user_properties"] == {"$set": {"email": "a@example.com", "plan": "pro"}}


def test_group_sets_membership_and_group_properties(mock):
    [outcome] = send(mock, [{"type": "group", "messageId": "g1", "userId": "user-1",
                             "groupId": "acme", "timestamp": TS, "traits": {"plan": "team"}}],
                     group_type="company")
    assert outcome.state == "delivered"
    member, group = mock.accepted
    assert member["event_type"] == "$identify" and member["groups"] == {"company": "acme"}
    assert member["user_properties"] == {"$set": {"company": "acme"}}
    assert group["event_type"] == "$groupidentify" and group["groups"] == {"company": "acme"}
    assert group["group_properties"] == {"$set": {"plan": "team"}}
    assert {member["insert_id"], group["insert_id"]} == {"g1", "g1-group"}


def test_alias_is_not_sent(mock):
    [outcome] = send(mock, [{"type": "alias", "messageId": "a1", "userId": "u",
                             "previousId": "p"}])
    assert outcome.state == "delivered" and outcome.detail.startswith("not sent:")
    assert mock.requests == []


def test_invalid_events_fail_and_the_rest_are_resent(mock):
    bad = track(mid="m-2")
    bad["properties"]["quantity"] = "two"  # Amplitude wants an integer
    outcomes = send(mock, [track(mid="m-1"), bad, track(mid="m-3")])
    assert [o.state for o in outcomes] == ["delivered", "failed", "delivered"]
    assert "invalid field 'quantity'" in outcomes[1].detail
    assert len(mock.requests) == 2  # the refused request, then the others again
    assert mock.received() == ["m-1", "m-3"]


def test_a_too_large_request_is_split_in_halves(mock):
    mock.answer_next(413, {"code": 413, "error": "Payload too large"})
    outcomes = send(mock, [track(mid=f"m-{k}") for k in range(4)])
    assert all(o.state == "delivered" for o in outcomes)
    assert [len(json.loads(r.body)["events"]) for r in mock.requests] == [4, 2, 2]
    assert sorted(mock.received()) == [f"m-{k}" for k in range(4)]


def test_throttling_is_retried_after_amplitudes_pause(mock):
    mock.answer_next(429, {"code": 429, "error": "Too many requests for some devices and users",
                           "eps_threshold": 30, "throttled_events": [0]})
    [outcome] = send(mock, [track()])
    assert outcome.state == "retry" and outcome.retry_after == 30
    mock.answer_next(429, {"code": 429, "error": "slow down"}, {"Retry-After": "5"})
    [outcome] = send(mock, [track()])
    assert outcome.retry_after == 5


def test_outage_is_retried_and_a_bad_key_fails(mock):
    mock.break_()
    [down] = send(mock, [track()])
    assert down.state == "retry" and down.status == 503
    mock.heal()
    [refused] = send(mock, [track()], api_key="wrong-key")
    assert refused.state == "failed" and "Invalid API key" in refused.detail


def test_check_verifies_the_api_key(mock):
    assert "accepted" in asyncio.run(build_destination(cfg(mock)).check())
    with pytest.raises(DestinationError, match="Check api_key"):
        asyncio.run(build_destination(cfg(mock, api_key="nope")).check())


@pytest.mark.parametrize("settings,message", [({"api_key": " "}, "api_key is empty"),
                                              ({"api_url": "ftp://x"}, "must start with")])
def test_bad_settings_are_config_errors(mock, settings, message):
    with pytest.raises(ConfigError, match=message):
        build_destination(cfg(mock, **settings))


def test_api_key_is_masked(mock):
    assert masked(cfg(mock))["api_key"] == "********"
