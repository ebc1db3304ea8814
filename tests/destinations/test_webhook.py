"""The webhook destination against a local receiver: body shapes, Standard Webhooks
signing (checked by sink_webhook.verify, written from the spec), ids that survive
retries, failure classification, redirects and the SSRF guard."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import socket
import tomllib

import httpx
import msgspec
import pytest

from destinations import sink_webhook
from destinations.sink_webhook import BadSignature, Recorder, Redial, fake_dns, new_secret, verify
from trackpipe import config
from trackpipe.destinations import destination_class
from trackpipe.destinations import webhook as webhook_module
from trackpipe.destinations.base import DELIVERED, DestinationError, Event
from trackpipe.destinations.build import build_destination, masked
from trackpipe.destinations.webhook import _keeps_custom_headers, Webhook, WebhookSettings

PUBLIC = "8.8.8.8"


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


def settings(**fields) -> WebhookSettings:
    return msgspec.convert(fields, WebhookSettings)


def run(url: str, batches, *, resolver=None, dialer=None, _between=(), **fields):
    """Start a Webhook, send each batch, close it; the outcomes, one per batch.
    `_between[i]`, when given, runs before batch i is sent."""
    fields.setdefault("allow_private_targets", True)

    async def go():
        hook = Webhook("hook", settings(url=url, **fields), resolver=resolver, dialer=dialer)
        await hook.start()
        try:
            outcomes = []
            for i, batch in enumerate(batches):
                if i < len(_between) and _between[i]:
                    _between[i]()
                outcomes.append(await hook.send(batch))
            return outcomes
        finally:
            await hook.close()

    return asyncio.run(go())


def events(*ids: str, **props) -> list[Event]:
    return [Event(k + 1, i, {"type": "track", "event": "Order Completed", "messageId": i,
                             "userId": "u1", "properties": {"seq": k, **props}}, None, None, None)
            for k, i in enumerate(ids)]


def test_batch_mode_sends_one_signed_request(recorder):
    secret = new_secret()
    batch = events("m1", "m2", "m3")
    [outcome] = run(recorder.url(), [batch], secret=secret)
    assert outcome == DELIVERED
    [req] = recorder.requests
    assert req["method"] == "POST" and req["path"] == "/hook"
    assert req["headers"]["content-type"] == "application/json"
    assert json.loads(req["body"]) == {"batch": [e.message for e in batch]}
    webhook_id = verify(secret, req["headers"], req["body"])
    digest = hashlib.sha256(json.dumps(["m1", "m2", "m3"]).encode()).hexdigest()[:32]
    assert webhook_id == f"batch_{digest}"


def test_single_mode_sends_one_request_per_event(recorder):
    secret = new_secret()
    batch = events("m1", "m2", "m3")
    [outcomes] = run(recorder.url(), [batch], secret=secret, mode="single")
    assert list(outcomes) == [DELIVERED] * 3
    by_id = {verify(secret, r["headers"], r["body"]): json.loads(r["body"])
             for r in recorder.requests}
    assert by_id == {e.message_id: e.message for e in batch}


def test_webhook_id_survives_a_retry_and_the_timestamp_is_fresh(recorder, monkeypatch):
    secret = new_secret()
    recorder.script = [(503, {}, b"busy")]
    clock = iter([1_700_000_000, 1_700_000_090])
    monkeypatch.setattr(webhook_module, "_unix_now", lambda: next(clock))
    batch = events("m1", "m2")
    first, second = run(recorder.url(), [batch, batch], secret=secret)
    assert first.state == "retry" and second == DELIVERED
    a, b = recorder.requests
    assert a["body"] == b["body"]
    assert a["headers"]["webhook-id"] == b["headers"]["webhook-id"]
    assert (a["headers"]["webhook-timestamp"], b["headers"]["webhook-timestamp"]) == \
        ("1700000000", "1700000090")
    assert verify(secret, b["headers"], b["body"], now=1_700_000_090)


def test_different_batches_get_different_ids(recorder):
    run(recorder.url(), [events("m1", "m2"), events("m2", "m1"), events("m1")])
    ids = [r["headers"]["webhook-id"] for r in recorder.requests]
    assert len(set(ids)) == 3 and all(i.startswith("batch_") for i in ids)


def test_unsafe_message_id_becomes_a_digest(recorder):
    [_] = run(recorder.url(), [events("a.b c\u00e9")], mode="single")
    webhook_id = recorder.requests[0]["headers"]["webhook-id"]
    assert re.fullmatch(r"msg_[0-9a-f]{32}", webhook_id)


def test_rotation_signs_with_every_secret(recorder):
    old, new = new_secret(), new_secret()
    run(recorder.url(), [events("m1")], secret=[new, old])
    req = recorder.requests[0]
    assert len(req["headers"]["webhook-signature"].split(" ")) == 2
    assert verify(old, req["headers"], req["body"]) == verify(new, req["headers"], req["body"])
    with pytest.raises(BadSignature):
        verify(new_secret(), req["headers"], req["body"])


def test_verifier_rejects_tampering_and_stale_timestamps(recorder):
    secret = new_secret()
    run(recorder.url(), [events("m1")], secret=secret)
    req = recorder.requests[0]
    with pytest.raises(BadSignature, match="no v1 signature"):
        verify(secret, req["headers"], req["body"].replace(b"m1", b"m9"))
    stamp = int(req["headers"]["webhook-timestamp"])
    with pytest.raises(BadSignature, match="tolerance"):
        verify(secret, req["headers"], req["body"], now=stamp + 301)


def test_unsigned_without_a_secret_but_still_identified(recorder):
    run(recorder.url(), [events("m1")], mode="single")
    headers = recorder.requests[0]["headers"]
    assert "webhook-signature" not in headers and "x-signature" not in headers
    assert headers["webhook-id"] == "m1" and headers["webhook-timestamp"].isdigit()


def test_segment_x_signature_matches_segments_example(recorder):
    shared = "segment-shared-secret"
    run(recorder.url(), [events("m1", city="Zürich", note='say "hi"')], mode="single",
        segment_shared_secret=shared)
    req = recorder.requests[0]
    expected = hmac.new(shared.encode(), req["body"], hashlib.sha1).hexdigest()
    assert req["headers"]["x-signature"] == expected
    # Segment's doc example re-serialises the parsed body with JSON.stringify: compact
    # separators, no ASCII escaping. The body must survive that byte for byte.
    stringify = json.dumps(json.loads(req["body"]), separators=(",", ":"), ensure_ascii=False)
    assert stringify.encode() == req["body"]


def test_custom_headers_and_put(recorder):
    run(recorder.url(), [events("m1")], method="PUT",
        headers={"Authorization": "Bearer t0k3n", "X-Team": "growth"})
    req = recorder.requests[0]
    assert req["method"] == "PUT"
    assert req["headers"]["authorization"] == "Bearer t0k3n"
    assert req["headers"]["x-team"] == "growth"
    assert req["headers"]["user-agent"].startswith("trackpipe/")


@pytest.mark.parametrize("answer, state, status, retry_after", [
    ((200, {}, b"ok"), "delivered", 200, None),
    ((204, {}, b""), "delivered", 204, None),
    ((400, {}, b'{"error": "bad field"}'), "failed", 400, None),
    ((410, {}, b"gone"), "retry", 410, None),  # kept; it stops the destination (R10)
    ((429, {"Retry-After": "7"}, b"slow down"), "retry", 429, 7.0),
    ((500, {}, b"oops"), "retry", 500, None),
    ((503, {"Retry-After": "2"}, b"later"), "retry", 503, 2.0),
])
def test_answers_are_classified(recorder, answer, state, status, retry_after):
    recorder.script = [answer]
    [outcome] = run(recorder.url(), [events("m1")])
    assert (outcome.state, outcome.status, outcome.retry_after) == (state, status, retry_after)
    if state != "delivered":
        assert outcome.detail == answer[2].decode()


def test_a_batch_too_large_for_the_receiver_goes_in_halves_and_later_ones_fit(recorder):
    recorder.max_body = 700  # a receiver with a body limit (nginx: client_max_body_size)
    first, second = events(*[f"m{k}" for k in range(8)]), events(*[f"n{k}" for k in range(8)])
    big = events("huge", pad="x" * 1000)
    outcomes = run(recorder.url(), [first, second, first[:1] + big])
    assert [list(o) for o in outcomes[:2]] == [[DELIVERED] * 8] * 2
    assert [o.state for o in outcomes[2]] == ["delivered", "failed"]
    assert outcomes[2][1].status == 413  # too large on its own: nothing left to split
    delivered = [json.loads(r["body"])["batch"] for r in recorder.requests
                 if len(r["body"]) <= 700]
    assert [m["messageId"] for b in delivered for m in b] == [
        *(e.message_id for e in first), *(e.message_id for e in second), "m0"]
    # Only the first batch was refused whole; the second was cut to fit before sending.
    refused = [r for r in recorder.requests if len(r["body"]) > 700]
    assert len(refused) == 2 and json.loads(refused[0]["body"])["batch"][0]["messageId"] == "m0"
    assert all(len(json.loads(r["body"])["batch"]) == 1 for r in refused[1:])


def test_connection_refused_is_retried():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once it is closed
    [outcome] = run(f"http://127.0.0.1:{port}/hook", [events("m1")])
    assert outcome.state == "retry" and outcome.status is None
    assert "ConnectError" in outcome.detail


def test_timeout_is_retried(recorder):
    recorder.script = [(200, {}, b"too late", 1.5)]
    [outcome] = run(recorder.url(), [events("m1")], timeout_seconds=0.3)
    assert outcome.state == "retry" and "timed out" in outcome.detail


def test_a_send_stays_within_its_budget(recorder, monkeypatch):
    monkeypatch.setattr(webhook_module, "SEND_BUDGET", 1.5)
    monkeypatch.setattr(webhook_module, "SINGLE_CONCURRENCY", 1)
    recorder.script = [(200, {}, b"ok", 0.1), (200, {}, b"ok", 0.1), (200, {}, b"ok", 3.0)]
    [outcomes] = run(recorder.url(), [events("m1", "m2", "m3", "m4")], mode="single",
                     timeout_seconds=5)
    states = [o.state for o in outcomes]
    assert states[:2] == ["delivered", "delivered"] and states[2:] == ["retry", "retry"]
    assert "budget" in outcomes[3].detail


def test_huge_error_body_is_cut(recorder):
    recorder.script = [(400, {}, b"x" * 2_000_000)]
    [outcome] = run(recorder.url(), [events("m1")])
    assert outcome.state == "failed" and len(outcome.detail) <= 500


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_followed_with_method_body_and_signature(recorder, status):
    secret = new_secret()
    recorder.script = [(status, {"Location": "/moved"}, b"")]
    [outcome] = run(recorder.url(), [events("m1")], secret=secret)
    assert outcome == DELIVERED
    first, second = recorder.requests
    assert (second["method"], second["path"]) == ("POST", "/moved")
    assert second["body"] == first["body"]
    assert verify(secret, second["headers"], second["body"]) == first["headers"]["webhook-id"]


def test_more_than_five_redirects_fail(recorder):
    recorder.script = [(302, {"Location": f"/hop{i}"}, b"") for i in range(6)]
    [outcome] = run(recorder.url(), [events("m1")])
    assert outcome.state == "failed" and "more than 5 redirects" in outcome.detail
    assert len(recorder.requests) == 6


def test_redirect_to_a_private_address_is_refused(recorder):
    recorder.script = [(307, {"Location": recorder.url("/admin")}, b"")]
    dns = fake_dns({"hooks.example.test": [PUBLIC]})
    [outcome] = run(recorder.url(host="hooks.example.test"), [events("m1")],
                    resolver=dns, dialer=Redial({PUBLIC: "127.0.0.1"}),
                    allow_private_targets=False)
    assert outcome.state == "failed" and outcome.status is None
    assert "127.0.0.1" in outcome.detail and "allow_private_targets = true" in outcome.detail
    assert [r["path"] for r in recorder.requests] == ["/hook"]  # the second hop never left


def test_redirect_to_another_host_drops_custom_headers(recorder):
    secret = new_secret()
    other = f"http://other.example.test:{recorder.port}/elsewhere"
    recorder.script = [(308, {"Location": other}, b"")]
    dns = fake_dns({"hooks.example.test": [PUBLIC], "other.example.test": ["8.8.4.4"]})
    [outcome] = run(recorder.url(host="hooks.example.test"), [events("m1")], secret=secret,
                    headers={"Authorization": "Bearer t0k3n"}, resolver=dns,
                    dialer=Redial({PUBLIC: "127.0.0.1", "8.8.4.4": "127.0.0.1"}),
                    allow_private_targets=False)
    assert outcome == DELIVERED
    first, second = recorder.requests
    assert first["headers"]["authorization"] == "Bearer t0k3n"
    assert "authorization" not in second["headers"]
    assert verify(secret, second["headers"], second["body"])


def test_a_redirect_to_another_port_of_the_same_host_drops_custom_headers(recorder):
    other = Recorder()
    try:
        recorder.script = [(307, {"Location": other.url("/elsewhere", host="hooks.example.test")},
                            b"")]
        [outcome] = run(recorder.url(host="hooks.example.test"), [events("m1")],
                        headers={"Authorization": "Bearer t0k3n"},
                        resolver=fake_dns({"hooks.example.test": [PUBLIC]}),
                        dialer=Redial({PUBLIC: "127.0.0.1"}), allow_private_targets=False)
        assert outcome == DELIVERED
        assert recorder.requests[0]["headers"]["authorization"] == "Bearer t0k3n"
        [moved] = other.requests
        assert moved["path"] == "/elsewhere" and "authorization" not in moved["headers"]
    finally:
        other.close()


def test_a_redirect_within_the_origin_keeps_custom_headers(recorder):
    recorder.script = [(308, {"Location": "/moved"}, b"")]
    [outcome] = run(recorder.url(), [events("m1")], headers={"Authorization": "Bearer t0k3n"})
    assert outcome == DELIVERED
    assert [r["headers"].get("authorization") for r in recorder.requests] == [
        "Bearer t0k3n", "Bearer t0k3n"]


@pytest.mark.parametrize("origin, target, kept", [
    ("https://h.test/a", "https://h.test/b", True),
    ("https://h.test/a", "https://h.test:443/b", True),  # the default port, spelled out
    ("http://h.test/a", "https://h.test/b", True),  # the upgrade httpx keeps Authorization on
    ("https://h.test:8443/a", "https://h.test:8443/b", True),
    ("https://h.test/a", "https://h.test:8443/b", False),  # another port: another service
    ("http://h.test:8080/a", "https://h.test/b", False),
    ("http://h.test/a", "https://h.test:8443/b", False),
    ("https://h.test/a", "http://h.test/b", False),  # a downgrade
    ("https://h.test/a", "https://other.test/b", False),
    ("https://h.test/a", "https://sub.h.test/b", False),
])
def test_which_redirects_keep_custom_headers(origin, target, kept):
    assert _keeps_custom_headers(httpx.URL(origin), httpx.URL(target)) is kept


def test_private_target_is_refused_at_send_time(recorder):
    dns = fake_dns({"intranet.test": ["127.0.0.1"]})
    [outcome] = run(recorder.url(host="intranet.test"), [events("m1")], resolver=dns,
                    allow_private_targets=False)
    assert outcome.state == "failed"
    assert "intranet.test (127.0.0.1, loopback)" in outcome.detail
    assert "allow_private_targets" in outcome.detail
    assert recorder.requests == []


def test_private_targets_are_refused_by_default():
    assert settings(url="https://example.com/hook").allow_private_targets is False


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://localhost:8080/", "http://[::1]/", "http://0.0.0.0/",
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://2130706433/",
    "http://[::ffff:127.0.0.1]/",
])
def test_private_literal_urls_are_refused_when_configured(url):
    with pytest.raises(msgspec.ValidationError, match="allow_private_targets = true"):
        settings(url=url)
    assert settings(url=url, allow_private_targets=True).url == url


@pytest.mark.parametrize("fields, message", [
    ({"url": "file:///etc/passwd"}, "http:// or https://"),
    ({"url": "gopher://example.com/"}, "http:// or https://"),
    ({"url": "https://user:pw@example.com/"}, "must not carry credentials"),
    ({"url": "https://example.com/", "secret": "whsec_c2hvcnQ="}, "at least 24 bytes"),
    ({"url": "https://example.com/", "secret": "not base64!"}, "whsec_"),
    ({"url": "https://example.com/", "headers": {"Webhook-Signature": "x"}}, "cannot be set"),
    ({"url": "https://example.com/", "headers": {"X-A": "1\r\nX-B: 2"}}, "line break"),
    ({"url": "https://example.com/", "mode": "stream"}, r"\$\.mode"),
    ({"url": "https://example.com/", "method": "GET"}, r"\$\.method"),
    ({"url": "https://example.com/", "timeout_seconds": 0}, "timeout_seconds"),
    ({"url": "https://example.com/", "retries": 3}, "unknown field"),
])
def test_bad_settings_say_what_to_fix(fields, message):
    with pytest.raises(msgspec.ValidationError, match=message):
        settings(**fields)


def check(url: str, resolver=None, **fields) -> str:
    hook = Webhook("hook", settings(url=url, **fields), resolver=resolver)
    return asyncio.run(hook.check())


def test_check_accepts_a_public_name_without_sending(recorder):
    dns = fake_dns({"hooks.example.test": [PUBLIC]})
    result = check(recorder.url(host="hooks.example.test"), dns)
    assert "8.8.8.8" in result and "all public" in result
    assert recorder.requests == []


def test_check_refuses_a_name_that_resolves_privately():
    dns = fake_dns({"intranet.test": ["10.2.3.4"]})
    with pytest.raises(DestinationError, match=r"10\.2\.3\.4.*allow_private_targets"):
        check("https://intranet.test/hook", dns)
    assert "10.2.3.4" in check("https://intranet.test/hook", dns, allow_private_targets=True)


def test_check_reports_a_name_that_does_not_resolve():
    with pytest.raises(DestinationError, match="does not resolve"):
        check("https://nowhere.test/hook", fake_dns({}))


def test_delete_is_forwarded_like_segment(recorder):
    secret = new_secret()

    async def go():
        hook = Webhook("hook", settings(url=recorder.url(), secret=secret,
                                        allow_private_targets=True))
        await hook.start()
        try:
            return await hook.delete_user(["u1"], ["anon-1"])
        finally:
            await hook.close()

    assert asyncio.run(go()) == DELIVERED
    [req] = recorder.requests
    assert verify(secret, req["headers"], req["body"]).startswith("delete_")
    body = json.loads(req["body"])["batch"]
    assert [(m["type"], m.get("userId"), m.get("anonymousId")) for m in body] == \
        [("delete", "u1", None), ("delete", None, "anon-1")]
    assert all(m["timestamp"].endswith("Z") for m in body)


def test_example_config_in_the_module_docstring_builds():
    toml = "\n".join(line[4:] for line in webhook_module.__doc__.splitlines()
                     if line.startswith("    "))
    [table] = tomllib.loads(toml)["destinations"]
    cfg = msgspec.convert(table, config.Destination)
    hook = build_destination(cfg)
    assert isinstance(hook, Webhook) and destination_class("webhook") is Webhook
    shown = masked(cfg)
    assert shown["secret"] == shown["headers"] == "********"
    assert shown["url"] == "https://example.com/hook"


def test_sink_accepts_the_destination_and_can_break_and_heal(tmp_path):
    sink = sink_webhook.Sink(tmp_path / "sink")
    try:
        table = sink.config("dest")
        assert table["type"] == "webhook"
        first, broken, terminal, healed = run(
            table["settings"]["url"], [events("m1", "m2")] * 4,
            **{k: v for k, v in table["settings"].items() if k != "url"},
            _between=[None, lambda: sink.break_(), lambda: sink.break_(terminal=True), sink.heal])
        assert (first.state, broken.status, terminal.status, healed.state) == \
            ("delivered", 503, 400, "delivered")
        assert sink.received() == ["m1", "m2", "m1", "m2"]
        assert len(sink.webhook_ids("m1")) == 2 and len(set(sink.webhook_ids("m1"))) == 1
        assert sink.handle({}, b'{"messageId": "m3"}')[0] == 401
        assert "missing webhook-id" in sink.errors()[0] and "m3" not in sink.received()
    finally:
        sink.close()
