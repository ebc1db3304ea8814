"""The mixpanel destination against a local Mixpanel Import/Engage API (vendor_mocks)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json

import pytest

from trackpipe import config
from trackpipe.destinations.base import DestinationError, Event
from trackpipe.destinations.build import build_destination, masked
from trackpipe.errors import ConfigError

from destinations.vendor_mocks import MixpanelMock

TS = "2026-03-01T12:00:00.250Z"
TS_MS = 1772366400250


@pytest.fixture
def mock():
    m = MixpanelMock(token="tok", service_account=("sa.user", "sa-secret"), project_id="42")
    yield m
    m.close()


def cfg(mock, **settings) -> config.Destination:
    return config.Destination(name="mp", type="mixpanel", settings={
        "project_token": "tok", "api_url": mock.url, "allow_private_targets": True, **settings})


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
    return {"type": "track", "event": "Order Completed", "messageId": mid, "userId": "user-1",
            "anonymousId": "anon-1", "timestamp": TS,
            "properties": {"revenue": 19.99, "currency": "EUR", "order_id": "o1"},
            "context": {"ip": "203.0.113.9", "page": {"url": "https://shop.example/cart",
                                                      "referrer": "https://search.example/"},
                        "os": {"name": "iOS"}, "campaign": {"name": "spring", "source": "news"}},
            **extra}


def test_track_becomes_an_import_event(mock):
    [outcome] = send(mock, [track()])
    assert outcome.state == "delivered"
    [req] = mock.requests
    assert req.path == "/import" and req.query == {"strict": ["1"]}
    assert req.basic_auth() == ("tok", "")  # the project token as Basic username
    [record] = mock.accepted
    assert record["event"] == "Order Completed"
    p = record["properties"]
    assert p["time"] == TS_MS and p["distinct_id"] == "user-1"
    assert p["$user_id"] == "user-1" and p["$device_id"] == "anon-1"
    assert p["$insert_id"] == "m-1" and p["trackpipe_message_id"] == "m-1"
    assert p["revenue"] == 19.99 and p["currency"] == "EUR" and p["order_id"] == "o1"
    assert p["ip"] == "203.0.113.9" and p["$current_url"] == "https://shop.example/cart"
    assert p["$referrer"] == "https://search.example/" and p["$os"] == "iOS"
    assert p["utm_campaign"] == "spring" and p["utm_source"] == "news"
    assert p["mp_lib"] == "trackpipe"


def test_anonymous_events_use_the_device_distinct_id(mock):
    msg = track()
    del msg["userId"]
    send(mock, [msg])
    p = mock.accepted[0]["properties"]
    assert p["distinct_id"] == "$device:anon-1" and "$user_id" not in p


def test_long_message_ids_are_hashed_into_the_insert_id_charset(mock):
    long_id = "api-" + "x" * 40 + ":1"
    send(mock, [track(mid=long_id)])
    p = mock.accepted[0]["properties"]
    assert p["$insert_id"] == hashlib.sha256(long_id.encode()).hexdigest()[:36]
    assert p["trackpipe_message_id"] == long_id


@pytest.mark.parametrize("message,name", [
    ({"type": "page", "name": "Pricing"}, "Viewed Pricing Page"),
    ({"type": "page"}, "Loaded a Page"),
    ({"type": "screen", "name": "Home"}, "Viewed Home Screen"),
    ({"type": "screen", "properties": {}}, "Loaded a Screen"),
])
def test_pages_and_screens_are_named_as_segment_names_them(mock, message, name):
    send(mock, [{**message, "messageId": "p1", "anonymousId": "a1", "timestamp": TS}])
    assert mock.accepted[0]["event"] == name


def test_identify_sets_the_profile_and_links_the_anonymous_id(mock):
    msg = {"type": "identify", "messageId": "i-1", "userId": "user-1", "anonymousId": "anon-1",
           "timestamp": TS, "context": {"ip": "198.51.100.7", "active": False},
           "traits": {"email": "a@example.com", "firstName": "Ada", "lastName": "Lovelace",
                      "plan": "pro"}}
    [outcome] = send(mock, [msg])
    assert outcome.state == "delivered"
    [update] = mock.profile_updates
    assert update["$token"] == "tok" and update["$distinct_id"] == "user-1"
    assert update["$set"] == {"$email": "a@example.com", "$first_name": "Ada",
                              "$last_name": "Lovelace", "$name": "Ada Lovelace", "plan": "pro"}
    assert update["$ip"] == "198.51.100.7" and update["$ignore_time"] is True
    [merge] = mock.accepted
    assert merge["event"] == "$identify"
    assert merge["properties"]["$identified_id"] == "user-1"
    assert merge["properties"]["$anon_id"] == "anon-1"
    engage = [r for r in mock.requests if r.path == "/engage"]
    assert engage[0].query == {"verbose": ["1"]} and engage[0].basic_auth() is None


def test_identify_without_ip_turns_geolocation_off(mock):
    send(mock, [{"type": "identify", "messageId": "i-2", "userId": "user-2", "traits": {}}])
    assert mock.profile_updates[0]["$ip"] == "0"
    assert not mock.accepted  # no anonymous id: nothing to link


def test_group_and_alias_are_not_sent(mock):
    outcomes = send(mock, [{"type": "group", "groupId": "g", "userId": "u", "messageId": "g1"},
                           {"type": "alias", "previousId": "a", "userId": "u", "messageId": "a1"}])
    assert [o.state for o in outcomes] == ["delivered", "delivered"]
    assert all(o.detail.startswith("not sent:") for o in outcomes)
    assert mock.requests == []


def test_an_unknown_message_shape_fails_with_a_hint(mock):
    [outcome] = send(mock, [{"order": 1}])
    assert outcome.state == "failed" and "map `type`" in outcome.detail


def test_a_1970_timestamp_is_sent_as_it_is_and_fails_with_mixpanels_reason(mock):
    """Epoch 0 is falsy: it used to be replaced by the time of sending."""
    [outcome] = send(mock, [track(timestamp="1970-01-01T00:00:00Z")], stored_time=TS_MS)
    assert outcome.state == "failed" and "before 1971" in outcome.detail
    [req] = mock.requests
    assert json.loads(req.body)[0]["properties"]["time"] == 0 and mock.accepted == []


def test_a_message_without_timestamp_is_sent_with_its_stored_time_on_every_attempt(mock):
    """A mapping that leaves `timestamp` out: Mixpanel deduplicates on (event, distinct_id,
    time, $insert_id), so a time taken when sending would double every retried event."""
    message = track()
    del message["timestamp"]
    for _ in range(2):  # a retry
        [outcome] = send(mock, [message], stored_time=TS_MS)
        assert outcome.state == "delivered"
    assert [r["properties"]["time"] for r in mock.accepted] == [TS_MS, TS_MS]


@pytest.mark.parametrize("odd", [{"type": {"v": 1}}, {"type": ["track"]}, {"type": None},
                                 {"event": {"name": "x"}}, {"userId": {"id": 7}},
                                 {"anonymousId": ["a"]}, {"messageId": True}])
def test_a_mapped_field_of_the_wrong_type_fails_that_event_alone(mock, odd):
    """An action's mapping can put any JSON value anywhere; an object `type` used to raise
    (unhashable), which retried the whole batch for hours and sent nothing."""
    outcomes = send(mock, [track(mid="m-1"), track(mid="m-2", **odd), track(mid="m-3")])
    assert [o.state for o in outcomes] == ["delivered", "failed", "delivered"]
    field = next(iter(odd))
    assert f"`{field}`" in outcomes[1].detail and "map `" in outcomes[1].detail
    assert mock.received() == ["m-1", "m-3"]


def test_failed_records_fail_only_those_events(mock):
    bad = track(mid="m-2", userId="null")  # a placeholder distinct_id Mixpanel refuses
    outcomes = send(mock, [track(mid="m-1"), bad, track(mid="m-3")])
    assert [o.state for o in outcomes] == ["delivered", "failed", "delivered"]
    assert outcomes[1].status == 400 and "distinct_id" in outcomes[1].detail
    assert mock.received() == ["m-1", "m-3"]


def test_service_account_auth_sends_project_id(mock):
    [outcome] = send(mock, [track()], service_account_username="sa.user",
                     service_account_secret="sa-secret", project_id="42")
    assert outcome.state == "delivered"
    req = mock.requests[0]
    assert req.basic_auth() == ("sa.user", "sa-secret") and req.query["project_id"] == ["42"]


def test_bad_credentials_fail_for_good(mock):
    [outcome] = send(mock, [track()], project_token="wrong")
    assert outcome.state == "failed" and outcome.status == 401


def test_rate_limit_and_outage_are_retried(mock):
    mock.answer_next(429, {"error": "rate limited"}, {"Retry-After": "12"})
    [limited] = send(mock, [track()])
    assert limited.state == "retry" and limited.retry_after == 12
    mock.break_()
    [down] = send(mock, [track()])
    assert down.state == "retry" and down.status == 503


def test_an_unreachable_api_is_retried():
    dest = build_destination(config.Destination(name="mp", type="mixpanel", settings={
        "project_token": "tok", "api_url": "http://127.0.0.1:9", "allow_private_targets": True}))

    async def go():
        await dest.start()
        try:
            return await dest.send([Event(0, "m", track(), None, None, None)])
        finally:
            await dest.close()
    [outcome] = asyncio.run(go())
    assert outcome.state == "retry" and "cannot reach" in outcome.detail


def test_gzip_imports(mock):
    [outcome] = send(mock, [track()], gzip=True)
    assert outcome.state == "delivered"
    req = mock.requests[0]
    assert req.headers["content-encoding"] == "gzip" and gzip.decompress(req.raw) == req.body


def test_more_than_2000_events_split_into_requests(mock):
    messages = [track(mid=f"m-{k}") for k in range(2001)]
    outcomes = send(mock, messages)
    assert all(o.state == "delivered" for o in outcomes)
    assert [len(r.body) > 0 for r in mock.requests] == [True, True]
    assert len(mock.received()) == 2001


def test_check_verifies_credentials(mock):
    assert "accepted" in asyncio.run(build_destination(cfg(mock)).check())
    with pytest.raises(DestinationError, match="refused the credentials"):
        asyncio.run(build_destination(cfg(mock, project_token="wrong")).check())


@pytest.mark.parametrize("settings,message", [
    ({"project_token": ""}, "project_token is empty"),
    ({"service_account_username": "sa"}, "set both"),
    ({"service_account_username": "sa", "service_account_secret": "s"}, "needs project_id"),
    ({"api_url": "api.mixpanel.com"}, "must start with https://"),
])
def test_bad_settings_are_config_errors(mock, settings, message):
    with pytest.raises(ConfigError, match=message):
        build_destination(cfg(mock, **settings))


def test_secrets_are_masked(mock):
    shown = masked(cfg(mock, service_account_username="sa", service_account_secret="s",
                       project_id="1"))
    assert shown["project_token"] == shown["service_account_secret"] == "********"
    assert shown["service_account_username"] == "sa"
