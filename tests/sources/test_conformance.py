"""Tracking-API conformance: wire-protocol.md §7 cases 1-44 that concern ingestion, as
overridden by decisions.md, plus the rest of trackpipe's ingest contract.

Test names carry the §7 case number (test_cNN_...). Every test uses its own ids
(uuid) because the session `server` is shared. Tests that need their own
configuration, a restart or a failing disk use `fresh_server`.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import resource
import time
import uuid
import zlib
from datetime import datetime, timezone

import httpx
import pytest

from support import basic

TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
ALL_PATHS = ("identify", "track", "page", "screen", "group", "alias", "batch",
             "i", "t", "p", "s", "g", "a", "b")
SHORT = {"i": "identify", "t": "track", "p": "page", "s": "screen", "g": "group", "a": "alias"}


# -- helpers -------------------------------------------------------------------------------

def uid(prefix: str = "x") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def ok(resp: httpx.Response) -> None:
    assert resp.status_code == 200, (resp.status_code, resp.text)
    assert resp.json() == {"success": True}


def err(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert isinstance(body, dict), body
    assert body.get("code") == code, body
    assert isinstance(body.get("message"), str) and body["message"], body
    return body


def ms(text: str) -> int:
    assert TS_RE.match(text), text
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return round(dt.timestamp() * 1000)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(at_ms: int) -> str:
    dt = datetime.fromtimestamp(at_ms / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at_ms % 1000:03d}Z"


def one(server, message_id: str) -> dict:
    found = server.events(message_id=message_id)
    assert len(found) == 1, found
    return found[0]


def not_stored(server, *message_ids: str) -> None:
    for mid in message_ids:
        assert server.events(message_id=mid) == [], mid


def discarded(server, message_id: str, reason: str) -> None:
    not_stored(server, message_id)
    rows = server.discards(message_id=message_id)
    assert [r["reason"] for r in rows] == [reason], rows
    status = server.status(message_id)
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["status"] == "discarded", body
    assert [d["reason"] for d in body["discards"]] == [reason], body


def track(mid: str | None = None, **fields) -> dict:
    ev = {"userId": uid("u"), "event": "E", "properties": {"n": 1}}
    if mid is not None:
        ev["messageId"] = mid
    ev.update(fields)
    return ev


def check_common(ev: dict, source_id: str) -> None:
    """What every stored event carries (decisions.md; wire-protocol.md §4.2)."""
    assert ev["sourceId"] == source_id
    assert "writeKey" not in ev
    assert ev["version"] == 2
    assert isinstance(ev["messageId"], str) and ev["messageId"]
    for key in ("receivedAt", "timestamp", "originalTimestamp"):
        assert TS_RE.match(ev[key]), (key, ev[key])
    if "sentAt" in ev:
        assert TS_RE.match(ev["sentAt"]), ev["sentAt"]


def deep_list(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.fixture(scope="module")
def source_ids(server) -> dict:
    """writeKey -> source id, refreshed on demand."""
    def refresh() -> dict:
        with server.admin() as client:
            return {s["writeKey"]: s["id"] for s in client.get("/api/v1/sources").json()["sources"]}
    ids = refresh()
    ids["_refresh"] = refresh
    return ids


@pytest.fixture(scope="module")
def wk_id(source_ids) -> str:
    return source_ids["WK"]


# -- 7.1 auth ------------------------------------------------------------------------------

def test_c01_basic_auth_track_stored_with_server_fields(server, wk_id):
    user = uid("u")
    before = now_ms()
    ok(server.post("/v1/track", {"userId": user, "event": "E"}))
    after = now_ms()
    [ev] = server.events(user_id=user)
    check_common(ev, wk_id)
    assert ev["type"] == "track" and ev["event"] == "E" and ev["userId"] == user
    assert ev["messageId"].startswith("api-")
    received = ms(ev["receivedAt"])
    assert before - 1 <= received <= after + 1
    assert ev["timestamp"] == ev["originalTimestamp"] == ev["receivedAt"]
    assert "sentAt" not in ev
    assert "anonymousId" not in ev


def test_c02_basic_auth_without_colon(server, wk_id):
    mid = uid("m")
    ok(server.post("/v1/track", track(mid), headers={"authorization": basic("WK", colon=False)}))
    check_common(one(server, mid), wk_id)


def test_c03_body_write_key_without_auth_header(server, wk_id):
    mid = uid("m")
    ok(server.post("/v1/track", track(mid, writeKey="WK"), auth=False))
    ev = one(server, mid)
    check_common(ev, wk_id)  # includes: writeKey not stored


def test_c03b_batch_item_write_key(server, wk_id):
    mids = [uid("m"), uid("m")]
    body = {"batch": [{**track(mids[0]), "type": "track", "writeKey": "WK"},
                      {**track(mids[1]), "type": "track"}]}
    ok(server.post("/v1/batch", body, auth=False))
    for mid in mids:
        check_common(one(server, mid), wk_id)


def test_c04_bearer_registered_cio_key(server, source_ids):
    key = f"sk_us_{uuid.uuid4().hex[:12]}"
    server.add_source(uid("cio"), write_key=key)
    source_id = source_ids["_refresh"]()[key]
    mid = uid("m")
    ok(server.post("/v1/batch", {"batch": [{**track(mid), "type": "track"}]},
                   headers={"authorization": f"Bearer {key}"}))
    check_common(one(server, mid), source_id)


def test_c05_bearer_opaque_token_plus_body_write_key(server, wk_id):
    mid = uid("m")
    body = {"writeKey": "WK", "batch": [{**track(mid), "type": "track"}]}
    ok(server.post("/v1/batch", body, headers={"authorization": "Bearer opaque.oauth.token"}))
    check_common(one(server, mid), wk_id)


@pytest.mark.parametrize("headers,extra", [
    ({}, {}),
    ({}, {"writeKey": ""}),
    ({"authorization": basic("", colon=True)}, {}),
    ({"authorization": "Bearer opaque.oauth.token"}, {}),
], ids=["nothing", "empty-body-key", "empty-basic", "opaque-bearer-only"])
def test_c06_missing_write_key_400(server, headers, extra):
    mid = uid("m")
    resp = server.post("/v1/track", track(mid, **extra), auth=False, headers=headers)
    err(resp, 400, "missing_write_key")
    not_stored(server, mid)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("where", ["basic", "body"])
def test_c07_unknown_write_key_401(server, strict, where):
    mid = uid("m")
    headers = {"x-strict-mode": "1"} if strict else {}
    if where == "basic":
        resp = server.post("/v1/track", track(mid), auth=False,
                           headers={**headers, "authorization": basic("NOPE")})
    else:
        resp = server.post("/v1/track", track(mid, writeKey="NOPE"), auth=False, headers=headers)
    err(resp, 401, "invalid_write_key")
    not_stored(server, mid)
    assert server.status(mid).status_code == 404


def test_c07b_disabled_write_key_401(server):
    from trackpipe.sources.catalog import Catalog

    name = uid("off")
    key = server.add_source(name)
    ok(server.post("/v1/track", track(uid("m")), headers={"authorization": basic(key)}))
    catalog = Catalog(server.data_dir)
    try:
        assert catalog.set_enabled(name, False)
    finally:
        catalog.close()
    deadline = time.monotonic() + 5
    mid = uid("m")
    while True:
        resp = server.post("/v1/track", track(mid), headers={"authorization": basic(key)})
        if resp.status_code != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    err(resp, 401, "invalid_write_key")
    assert httpx.get(f"{server.url}/v1/projects/{key}/settings").status_code == 404


# -- 7.2 transport and parsing -------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(SHORT) + sorted(SHORT.values()))
def test_c08_every_single_event_path_text_plain(server, wk_id, path):
    type_ = SHORT.get(path, path)
    mid = uid("m")
    ev = {"type": type_, "userId": uid("u"), "messageId": mid, "event": "E", "name": "N",
          "groupId": "g1", "previousId": "p1", "writeKey": "WK"}
    ok(server.post(f"/v1/{path}", ev, auth=False, headers={"content-type": "text/plain"}))
    stored = one(server, mid)
    check_common(stored, wk_id)
    assert stored["type"] == type_


def test_c09_browser_batch_b_same_received_at(server, wk_id):
    mids = [uid("m") for _ in range(3)]
    sent = iso(now_ms())
    body = {"writeKey": "WK", "sentAt": sent, "batch": [
        {"type": "track", "userId": "u", "event": "E", "messageId": mids[0]},
        {"type": "identify", "anonymousId": "a", "traits": {"x": 1}, "messageId": mids[1]},
        {"type": "page", "userId": "u", "name": "Home", "messageId": mids[2]},
    ]}
    ok(server.post("/v1/b", body, auth=False, headers={"content-type": "text/plain"}))
    stored = [one(server, m) for m in mids]
    assert [e["type"] for e in stored] == ["track", "identify", "page"]
    assert len({e["receivedAt"] for e in stored}) == 1
    for e in stored:
        check_common(e, wk_id)
        assert e["sentAt"] == sent


@pytest.mark.parametrize("encoding,compress", [
    ("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress),
    ("GZIP", gzip.compress)])
def test_c10_gzip_form_urlencoded_rudder_node_shape(server, wk_id, encoding, compress):
    mids = [uid("m"), uid("m")]
    body = {"batch": [{**track(m), "type": "track", "channel": "server"} for m in mids],
            "sentAt": iso(now_ms())}
    resp = server.post("/v1/batch", content=compress(json.dumps(body).encode()), headers={
        "content-encoding": encoding, "content-type": "application/x-www-form-urlencoded"})
    ok(resp)
    for m in mids:
        ev = one(server, m)
        check_common(ev, wk_id)
        assert ev["channel"] == "server"  # unknown top-level keys preserved


@pytest.mark.parametrize("content", [b"\x00garbage-not-gzip\xff" * 10, b"",
                                     gzip.compress(b'{"userId":"u","event":"E"}')[:-12]],
                         ids=["garbage", "empty", "truncated"])
def test_c11_garbage_gzip_400(server, content):
    resp = server.post("/v1/track", content=content, headers={"content-encoding": "gzip"})
    err(resp, 400, "bad_encoding")


@pytest.mark.parametrize("encoding", ["br", "compress", "zstd", "gzip, br"])
def test_c11b_unsupported_encoding_415(server, encoding):
    resp = server.post("/v1/track", content=json.dumps(track()).encode(),
                       headers={"content-encoding": encoding})
    err(resp, 415, "unsupported_encoding")


@pytest.mark.parametrize("content", [b'{"userId":', b"", b"   ", b"{'a': 1}", b'{"a":1}{"b":2}',
                                     b"\x00\x01", b'{"userId":"u",}'])
def test_c12_invalid_json_400(server, content):
    err(server.post("/v1/track", content=content), 400, "invalid_json")


@pytest.mark.parametrize("content", [b"[1,2]", b'"str"', b"1", b"null", b"true", b"[]"])
def test_c13_body_not_an_object_400(server, content):
    err(server.post("/v1/track", content=content), 400, "invalid_payload")


@pytest.mark.parametrize("batch", ['{"batch": {"type": "track"}}', '{"batch": "x"}',
                                   '{"batch": null}', '{"sentAt": "x"}'])
def test_c13b_batch_not_an_array_400(server, batch):
    err(server.post("/v1/batch", content=batch.encode()), 400, "invalid_payload")


@pytest.mark.parametrize("content", [
    b'{"userId":"u","event":"E","properties":{"x":NaN}}',
    b'{"userId":"u","event":"E","properties":{"x":Infinity}}',
    b'{"userId":"u","event":"E","properties":{"x":-Infinity}}',
    b'{"userId":"u","event":"E","properties":{"x":1e400}}',
    b'{"userId":"u","event":"E","properties":{"x":' + b"9" * 4301 + b"}}",
    b'{"userId":"u","event":"E","properties":{"x":-' + b"9" * 5000 + b"}}",
    b'{"userId":"\xff\xfe","event":"E"}',
    b'{"userId":"u\xed\xa0\x80","event":"E"}',
    b'{"userId":"u\\ud800","event":"E"}',
    b'{"userId":"u","event":"\\udfff x"}',
], ids=["nan", "inf", "-inf", "1e400", "int4301", "int-5000", "bad-utf8", "raw-surrogate",
        "lone-high-surrogate", "lone-low-surrogate"])
def test_c14_unrepresentable_json_400(server, content):
    err(server.post("/v1/track", content=content), 400, "invalid_json")


def test_c14b_big_but_legal_int_accepted(server):
    mid = uid("m")
    content = (b'{"userId":"u","event":"E","messageId":"' + mid.encode()
               + b'","properties":{"x":' + b"9" * 4300 + b"}}")
    ok(server.post("/v1/track", content=content))
    assert one(server, mid)["properties"]["x"] == int("9" * 4300)


def test_c14c_nesting_64_ok_65_too_deep(server):
    # The event object is level 1, properties level 2, then the lists.
    mid = uid("m")
    base = '{"userId":"u","event":"E","messageId":"%s","properties":{"a":%s}}'
    ok(server.post("/v1/track", content=(base % (mid, deep_list(62))).encode()))
    assert one(server, mid)["properties"]["a"] == json.loads(deep_list(62))
    mid2 = uid("m")
    err(server.post("/v1/track", content=(base % (mid2, deep_list(63))).encode()), 400, "too_deep")
    not_stored(server, mid2)


def test_c14c_a_batch_too_deep_stores_nothing_and_counts_as_rejected(fresh_server):
    """The log writer finds it (see LogWriter.commit): the valid events go unstored too."""
    server = fresh_server().start()
    ok_mid = uid("m")
    batch = {"batch": [{"type": "track", "userId": "u", "event": "E", "messageId": ok_mid},
                       {"type": "track", "userId": "u", "event": "E",
                        "properties": {"a": json.loads(deep_list(63))}},
                       {"type": "track", "event": "E"}]}  # a discard: no ids
    err(server.post("/v1/batch", batch), 400, "too_deep")
    not_stored(server, ok_mid)
    assert server.discards() == []
    metrics = server.metrics_text()
    assert 'trackpipe_requests_rejected_total{code="too_deep"} 1.0' in metrics
    assert "trackpipe_events_received_total 0.0" in metrics


@pytest.mark.parametrize("levels", [100, 5_000, 100_000])
def test_c14d_very_deep_nesting_too_deep_not_500(server, levels):
    content = '{"userId":"u","event":"E","properties":{"a":%s}}' % deep_list(levels)
    err(server.post("/v1/track", content=content.encode()), 400, "too_deep")
    batch = '{"batch":[{"type":"track","userId":"u","event":"E","properties":%s}]}' % (
        deep_list(levels))
    err(server.post("/v1/batch", content=batch.encode()), 400, "too_deep")


def test_c14e_deep_nesting_outside_the_events_too_deep(server):
    """decisions.md: a body nesting deeper than 64 is a 400, wherever the nesting is."""
    mid = uid("m")
    body = '{"batch":[{"type":"track","userId":"u","event":"E","messageId":"%s"}],"extra":%s}' % (
        mid, deep_list(100))
    err(server.post("/v1/batch", content=body.encode()), 400, "too_deep")
    not_stored(server, mid)


# -- 7.3 size limits -----------------------------------------------------------------------

def test_c15_event_over_32kb_rejected(server):
    mid = uid("m")
    ev = track(mid, properties={"blob": "x" * 33_000})
    err(server.post("/v1/track", ev), 400, "payload_too_large")
    not_stored(server, mid)
    mid2 = uid("m")
    ok(server.post("/v1/track", track(mid2, properties={"blob": "x" * 30_000})))
    assert len(one(server, mid2)["properties"]["blob"]) == 30_000


def sized_track(mid: str, size: int) -> dict:
    """A track event whose compact JSON is `size` bytes."""
    ev = {**track(mid), "type": "track", "properties": {"blob": ""}}
    ev["properties"]["blob"] = "x" * (size - len(json.dumps(ev, separators=(",", ":"))))
    assert len(json.dumps(ev, separators=(",", ":"))) == size
    return ev


def test_c15b_the_32kb_limit_is_on_the_event_as_sent(server):
    """An SDK measures its events before sending; one that fits must not be refused for
    what trackpipe adds (receivedAt, sourceId, timestamps...): it used to lose its batch."""
    fits, over, small = uid("m"), uid("m"), uid("m")
    ok(server.post("/v1/batch", {"batch": [sized_track(fits, 32_768), {**track(small),
                                                                     "type": "track"}]}))
    assert len(json.dumps(one(server, fits), separators=(",", ":"))) > 32_768  # as stored
    one(server, small)
    err(server.post("/v1/batch", {"batch": [sized_track(over, 32_769)]}), 400,
        "payload_too_large")
    not_stored(server, over)


def test_c15c_a_batch_context_cannot_swell_its_items_past_the_allowance(server):
    # Merged into every item, a batch's context could turn 500 KB into gigabytes stored.
    mid = uid("m")
    body = {"batch": [sized_track(mid, 30_000)], "context": {"pad": "c" * 12_000}}
    answer = err(server.post("/v1/batch", body), 400, "payload_too_large")
    assert "batch's context" in answer["message"]
    not_stored(server, mid)


def test_c16_one_oversized_event_rejects_whole_batch(server):
    mids = [uid("m") for _ in range(11)]
    batch = [{**track(m, properties={"pad": "p" * 1000}), "type": "track"} for m in mids[:10]]
    batch.append({**track(mids[10], properties={"pad": "p" * 40_000}), "type": "track"})
    err(server.post("/v1/batch", {"batch": batch}), 400, "payload_too_large")
    not_stored(server, *mids)


def test_c16b_oversized_invalid_event_also_rejects_batch(server):
    mid = uid("m")
    batch = [{**track(mid), "type": "track"},
             {"type": "track", "userId": "u", "properties": {"pad": "p" * 40_000}}]  # no event
    err(server.post("/v1/batch", {"batch": batch}), 400, "payload_too_large")
    not_stored(server, mid)


def test_c17_request_over_500kb_after_decompression(server):
    mids = [uid("m") for _ in range(21)]
    body = {"batch": [{**track(m, properties={"pad": "p" * 25_000}), "type": "track"}
                      for m in mids]}
    raw = json.dumps(body).encode()
    assert len(raw) > 512_000
    packed = gzip.compress(raw)
    assert len(packed) < 20_000
    resp = server.post("/v1/batch", content=packed, headers={"content-encoding": "gzip"})
    err(resp, 400, "payload_too_large")
    not_stored(server, mids[0], mids[-1])
    # the same body uncompressed
    err(server.post("/v1/batch", content=raw), 400, "payload_too_large")
    not_stored(server, mids[0], mids[-1])


def test_c17b_gzip_bomb_rejected_quickly(server):
    bomb = gzip.compress(b"0" * (10 * 1024 * 1024), compresslevel=9)
    started = time.monotonic()
    resp = server.post("/v1/batch", content=bomb, headers={"content-encoding": "gzip"})
    elapsed = time.monotonic() - started
    err(resp, 400, "payload_too_large")
    assert elapsed < 2.0, elapsed
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_c18_more_than_2500_events_400(server):
    user = uid("u")
    items = [{"type": "track", "userId": user, "event": "E"}] * 2501
    err(server.post("/v1/batch", {"batch": items}), 400, "payload_too_large")
    assert server.events(user_id=user) == []


def test_c18b_exactly_2500_events_stored(server):
    user = uid("u")
    items = [{"type": "track", "userId": user, "event": "E"}] * 2500
    ok(server.post("/v1/batch", {"batch": items}))
    stored = server.events(user_id=user)
    assert len(stored) == 2500
    assert len({e["messageId"] for e in stored}) == 2500  # c30: unique generated ids
    assert len({e["receivedAt"] for e in stored}) == 1


# -- 7.4 validation ------------------------------------------------------------------------

def test_c19_no_ids_discarded_permissive(server):
    mid = uid("m")
    ok(server.post("/v1/track", {"event": "E", "messageId": mid}))
    discarded(server, mid, "no_user_anon_id")


def test_c19b_no_ids_strict_header_400(server):
    mid = uid("m")
    resp = server.post("/v1/track", {"event": "E", "messageId": mid},
                       headers={"x-strict-mode": "1"})
    body = err(resp, 400, "validation_failed")
    assert len(body["errors"]) == 1
    e = body["errors"][0]
    assert e["index"] == 0 and e["code"] == "no_user_anon_id"
    assert isinstance(e["message"], str) and e["message"]
    not_stored(server, mid)


def test_c20_python_null_shape(server):
    mid = uid("m")
    ok(server.post("/v1/track", {"userId": None, "anonymousId": "a1", "event": "E",
                                 "properties": {}, "messageId": mid}))
    ev = one(server, mid)
    assert ev["anonymousId"] == "a1"
    assert "userId" not in ev


def test_c20b_null_and_empty_ids_absent(server):
    mid = uid("m")
    ok(server.post("/v1/batch", {"batch": [
        {"type": "identify", "userId": "u1", "anonymousId": None, "messageId": mid},
        {"type": "identify", "userId": "", "anonymousId": "a2", "messageId": mid + "-2"}]}))
    first, second = one(server, mid), one(server, mid + "-2")
    assert first["userId"] == "u1" and "anonymousId" not in first
    assert second["anonymousId"] == "a2" and "userId" not in second


def test_c21_batch_with_invalid_items(server):
    mids = [uid("m") for _ in range(3)]
    ok(server.post("/v1/batch", {"batch": [
        {"type": "track", "userId": "u", "event": "E", "messageId": mids[0]},
        {"type": "track", "userId": "u", "messageId": mids[1]},
        {"userId": "u", "event": "E", "messageId": mids[2]},
    ]}))
    assert one(server, mids[0])["type"] == "track"
    discarded(server, mids[1], "event_not_defined")
    discarded(server, mids[2], "type_not_defined")


def test_c22_properties_and_traits_not_objects(server):
    m1, m2 = uid("m"), uid("m")
    ok(server.post("/v1/track", {"userId": "u", "event": "E", "properties": "x", "messageId": m1}))
    ok(server.post("/v1/identify", {"userId": "u", "traits": [1], "messageId": m2}))
    discarded(server, m1, "properties_not_object")
    discarded(server, m2, "traits_not_object")


def test_c23_page_null_name_category_stored_empty_discarded(server):
    mid = uid("m")
    ok(server.post("/v1/page", {"userId": "u", "name": None, "category": None,
                                "properties": {}, "messageId": mid}))
    ev = one(server, mid)
    assert ev["type"] == "page"
    m2, m3 = uid("m"), uid("m")
    ok(server.post("/v1/page", {"userId": "u", "name": "", "messageId": m2}))
    ok(server.post("/v1/screen", {"userId": "u", "name": "N", "category": "", "messageId": m3}))
    discarded(server, m2, "name_not_string")
    discarded(server, m3, "category_not_string")


def test_c24_group_without_group_id_alias_without_previous_id(server):
    m1, m2 = uid("m"), uid("m")
    ok(server.post("/v1/group", {"userId": "u", "traits": {}, "messageId": m1}))
    ok(server.post("/v1/alias", {"userId": "u", "messageId": m2}))
    discarded(server, m1, "group_id_not_defined")
    discarded(server, m2, "previous_id_not_defined")


def test_c25_alias_user_id_equals_previous_id(server):
    mid = uid("m")
    ok(server.post("/v1/a", {"type": "alias", "userId": "u1", "previousId": "u1",
                             "messageId": mid}))
    ev = one(server, mid)
    assert ev["type"] == "alias" and ev["userId"] == ev["previousId"] == "u1"


def test_c26_endpoint_type_wins_over_body(server):
    mid = uid("m")
    ok(server.post("/v1/identify", {"type": "track", "userId": "u", "messageId": mid}))
    assert one(server, mid)["type"] == "identify"


def test_c27_numeric_ids_coerced_to_strings(server):
    mid = uid("m")
    numeric_mid = uuid.uuid4().int % 10**15
    ok(server.post("/v1/batch", {"batch": [
        {"type": "group", "userId": 123, "anonymousId": 4.0, "groupId": 77, "messageId": mid},
        {"type": "alias", "userId": 5, "previousId": 6, "messageId": numeric_mid}]}))
    ev = one(server, mid)
    assert ev["userId"] == "123" and ev["anonymousId"] == "4" and ev["groupId"] == "77"
    alias = one(server, str(numeric_mid))
    assert alias["userId"] == "5" and alias["previousId"] == "6"
    [stored] = server.events(user_id="123", message_id=mid)
    assert stored["messageId"] == mid


INVALID = [
    ("/v1/track", {"userId": "u"}, "event_not_defined"),
    ("/v1/track", {"userId": "u", "event": None}, "event_not_defined"),
    ("/v1/track", {"userId": "u", "event": ""}, "event_not_defined"),
    ("/v1/track", {"userId": "u", "event": 5}, "event_not_string"),
    ("/v1/track", {"userId": "u", "event": {"a": 1}}, "event_not_string"),
    ("/v1/track", {"userId": "u", "event": "E", "properties": [1]}, "properties_not_object"),
    ("/v1/identify", {"userId": "u", "traits": "x"}, "traits_not_object"),
    ("/v1/identify", {"userId": "u", "context": "x"}, "context_not_object"),
    ("/v1/identify", {"userId": "u", "context": [1]}, "context_not_object"),
    ("/v1/identify", {"userId": True}, "id_not_string"),
    ("/v1/identify", {"userId": {"id": 1}}, "id_not_string"),
    ("/v1/identify", {"anonymousId": ["a"]}, "id_not_string"),
    ("/v1/identify", {"userId": "", "anonymousId": None}, "no_user_anon_id"),
    ("/v1/page", {"userId": "u", "name": 5}, "name_not_string"),
    ("/v1/screen", {"userId": "u", "category": ["c"]}, "category_not_string"),
    ("/v1/group", {"userId": "u", "groupId": None}, "group_id_not_defined"),
    ("/v1/group", {"userId": "u", "groupId": ""}, "group_id_not_defined"),
    ("/v1/group", {"userId": "u", "groupId": {"g": 1}}, "group_id_not_defined"),
    ("/v1/alias", {"userId": "u", "previousId": None}, "previous_id_not_defined"),
    ("/v1/alias", {"userId": "u", "previousId": [1]}, "previous_id_not_defined"),
    ("/v1/alias", {"previousId": "p"}, "no_user_anon_id"),
    ("/v1/batch", {"batch": [{"type": "bogus", "userId": "u"}]}, "type_invalid"),
    ("/v1/batch", {"batch": [{"type": 7, "userId": "u"}]}, "type_invalid"),
    ("/v1/batch", {"batch": [{"type": None, "userId": "u"}]}, "type_not_defined"),
    ("/v1/batch", {"batch": [{"userId": "u", "event": "E"}]}, "type_not_defined"),
]


@pytest.mark.parametrize("path,body,reason", INVALID,
                         ids=[f"{r}-{i}" for i, (_, _, r) in enumerate(INVALID)])
def test_invalid_event_discarded_with_reason(server, path, body, reason):
    mid = uid("m")
    if path == "/v1/batch":
        body = {"batch": [{**body["batch"][0], "messageId": mid}]}
    else:
        body = {**body, "messageId": mid}
    ok(server.post(path, body))
    discarded(server, mid, reason)
    # the same request in strict mode is a 400 naming the index and reason
    mid2 = uid("m")
    strict_body = json.loads(json.dumps(body).replace(mid, mid2))
    resp = server.post(path, strict_body, headers={"x-strict-mode": "1"})
    errors = err(resp, 400, "validation_failed")["errors"]
    assert [(e["index"], e["code"]) for e in errors] == [(0, reason)]
    not_stored(server, mid2)


def test_alias_previous_id_with_anonymous_id_accepted(server):
    mid = uid("m")
    ok(server.post("/v1/alias", {"anonymousId": "a1", "previousId": "p1", "messageId": mid}))
    assert one(server, mid)["previousId"] == "p1"


def test_event_not_object_items_discarded(server):
    before = {r["id"] for r in server.discards(reason="event_not_object")}
    mid = uid("m")
    ok(server.post("/v1/batch", {"batch": [1, "x", None, [], {**track(mid), "type": "track"}]}))
    one(server, mid)
    new = [r for r in server.discards(reason="event_not_object") if r["id"] not in before]
    assert len(new) == 4


def test_empty_batch_discard(server):
    started = now_ms()
    ok(server.post("/v1/batch", {"batch": []}))
    latest = server.discards(reason="empty_batch")[0]
    assert ms(latest["receivedAt"]) >= started - 1


def test_strict_batch_lists_every_bad_index_and_stores_nothing(server):
    mids = [uid("m") for _ in range(4)]
    resp = server.post("/v1/batch", {"batch": [
        {"type": "track", "userId": "u", "event": "E", "messageId": mids[0]},
        {"type": "track", "userId": "u", "messageId": mids[1]},
        {"type": "identify", "userId": "u", "messageId": mids[2]},
        {"type": "group", "userId": "u", "messageId": mids[3]},
    ]}, headers={"x-strict-mode": "1"})
    errors = err(resp, 400, "validation_failed")["errors"]
    assert [(e["index"], e["code"]) for e in errors] == [
        (1, "event_not_defined"), (3, "group_id_not_defined")]
    assert all(isinstance(e["message"], str) and e["message"] for e in errors)
    not_stored(server, *mids)


def test_strict_mode_all_valid_is_200(server):
    mid = uid("m")
    ok(server.post("/v1/track", track(mid), headers={"x-strict-mode": "1"}))
    one(server, mid)


def test_strict_source_rejects_invalid_without_header(server):
    key = server.add_source(uid("strict"), strict=True)
    auth = {"authorization": basic(key)}
    m1, m2 = uid("m"), uid("m")
    resp = server.post("/v1/batch", {"batch": [{**track(m1), "type": "track"},
                                               {"type": "track", "messageId": m2}]}, headers=auth)
    errors = err(resp, 400, "validation_failed")["errors"]
    assert [(e["index"], e["code"]) for e in errors] == [(1, "no_user_anon_id")]
    not_stored(server, m1, m2)
    ok(server.post("/v1/track", track(m1), headers=auth))
    one(server, m1)


# -- 7.5 dedup and timestamps --------------------------------------------------------------

def test_c28_same_message_id_twice_stored_once(server):
    mid = uid("m")
    ok(server.post("/v1/track", track(mid)))
    ok(server.post("/v1/track", track(mid, event="Changed")))
    ok(server.post("/v1/batch", {"batch": [{**track(mid), "type": "track"}]}))
    ev = one(server, mid)
    assert ev["event"] == "E"  # the first copy wins
    status = server.status(mid).json()
    assert status["status"] == "deduplicated"
    assert status["deduplicated"]["repeats"] == 2
    assert status["stored"]["copies"] == 1


def test_c28b_duplicates_inside_one_batch_stored_once(server):
    mid, other = uid("m"), uid("m")
    ok(server.post("/v1/batch", {"batch": [
        {**track(mid), "type": "track"}, {**track(other), "type": "track"},
        {**track(mid), "type": "track", "event": "Again"}]}))
    assert one(server, mid)["event"] == "E"
    one(server, other)
    status = server.status(mid).json()
    assert status["status"] == "deduplicated" and status["deduplicated"]["repeats"] == 1


def test_c29_resend_after_window_stored_again(fresh_server):
    srv = fresh_server(env={"TRACKPIPE_DEDUP_WINDOW_SECONDS": "2"}).start()
    mid = uid("m")
    ok(srv.post("/v1/track", track(mid)))
    ok(srv.post("/v1/track", track(mid)))
    assert len(srv.events(message_id=mid)) == 1
    time.sleep(2.5)
    ok(srv.post("/v1/track", track(mid)))
    copies = srv.events(message_id=mid)
    assert len(copies) == 2
    assert copies[0]["receivedAt"] != copies[1]["receivedAt"]
    # The status names the newest copy; the one repeat so far was of the first copy.
    status = srv.status(mid).json()
    assert status["stored"]["copies"] == 2
    assert status["stored"]["receivedAt"] == copies[1]["receivedAt"]
    assert status["deduplicated"]["firstSeenAt"] == copies[0]["receivedAt"]
    assert status["deduplicated"]["repeats"] == 1
    ok(srv.post("/v1/track", track(mid)))  # within the window of the second copy
    assert len(srv.events(message_id=mid)) == 2
    status = srv.status(mid).json()
    assert status["deduplicated"]["firstSeenAt"] == copies[1]["receivedAt"]


def test_c29b_dedup_survives_restart_and_crash(fresh_server):
    srv = fresh_server(env={"TRACKPIPE_SERVER_TRUSTED_PROXIES": '["127.0.0.1"]'}).start()
    m1, m2 = uid("m"), uid("m")
    ok(srv.post("/v1/track", track(m1)))
    srv.restart()
    ok(srv.post("/v1/track", track(m1)))
    assert len(srv.events(message_id=m1)) == 1
    ok(srv.post("/v1/track", track(m2)))
    srv.kill()  # before the dedup index flushes: the log replays into it
    srv._log.close()  # support.ServerProcess.kill() leaves it open (ResourceWarning)
    srv.start()
    ok(srv.post("/v1/batch", {"batch": [{**track(m2), "type": "track"}]}))
    assert len(srv.events(message_id=m2)) == 1
    assert srv.status(m2).json()["status"] == "deduplicated"

    # the same server has a trusted proxy (127.0.0.1): X-Forwarded-For is believed
    mid = uid("m")
    ctx = {"library": {"name": "analytics.js", "version": "next-1.84.3"}}
    ok(srv.post("/v1/t", track(mid, context=ctx),
                headers={"x-forwarded-for": "198.51.100.9, 203.0.113.7"}))
    assert one(srv, mid)["context"]["ip"] == "203.0.113.7"
    mid = uid("m")
    ok(srv.post("/v1/t", track(mid, context=ctx),
                headers={"x-forwarded-for": "203.0.113.7, 127.0.0.1"}))
    assert one(srv, mid)["context"]["ip"] == "203.0.113.7"
    # entries that are not addresses are passed over and ports dropped: they were stored
    # as the ip ("unknown", "<script>", "", "203.0.113.9:5555")
    for forwarded, expected in (("unknown, 203.0.113.8", "203.0.113.8"),
                                ("203.0.113.9:5555", "203.0.113.9"),
                                ("<script>", "127.0.0.1"),
                                ("203.0.113.10 , ,203.0.113.11", "203.0.113.11")):
        mid = uid("m")
        ok(srv.post("/v1/t", track(mid, context=ctx), headers={"x-forwarded-for": forwarded}))
        assert one(srv, mid)["context"]["ip"] == expected, forwarded


def test_c30_generated_message_ids_unique(server):
    user = uid("u")
    ok(server.post("/v1/batch", {"batch": [{"type": "track", "userId": user, "event": "E"}] * 2}))
    ok(server.post("/v1/track", {"userId": user, "event": "E", "messageId": None}))
    ok(server.post("/v1/track", {"userId": user, "event": "E", "messageId": ""}))
    stored = server.events(user_id=user)
    assert len(stored) == 4
    ids = [e["messageId"] for e in stored]
    assert len(set(ids)) == 4 and all(isinstance(i, str) and i for i in ids)


def test_c31_original_timestamp_and_sent_at_skew(server):
    mid = uid("m")
    ok(server.post("/v1/track", track(mid, originalTimestamp="2024-01-01T00:00:00.000Z",
                                      sentAt="2024-01-01T00:00:10.000Z")))
    ev = one(server, mid)
    assert ev["originalTimestamp"] == "2024-01-01T00:00:00.000Z"
    assert ev["sentAt"] == "2024-01-01T00:00:10.000Z"
    assert ms(ev["timestamp"]) == ms(ev["receivedAt"]) - 10_000


def test_c32_server_library_timestamp_with_batch_sent_at(server):
    mid = uid("m")
    sent = now_ms() - 1500
    ok(server.post("/v1/batch", {"sentAt": iso(sent), "batch": [
        {**track(mid), "type": "track", "timestamp": "2012-12-02T00:30:08.276+00:00"}]}))
    ev = one(server, mid)
    assert ev["originalTimestamp"] == "2012-12-02T00:30:08.276Z"
    assert ev["sentAt"] == iso(sent)
    expected = ms("2012-12-02T00:30:08.276Z") + (ms(ev["receivedAt"]) - sent)
    assert ms(ev["timestamp"]) == expected


def test_c33_cio_node_no_sent_at_no_correction(server):
    mid = uid("m")
    t0 = "2025-03-04T05:06:07.890Z"
    ok(server.post("/v1/batch", {"batch": [{**track(mid), "type": "track", "timestamp": t0}]}))
    ev = one(server, mid)
    assert ev["timestamp"] == ev["originalTimestamp"] == t0
    assert "sentAt" not in ev


def test_c34_event_sent_at_beats_batch_sent_at(server):
    mid = uid("m")
    s1, s2 = "2024-06-01T00:00:05.000Z", "2024-06-01T00:00:30.000Z"
    ok(server.post("/v1/b", {"writeKey": "WK", "sentAt": s2, "batch": [
        {**track(mid), "type": "track", "originalTimestamp": "2024-06-01T00:00:00.000Z",
         "sentAt": s1}]}, auth=False))
    ev = one(server, mid)
    assert ev["sentAt"] == s1
    assert ms(ev["timestamp"]) == ms(ev["receivedAt"]) - 5_000


@pytest.mark.parametrize("given,expected", [
    ("2024-05-01T12:34:56.789123+00:00", "2024-05-01T12:34:56.789Z"),
    ("2024-05-01T12:34:56.789+00:00", "2024-05-01T12:34:56.789Z"),
    ("2024-05-01T14:34:56.789+02:00", "2024-05-01T12:34:56.789Z"),
    ("2024-05-01T12:34:56Z", "2024-05-01T12:34:56.000Z"),
    ("2024-05-01T12:34:56.7Z", "2024-05-01T12:34:56.700Z"),
    ("2024-05-01T12:34:56.789Z", "2024-05-01T12:34:56.789Z"),
])
def test_c35_timestamps_emitted_utc_millis(server, given, expected):
    mid = uid("m")
    ok(server.post("/v1/track", track(mid, timestamp=given)))
    ev = one(server, mid)
    assert ev["originalTimestamp"] == ev["timestamp"] == expected


@pytest.mark.parametrize("given", [
    "2024-05-01 12:34:56.789Z",           # space separator, JS-length string
    "2024-05-01X12:34:56.789Z",           # any separator char (Python 3.11 fromisoformat)
    "2024-W18-3T12:34:56.789Z",           # ISO week date
    "2024-05-01 12:34:56.789+00:00",      # Python-length string with a space
    "9999-12-31T23:59:59.999-01:00",      # past year 9999 in UTC
])
def test_c35b_odd_parseable_timestamps_still_emitted_canonical(server, given):
    mid = uid("m")
    ok(server.post("/v1/track", track(mid, timestamp=given, sentAt=given)))
    ev = one(server, mid)
    for key in ("originalTimestamp", "timestamp", "sentAt", "receivedAt"):
        if key in ev:
            assert TS_RE.match(ev[key]), (key, ev[key])


@pytest.mark.parametrize("bad", ["yesterday", "2024-13-01T00:00:00Z", 1700000000, ""])
def test_c35c_unparseable_timestamp_treated_as_absent(server, bad):
    mid = uid("m")
    ok(server.post("/v1/track", track(mid, timestamp=bad, sentAt=bad)))
    ev = one(server, mid)
    assert ev["timestamp"] == ev["originalTimestamp"] == ev["receivedAt"]
    assert "sentAt" not in ev


# -- 7.6 enrichment ------------------------------------------------------------------------

def test_c36_batch_context_and_integrations_merged_item_wins(server):
    mid = uid("m")
    ok(server.post("/v1/batch", {
        "context": {"device": {"type": "phone", "model": "X"}, "locale": "en-US"},
        "integrations": {"Mixpanel": False, "Intercom": True},
        "batch": [{**track(mid), "type": "track",
                   "context": {"ip": "1.2.3.4", "device": {"model": "Y"}},
                   "integrations": {"Intercom": False}}]}))
    ev = one(server, mid)
    assert ev["context"]["device"] == {"type": "phone", "model": "Y"}
    assert ev["context"]["ip"] == "1.2.3.4"
    assert ev["context"]["locale"] == "en-US"
    assert ev["integrations"]["Mixpanel"] is False
    assert ev["integrations"]["Intercom"] is False
    m2 = uid("m")  # an item without its own context gets the batch's
    ok(server.post("/v1/batch", {"context": {"device": {"type": "phone"}},
                                 "integrations": {"Mixpanel": False},
                                 "batch": [{**track(m2), "type": "track"}]}))
    ev2 = one(server, m2)
    assert ev2["context"]["device"] == {"type": "phone"}
    assert ev2["integrations"] == {"Mixpanel": False}


def test_c36b_batch_integrations_nested_merge(server):
    mid = uid("m")
    ok(server.post("/v1/batch", {
        "integrations": {"Amplitude": {"session_id": 1, "a": "batch"}},
        "batch": [{**track(mid), "type": "track",
                   "integrations": {"Amplitude": {"a": "item"}}}]}))
    assert one(server, mid)["integrations"]["Amplitude"] == {"session_id": 1, "a": "item"}


@pytest.mark.parametrize("context,headers,expected", [
    ({"library": {"name": "analytics.js", "version": "next-1.84.3"}}, {}, "127.0.0.1"),
    ({"library": {"name": "analytics.js"}, "ip": "0.0.0.0"}, {}, "0.0.0.0"),
    ({"library": {"name": "analytics-python", "version": "2.4.0"}}, {}, None),
    ({"library": {"name": "analytics-python"}, "direct": True}, {}, "127.0.0.1"),
    ({"direct": True, "ip": "1.1.1.1"}, {}, "1.1.1.1"),
    ({}, {}, None),
    # X-Forwarded-For from a peer that is not a trusted proxy is ignored
    ({"library": {"name": "analytics.js"}}, {"x-forwarded-for": "203.0.113.7"}, "127.0.0.1"),
    # the mobile libraries are client-side too (§4.2: analytics.js, iOS, Android, Xamarin)
    ({"library": {"name": "analytics-ios", "version": "4.1.8"}}, {}, "127.0.0.1"),
    ({"library": {"name": "analytics-kotlin", "version": "1.15.0"}}, {}, "127.0.0.1"),
    ({"library": {"name": "analytics-xamarin"}}, {}, "127.0.0.1"),
    ({"library": {"name": "analytics.js"}, "ip": None}, {}, "127.0.0.1"),  # null is unset
    ({"library": {"name": ["analytics.js"]}}, {}, None),  # not a name (it was a 500)
    ({"library": {"name": {"a": 1}}}, {}, None),
], ids=["ajs", "ajs-explicit", "python", "direct", "direct-explicit", "none", "xff-untrusted",
        "ios", "kotlin", "xamarin", "ajs-null", "name-list", "name-object"])
def test_c37_context_ip(server, context, headers, expected):
    mid = uid("m")
    ok(server.post("/v1/t", track(mid, context=context), headers=headers))
    ev = one(server, mid)
    if expected is None:
        assert "ip" not in ev["context"]
    else:
        assert ev["context"]["ip"] == expected


@pytest.mark.parametrize("given,expected", [
    ({"All": False, "Webhook": True}, {"All": False, "Webhook": True}),
    ({"Amplitude": {"session_id": 1}}, {"Amplitude": {"session_id": 1}}),
    (None, {}),
    ({}, {}),
])
def test_c38_integrations_stored(server, given, expected):
    mid = uid("m")
    ok(server.post("/v1/track", track(mid, integrations=given)))
    assert one(server, mid)["integrations"] == expected


def test_unknown_fields_and_metadata_preserved(server):
    mid = uid("m")
    ok(server.post("/v1/track", track(mid, channel="server", _metadata={"nodeVersion": "20"},
                                      custom={"k": [1, 2.5, None, "s"]})))
    ev = one(server, mid)
    assert ev["channel"] == "server"
    assert ev["_metadata"] == {"nodeVersion": "20"}
    assert ev["custom"] == {"k": [1, 2.5, None, "s"]}
    assert ev["properties"] == {"n": 1}


# -- 7.7 responses -------------------------------------------------------------------------

@pytest.mark.parametrize("path", ALL_PATHS + ("m",))
def test_c39_success_is_exactly_200_success_true(server, path):
    if path in ("batch", "b"):
        body = {"batch": [{"type": "track", **track()}]}
    elif path == "m":
        body = {"series": [{"type": "Counter", "metric": "x", "value": 1, "tags": {}}]}
    else:
        body = {**track(), "groupId": "g", "previousId": "p", "type": SHORT.get(path, path)}
    resp = server.post(f"/v1/{path}", body)
    ok(resp)
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.content == b'{"success":true}'


def test_c40_store_unavailable_503_retry_after(fresh_server):
    limit = 3 * 1024 * 1024

    def cap_file_size():  # writes past `limit` fail with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    srv = fresh_server(preexec_fn=cap_file_size).start()
    pad = "p" * 25_000
    resp = None
    for _ in range(40):
        body = {"batch": [{**track(), "type": "track", "properties": {"pad": pad}}
                          for _ in range(15)]}
        resp = srv.post("/v1/batch", body)
        if resp.status_code != 200:
            break
        assert resp.json() == {"success": True}
    err(resp, 503, "store_unavailable")
    retry_after = resp.headers.get("retry-after")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) > 0
    assert httpx.get(f"{srv.url}/health").status_code == 200


def test_not_found_and_method_not_allowed_are_json(server):
    err(server.post("/v1/nope", track()), 404, "not_found")
    resp = httpx.get(f"{server.url}/v1/track")
    assert resp.status_code == 405
    body = resp.json()
    assert isinstance(body["code"], str) and isinstance(body["message"], str)


# -- 7.8 browser self-hosting --------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/t", "/v1/i", "/v1/b", "/v1/batch", "/v1/track", "/v1/m"])
def test_c42_cors_preflight(server, path):
    origin = "http://localhost:3000"
    resp = httpx.options(f"{server.url}{path}", headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "Authorization, X-Retry-Count"})
    assert resp.status_code == 204
    assert resp.headers["access-control-allow-origin"] in (origin, "*")
    allowed = {h.strip().lower() for h in resp.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-retry-count"} <= allowed
    methods = {m.strip().upper() for m in resp.headers["access-control-allow-methods"].split(",")}
    assert "POST" in methods


def test_c42b_post_with_origin_gets_acao_admin_does_not(server):
    origin = "http://localhost:3000"
    mid = uid("m")
    resp = server.post("/v1/t", track(mid), headers={"origin": origin,
                                                     "content-type": "text/plain"})
    ok(resp)
    assert resp.headers["access-control-allow-origin"] in (origin, "*")
    # so that a browser's script can read a 429's wait
    assert "Retry-After" in resp.headers["access-control-expose-headers"]
    bad = server.post("/v1/t", content=b"{", headers={"origin": origin})
    err(bad, 400, "invalid_json")
    assert bad.headers["access-control-allow-origin"] in (origin, "*")
    with server.admin() as client:
        for path in ("/api/v1/events", "/api/v1/sources", f"/api/v1/messages/{mid}/status"):
            r = client.get(path, headers={"origin": origin})
            assert r.status_code == 200
            assert "access-control-allow-origin" not in r.headers
        pre = client.options("/api/v1/events", headers={
            "origin": origin, "access-control-request-method": "GET",
            "access-control-request-headers": "authorization"})
        assert "access-control-allow-origin" not in pre.headers


def test_c43_settings_endpoint(server):
    origin = "http://localhost:3000"
    resp = httpx.get(f"{server.url}/v1/projects/WK/settings", headers={"origin": origin})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["access-control-allow-origin"] in (origin, "*")
    seg = resp.json()["integrations"]["Segment.io"]
    assert seg["apiKey"] == "WK"
    assert seg["apiHost"] == f"127.0.0.1:{server.port}/v1"
    assert seg["protocol"] == "http"
    # One key only: any other makes analytics-next fetch vendor code (wire-protocol §6.1).
    assert list(resp.json()["integrations"]) == ["Segment.io"]
    missing = httpx.get(f"{server.url}/v1/projects/NOPE/settings")
    assert missing.status_code == 404
    body = missing.json()
    assert isinstance(body["code"], str) and isinstance(body["message"], str)


def test_c44_browser_metrics(server):
    body = {"series": [{"type": "Counter", "metric": "analytics_js.invoke", "value": 1,
                        "tags": {"method": "track"}}]}
    resp = server.post("/v1/m", body, auth=False, headers={"content-type": "text/plain"})
    ok(resp)


# -- admin API and observability -----------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/v1/events", "/api/v1/events/x", "/api/v1/discards",
                                  "/api/v1/messages/x/status", "/api/v1/sources"])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Basic dHBhX3Rlc3Q6"])
def test_admin_api_needs_token(server, path, auth):
    headers = {"authorization": auth} if auth else {}
    err(httpx.get(f"{server.url}{path}", headers=headers), 401, "unauthorized")


def test_admin_event_filters_and_paging(server, wk_id, source_ids):
    key = f"flt_{uuid.uuid4().hex[:10]}"
    server.add_source(uid("filters"), write_key=key)
    other_id = source_ids["_refresh"]()[key]
    user, anon = uid("u"), uid("a")
    mids = [uid("m") for _ in range(6)]
    ok(server.post("/v1/track", {"userId": user, "event": "Alpha", "messageId": mids[0]}))
    ok(server.post("/v1/track", {"userId": user, "event": "Beta", "messageId": mids[1]}))
    ok(server.post("/v1/identify", {"userId": user, "anonymousId": anon, "messageId": mids[2]}))
    time.sleep(0.01)
    split = now_ms()
    time.sleep(0.01)
    ok(server.post("/v1/page", {"userId": user, "name": "P", "messageId": mids[3]}))
    ok(server.post("/v1/track", {"anonymousId": anon, "event": "Alpha", "messageId": mids[4]}))
    ok(server.post("/v1/track", {"userId": user, "event": "Alpha", "messageId": mids[5]},
                   headers={"authorization": basic(key)}))

    def got(**filters):
        return [e["messageId"] for e in server.events(**filters)]

    assert got(user_id=user) == [mids[0], mids[1], mids[2], mids[3], mids[5]]
    assert got(anonymous_id=anon) == [mids[2], mids[4]]
    assert got(user_id=user, type="track") == [mids[0], mids[1], mids[5]]
    assert got(user_id=user, event="Alpha") == [mids[0], mids[5]]
    assert got(message_id=mids[3]) == [mids[3]]
    assert got(user_id=user, source=other_id) == [mids[5]]
    assert got(user_id=user, source=wk_id) == mids[:4]
    assert got(user_id=user, since=split) == [mids[3], mids[5]]
    assert got(user_id=user, until=split) == mids[:3]
    assert got(user_id=user, since=iso(split)) == [mids[3], mids[5]]

    with server.admin() as client:
        seen, cursor, pages = [], None, 0
        while True:
            params = {"user_id": user, "limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/api/v1/events", params=params)
            assert page.status_code == 200
            body = page.json()
            assert len(body["events"]) <= 2
            seen += [e["messageId"] for e in body["events"]]
            pages += 1
            cursor = body["next"]
            if cursor is None:
                break
            assert isinstance(cursor, str)
        assert seen == [mids[5], mids[3], mids[2], mids[1], mids[0]]  # newest first
        assert pages >= 3
        err(client.get("/api/v1/events", params={"limit": 0}), 400, "invalid_parameter")
        err(client.get("/api/v1/events", params={"cursor": "abc"}), 400, "invalid_parameter")
        err(client.get("/api/v1/events", params={"since": "not-a-time"}), 400,
            "invalid_parameter")

        single = client.get(f"/api/v1/events/{mids[2]}")
        assert single.status_code == 200 and single.json()["messageId"] == mids[2]
        err(client.get(f"/api/v1/events/{uid('never')}"), 404, "not_found")
        err(client.get(f"/api/v1/messages/{uid('never')}/status"), 404, "not_found")
        status = client.get(f"/api/v1/messages/{mids[0]}/status").json()
        assert status["status"] == "stored" and status["stored"]["sourceId"] == wk_id
        sources = client.get("/api/v1/sources").json()["sources"]
        assert {"WK", key} <= {s["writeKey"] for s in sources}


def test_the_ready_metric_is_right_without_anyone_polling_ready(fresh_server):
    server = fresh_server().start()
    text = server.metrics_text()  # /ready never asked: the gauge was only set by it
    assert re.search(r"^trackpipe_ready 1\.0$", text, re.M), text


def test_health_ready_metrics(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    mid = uid("m")
    ok(server.post("/v1/track", track(mid)))
    ok(server.post("/v1/track", track(mid)))
    ok(server.post("/v1/track", {"userId": "u", "messageId": uid("m")}))  # event_not_defined
    text = server.metrics_text()
    for name in ("trackpipe_http_requests_total", "trackpipe_events_accepted_total",
                 "trackpipe_events_deduplicated_total", "trackpipe_store_commit_seconds"):
        assert name in text, name
    assert re.search(r'^trackpipe_events_discarded_total\{reason="event_not_defined"\} [1-9]',
                     text, re.M), text
    assert re.search(r"^trackpipe_events_deduplicated_total [1-9]", text, re.M)
    assert re.search(r"^trackpipe_events_accepted_total [1-9]", text, re.M)


def test_write_key_in_basic_wins_over_body_and_is_never_stored(server, wk_id):
    mid = uid("m")
    ok(server.post("/v1/batch", {"writeKey": "NOPE", "batch": [
        {**track(mid), "type": "track", "writeKey": "ALSO-NOPE"}]}))
    ev = one(server, mid)
    check_common(ev, wk_id)
    raw = json.dumps(ev)
    assert "NOPE" not in raw


def test_basic_auth_garbage_falls_back_to_body_key(server, wk_id):
    mid = uid("m")
    ok(server.post("/v1/track", track(mid, writeKey="WK"), auth=False,
                   headers={"authorization": "Basic !!!not-base64!!!"}))
    check_common(one(server, mid), wk_id)
    err(server.post("/v1/track", track(), auth=False,
                    headers={"authorization": "Basic " + base64.b64encode(b"\xff\xfe:").decode()}),
        400, "missing_write_key")
