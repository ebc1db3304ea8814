"""Property test for the admin API's reads: whatever the query string and path, the
answer is never a 5xx; a 200 is a JSON object, anything else JSON {code, message}."""

from __future__ import annotations

import urllib.parse

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import examples

FUZZ = settings(max_examples=examples(100), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
PATHS = ["/api/v1/events", "/api/v1/events/{}", "/api/v1/messages/{}/status",
         "/api/v1/discards", "/api/v1/sources", "/api/v1/destinations",
         "/api/v1/destinations/{}", "/api/v1/destinations/{}/failed",
         "/api/v1/events/{}/deliveries", "/api/v1/profiles/{}", "/api/v1/profiles/{}/events",
         "/api/v1/profiles/{}/merges", "/api/v1/privacy/audit"]
PARAMS = ["limit", "cursor", "since", "until", "order", "type", "event", "user_id",
          "anonymous_id", "message_id", "source", "reason", "x"]
VALUES = st.one_of(
    st.sampled_from(["", "0", "-1", "1", "1000", "1001", "99999999999999999999999", "1e400",
                     "NaN", "asc", "desc", "2024-05-01T10:00:00Z", "2024-13-45", "yesterday",
                     "\u0000", "%", "é", "1.5", " 5 ", "0x10", "track", "null"]),
    st.text(max_size=40))
SEGMENTS = st.one_of(st.sampled_from(["u1", "a1", "prof_x", "m1", "..", ".", "%2e%2e", "a/b",
                                      "x" * 3000, "\u0000", "é", " "]), st.text(min_size=1, max_size=30))


@FUZZ
@given(path=st.sampled_from(PATHS), segment=SEGMENTS,
       params=st.lists(st.tuples(st.sampled_from(PARAMS), VALUES), max_size=5))
def test_admin_reads_never_fail_with_5xx(server, path, segment, params):
    url = path.format(urllib.parse.quote(segment, safe="")) + (
        "?" + urllib.parse.urlencode(params) if params else "")
    with server.admin() as client:
        r = client.get(url)
    assert r.status_code < 500, (url, r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), (url, r.text[:300])
    body = r.json()
    assert isinstance(body, dict), (url, body)
    if r.status_code != 200:
        assert isinstance(body.get("code"), str) and isinstance(body.get("message"), str), (
            url, body)
