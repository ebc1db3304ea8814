"""The mixpanel destination against a local Mixpanel Import/Engage/Groups API (sink_mixpanel)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from trackpipe import config
from trackpipe.destinations import mixpanel
from trackpipe.destinations.base import DestinationError, Event
from trackpipe.destinations.build import build_destination, masked
from trackpipe.errors import ConfigError

from delivery.test_consumers_fuzz import FUZZ, message as any_message, value as any_value
from destinations.sink_mixpanel import MixpanelGroupsMock
from support import examples

TS = "2026-03-01T12:00:00.250Z"
TS_MS = 1772366400250


@pytest.fixture
def mock():
    m = MixpanelGroupsMock(token="tok", service_account=("sa.user", "sa-secret"),
                           project_id="42")
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
    assert "set group_key" in outcomes[0].detail  # the setting that would send it
    assert mock.requests == []


# -- group calls (Group Analytics) ----------------------------------------------------

def group(mid="g-1", **extra) -> dict:
    return {"type": "group", "groupId": "acme", "messageId": mid, "userId": "user-1",
            "anonymousId": "anon-1", "timestamp": TS, "context": {"ip": "203.0.113.9"},
            "traits": {"name": "Acme Inc", "plan": "enterprise", "employees": 350}, **extra}


def test_a_group_call_sets_the_group_profile_and_adds_the_group_to_the_user(mock):
    [outcome] = send(mock, [group()], group_key="company_id")
    assert outcome.state == "delivered"
    [update] = mock.group_updates
    assert update == {"$token": "tok", "$group_key": "company_id", "$group_id": "acme",
                      "$set": {"$name": "Acme Inc", "plan": "enterprise", "employees": 350}}
    [member] = mock.profile_updates  # $union: a user may belong to several companies
    assert member == {"$token": "tok", "$distinct_id": "user-1", "$ip": "203.0.113.9",
                      "$union": {"company_id": ["acme"]}}
    groups = [r for r in mock.requests if r.path == "/groups"]
    assert groups[0].query == {"verbose": ["1"]} and groups[0].basic_auth() is None
    assert mock.accepted == []  # no event: a group call is not a track


def test_a_trait_named_after_the_group_key_names_the_group_as_segment_classic_did(mock):
    message = group(traits={"company_id": 12345, "name": "Initech"})
    send(mock, [message], group_key="company_id")
    assert mock.group_updates[0]["$group_id"] == "12345"  # a string, as Mixpanel takes it
    assert mock.profile_updates[0]["$union"] == {"company_id": ["12345"]}


def test_a_group_call_without_a_user_updates_only_the_group(mock):
    message = group()
    del message["userId"], message["anonymousId"]
    [outcome] = send(mock, [message], group_key="company_id")
    assert outcome.state == "delivered"
    assert len(mock.group_updates) == 1 and mock.profile_updates == []


def test_a_group_call_without_a_group_id_fails_alone(mock):
    message = group(mid="g-2")
    del message["groupId"]
    outcomes = send(mock, [group(mid="g-1"), message], group_key="company_id")
    assert [o.state for o in outcomes] == ["delivered", "failed"]
    assert "groupId" in outcomes[1].detail and "company_id" in outcomes[1].detail
    assert [u["$group_id"] for u in mock.group_updates] == ["acme"]


def test_events_with_a_context_group_id_carry_the_group_key(mock):
    in_group = track(mid="m-1", context={"groupId": "acme"})
    explicit = track(mid="m-2", context={"groupId": "acme"},
                     properties={"company_id": "other"})  # an explicit property wins
    page = {"type": "page", "messageId": "p-1", "anonymousId": "a1", "timestamp": TS,
            "context": {"groupId": "acme"}}
    send(mock, [in_group, explicit, track(mid="m-3"), page], group_key="company_id")
    values = [r["properties"].get("company_id") for r in mock.accepted]
    assert values == ["acme", "other", None, "acme"]


def test_without_a_group_key_events_do_not_get_a_group_property(mock):
    send(mock, [track(context={"groupId": "acme"})])
    assert "company_id" not in mock.accepted[0]["properties"]


@pytest.mark.parametrize("status,body,headers,state", [
    (429, {"error": "rate limited"}, {"Retry-After": "7"}, "retry"),
    (503, {"error": "service unavailable"}, {}, "retry"),
    (401, {"error": "Unauthorized", "status": "error"}, {}, "failed"),
    (200, {"status": 0, "error": "Invalid token"}, {}, "failed"),  # refused, answered 200
])
def test_groups_failures_are_retried_or_final_as_mixpanel_means_them(mock, status, body,
                                                                     headers, state):
    message = group()
    del message["userId"], message["anonymousId"]  # one request: /groups
    mock.answer_next(status, body, headers)
    [outcome] = send(mock, [message], group_key="company_id")
    assert (outcome.state, outcome.status) == (state, status)
    if headers:
        assert outcome.retry_after == 7
    assert mock.group_updates == []


def test_a_refused_groups_request_fails_only_the_group_calls_of_the_batch(mock):
    mock.answer_next(200, {"code": 200, "num_records_imported": 2, "status": "OK"})  # /import
    mock.answer_next(200, {"status": 0, "error": "Invalid token"})                  # /groups
    outcomes = send(mock, [track(mid="m-1"), group(), track(mid="m-3")],
                    group_key="company_id")
    assert [o.state for o in outcomes] == ["delivered", "failed", "delivered"]
    assert "Groups refused the group profile update" in outcomes[1].detail
    assert mock.profile_updates != []  # the membership went; only the group update failed


def test_a_group_update_over_1_mb_fails_alone_before_sending(mock):
    big = group(mid="g-2", traits={"notes": "x" * 1_000_001})
    outcomes = send(mock, [group(mid="g-1"), big], group_key="company_id")
    assert [o.state for o in outcomes] == ["delivered", "failed"]
    assert "1 MB" in outcomes[1].detail
    assert len(mock.group_updates) == 1


def test_more_than_2000_group_updates_split_into_requests(mock):
    messages = [{**group(mid=f"g-{k}", groupId=f"c-{k}"), "userId": None, "anonymousId": None}
                for k in range(2001)]
    outcomes = send(mock, messages, group_key="company_id")
    assert all(o.state == "delivered" for o in outcomes)
    assert [r.path for r in mock.requests] == ["/groups", "/groups"]
    assert len(mock.group_updates) == 2001


@settings(FUZZ, max_examples=examples(30))  # the vendor fuzz test covers the rest of plan()
@given(st.lists(any_message(), min_size=1, max_size=8),
       st.lists(any_value, min_size=8, max_size=8))
def test_group_key_translations_take_any_message(messages, group_ids):
    """With a group key, whatever a mapping put in a message (context.groupId and the
    key's trait too): request bodies that encode, or an outcome for that event alone."""
    records, updates, groups = [], [], []
    for i, (m, group_id) in enumerate(zip(messages, group_ids)):
        m = {**m, "context": {**m["context"], "groupId": group_id}}
        event = Event(i, f"m{i}", m, "p1", None, None, stored_time=1714557600000)
        skipped = mixpanel.plan(i, event, "token", records, updates, groups, "id")
        assert skipped is None or skipped.state in ("delivered", "failed")
    msgspec.json.encode([u for _, u in updates])
    for _, encoded in groups:
        update = msgspec.json.decode(encoded)
        assert isinstance(update["$group_id"], str) and update["$group_id"]
        assert isinstance(update["$set"], dict)


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
    ({"group_key": ""}, "group_key is empty"),
    ({"group_key": "  "}, "group_key is empty"),
    ({"group_key": " company_id"}, "group_key ' company_id' has spaces around it"),
    ({"group_key": 5}, r"Expected `str \| null`, got `int` - at `\$.group_key`"),
])
def test_bad_settings_are_config_errors(mock, settings, message):
    with pytest.raises(ConfigError, match=message):
        build_destination(cfg(mock, **settings))


def test_secrets_are_masked(mock):
    shown = masked(cfg(mock, service_account_username="sa", service_account_secret="s",
                       project_id="1"))
    assert shown["project_token"] == shown["service_account_secret"] == "********"
    assert shown["service_account_username"] == "sa"
