"""The admin API against a hostile client or web page: how the token is taken, what the
unauthenticated routes show, and what malformed requests are answered (JSON 4xx, never a 5xx)."""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid

import httpx
import pytest
from support import ADMIN_TOKEN, write_config

STATE_CHANGING = ["/api/v1/privacy/suppress", "/api/v1/privacy/unsuppress",
                  "/api/v1/privacy/delete", "/api/v1/profiles/someone/unmerge"]


def _refused(r: httpx.Response, status: int = 401, code: str = "unauthorized") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["code"] == code and isinstance(body["message"], str), body
    return body


def _raw_get(server, path: str, authorization: bytes) -> tuple[int, dict]:
    """A GET with the Authorization header exactly as given (httpx refuses some of these)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Authorization: " + authorization + b"\r\n\r\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head[9:12]), json.loads(body)


# -- the token ------------------------------------------------------------------------------


def test_several_authorization_headers_are_refused_whichever_comes_first(server):
    """Which of several counts is up to each server on the way; the first one used to."""
    right = f"Bearer {ADMIN_TOKEN}"
    for order in (["Bearer nope", right], [right, "Bearer nope"], [right, right]):
        r = httpx.get(f"{server.url}/api/v1/sources",
                      headers=[("authorization", value) for value in order])
        _refused(r)


@pytest.mark.parametrize("where", ["query", "cookie", "basic_user", "basic_password", "bare",
                                   "token_then_more", "tab", "non_ascii"])
def test_the_token_counts_only_as_a_bearer_authorization_header(server, where):
    token = ADMIN_TOKEN
    url, headers = f"{server.url}/api/v1/sources", {}
    if where == "query":  # it would end up in logs and Referer headers
        url += f"?token={token}&access_token={token}&admin_token={token}"
    elif where == "cookie":
        headers["cookie"] = f"token={token}; admin_token={token}"
    elif where.startswith("basic"):
        pair = f"{token}:" if where == "basic_user" else f"admin:{token}"
        headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        headers["authorization"] = {
            "bare": token, "token_then_more": f"Bearer {token} x",
            "tab": f"Bearer\t{token}", "non_ascii": b"Bearer \xff\xfe" + token.encode()}[where]
    r = httpx.get(url, headers=headers)
    body = _refused(r)
    assert token not in r.text and "writeKey" not in body


def test_the_scheme_is_case_insensitive_and_spaces_around_the_token_do_not_count(server):
    token = ADMIN_TOKEN.encode()
    for value in (b"bearer " + token, b"BEARER " + token, b"Bearer  " + token + b"  "):
        assert _raw_get(server, "/api/v1/sources", value)[0] == 200, value


def test_a_token_is_never_echoed_in_an_answer_or_the_server_log(server):
    wrong = f"tpa_wrong_{uuid.uuid4().hex}"
    answers = [httpx.get(f"{server.url}/api/v1/events",
                         headers={"authorization": f"Bearer {wrong}"}),
               httpx.get(f"{server.url}/api/v1/events?token={wrong}"),
               httpx.post(f"{server.url}/api/v1/privacy/delete", content=b'{"id": "x"}',
                          headers={"authorization": f"Basic {wrong}"})]
    with server.admin() as client:  # errors raised with the right token
        answers += [client.get("/api/v1/events?limit=x"), client.get("/api/v1/nope"),
                    client.post("/api/v1/privacy/suppress", content=b"not json")]
    for r in answers:
        assert r.status_code in (400, 401, 404), r.text
        shown = r.text + "".join(f"{k}: {v}" for k, v in r.headers.items())
        assert wrong not in shown and ADMIN_TOKEN not in shown
    log = server.log_path.read_text(errors="replace")
    assert wrong not in log and ADMIN_TOKEN not in log


def test_an_empty_configured_token_means_a_generated_one_not_an_open_api(fresh_server):
    server = fresh_server(env={"TRACKPIPE_ADMIN_TOKEN": ""}).start()
    printed = server.log_path.read_text()
    assert "Admin token (shown once; keep it): tpa_" in printed
    for value in (b"Bearer ", b"Bearer", b"", b" "):
        status, body = _raw_get(server, "/api/v1/sources", value)
        assert status == 401 and body["code"] == "unauthorized", (value, body)


# -- browsers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", STATE_CHANGING)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_simple_cross_origin_request_changes_nothing(server, path, content_type):
    """What a hostile page can send without a preflight: no Authorization, any cookie."""
    r = httpx.post(f"{server.url}{path}", content=b'{"id": "someone"}',
                   headers={"origin": "http://evil.example", "content-type": content_type,
                            "cookie": f"token={ADMIN_TOKEN}"})
    _refused(r)
    assert not any(k.startswith("access-control-") for k in r.headers)


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/api/v1/sources"])
def test_no_route_outside_v1_answers_cors(server, path):
    """So a page of another origin cannot read /metrics or /ready (only one that rebinds its
    own name to this address can: see the README on what they show)."""
    origin = {"origin": "http://evil.example"}
    got = httpx.get(f"{server.url}{path}", headers=origin)
    preflight = httpx.options(f"{server.url}{path}", headers={
        **origin, "access-control-request-method": "GET",
        "access-control-request-headers": "authorization"})
    assert got.status_code in (200, 401, 503)
    _refused(preflight, 405, "method_not_allowed")
    for r in (got, preflight):
        assert not any(k.startswith("access-control-") for k in r.headers), r.headers


def test_metrics_and_ready_show_no_keys_ids_or_tokens(server):
    name = f"hardening-{uuid.uuid4().hex[:6]}"
    key = server.add_source(name, f"wk_{uuid.uuid4().hex}")
    user = f"user-{uuid.uuid4().hex}"
    r = httpx.post(f"{server.url}/v1/track", json={"userId": user, "event": "Hardening"},
                   auth=(key, ""))
    assert r.status_code == 200
    with server.admin() as client:
        source_id = next(s["id"] for s in client.get("/api/v1/sources").json()["sources"]
                         if s["name"] == name)
    shown = httpx.get(f"{server.url}/metrics").text + httpx.get(f"{server.url}/ready").text
    assert "trackpipe_events_accepted_total" in shown and '"ready"' in shown
    for secret in (key, source_id, name, user, ADMIN_TOKEN, str(server.data_dir)):
        assert secret not in shown, secret


# -- hostile requests -------------------------------------------------------------------------


@pytest.mark.parametrize("path", STATE_CHANGING)
@pytest.mark.parametrize("body", [b"[" * 5000, b'{"id":' * 5000 + b'"x"' + b"}" * 5000,
                                  b'{"merge_id": ' + b"[" * 2000 + b"]" * 2000 + b"}"],
                         ids=["arrays", "objects", "inside_an_object"])
def test_deeply_nested_bodies_are_400_not_500(server, path, body):
    """Under the 64 KB limit but past the JSON decoder's depth: they used to be 500s."""
    assert len(body) < 64 * 1024
    with server.admin() as client:
        _refused(client.post(path, content=body), 400, "invalid_json")


