"""A lost admin token is replaced by starting the server with a new one (README, Quick
start): the new one opens the admin API, the old one no longer does, on the same data."""

from __future__ import annotations

import httpx


def events_status(server, token: str) -> int:
    return httpx.get(f"{server.url}/api/v1/events", timeout=10,
                     headers={"authorization": f"Bearer {token}"}).status_code


def test_a_new_token_at_start_replaces_the_stored_one(fresh_server):
    server = fresh_server().start()
    old = server.admin_token
    assert events_status(server, old) == 200
    server.stop()
    server.env = {"TRACKPIPE_ADMIN_TOKEN": "tpa_replacement-token-0123456789"}
    server.start()
    assert events_status(server, "tpa_replacement-token-0123456789") == 200
    assert events_status(server, old) == 401
