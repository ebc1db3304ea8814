"""Property tests for the ingest endpoints: whatever arrives, trackpipe answers like an API.

Properties, for arbitrary bytes, arbitrary JSON (as single events, batch items and
whole bodies) and arbitrary Authorization / Content-Encoding / Content-Type /
X-Strict-Mode headers on every /v1 path:
- never a 5xx (a 503 only while /ready says the store is not ready);
- a 200 is exactly {"success": true}; a 204 only answers OPTIONS;
- every other answer is a JSON object with string `code` and `message`;
- the server is still healthy afterwards.
And for parseable timestamps of any offset and precision: the stored times are UTC
`YYYY-MM-DDTHH:MM:SS.mmmZ` and obey the clock-skew rule of wire-protocol.md §4.3.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import sys
import uuid
import zlib
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import examples

PATHS = ["/v1/identify", "/v1/track", "/v1/page", "/v1/screen", "/v1/group", "/v1/alias",
         "/v1/batch", "/v1/i", "/v1/t", "/v1/p", "/v1/s", "/v1/g", "/v1/a", "/v1/b", "/v1/m"]
TYPES = ["identify", "track", "page", "screen", "group", "alias"]

FUZZ = settings(max_examples=examples(300), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30,
                      limits=httpx.Limits(max_keepalive_connections=2)) as c:
        yield c
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200


def wk_basic() -> str:
    return "Basic " + base64.b64encode(b"WK:").decode()


def check(client: httpx.Client, resp: httpx.Response) -> None:
    status = resp.status_code
    if status >= 500:
        assert status == 503, (status, resp.text)
        ready = client.get("/ready")
        assert ready.status_code == 503, ("503 while /ready says ready", resp.text)
    if status == 200:
        assert resp.json() == {"success": True}, resp.text
        return
    assert status != 204, "204 is only for OPTIONS"
    try:
        body = json.loads(resp.content)
    except ValueError:
        raise AssertionError(f"{status} with a non-JSON body: {resp.content[:200]!r}") from None
    assert isinstance(body, dict), body
    assert isinstance(body.get("code"), str) and body["code"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    assert 400 <= status < 600, status


# -- JSON values, serialized by hand-rolled rules so anything can appear on the wire ---------

@contextmanager
def unlimited_int_digits():
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(old)


# Python cannot even repr an int past 4300 digits, so those travel as placeholders that
# dumps() swaps for the digits.
HUGE = {"@@huge-int-4301@@": b"9" * 4301, "@@huge-int-neg@@": b"-" + b"1" * 6000,
        "@@huge-float@@": b"1e400", "@@huge-neg-float@@": b"-1.5e99999"}
big_ints = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**4299 * 9]),
    st.sampled_from(sorted(HUGE)),
)
floats = st.floats(allow_nan=True, allow_infinity=True)
texts = st.text()  # includes lone surrogates
scalars = st.one_of(st.none(), st.booleans(), big_ints, floats, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(texts, children, max_size=5)),
    max_leaves=25,
)


def dumps(value, ascii_only: bool) -> bytes:
    with unlimited_int_digits():
        text = json.dumps(value, allow_nan=True, ensure_ascii=ascii_only)
    # ensure_ascii=False leaves lone surrogates raw: send them as (invalid) UTF-8 bytes
    raw = text.encode("utf-8", "surrogatepass")
    for placeholder, digits in HUGE.items():
        raw = raw.replace(b'"' + placeholder.encode() + b'"', digits)
    return raw


def wrap_deep(text: bytes, depth: int) -> bytes:
    return b'{"x":' * depth + text + b"}" * depth


ids = st.one_of(st.none(), st.text(max_size=20), big_ints, floats, json_values)
timestamps = st.one_of(st.none(), st.text(max_size=40), big_ints,
                       st.datetimes().map(lambda d: d.isoformat()),
                       st.sampled_from(["2024-01-01T00:00:00.000Z", "0001-01-01T00:00:00+14:00",
                                        "9999-12-31T23:59:59.999-14:00",
                                        "2024-01-01 00:00:00.000Z", "2024-W01-1T00:00:00.000Z"]))
events = st.fixed_dictionaries({}, optional={
    "type": st.one_of(st.sampled_from(TYPES), json_values),
    "userId": ids, "anonymousId": ids, "messageId": ids, "previousId": ids, "groupId": ids,
    "event": st.one_of(st.text(max_size=20), json_values),
    "name": st.one_of(st.text(max_size=10), json_values),
    "category": st.one_of(st.text(max_size=10), json_values),
    "properties": json_values, "traits": json_values,
    "context": st.one_of(json_values, st.fixed_dictionaries({}, optional={
        "ip": json_values, "direct": json_values,
        "library": st.one_of(json_values, st.just({"name": "analytics.js"}))})),
    "integrations": json_values,
    "timestamp": timestamps, "originalTimestamp": timestamps, "sentAt": timestamps,
    "writeKey": st.one_of(st.just("WK"), json_values),
})
batches = st.fixed_dictionaries({"batch": st.one_of(st.lists(st.one_of(events, json_values),
                                                             max_size=6), json_values)},
                                optional={"sentAt": timestamps, "context": json_values,
                                          "integrations": json_values,
                                          "writeKey": st.one_of(st.just("WK"), json_values)})


@st.composite
def json_requests(draw):
    path = draw(st.sampled_from(PATHS))
    shape = draw(st.sampled_from(["event", "batch", "value"]))
    value = draw({"event": events, "batch": batches, "value": json_values}[shape])
    body = dumps(value, draw(st.booleans()))
    depth = draw(st.one_of(st.just(0), st.just(0), st.integers(0, 100), st.integers(0, 3000)))
    if depth:
        body = wrap_deep(body, depth)
    return path, body


@settings(FUZZ)
@given(req=json_requests(), strict=st.booleans())
def test_fuzz_json_values(client, req, strict):
    path, body = req
    headers = {"authorization": wk_basic(), "content-type": "application/json"}
    if strict:
        headers["x-strict-mode"] = "1"
    check(client, client.post(path, content=body, headers=headers))


@settings(FUZZ)
@given(path=st.sampled_from(PATHS), body=st.one_of(
    st.binary(max_size=2000),
    st.binary(max_size=200).map(lambda b: b'{"userId":"u","event":"' + b + b'"}'),
    st.binary(max_size=200).map(lambda b: b'{"batch":[' + b + b"]}"),
), encoding=st.sampled_from([None, "gzip", "deflate"]), compress=st.booleans())
def test_fuzz_arbitrary_bytes(client, path, body, encoding, compress):
    headers = {"authorization": wk_basic()}
    if encoding:
        headers["content-encoding"] = encoding
        if compress:
            body = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    check(client, client.post(path, content=body, headers=headers))


# -- header values: anything h11 will put on the wire ---------------------------------------

_vchar = [bytes([b]) for b in list(range(0x21, 0x7F)) + list(range(0x80, 0x100))]


@st.composite
def header_values(draw):
    parts = draw(st.lists(st.lists(st.sampled_from(_vchar), min_size=1, max_size=12)
                          .map(b"".join), max_size=4))
    return draw(st.sampled_from([b" ", b"\t", b"  "])).join(parts)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


auth_values = st.one_of(
    header_values(),
    st.just(wk_basic().encode()),
    st.builds(lambda s, v: (s + b" " + v).strip(), st.sampled_from([b"Basic", b"basic", b"BASIC",
                                                          b"Bearer", b"bearer", b"Digest"]),
              st.one_of(header_values(), st.binary(max_size=40).map(b64),
                        st.sampled_from([b64(b"WK"), b64(b"WK:"), b64(b":"), b64(b""),
                                         b64(b"NOPE:"), b"WK", b"sk_us_abc"]))),
)
encoding_values = st.one_of(header_values(), st.sampled_from(
    [b"gzip", b"GZIP", b"x-gzip", b"deflate", b"identity", b"br", b"gzip, deflate", b"", b"zstd"]))
content_types = st.one_of(header_values(), st.sampled_from(
    [b"application/json", b"text/plain", b"application/x-www-form-urlencoded",
     b"multipart/form-data; boundary=x", b"application/json; charset=latin-1"]))
strict_values = st.one_of(header_values(), st.sampled_from([b"1", b"0", b"true", b"", b"yes"]))


@st.composite
def header_requests(draw):
    path = draw(st.sampled_from(PATHS))
    if path in ("/v1/batch", "/v1/b"):
        doc = {"batch": [{"type": "track", "userId": "u", "event": "E"},
                         {"type": "track", "event": "E"}]}
    else:
        doc = {"userId": "u", "event": "E", "type": "track", "groupId": "g", "previousId": "p"}
    if draw(st.booleans()):
        doc["writeKey"] = draw(st.sampled_from(["WK", "NOPE", ""]))
    body = json.dumps(doc).encode()
    headers = {}
    for name, values in (("authorization", auth_values), ("content-encoding", encoding_values),
                         ("content-type", content_types), ("x-strict-mode", strict_values)):
        if draw(st.booleans()):
            headers[name] = draw(values)
    encoding = headers.get("content-encoding", b"").strip().lower()
    if encoding in (b"gzip", b"x-gzip") and draw(st.booleans()):
        body = gzip.compress(body)
    elif encoding == b"deflate" and draw(st.booleans()):
        body = zlib.compress(body)
    return path, body, headers


@settings(FUZZ)
@given(req=header_requests())
def test_fuzz_headers(client, req):
    path, body, headers = req
    check(client, client.post(path, content=body, headers=headers))


# -- stored timestamps: any parseable shape in, UTC `YYYY-MM-DDTHH:MM:SS.mmmZ` out --------------

TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MIN_MS = -62135596800000  # 0001-01-01T00:00:00.000Z
MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999Z

aware = st.builds(
    lambda dt, minutes: dt.replace(tzinfo=timezone(timedelta(minutes=minutes))),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9998, 12, 30)),
    st.one_of(st.just(0), st.integers(-14 * 60 + 1, 14 * 60 - 1)))


@st.composite
def wire_time(draw):
    """(string as a client might send it, its instant in ms)."""
    dt = draw(aware)
    timespec = draw(st.sampled_from(["auto", "seconds", "milliseconds", "microseconds"]))
    text = dt.isoformat(sep=draw(st.sampled_from(["T", "T", " "])), timespec=timespec)
    if text.endswith("+00:00") and draw(st.booleans()):
        text = text[:-6] + "Z"
    if timespec == "seconds":
        dt = dt.replace(microsecond=0)
    elif timespec == "milliseconds":
        dt = dt.replace(microsecond=dt.microsecond // 1000 * 1000)
    return text, (dt - EPOCH) // timedelta(milliseconds=1)


def ts_ms(text: str) -> int:
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return (dt - EPOCH) // timedelta(milliseconds=1)


@settings(FUZZ, max_examples=examples(80))
@given(original=wire_time(), sent=st.one_of(st.none(), wire_time()),
       field=st.sampled_from(["timestamp", "originalTimestamp"]))
def test_fuzz_stored_timestamps_canonical(server, client, original, sent, field):
    mid = f"fuzz-ts-{uuid.uuid4().hex}"
    event = {"userId": "u", "event": "E", "messageId": mid, field: original[0]}
    if sent is not None:
        event["sentAt"] = sent[0]
    check(client, client.post("/v1/track", json=event, headers={"authorization": wk_basic()}))
    [stored] = server.events(message_id=mid)
    for key in ("receivedAt", "originalTimestamp", "timestamp", "sentAt"):
        if key in stored:
            assert TS_RE.match(stored[key]), (key, stored[key], event)
    assert ts_ms(stored["originalTimestamp"]) == original[1], (stored, event)
    if sent is None:
        assert "sentAt" not in stored
        assert stored["timestamp"] == stored["originalTimestamp"]
    else:
        assert ts_ms(stored["sentAt"]) == sent[1]
        expected = ts_ms(stored["receivedAt"]) - (sent[1] - original[1])
        if not MIN_MS <= expected <= MAX_MS:
            expected = original[1]
        assert ts_ms(stored["timestamp"]) == expected, (stored, event)


def test_server_healthy_after_fuzzing(server, client):
    assert client.get("/health").status_code == 200
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    resp = client.post("/v1/track", json={"userId": "u", "event": "after-fuzz"},
                       headers={"authorization": wk_basic()})
    assert resp.status_code == 200 and resp.json() == {"success": True}
