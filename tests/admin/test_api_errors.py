"""Every admin answer is JSON {code, message}, including routing errors and bad parameters."""

import gzip
import uuid
from urllib.parse import quote

import httpx
import pytest
from support import wait_for


@pytest.mark.parametrize("path", [
    "/api/v1/events?cursor=99999999999999999999",
    "/api/v1/events?since=999999999999999999999",
    "/api/v1/events?limit=100000000000000000000000",
    "/api/v1/discards?cursor=abc",
])
def test_bad_parameters_are_400_json(server, path):
    with server.admin() as client:
        r = client.get(path)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_parameter" and r.json()["message"]


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/api/v1/nope", 404), ("POST", "/health", 405), ("GET", "/V1/track", 404),
    ("GET", "/api/v1/destinations/", 404), ("GET", "/health/", 404), ("GET", "/api/v1/profiles", 404),
])
def test_routing_errors_are_json(server, method, path, status):
    with server.admin() as client:
        r = client.request(method, path)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/json")
    assert set(r.json()) >= {"code", "message"}


def test_gzip_with_trailing_bytes_is_refused(server):
    body = gzip.compress(b'{"userId":"u","event":"E"}') + b"junk"
    r = server.post("/v1/track", content=body, headers={"content-encoding": "gzip"})
    assert r.status_code == 400 and r.json()["code"] == "bad_encoding"


def test_admin_routes_send_no_cors_headers(server):
    with server.admin() as client:
        r = client.get("/api/v1/sources", headers={"origin": "http://evil.example"})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    assert httpx.options(f"{server.url}/api/v1/sources",
                         headers={"origin": "http://evil.example",
                                  "access-control-request-method": "GET"}
                         ).headers.get("access-control-allow-origin") is None


HOSTILE_BODIES = [b"", b"not json", b"[]", b'"x"', b'{"id": 5}', b'{"id": ""}', b'{"id": null}',
                  b'{"id": "' + b"x" * 5000 + b'"}', b'{"id": "\\ud800"}', b"{" * 100_000,
                  b'{"merge_id": {"a": 1}}', b'{"since": 1e400}', b'{"failed_only": 1}']


@pytest.mark.parametrize("path", [
    "/api/v1/privacy/suppress", "/api/v1/privacy/unsuppress", "/api/v1/privacy/delete",
    "/api/v1/profiles/nobody/unmerge", "/api/v1/destinations/nope/replay",
])
@pytest.mark.parametrize("body", HOSTILE_BODIES, ids=range(len(HOSTILE_BODIES)))
def test_people_and_delivery_routes_answer_hostile_bodies_with_json_4xx(server, path, body):
    with server.admin() as client:
        r = client.post(path, content=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert set(r.json()) >= {"code", "message"}


@pytest.mark.parametrize("path", [
    "/api/v1/profiles/%00", "/api/v1/profiles/" + "x" * 3000, "/api/v1/profiles/a/events?limit=0",
    "/api/v1/profiles/a/events?cursor=%F0%9F%98%80", "/api/v1/profiles/a/events?limit=²",
    "/api/v1/privacy/audit?limit=-1", "/api/v1/destinations/%FF", "/api/v1/events/%00/deliveries",
    "/api/v1/destinations/nope/failed?limit=abc",
])
def test_people_and_delivery_reads_answer_bad_paths_with_json_4xx(server, path):
    with server.admin() as client:
        r = client.get(path)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert set(r.json()) >= {"code", "message"}


def _person(server) -> str:
    """A userId with a profile (identity applies it in the background)."""
    user = f"errors-{uuid.uuid4().hex[:8]}"
    assert server.post("/v1/identify", {"userId": user, "anonymousId": f"a-{user}"}
                       ).status_code == 200
    with server.admin() as client:
        wait_for(lambda: client.get(f"/api/v1/profiles/{user}").status_code == 200,
                 what="the profile")
    return user


def test_numbers_past_sqlite_integers_in_cursor_and_merge_id_are_400(server):
    """They used to reach SQLite and come back as 500 (OverflowError), closing the connection."""
    user = _person(server)
    with server.admin() as client:
        page = client.get(f"/api/v1/profiles/{user}/events",
                          params={"cursor": "2026-12-07T04:49:25.162Z~99999999999999999999"})
        assert page.status_code == 400 and page.json()["code"] == "invalid_parameter", page.text
        for merge_id in ("m99999999999999999999", 99999999999999999999, "m" + "9" * 5000,
                         [1], {}, True, 1.5, "m-1"):
            r = client.post(f"/api/v1/profiles/{user}/unmerge", json={"merge_id": merge_id})
            assert r.status_code == 400 and r.json()["code"] == "invalid_parameter", r.text
            assert "set_int_max_str_digits" not in r.text
        r = client.post(f"/api/v1/profiles/{user}/unmerge", json={"merge_id": "m123456"})
        assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_event_order_other_than_asc_or_desc_is_400(server):
    with server.admin() as client:
        for order in ("ASC", "xyz", ""):
            r = client.get("/api/v1/events", params={"order": order})
            assert r.status_code == 400 and r.json()["code"] == "invalid_parameter", r.text


@pytest.mark.parametrize("path", ["/api/v1/privacy/suppress", "/api/v1/privacy/delete",
                                  "/api/v1/profiles/x/unmerge"])
def test_a_large_admin_body_is_refused_before_it_is_read(server, path):
    """It used to be read whole: 50 MB doubled the server's memory."""
    big = b'{"id": "' + b"x" * (1 << 20) + b'"}'

    def chunks():  # no content-length: the limit must hold while streaming too
        yield big[:1000]
        yield big[1000:]
    with server.admin() as client:
        for content in (big, chunks()):
            r = client.post(path, content=content)
            assert r.status_code == 413 and r.json()["code"] == "payload_too_large", r.text


def test_ids_holding_a_slash_are_found_when_it_is_sent_as_percent_2f(server):
    """/profiles/team%2Fmerges is the person "team/merges", not the merges of "team"."""
    run = uuid.uuid4().hex[:6]
    user, message_id = f"team-{run}/merges", f"50%off-{run}/deliveries"
    assert server.post("/v1/identify", {"userId": user, "messageId": message_id}
                       ).status_code == 200
    profile = f"/api/v1/profiles/{quote(user, safe='')}"
    with server.admin() as client:
        wait_for(lambda: client.get(profile).status_code == 200, what="the profile")
        assert client.get(profile).json()["user_ids"] == [user]
        assert client.get(profile + "/merges").json() == {"merges": []}
        assert [e["messageId"] for e in client.get(profile + "/events").json()["events"]] \
            == [message_id]
        event = client.get(f"/api/v1/events/{quote(message_id, safe='')}")
        assert event.status_code == 200 and event.json()["userId"] == user, event.text
        status = client.get(f"/api/v1/messages/{quote(message_id, safe='')}/status")
        assert status.status_code == 200 and status.json()["status"] == "stored", status.text


def test_a_damaged_or_locked_file_is_a_json_503_not_a_500():
    """A read that meets a damaged log (R20) or a locked file answered 500."""
    import asyncio
    import json
    import sqlite3

    from trackpipe.admin.api import _internal_error

    answer = asyncio.run(_internal_error(None, sqlite3.DatabaseError(
        "database disk image is malformed")))
    body = json.loads(answer.body)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert body["code"] == "store_unavailable" and "malformed" in body["message"]
    bug = asyncio.run(_internal_error(None, KeyError("x")))
    assert bug.status_code == 500 and json.loads(bug.body)["code"] == "internal_error"
