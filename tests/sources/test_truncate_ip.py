"""`[privacy] truncate_ip = true`: no full client address is written anywhere, whether the
event is accepted or discarded, and whatever shape its context.ip has."""

from __future__ import annotations

import json
import uuid

import pytest
from support import write_config


@pytest.fixture
def server(fresh_server, tmp_path):
    config = write_config(tmp_path / "t.toml", privacy={"truncate_ip": True})
    return fresh_server(config=config).start()


def mid() -> str:
    return f"ip-{uuid.uuid4().hex}"


def stored(server) -> bytes:
    """Every byte in the data dir: the databases with their -wal files."""
    return b"".join(p.read_bytes() for p in server.data_dir.rglob("*") if p.is_file())


def written(server) -> bytes:
    """What was stored and what was logged (the log names the listening 127.0.0.1)."""
    return stored(server) + server.log_path.read_bytes()


def test_a_discarded_event_keeps_only_the_network_part(server):
    valid, invalid, item, browser = mid(), mid(), mid(), mid()
    assert server.post("/v1/track", {"userId": "u", "event": "E", "messageId": valid,
                                     "context": {"ip": "203.0.113.77"}}).status_code == 200
    # no `event`: valid JSON, so stored as a discard with its payload
    assert server.post("/v1/track", {"userId": "u", "messageId": invalid,
                                     "context": {"ip": "203.0.113.78"}}).status_code == 200
    assert server.post("/v1/batch", {"context": {"ip": "198.51.100.23"}, "batch": [
        {"type": "track", "userId": "u", "messageId": item,
         "context": {"ip": "::ffff:198.51.100.24"}}]}).status_code == 200
    # a browser event, which would be given the peer's address had it been valid
    assert server.post("/v1/t", {"anonymousId": "a", "messageId": browser,
                                 "context": {"library": {"name": "analytics.js"}}}
                       ).status_code == 200

    # an item that is no object, and a context that is none, may hold one anywhere
    odd_context = mid()
    assert server.post("/v1/batch", {"batch": [
        ["203.0.113.90"], {"type": "track", "userId": "u", "event": "E",
                           "messageId": odd_context, "context": ["203.0.113.91"]}]}
                       ).status_code == 200
    [kept] = server.discards(message_id=odd_context)
    assert kept["reason"] == "context_not_object" and "203.0.113" not in str(kept)
    assert [d["payload"] for d in server.discards(reason="event_not_object")] == ["null"]

    [event] = server.events(message_id=valid)
    assert event["context"]["ip"] == "203.0.113.0"
    payloads = {m: server.discards(message_id=m)[0]["payload"] for m in (invalid, item, browser)}
    assert '"ip":"203.0.113.0"' in payloads[invalid]
    assert '"ip":"198.51.100.0"' in payloads[item]
    assert '"ip"' not in payloads[browser]
    raw = written(server)
    for ip in (b"203.0.113.77", b"203.0.113.78", b"198.51.100.23", b"198.51.100.24",
               b"203.0.113.90", b"203.0.113.91"):
        assert ip not in raw, ip
    assert b"127.0.0.1" not in stored(server)  # the peer's address


@pytest.mark.parametrize("path", ["/v1/track", "/v1/i"])  # accepted / discarded (no userId)
def test_context_ip_that_is_no_plain_address(server, path):
    """IPv4 carried in IPv6 is truncated as IPv4; what is no IP address is dropped."""
    sent = {"mapped": "::ffff:203.0.113.79", "6to4": "2002:cb00:7150::1",
            "list": ["203.0.113.81"], "object": {"v": "203.0.113.82"},
            "number": 3405803859,  # 203.0.113.83 as an integer
            "two": "203.0.113.84, 10.0.0.1", "text": "near 203.0.113.85", "empty": "",
            "null": None}
    ids = {}
    for name, ip in sent.items():
        ids[name] = mid()
        body = {"event": "E", "messageId": ids[name], "context": {"ip": ip}}
        if path == "/v1/track":
            body["userId"] = "u"
        assert server.post(path, body).status_code == 200

    def context_of(message_id):
        if path == "/v1/track":
            return server.events(message_id=message_id)[0]["context"]
        return json.loads(server.discards(message_id=message_id)[0]["payload"])["context"]

    stored = {name: context_of(m).get("ip", "<absent>") for name, m in ids.items()}
    assert stored == {"mapped": "203.0.113.0", "6to4": "203.0.113.0", "list": "<absent>",
                      "object": "<absent>", "number": "<absent>", "two": "<absent>",
                      "text": "<absent>", "empty": "<absent>", "null": None}
    raw = written(server)
    for leak in (b"203.0.113.79", b"cb00:7150", b"203.0.113.81", b"203.0.113.82",
                 b"3405803859", b"203.0.113.84", b"203.0.113.85"):
        assert leak not in raw, leak
