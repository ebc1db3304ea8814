"""The conformance suite every built-in destination passes, end to end through a real server.

Each kind brings a Sink (tests/destinations/sink_<kind>.py): something that
receives what the destination sends, checks it the way the real tool would,
and can be broken (retryably or for good) and healed. The suite checks the
framework's promises hold for that kind: it delivers, it retries a retryable
failure, a terminal failure lands in the failed store and can be replayed,
it resumes after a restart without losing or doubling, and it respects
`integrations`.
"""

from __future__ import annotations

import importlib
import time
import uuid

import pytest

from delivery.faulty_rig import TESTS, api
from support import wait_for, write_config

KINDS = ["webhook", "postgres", "duckdb", "file", "mixpanel", "amplitude", "segment"]


@pytest.fixture(params=KINDS)
def sink(request, tmp_path):
    module = importlib.import_module(f"destinations.sink_{request.param}")
    s = module.Sink(tmp_path / "sink")
    yield s
    s.close()


@pytest.fixture
def deliver(fresh_server, tmp_path, sink):
    """A server delivering to the sink; retries start fast so tests stay short."""
    table = {**sink.config("dest"), "retry_initial_seconds": 0.2}
    path = write_config(tmp_path / "trackpipe.toml", [table], identity={"enabled": False})
    server = fresh_server(config=path, env={"PYTHONPATH": str(TESTS)}).start()
    # One event through first: the destination has started (made its directory,
    # table or connection) before a test breaks the sink.
    arrived(sink, send(server, 1))
    wait_for(lambda: summary(server)["delivered"] == 1, what="the warm-up event counted")
    return server


def send(server, n: int, **extra) -> list[str]:
    ids = [f"conf-{uuid.uuid4().hex}" for _ in range(n)]
    batch = [{"type": "track", "event": "Order Completed", "userId": f"user-{k % 3}",
              "messageId": i, "properties": {"revenue": 10.5 + k, "currency": "EUR", "seq": k},
              **extra} for k, i in enumerate(ids)]
    assert server.post("/v1/batch", {"batch": batch}).status_code == 200
    return ids


def arrived(sink, ids, timeout=30.0):
    want = set(ids)
    return wait_for(lambda: want <= set(sink.received()), timeout,
                    what=f"{len(want)} events at the sink")


def summary(server) -> dict:
    return api(server, "/api/v1/destinations/dest").json()


def test_delivers(sink, deliver):
    ids = send(deliver, 25)
    arrived(sink, ids)
    wait_for(lambda: summary(deliver)["delivered"] == 1 + 25, what="delivered count")
    assert summary(deliver)["pending"] == 0


def test_retries_a_retryable_failure(sink, deliver):
    sink.break_(terminal=False)
    ids = send(deliver, 5)
    wait_for(lambda: summary(deliver)["retries"] >= 5, what="retries scheduled")
    d = api(deliver, f"/api/v1/events/{ids[0]}/deliveries").json()["deliveries"][0]
    assert d["attempts"] and d["attempts"][0]["state"] == "retry"
    sink.heal()
    arrived(sink, ids)
    wait_for(lambda: summary(deliver)["pending"] == 0, what="nothing pending")
    assert summary(deliver)["failed"] == 0


def test_terminal_failure_goes_to_failed_store_and_replays(sink, deliver):
    sink.break_(terminal=True)
    ids = send(deliver, 4)
    wait_for(lambda: summary(deliver)["failed"] == 4, what="events in the failed store")
    assert summary(deliver)["failed_total"] == {"terminal": 4}
    assert not set(ids) & set(sink.received())
    sink.heal()
    r = api(deliver, "/api/v1/destinations/dest/replay", "POST", json={"failed_only": True})
    assert r.json()["queued"] == 4
    arrived(sink, ids)
    wait_for(lambda: summary(deliver)["failed"] == 0, what="failed store emptied")


def test_resumes_after_restart_without_loss(sink, deliver):
    first = send(deliver, 10)
    arrived(sink, first)
    sink.break_(terminal=False)
    second = send(deliver, 10)
    wait_for(lambda: summary(deliver)["retries"] >= 1, what="a failed attempt")
    deliver.stop()
    sink.heal()
    deliver.start()
    arrived(sink, second)
    received = sink.received()
    for mid in first:  # delivered before the restart: not sent again
        assert received.count(mid) == 1


def test_respects_integrations(sink, deliver):
    off = send(deliver, 2, integrations={"dest": False})
    all_off = send(deliver, 2, integrations={"All": False})
    on = send(deliver, 2, integrations={"All": False, "dest": True})
    arrived(sink, on)
    time.sleep(0.5)
    assert not (set(off) | set(all_off)) & set(sink.received())
    skipped = summary(deliver)["skipped"]
    assert skipped.get("integrations") == 4
