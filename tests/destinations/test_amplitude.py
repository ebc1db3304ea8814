"""The amplitude destination against a local Amplitude HTTP V2 API (vendor_mocks)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest
from support import wait_for, write_config

from trackpipe import config
from trackpipe.destinations.base import DestinationError, Event
from trackpipe.dsn import MASK
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


def send(mock, messages: list[dict], options: dict | None = None,
         stored_time: int | None = None, **settings):
    dest = build_destination(cfg(mock, **settings))
    batch = [Event(k, m.get("messageId", f"m{k}"), m, None, options, None,
                   stored_time=stored_time) for k, m in enumerate(messages)]

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
    bad = track(mid="m-2", event="")  # Amplitude wants a non-empty event_type
    outcomes = send(mock, [track(mid="m-1"), bad, track(mid="m-3")])
    assert [o.state for o in outcomes] == ["delivered", "failed", "delivered"]
    assert "missing field 'event_type'" in outcomes[1].detail
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


def test_the_event_time_is_the_messages_even_at_0_else_the_stored_one(mock):
    """`timestamp or now` sent 1970-01-01T00:00:00Z as the time of sending, and a message
    an action built without `timestamp` with a new time on every attempt."""
    untimed = track(mid="m-2")
    del untimed["timestamp"]
    send(mock, [track(mid="m-1", timestamp="1970-01-01T00:00:00Z"), untimed],
         stored_time=TS_MS)
    assert [e["time"] for e in mock.accepted] == [0, TS_MS]


def revenue_event(mid: str, **properties) -> dict:
    return {"type": "track", "event": "Product Added", "messageId": mid, "userId": "u1",
            "timestamp": TS, "properties": {"product_id": "p1", **properties}}


def test_revenue_fields_of_the_wrong_type_stay_event_properties(mock):
    """quantity 0.5 or price "abc" at the top level would make Amplitude refuse the event."""
    messages = [revenue_event("q-half", price=12.0, quantity=0.5),
                revenue_event("q-2.0", price=12.0, quantity=2.0),
                revenue_event("rev-str", revenue="19.99", price="cheap", quantity="2"),
                revenue_event("id-num", product_id=123, revenue=True)]
    outcomes = send(mock, messages)
    assert [o.state for o in outcomes] == ["delivered"] * 4, outcomes
    half, whole, text, number = mock.accepted
    assert "quantity" not in half and half["event_properties"]["quantity"] == 0.5
    assert whole["quantity"] == 2 and type(whole["quantity"]) is int
    assert text["revenue"] == 19.99 and "price" not in text and "quantity" not in text
    assert text["event_properties"]["price"] == "cheap"
    assert number["productId"] == "123" and "revenue" not in number


def test_a_quantity_beyond_amplitudes_integer_stays_an_event_property(mock):
    """1e300.is_integer(): it went to Amplitude as a 301-digit quantity."""
    outcomes = send(mock, [revenue_event("huge", price=2.0, quantity=1e300),
                           revenue_event("big", price=2.0, quantity=2**31),
                           revenue_event("ok", price=2.0, quantity=-(2**31 - 1))])
    assert [o.state for o in outcomes] == ["delivered"] * 3
    huge, big, ok = mock.accepted
    assert "quantity" not in huge and huge["event_properties"]["quantity"] == 1e300
    assert "quantity" not in big and ok["quantity"] == -(2**31 - 1)


@pytest.mark.parametrize("odd", [{"type": {"v": 1}}, {"event": {"name": "x"}},
                                 {"userId": {"id": 7}}, {"anonymousId": [1]},
                                 {"messageId": False}])
def test_a_mapped_field_of_the_wrong_type_fails_that_event_alone(mock, odd):
    """Sent on, an object id reached Amplitude as a Python repr ("{'id': 7}")."""
    outcomes = send(mock, [track(mid="m-1"), track(mid="m-2", **odd), track(mid="m-3")])
    assert [o.state for o in outcomes] == ["delivered", "failed", "delivered"]
    assert f"`{next(iter(odd))}`" in outcomes[1].detail
    assert mock.received() == ["m-1", "m-3"]


# A real key of another project (an EU key sent to the US host): Amplitude answers
# 400 "Invalid API key: <the key>", and that answer is an outcome's detail.
LEAKED_KEY = "eu-project-REAL-api-key-7f3a9c"


def test_an_echoed_api_key_is_masked_in_the_failed_store_api_and_log(mock, fresh_server,
                                                                      tmp_path):
    table = {"name": "amp", "type": "amplitude", "settings": {
        "api_key": LEAKED_KEY, "api_url": mock.url, "allow_private_targets": True}}
    path = write_config(tmp_path / "t.toml", [table], identity={"enabled": False})
    srv = fresh_server(config=path).start()
    wait_for(lambda: b"consumers ready" in srv.log_path.read_bytes(), 20,
             what="the destinations to start")
    mid = uuid.uuid4().hex
    assert srv.post("/v1/batch", {"batch": [
        {"type": "track", "event": "E", "userId": "user-1", "messageId": mid}]}).status_code == 200
    with srv.admin() as c:
        failed = wait_for(lambda: (f := c.get("/api/v1/destinations/amp/failed").json()["failed"])
                          and f, 30, what="the event in the failed store")
        summary = c.get("/api/v1/destinations/amp").json()
    assert [f["message_id"] for f in failed] == [mid]
    assert failed[0]["detail"] == f'{{"code": 400, "error": "Invalid API key: {MASK}"}}'
    assert summary["last_error"]["detail"] == failed[0]["detail"]
    wait_for(lambda: mid.encode() in srv.log_path.read_bytes(), 10, what="the log line")
    assert LEAKED_KEY not in json.dumps(summary) + srv.log_path.read_text(errors="replace")


def check_with_leaked_key(mock, tmp_path) -> subprocess.CompletedProcess:
    """`trackpipe check` on an amplitude destination whose api_key is LEAKED_KEY."""
    path = write_config(tmp_path / "t.toml", [{"name": "amp", "type": "amplitude", "settings": {
        "api_key": LEAKED_KEY, "api_url": mock.url, "allow_private_targets": True}}])
    return subprocess.run([sys.executable, "-m", "trackpipe", "check", "--config", str(path),
                           "--data-dir", str(tmp_path / "data")], capture_output=True,
                          text=True, timeout=60)


def test_trackpipe_check_masks_an_echoed_api_key(mock, tmp_path):
    r = check_with_leaked_key(mock, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"FAIL  amp (amplitude): Amplitude answered 400: {{\"code\": 400, \"error\":" \
           f" \"Invalid API key: {MASK}\"}}. Check api_key" in r.stderr, r.stderr
    assert LEAKED_KEY not in r.stdout + r.stderr


def test_trackpipe_check_masks_an_api_key_cut_inside_a_long_answer(mock, tmp_path):
    """check() quotes the excerpt inside a sentence: the cut ("…") was not at the end of
    the text, so the start of the key showed."""
    shown = 'Amplitude answered 401: {"error": "'
    pad = "x" * (499 - len('{"error": "') - len(" key ") - 12)
    mock.answer_next(401, {"error": f"{pad} key {LEAKED_KEY}"})  # 12 chars of it before the cut
    r = check_with_leaked_key(mock, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{shown}{pad} key {MASK}…. Check api_key" in r.stderr, r.stderr
    assert LEAKED_KEY[:8] not in r.stdout + r.stderr
