"""The browser settings body (GET /v1/projects/<KEY>/settings), in process."""

from __future__ import annotations

import asyncio
import json

import pytest

from trackpipe.config import load as load_config
from trackpipe.sources.auth import SourceRegistry
from trackpipe.sources.catalog import Source
from trackpipe.sources.http import TrackingAPI


def get(path: str, raw_path: bytes, keys: list[str], env: dict | None = None):
    answer = answer_of(path, raw_path, keys, env)
    return answer["status"], json.loads(answer["body"])


def answer_of(path: str, raw_path: bytes, keys: list[str], env: dict | None = None) -> dict:
    """status, body and the Vary lines of the answer to one GET."""
    api = TrackingAPI(load_config(None, env or {}), SourceRegistry(
        [Source(f"src{i}", f"s{i}", key, True, False, 0) for i, key in enumerate(keys)]), None)
    scope = {"type": "http", "path": path, "raw_path": raw_path, "method": "GET",
             "client": ("127.0.0.1", 5555), "headers": [(b"host", b"t.local:8080")]}
    answer: dict = {}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["vary"] = [v for k, v in message["headers"] if k == b"vary"]
        else:
            answer["body"] = answer.get("body", b"") + message.get("body", b"")

    asyncio.run(api(scope, receive, send))
    return answer


@pytest.mark.parametrize("key, path, raw_path", [
    # analytics-next puts the key in the URL as it is; the server decodes the path
    ("team/web", "/v1/projects/team/web/settings", b"/v1/projects/team/web/settings"),
    ("k%41x", "/v1/projects/kAx/settings", b"/v1/projects/k%41x/settings"),
    ("k x", "/v1/projects/k x/settings", b"/v1/projects/k%20x/settings"),  # fetch encodes
])
def test_write_keys_are_found_as_the_sdk_sends_them(key, path, raw_path):
    status, body = get(path, raw_path, ["other", key])
    assert status == 200 and body["integrations"]["Segment.io"]["apiKey"] == key


def test_an_unknown_key_is_404_whatever_its_shape():
    for path in ("/v1/projects//settings", "/v1/projects/settings", "/v1/projects/x/settingsx"):
        status, body = get(path, path.encode(), ["x"])
        assert (status, body["code"]) == (404, "invalid_write_key"), path


@pytest.mark.parametrize("public_url, protocol, api_host", [
    ("https://t.example.com", "https", "t.example.com/v1"),
    ("https://example.com/trackpipe/", "https", "example.com/trackpipe/v1"),  # a proxy prefix
    ("http://10.0.0.5:8443/a/b", "http", "10.0.0.5:8443/a/b/v1"),
])
def test_the_public_url_names_where_the_browser_sends(public_url, protocol, api_host):
    status, body = get("/v1/projects/k/settings", b"/v1/projects/k/settings", ["k"],
                       {"TRACKPIPE_SERVER_PUBLIC_URL": public_url})
    segment = body["integrations"]["Segment.io"]
    assert status == 200 and (segment["protocol"], segment["apiHost"]) == (protocol, api_host)


def test_an_answer_built_from_the_host_header_says_so_to_caches():
    """Without public_url, apiHost comes from the request's Host: a caching proxy in
    front must key on it, or one Host's answer sends another's browsers elsewhere."""
    path = "/v1/projects/k/settings"
    answer = answer_of(path, path.encode(), ["k"])
    assert json.loads(answer["body"])["integrations"]["Segment.io"]["apiHost"] == \
        "t.local:8080/v1"
    assert answer["vary"] == [b"Host"]
    fixed = answer_of(path, path.encode(), ["k"],
                      {"TRACKPIPE_SERVER_PUBLIC_URL": "https://t.example.com"})
    assert fixed["vary"] == []
