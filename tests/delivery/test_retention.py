"""Retention in a running server: delivered events older than `log.retention_seconds`
leave the log; failed ones stay, and can still be replayed."""

from __future__ import annotations

import os
import sqlite3
import time

import msgspec
from delivery.faulty_rig import api, cli, send
from destinations.sink_webhook import Sink
from support import wait_for, write_config


def test_retention_deletes_delivered_events_and_keeps_failed_ones(fresh_server, tmp_path):
    sink = Sink(tmp_path / "sink")
    try:
        sink.break_(terminal=True)
        config = write_config(tmp_path / "trackpipe.toml",
                              [{**sink.config("hook"), "batch_size": 10}],
                              dedup={"window_seconds": 1},
                              log={"retention_seconds": 1, "prune_every_seconds": 0.2})
        server = fresh_server(config=config).start()
        failed = send(server, 3, user="f")
        wait_for(lambda: _count(server, "failed") == 3, what="three failed deliveries")
        sink.heal()
        delivered = send(server, 5, user="d")
        wait_for(lambda: set(delivered) <= set(sink.received()), what="five delivered")

        stored = wait_for(lambda: (ids := [e["messageId"] for e in server.events()])
                          and set(ids) == set(failed) and ids, timeout=30,
                          what="the delivered events pruned, the failed ones kept")
        assert sorted(stored) == sorted(failed)
        # The failed events stay past the retention: the oldest event's age shows the hold.
        assert _metric(server, "trackpipe_log_oldest_event_age_seconds") > 1
        gone = server.status(delivered[0])
        assert gone.status_code == 404 and "older than the log's retention (1 s)" in gone.text
        assert "retention: deleted" in server.log_path.read_text()

        r = cli(server, "replay", "--destination", "hook", "--failed-only")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: set(failed) <= set(sink.received()), what="the failed events replayed")
    finally:
        sink.close()


def test_retention_waits_for_a_destination_that_has_not_read_the_events(fresh_server, tmp_path):
    sink = Sink(tmp_path / "sink")
    try:
        sink.delay = 4.0  # the first batch is still being sent well past the retention
        config = write_config(tmp_path / "trackpipe.toml",
                              [{**sink.config("hook"), "batch_size": 10}],
                              dedup={"window_seconds": 1},
                              log={"retention_seconds": 1, "prune_every_seconds": 0.2})
        server = fresh_server(config=config).start()
        ids = send(server, 4)
        wait_for(lambda: sink.requests(), what="the first send to start")
        time.sleep(2.0)  # the events are now older than the retention, their batch still sending
        assert {e["messageId"] for e in server.events()} == set(ids)
        wait_for(lambda: set(ids) <= set(sink.received()), what="delivered")
        wait_for(lambda: not server.events(), timeout=30, what="pruned once delivered")
        assert _metric(server, "trackpipe_log_head_position") == 4  # positions are not reused
        assert _metric(server, "trackpipe_log_oldest_event_age_seconds") == 0  # holds none
    finally:
        sink.close()


def _metric(server, name: str) -> float:
    for line in server.metrics_text().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def _count(server, name: str) -> int:
    dest = api(server, "/api/v1/destinations").json()["destinations"][0]
    return dest[name]


class _Identity:
    """What the retention asks of the identity consumer: its position, and its store durable."""

    def __init__(self, position: int):
        self._position = position
        self.store = self
        self.synced = 0

    def position(self) -> int:
        return self._position

    def make_durable(self) -> None:
        self.synced += 1


def test_identity_and_every_enabled_destination_hold_the_log_back(tmp_path):
    from trackpipe.config import Destination, load
    from trackpipe.delivery.process import LogRetention
    from trackpipe.delivery.state import DeliveryState
    from trackpipe.log.base import Record
    from trackpipe.log.sqlite import SQLiteLog

    writer = SQLiteLog(tmp_path / "log.db")
    writer.append([Record(f"m{i}", 1, "track", "E", "u", None, "src", b"{}") for i in range(10)])
    state = DeliveryState(tmp_path / "deliveries.db")
    state.set_cursor("on", 8)
    state.set_cursor("off", 2)  # disabled: it does not hold the log back
    settings = load(None, {"TRACKPIPE_DEDUP_WINDOW_SECONDS": "1",
                           "TRACKPIPE_LOG_RETENTION_SECONDS": "1"})
    settings.destinations = [msgspec.convert({"name": name, "type": "webhook", "enabled": on},
                                             Destination) for name, on in (("on", True),
                                                                           ("off", False))]
    reader = SQLiteLog(tmp_path / "log.db", writable=False)
    try:
        def left(identity) -> list[int]:
            retaining = LogRetention(tmp_path, settings, state, reader, identity)
            retaining.prune(0)
            retaining.close()
            return [e.position for e in reader.read(0, 100)]

        identity = _Identity(3)
        assert left(identity) == list(range(4, 11))  # identity is the furthest behind
        assert identity.synced == 1  # its position made durable before anything went
        assert left(_Identity(9)) == [9, 10]  # now the enabled destination is
        settings.destinations = []
        assert left(None) == []  # no reader at all: up to the head
    finally:
        reader.close()
        state.close()
        writer.close()