@pytest.mark.parametrize("segment", ["..", "..%2F..%2Fsources", "%2e%2e", "a%00b", "%00", "%",
                                     "%zz", "%ff", "x" * 20000, "%0d%0aX-Injected:%201"])
@pytest.mark.parametrize("route", ["/api/v1/profiles/{}/unmerge", "/api/v1/destinations/{}/replay",
                                   "/api/v1/destinations/{}", "/api/v1/events/{}/deliveries"])
def test_hostile_path_segments_are_json_4xx(server, route, segment):
    with server.admin() as client:
        method = "POST" if route.endswith(("unmerge", "replay")) else "GET"
        r = client.request(method, route.format(segment),
                           content=b"{}" if method == "POST" else None)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert set(r.json()) >= {"code", "message"} and "x-injected" not in r.headers


@pytest.fixture
def with_destination(fresh_server, tmp_path):
    """A server with a destination to replay to, and a short body deadline."""
    config = write_config(tmp_path / "trackpipe.toml",
                          [{"name": "archive", "type": "file",
                            "settings": {"directory": str(tmp_path / "out")}}],
                          server={"body_timeout_seconds": 1.0})
    return fresh_server(config=config).start()


def test_replay_answers_hostile_bodies_with_json_4xx(with_destination):
    path = "/api/v1/destinations/archive/replay"
    with with_destination.admin() as client:
        assert client.post(path, json={"failed_only": True}).status_code == 200
        for body, code in [(b"[" * 5000, "invalid_json"), (b"{" * 70_000, "payload_too_large"),
                           (b'{"since": ' + b"[" * 3000 + b"]" * 3000 + b"}", "invalid_json"),
                           (b'{"since": 1e400}', "invalid_json"), (b'{"since": -5}', None),
                           (b'{"since": "yesterday"}', None),
                           (b'{"until": 99999999999999999999}', None),
                           (b'{"since": true}', "invalid_parameter"), (b'{"x": 1}', None)]:
            r = client.post(path, content=body)
            assert 400 <= r.status_code < 500, (body[:40], r.status_code, r.text)
            assert set(r.json()) >= {"code", "message"}
            assert code is None or r.json()["code"] == code, (body[:40], r.text)


def test_an_admin_body_that_stops_coming_is_answered_408_not_waited_for(with_destination):
    host, port = "127.0.0.1", with_destination.port
    with socket.create_connection((host, port), timeout=20) as s:
        s.sendall(b"POST /api/v1/privacy/suppress HTTP/1.1\r\nHost: x\r\n"
                  b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n"
                  b"Content-Length: 100\r\n\r\n{\"id\": ")
        start, got = time.monotonic(), b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b'"code":"request_timeout"' in got and time.monotonic() - start < 15
