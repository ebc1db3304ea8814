"""Which address becomes context.ip: the peer's, or a trusted proxy's X-Forwarded-For."""

from __future__ import annotations

import pytest

from trackpipe.config import load
from trackpipe.sources.auth import SourceRegistry
from trackpipe.sources.http import TrackingAPI


def api(trusted: list[str]) -> TrackingAPI:
    settings = load(None, {"TRACKPIPE_SERVER_TRUSTED_PROXIES": repr(trusted).replace("'", '"')})
    return TrackingAPI(settings, SourceRegistry([]), committer=None)


def peer_ip(tracking: TrackingAPI, peer: str, forwarded: str | None = None) -> str | None:
    headers = {b"x-forwarded-for": forwarded.encode()} if forwarded is not None else {}
    return tracking._peer_ip({"client": (peer, 5555)}, headers)


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
