"""R24: suppressing a person while their events are queued and being delivered.

A real server (identity on, so the person's anonymousId is theirs too) and
webhook receivers that note when each event arrives. Once
POST /api/v1/privacy/suppress has answered, no receiver gets any of the person's
events: not the ones retrying, held for per-user ordering or not yet read from
the log, and not the ones a request was carrying while it was asked. Everyone
else's arrive; each of theirs never delivered counts as skipped:suppressed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid

import pytest
from delivery.faulty_rig import TESTS, api
from destinations.sink_webhook import Sink, _handler, _messages, _Server
from support import free_port, wait_for, write_config

class TimedSink(Sink):
    """The webhook receiver, on a port of the range, noting when each event arrived."""

    def __init__(self, directory):
        super().__init__(directory)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self.arrivals: list[tuple[float, str]] = []  # (time.time() on arrival, messageId)
        self._server = _Server(("127.0.0.1", free_port()), _handler(self))
        # Polled every 50 ms, not 0.5 s: close() waits for the next poll.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    def handle(self, headers, body: bytes):
        at = time.time()  # before the answer: the sender learns of it only after this
        status, answer = super().handle(headers, body)
        if status == 200:
            with self._lock:
                self.arrivals += [(at, m["messageId"]) for m in _messages(json.loads(body))
                                  if "messageId" in m]
        return status, answer

    def config(self, name: str, **overrides) -> dict:
        return {**super().config(name), "batch_size": 10, "retry_initial_seconds": 0.2,
                "retry_max_delay_seconds": 1.0, "max_attempts": 1000, **overrides}


@pytest.fixture
def sinks(tmp_path):
    made = []

    def make(name):
        made.append(TimedSink(tmp_path / name))
        return made[-1]
    yield make
    for sink in made:
        sink.close()


def serve(fresh_server, tmp_path, tables):
    config = write_config(tmp_path / f"t-{uuid.uuid4().hex[:6]}.toml", tables,
                          identity={"enabled": True})
    return fresh_server(config=config, env={"PYTHONPATH": str(TESTS)}).start()


def post_all(server, events: list[dict]) -> None:
    for i in range(0, len(events), 500):
        r = server.post("/v1/batch", {"batch": events[i:i + 500]})
        assert r.status_code == 200 and r.json() == {"success": True}, r.text


def interleaved(theirs: int, others: int, person: str, anon: str):
    """Their events (by userId, and by their anonymousId alone) among other people's."""
    events, mine, rest = [], [], []
    every = max(1, theirs // max(1, others))
    for k in range(theirs):
        mid = f"u-{uuid.uuid4().hex}"
        ids = {"userId": person} if k % 2 else {"anonymousId": anon}
        events.append({"type": "track", "event": "Theirs", "messageId": mid, **ids})
        mine.append(mid)
        if k % every == 0 and len(rest) < others:
            mid = f"o-{uuid.uuid4().hex}"
            events.append({"type": "track", "event": "Other", "messageId": mid,
                           "userId": f"other-{len(rest) % 7}"})
            rest.append(mid)
    return events, mine, rest


def summary(server, name) -> dict:
    return api(server, f"/api/v1/destinations/{name}").json()


def suppress(server, ident) -> tuple[float, dict]:
    """Suppress; the time its answer arrived, and the answer (checked by the caller once
    it has checked the deliveries, which is what a failure should show first)."""
    r = api(server, "/api/v1/privacy/suppress", "POST", json={"id": ident})
    answered = time.time()
    assert r.status_code in (200, 202), r.text
    return answered, {"status": r.status_code, **r.json()}


def queued(server) -> list[tuple]:
    db = sqlite3.connect(f"file:{server.data_dir / 'deliveries.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT destination, position FROM pending").fetchall()
    finally:
        db.close()


def test_retrying_held_and_unread_events_stop_at_suppress_and_the_rest_arrive(
        fresh_server, tmp_path, sinks):
    plain, ordered = sinks("plain"), sinks("ordered")
    server = serve(fresh_server, tmp_path, [plain.config("plain"),
                                            ordered.config("ordered", ordered=True)])
    person, anon = f"user-{uuid.uuid4().hex[:8]}", f"anon-{uuid.uuid4().hex[:8]}"
    r = server.post("/v1/identify", {"userId": person, "anonymousId": anon, "messageId": "id-1"})
    assert r.status_code == 200
    wait_for(lambda: anon in api(server, f"/api/v1/profiles/{person}").json().get(
        "anonymous_ids", ()), what="their anonymousId in their profile")
    for sink in (plain, ordered):
        wait_for(lambda: "id-1" in sink.received(), what="the identify delivered")
        sink.break_()  # 503 from now on
        sink.delay = 0.05  # and slow: most events are still unread when suppress comes

    events, theirs, others = interleaved(1000, 500, person, anon)
    post_all(server, events)
    for name in ("plain", "ordered"):
        wait_for(lambda: summary(server, name)["retrying"] >= 20, what=f"{name} retrying")
    state = {name: summary(server, name) for name in ("plain", "ordered")}
    answered, answer = suppress(server, person)
    # Events still unread at the suppress, at one sink at least: the plain one reads on
    # only as its slow sends finish; the ordered one may have read the whole log by then
    # (it holds their events without sending them), which left this check failing 1 run
    # in 4-6, before and after this sitting's changes alike.
    assert any(s["pending"] > s["retrying"] for s in state.values()), \
        f"nothing left unread at suppress: {state}"
    mine = set(theirs)

    for sink in (plain, ordered):
        sink.delay = 0
        sink.heal()
    for name, sink in (("plain", plain), ("ordered", ordered)):
        wait_for(lambda: set(others) <= set(sink.received()), 60,
                 what=f"everyone else's events at {name}")
        wait_for(lambda: summary(server, name)["pending"] == 0, 30, what=f"{name} drained")
        late = [(at, m) for at, m in sink.arrivals if m in mine and at >= answered]
        assert not late, f"{name}: {len(late)} of their events arrived after suppress answered"
        delivered = {m for m in sink.received() if m in mine}
        assert summary(server, name)["skipped"].get("suppressed") == len(mine - delivered), name
    assert queued(server) == []
    assert answer == {"status": 200, "suppressed": 2, "deliveries_stopped": True}

    # New events of theirs, by either id, are answered 200 and dropped.
    post_all(server, [{"type": "track", "event": "Late", "userId": person},
                      {"type": "track", "event": "Late", "anonymousId": anon}])
    assert "trackpipe_events_suppressed_total 2" in server.metrics_text()


def test_a_person_suppressed_mid_delivery_gets_nothing_after_the_answer(
        fresh_server, tmp_path, sinks):
    hook = sinks("hook")
    hook.delay = 0.02  # each request takes a while: one is usually in flight
    server = serve(fresh_server, tmp_path, [hook.config("hook")])
    person, anon = f"user-{uuid.uuid4().hex[:8]}", f"anon-{uuid.uuid4().hex[:8]}"
    events, theirs, others = interleaved(1000, 300, person, anon)
    post_all(server, [{"type": "identify", "userId": person, "anonymousId": anon}])
    wait_for(lambda: anon in api(server, f"/api/v1/profiles/{person}").json().get(
        "anonymous_ids", ()), what="their anonymousId in their profile")
    post_all(server, events)
    wait_for(lambda: len(set(hook.received()) & set(theirs)) >= 100,
             what="their events being delivered")
    answered, answer = suppress(server, anon)  # by their anonymousId: the profile's ids too

    wait_for(lambda: set(others) <= set(hook.received()), 60, what="everyone else's events")
    wait_for(lambda: summary(server, "hook")["pending"] == 0, 30, what="the queue drained")
    mine = set(theirs)
    arrived = [(at, m) for at, m in hook.arrivals if m in mine]
    assert arrived and max(at for at, _ in arrived) < answered, "one arrived after the answer"
    delivered = {m for _, m in arrived}
    assert len(delivered) < len(mine), "suppress came too late to test anything"
    assert summary(server, "hook")["skipped"].get("suppressed") == len(mine - delivered)
    assert answer == {"status": 200, "suppressed": 2, "deliveries_stopped": True}