def test_the_delivery_state_holds_and_forgets_what_the_retention_asks(tmp_path, monkeypatch):
    from trackpipe.delivery.state import DeliveryState
    from trackpipe.log import sqlite as log_sqlite

    state = DeliveryState(tmp_path / "deliveries.db")
    try:
        db = state._db()
        state.set_cursor("a", 100)
        state.set_cursor("b", 100)
        db.execute("INSERT INTO pending VALUES ('a', 5, NULL, 1, 0, 0, NULL, '', 0)")
        db.execute("INSERT INTO failed VALUES ('b', 7, 'm7', 0, 3, 400, '', 'terminal', 0)")
        db.execute("INSERT INTO failed VALUES ('b', 70, 'm70', 0, 3, 400, '', 'terminal', 0)")
        assert state.known_destinations() == ["a", "b"]
        assert state.held(["a", "b"], 1, 10) == {5, 7}
        assert state.held(["a"], 1, 100) == {5}

        for dest, lo, hi, st in (("a", 1, 4, "delivered"), ("a", 5, 9, "delivered"),
                                 ("b", 1, 9, "mixed"), ("b", 10, 20, "delivered")):
            db.execute("INSERT INTO batches (destination, lo, hi, events, at, state)"
                       " VALUES (?, ?, ?, ?, 0, ?)", (dest, lo, hi, hi - lo + 1, st))
        for position in (2, 5, 7):
            db.execute("INSERT INTO attempts (destination, position, at, state, attempt)"
                       " VALUES ('b', ?, 0, 'failed', 1)", (position,))
        state.forget_traces([1, 2, 3, 4, 6], below=5)
        assert sorted(db.execute("SELECT destination, lo FROM batches")) == [
            ("a", 5), ("b", 1), ("b", 10)]  # a delivered batch holding a kept event stays
        assert sorted(p for (p,) in db.execute("SELECT position FROM attempts")) == [5, 7]

        synced = []
        monkeypatch.setattr(log_sqlite.os, "fsync",
                            lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
        state.make_durable()
        assert sorted(synced) == sorted([str(state.path), f"{state.path}-wal"])
    finally:
        state.close()


def test_a_retention_alone_starts_the_consumers_process():
    from trackpipe.config import load
    from trackpipe.delivery.supervisor import ConsumersProcess

    base = {"TRACKPIPE_IDENTITY_ENABLED": "false", "TRACKPIPE_DEDUP_WINDOW_SECONDS": "60"}
    assert not ConsumersProcess(load(None, base)).needed
    assert ConsumersProcess(load(None, {**base, "TRACKPIPE_LOG_RETENTION_SECONDS": "60"})).needed


def test_what_cannot_be_forgotten_now_is_forgotten_after_the_next_prune(tmp_path, caplog):
    from trackpipe.config import load
    from trackpipe.delivery.process import LogRetention
    from trackpipe.delivery.state import DeliveryState
    from trackpipe.log.base import Record
    from trackpipe.log.sqlite import SQLiteLog

    writer = SQLiteLog(tmp_path / "log.db")
    state = DeliveryState(tmp_path / "deliveries.db")
    settings = load(None, {"TRACKPIPE_DEDUP_WINDOW_SECONDS": "1",
                           "TRACKPIPE_LOG_RETENTION_SECONDS": "1"})
    reader = SQLiteLog(tmp_path / "log.db", writable=False)
    retaining = LogRetention(tmp_path, settings, state, reader, None)
    forgotten, failures = [], [OSError("disk I/O error")]

    def forget(gone):
        if failures:
            raise failures.pop()
        forgotten.extend(gone)

    retaining.index.forget = forget
    try:
        writer.append([Record(f"m{i}", 1, "track", "E", "u", None, "src", b"{}")
                       for i in range(3)])
        retaining.prune(0)
        assert forgotten == [] and "trying again later" in caplog.text
        writer.append([Record("m3", 1, "track", "E", "u", None, "src", b"{}")])
        retaining.prune(0)
        assert forgotten == [(1, "m0"), (2, "m1"), (3, "m2"), (4, "m3")]
        assert not reader.read(0, 10)
    finally:
        retaining.close()
        reader.close()
        state.close()
        writer.close()


def _retention_rig(tmp_path, names: list[str], events: int):
    """A log of `events` old events, a deliveries.db, and settings naming `names`."""
    from trackpipe.config import Destination, load
    from trackpipe.delivery.state import DeliveryState
    from trackpipe.log.base import Record
    from trackpipe.log.sqlite import SQLiteLog

    writer = SQLiteLog(tmp_path / "log.db")
    writer.append([Record(f"m{i}", 1, "track", "E", "u", None, "src", b"{}")
                   for i in range(events)])
    settings = load(None, {"TRACKPIPE_DEDUP_WINDOW_SECONDS": "1",
                           "TRACKPIPE_LOG_RETENTION_SECONDS": "1"})
    settings.destinations = [msgspec.convert({"name": n, "type": "webhook"}, Destination)
                             for n in names]
    return writer, SQLiteLog(tmp_path / "log.db", writable=False), \
        DeliveryState(tmp_path / "deliveries.db"), settings


def _prune(tmp_path, settings, state, reader) -> list[int]:
    """One prune; the positions the log still holds."""
    from trackpipe.delivery.process import LogRetention

    retaining = LogRetention(tmp_path, settings, state, reader, None)
    try:
        retaining.prune(0)
    finally:
        retaining.close()
    return [e.position for e in reader.read(0, 100)]


def test_a_held_failure_keeps_only_the_batch_rows_around_it(tmp_path):
    """One old failed event used to keep every batch row of every destination above it:
    deliveries.db grew by a row per read for as long as the failure was kept."""
    writer, reader, state, settings = _retention_rig(tmp_path, ["hook", "other"], 20)
    try:
        db = state._db()
        for name in ("hook", "other"):
            state.set_cursor(name, 20)
            for lo in range(1, 21, 2):  # reads of two events each
                db.execute("INSERT INTO batches (destination, lo, hi, events, at, state)"
                           " VALUES (?, ?, ?, 2, 0, 'delivered')", (name, lo, lo + 1))
        db.execute("INSERT INTO failed VALUES ('hook', 3, 'm2', 0, 1, 400, '', 'terminal', 0)")
        db.execute("INSERT INTO unsent SELECT id, '{\"filter\": [[6, 6]]}' FROM batches"
                   " WHERE lo = 5")

        assert _prune(tmp_path, settings, state, reader) == [3]
        assert sorted(db.execute("SELECT destination, lo, hi FROM batches")) == [
            ("hook", 3, 4), ("other", 3, 4)]
        assert db.execute("SELECT count(*) FROM unsent").fetchone() == (0,)
    finally:
        reader.close()
        state.close()
        writer.close()


def test_a_destination_removed_from_the_config_no_longer_holds_the_log(tmp_path, caplog):
    """Its failures were kept (and its rows) forever, though nothing could replay them or
    show them; now they go with their events, and the start says so once."""
    writer, reader, state, settings = _retention_rig(tmp_path, ["kept"], 4)
    try:
        db = state._db()
        state.set_cursor("kept", 4)
        state.set_cursor("gone", 4)
        db.executemany("INSERT INTO failed VALUES ('gone', ?, ?, 0, 1, 400, '', 'terminal', 0)",
                       [(p, f"m{p - 1}") for p in range(1, 5)])

        assert _prune(tmp_path, settings, state, reader) == []
        assert state.leftovers("gone") == (0, 0)

        from trackpipe.delivery.process import report_removed

        db.execute("INSERT INTO pending VALUES ('gone', 9, NULL, 1, 0, 0, NULL, '', 0)")
        report_removed(settings, state)
        assert "destination gone is no longer in the config: its 1 queued and 0 failed" \
            in caplog.text and "kept" not in caplog.text
    finally:
        reader.close()
        state.close()
        writer.close()


def test_traces_of_an_event_the_retention_never_met_go_once_it_passes_them(tmp_path):
    """A privacy delete erases the event but leaves the drops row that its suppression
    left (it only knew attempts, pending and failed); the retention never deletes that
    position, so the row stayed for good, one per such event."""
    writer, reader, state, settings = _retention_rig(tmp_path, ["hook"], 6)
    try:
        db = state._db()
        state.set_cursor("hook", 6)
        db.execute("INSERT INTO drops VALUES ('hook', 3, 0, 'suppressed')")
        with sqlite3.connect(tmp_path / "log.db") as log_db:
            log_db.execute("DELETE FROM events WHERE position = 3")  # the privacy delete

        assert _prune(tmp_path, settings, state, reader) == []
        assert db.execute("SELECT count(*) FROM drops").fetchone() == (0,)
    finally:
        reader.close()
        state.close()
        writer.close()
