"""The log's retention (log/retention.py): what it deletes, and what it must keep."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trackpipe.config import load
from trackpipe.errors import ConfigError
from trackpipe.log import retention
from trackpipe.log.base import Discard, Record, Repeat
from trackpipe.log.sqlite import SQLiteLog

T0 = 1_700_000_000_000
CUTOFF = T0 + 50  # events received before it are old


def record(i: int, received_at: int) -> Record:
    return Record(f"m{i}", received_at, "track", "E", f"u{i}", None, "src", b"{}")


@pytest.fixture
def log(tmp_path):
    """A log (writer open) of 100 events: positions 1-60 old, 61-100 young."""
    writer = SQLiteLog(tmp_path / "log.db")
    writer.append([record(i, T0 + (i if i < 60 else 100 + i)) for i in range(100)])
    yield writer
    writer.close()


def positions(log: SQLiteLog) -> list[int]:
    return [e.position for e in log.read(0, 10_000)]


def test_deletes_old_events_every_reader_has_passed(log):
    pruned = retention.prune(log.path, read_up_to=100, older_than=CUTOFF, chunk=7)
    assert pruned.events == 50  # received T0+0 .. T0+49
    assert positions(log) == list(range(51, 101))


def test_a_prune_stops_at_its_budget_and_the_next_goes_on_from_there(log):
    """Events held at the bottom of the log are walked past once, not by every prune."""
    asked = []

    def held(lo, hi):
        asked.append(lo)
        return set(range(1, 21))

    first = retention.prune(log.path, read_up_to=100, older_than=CUTOFF, held=held, chunk=10,
                            budget_s=0)
    assert (first.events, first.more, first.after) == (0, True, 10)
    pruned, rounds = first, 1
    while pruned.more and rounds < 20:  # starting over each time would never finish
        pruned = retention.prune(log.path, read_up_to=100, older_than=CUTOFF, held=held,
                                 after=pruned.after, chunk=10, budget_s=0)
        rounds += 1
    assert rounds == 6 and asked == [1, 11, 21, 31, 41]  # the sixth finds only young ones
    assert positions(log) == [*range(1, 21), *range(51, 101)]


def test_keeps_what_a_reader_has_not_reached(log):
    pruned = retention.prune(log.path, read_up_to=20, older_than=CUTOFF)
    assert pruned.events == 20
    assert positions(log)[0] == 21


def test_keeps_what_a_destination_holds(log):
    asked = []

    def held(lo, hi):
        asked.append((lo, hi))
        return {3, 17, 44}

    gone, lowest = [], []

    def forget(pairs, below):
        gone.extend(p for p, _ in pairs)
        assert all(message_id == f"m{p - 1}" for p, message_id in pairs)
        lowest.append(below)

    retention.prune(log.path, read_up_to=100, older_than=CUTOFF, held=held, forget=forget,
                    chunk=10)
    assert positions(log) == [3, 17, 44, *range(51, 101)]
    assert sorted(gone) == [p for p in range(1, 51) if p not in (3, 17, 44)]
    assert asked[0] == (1, 10) and asked[-1][1] == 50
    assert lowest == [3] * 5  # after each chunk: the lowest position the log still holds


def test_a_query_does_not_scan_what_was_deleted(log):
    retention.prune(log.path, read_up_to=100, older_than=CUTOFF)  # positions 1-50 go
    oldest_first, cursor, _ = log.query({}, after=0, limit=100, scan=10)
    assert [e.position for e in oldest_first] == list(range(51, 61)) and cursor == 60
    pages, cursor = [], None
    while True:
        page, cursor, _ = log.query({}, before=cursor, limit=100, scan=10)
        pages.append([e.position for e in page])
        if cursor is None:
            break
    # Windows of 9 positions over 51-100; going on down to position 0 would take 11.
    assert len(pages) == 6 and sorted(sum(pages, [])) == list(range(51, 101))


def test_stops_at_the_first_young_event(log):
    """Positions follow arrival: an old event past a young one waits for the next round."""
    log.append([record(200, T0 + 1)])  # position 101, old, behind young ones
    retention.prune(log.path, read_up_to=101, older_than=CUTOFF)
    assert positions(log) == list(range(51, 102))


def test_deleting_every_event_does_not_hand_out_their_positions_again(tmp_path):
    writer = SQLiteLog(tmp_path / "log.db")
    writer.append([record(i, T0) for i in range(5)])
    pruned = retention.prune(writer.path, read_up_to=5, older_than=CUTOFF)
    assert pruned.events == 5 and positions(writer) == []
    writer.close()
    reopened = SQLiteLog(tmp_path / "log.db")  # a restart works the head out from the file
    try:
        assert reopened.head() == 5
        assert reopened.append([record(9, T0 + 500)]) == [6]
    finally:
        reopened.close()


def test_the_head_a_prune_keeps_is_not_taken_for_a_reader(tmp_path):
    writer = SQLiteLog(tmp_path / "log.db")
    try:
        writer.append([record(i, T0) for i in range(5)])
        retention.prune(writer.path, read_up_to=5, older_than=CUTOFF)
        writer.append([record(i, T0) for i in range(5, 10)])
        assert retention.prune(writer.path, read_up_to=10, older_than=CUTOFF).events == 5
        assert positions(writer) == []
    finally:
        writer.close()


def test_old_discards_and_repeat_records_go_too(tmp_path):
    writer = SQLiteLog(tmp_path / "log.db")
    try:
        writer.append([record(1, T0), record(2, T0 + 100)],
                      [Discard(T0 + k, "src", None, "no_user_anon_id", "m", "{}") for k in (1, 2)]
                      + [Discard(T0 + 100, "src", None, "no_user_anon_id", "m", "{}")],
                      [Repeat("m1", 1, T0 + 5), Repeat("m2", 2, T0 + 100)])
        pruned = retention.prune(writer.path, read_up_to=2, older_than=CUTOFF)
        assert (pruned.events, pruned.discards, pruned.repeats) == (1, 2, 1)
        assert [d[1] for d in writer.discards()] == [T0 + 100]
        assert writer.repeat("m1") is None and writer.repeat("m2") is not None
    finally:
        writer.close()


def test_the_retention_is_at_least_the_dedup_window():
    assert load(None, {"TRACKPIPE_LOG_RETENTION_SECONDS": "604800"}).log.retention_seconds == 604800
    assert load(None, {}).log.retention_seconds == 0  # off: the log keeps every event
    with pytest.raises(ConfigError, match="log.retention_seconds .* dedup.window_seconds"):
        load(None, {"TRACKPIPE_LOG_RETENTION_SECONDS": "3600"})
    settings = load(None, {"TRACKPIPE_LOG_RETENTION_SECONDS": "3600",
                           "TRACKPIPE_DEDUP_WINDOW_SECONDS": "3600"})
    assert settings.log.retention_seconds == 3600


def test_the_dedup_index_forgets_what_was_deleted(tmp_path):
    from trackpipe.pipeline.dedupe import MessageIndex, MessageLookup, message_hash

    writer = SQLiteLog(tmp_path / "log.db")
    index = MessageIndex(tmp_path / "ids.db", writer)
    lookup = MessageLookup(tmp_path / "ids.db", writer)
    try:
        records = [record(i, T0 + (0 if i < 6 else 100)) for i in range(10)]
        index.add([(message_hash(r.message_id), p) for p, r in
                   zip(writer.append(records), records)])
        index.flush()
        retention.prune(writer.path, read_up_to=10, older_than=CUTOFF,
                        held=lambda lo, hi: {2}, forget=lambda gone, below: lookup.forget(gone))
        entries = lookup._db().execute("SELECT position FROM ids ORDER BY position").fetchall()
        assert [p for (p,) in entries] == [2, 7, 8, 9, 10]
        assert lookup.positions("m1") == [2] and lookup.positions("m0") == []
        with sqlite3.connect(tmp_path / "ids.db") as db:  # the deletes left no WAL to copy
            _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert frames == copied
    finally:
        lookup.close()
        index.close()
        writer.close()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ages=st.lists(st.integers(0, 99), min_size=0, max_size=60),
       held=st.sets(st.integers(1, 60), max_size=15),
       read_up_to=st.integers(0, 70), chunk=st.integers(1, 12),
       cutoff=st.integers(0, 100))
def test_a_prune_never_takes_what_must_stay(tmp_path_factory, ages, held, read_up_to, chunk,
                                            cutoff):
    """Whatever the log, the readers and the holds: nothing held, unread or young goes;
    every old, unheld, read event before the first young one does; no position comes back."""
    path = tmp_path_factory.mktemp("log") / "log.db"
    writer = SQLiteLog(path)
    try:
        writer.append([record(i, T0 + age) for i, age in enumerate(ages)])
        received = {p: T0 + age for p, age in enumerate(ages, 1)}
        pruned, rounds = retention.prune(path, read_up_to=read_up_to, older_than=T0 + cutoff,
                                         held=lambda lo, hi: {p for p in held if lo <= p <= hi},
                                         chunk=chunk, budget_s=0), 1
        while pruned.more and rounds < 100:
            pruned = retention.prune(path, read_up_to=read_up_to, older_than=T0 + cutoff,
                                     held=lambda lo, hi: {p for p in held if lo <= p <= hi},
                                     after=pruned.after, chunk=chunk, budget_s=0)
            rounds += 1
        assert not pruned.more
        left = set(positions(writer))
        gone = set(received) - left
        assert not gone & held
        assert all(p <= read_up_to and received[p] < T0 + cutoff for p in gone)
        first_young = next((p for p in sorted(received) if received[p] >= T0 + cutoff
                            and p <= read_up_to), None)
        expected = {p for p in received if p <= read_up_to and p not in held
                    and (first_young is None or p < first_young)}
        assert gone == expected
        writer.close()
        writer = SQLiteLog(path)  # a restart works its head out from the file
        assert writer.append([record(999, T0)]) == [len(ages) + 1]  # no position reused
    finally:
        writer.close()
