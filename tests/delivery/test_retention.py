"""Retention in a running server: delivered events older than `log.retention_seconds`
leave the log; failed ones stay, and can still be replayed."""

from __future__ import annotations

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
    finally:
        sink.close()


def _count(server, name: str) -> int:
    dest = api(server, "/api/v1/destinations").json()["destinations"][0]
    return dest[name]


class _Identity:
    def __init__(self, position: int):
        self._position = position

    def position(self) -> int:
        return self._position


def test_identity_and_every_enabled_destination_hold_the_log_back(tmp_path):
    from trackpipe.config import Destination, load
    from trackpipe.delivery.process import IdentityConsumer
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
            consumer = IdentityConsumer(identity, reader)
            consumer.prune_log(tmp_path, settings, state)
            consumer.pool.shutdown()
            return [e.position for e in reader.read(0, 100)]

        assert left(_Identity(3)) == list(range(4, 11))  # identity is the furthest behind
        assert left(_Identity(9)) == [9, 10]  # now the enabled destination is
        settings.destinations = []
        assert left(None) == []  # no reader at all: up to the head
    finally:
        reader.close()
        state.close()
        writer.close()
