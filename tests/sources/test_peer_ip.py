"""Which address becomes context.ip: the peer's, or a trusted proxy's X-Forwarded-For."""

from __future__ import annotations

import uuid

import httpx
import pytest
from support import basic, write_config

from trackpipe.config import load
from trackpipe.sources.auth import SourceRegistry
from trackpipe.sources.http import TrackingAPI


def api(trusted: list[str]) -> TrackingAPI:
    settings = load(None, {"TRACKPIPE_SERVER_TRUSTED_PROXIES": repr(trusted).replace("'", '"')})
    return TrackingAPI(settings, SourceRegistry([]), committer=None)


def peer_ip(tracking: TrackingAPI, peer: str, forwarded: str | list[str] | None = None,
            others: list[tuple[bytes, bytes]] = ()) -> str | None:
    """`forwarded` as a list: X-Forwarded-For sent on that many header lines."""
    lines = [] if forwarded is None else [forwarded] if type(forwarded) is str else forwarded
    raw = [*others, *((b"x-forwarded-for", line.encode()) for line in lines)]
    return tracking._peer_ip({"client": (peer, 5555), "headers": raw}, dict(raw))


@pytest.mark.parametrize("peer, expected", [
    ("203.0.113.7", "203.0.113.7"),
    ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client of a dual-stack listener
    ("2001:db8::1", None),                  # Segment does not auto-collect IPv6
    ("::1", None),
])
def test_the_peer_is_collected_when_it_is_ipv4(peer, expected):
    assert peer_ip(api([]), peer) == expected


@pytest.mark.parametrize("forwarded, expected", [
    ("198.51.100.9, 203.0.113.7", "203.0.113.7"),   # the nearest untrusted hop
    ("203.0.113.7, 10.1.2.3", "203.0.113.7"),        # past a trusted one
    ("10.1.2.3, 10.2.2.2", "10.1.2.3"),              # all trusted: the farthest
    ("unknown, 203.0.113.8", "203.0.113.8"),
    ("203.0.113.9:5555", "203.0.113.9"),
    ("[2001:db8::1]:443", None),                     # an IPv6 client: not collected
    ("<script>", "10.0.0.1"),                        # nothing usable: the proxy itself
    (" , ", "10.0.0.1"),
])
def test_forwarded_for_from_a_trusted_proxy(forwarded, expected):
    assert peer_ip(api(["10.0.0.0/8"]), "10.0.0.1", forwarded) == expected


def test_a_trusted_proxy_reaching_a_dual_stack_listener_is_trusted():
    # its address arrives IPv4-mapped (::ffff:10.0.0.1), as do the entries it may forward
    assert peer_ip(api(["10.0.0.0/8"]), "::ffff:10.0.0.1", "203.0.113.9") == "203.0.113.9"
    assert peer_ip(api(["10.0.0.0/8"]), "10.0.0.1", "::ffff:203.0.113.9") == "203.0.113.9"


def test_forwarded_for_from_anyone_else_is_ignored():
    assert peer_ip(api(["10.0.0.0/8"]), "203.0.113.50", "198.51.100.9") == "203.0.113.50"


@pytest.mark.parametrize("lines, expected", [
    (["203.0.113.7", "10.0.0.2"], "203.0.113.7"),                 # = "203.0.113.7, 10.0.0.2"
    (["198.51.100.9", "203.0.113.7, 10.1.2.3"], "203.0.113.7"),
    (["203.0.113.7", ""], "203.0.113.7"),                        # an empty last line
    (["10.1.2.3", "10.2.2.2"], "10.1.2.3"),                      # all trusted: the farthest
])
def test_forwarded_for_on_several_lines_is_one_list(lines, expected):
    assert peer_ip(api(["10.0.0.0/8"]), "10.0.0.1", lines) == expected


def test_another_repeated_header_leaves_forwarded_for_as_it_is():
    cookies = [(b"cookie", b"a=1"), (b"cookie", b"b=2")]
    assert peer_ip(api(["10.0.0.0/8"]), "10.0.0.1", "203.0.113.7", cookies) == "203.0.113.7"


def test_forwarded_for_on_two_lines_reaches_context_ip(fresh_server, tmp_path):
    config = write_config(tmp_path / "t.toml",
                          server={"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]})
    server = fresh_server(config=config).start()
    stored = {}
    for label, lines in (("one line", ["203.0.113.7, 10.0.0.2"]),
                         ("two lines", ["203.0.113.7", "10.0.0.2"])):
        mid = f"xff-{uuid.uuid4().hex}"
        body = {"userId": "u", "event": "E", "messageId": mid,
                "context": {"library": {"name": "analytics.js"}}}
        headers = [("authorization", basic(server.write_key)),
                   *(("x-forwarded-for", line) for line in lines)]
        r = httpx.post(f"{server.url}/v1/track", json=body, headers=headers, timeout=10)
        assert r.status_code == 200
        [event] = server.events(message_id=mid)
        stored[label] = event["context"]["ip"]
    assert stored == {"one line": "203.0.113.7", "two lines": "203.0.113.7"}
