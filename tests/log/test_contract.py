"""The contract every event-log backend passes (see trackpipe/log/base.py).

A new backend joins by adding a factory to BACKENDS.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest

from trackpipe.log.base import Discard, Record, Repeat
from trackpipe.log.sqlite import SQLiteLog


def sqlite_backend(path):
    return SQLiteLog(path / "log.db")


BACKENDS = {"sqlite": sqlite_backend}


@pytest.fixture(params=sorted(BACKENDS))
def reopen(request, tmp_path):
    """Open (and reopen, after close) the backend on one durable location."""
    opened = []

    def make():
        log = BACKENDS[request.param](tmp_path)
        opened.append(log)
        return log

    yield make
    for log in opened:
        try:
            log.close()
        except Exception:
            pass


def rec(i: int, **kw) -> Record:
    fields = dict(message_id=f"m-{i}", received_at=1_700_000_000_000 + i, type="track",
                  event="E", user_id=f"u{i % 3}", anonymous_id=None, source="src_1",
                  body=b'{"n":%d}' % i)
    fields.update(kw)
    return Record(**fields)


def test_append_returns_increasing_positions_in_order(reopen):
    log = reopen()
    first = log.append([rec(1), rec(2), rec(3)])
    second = log.append([rec(4)])
    assert first == sorted(first) and len(set(first)) == 3
    assert second[0] > first[-1]
    assert log.head() == second[-1]
    assert [e.message_id for e in log.read(0)] == ["m-1", "m-2", "m-3", "m-4"]


def test_each_entry_keeps_its_ts_and_a_lean_read_keeps_the_rest(reopen):
    log = reopen()
    log.append([rec(1, ts=1_600_000_000_001), rec(2), rec(3, type="identify", event=None,
                                                        ts=1_600_000_000_003)])
    for entries in (log.read(0), log.get([1, 2, 3])):
        assert [e.ts for e in entries] == [1_600_000_000_001, None, 1_600_000_000_003]
    lean = log.read(0, 10, ("track",))
    full = log.read(0)
    # A backend may leave out a named type's body when the entry has its ts; nothing else.
    assert [e._replace(body=b"") for e in lean] == [e._replace(body=b"") for e in full]
    assert [e.body for e in lean[1:]] == [e.body for e in full[1:]]
    assert lean[0].body in (b"", full[0].body)


def test_read_from_a_position_and_limit(reopen):
    log = reopen()
    positions = log.append([rec(i) for i in range(10)])
    page = log.read(positions[3], limit=4)
    assert [e.position for e in page] == positions[4:8]
    assert page[0].body == rec(4).body and page[0].user_id == rec(4).user_id


def test_get_returns_requested_positions_only(reopen):
    log = reopen()
    positions = log.append([rec(i) for i in range(5)])
    got = log.get([positions[4], positions[1], 999_999])
    assert [e.message_id for e in got] == ["m-1", "m-4"]


def test_empty_append_changes_nothing(reopen):
    log = reopen()
    assert log.append([]) == []
    assert log.head() == 0 and log.read(0) == []


def test_appends_survive_reopen(reopen):
    log = reopen()
    positions = log.append([rec(i) for i in range(3)])
    log.close()
    again = reopen()
    assert again.head() == positions[-1]
    assert [e.message_id for e in again.read(0)] == ["m-0", "m-1", "m-2"]
    assert again.append([rec(9)])[0] == positions[-1] + 1


def test_consumer_positions_are_independent_and_durable(reopen):
    log = reopen()
    log.append([rec(i) for i in range(5)])
    assert log.position("warehouse") == 0
    log.commit("warehouse", 3)
    log.commit("webhook", 5)
    log.commit("warehouse", 4)
    log.close()
    again = reopen()
    assert again.position("warehouse") == 4
    assert again.position("webhook") == 5
    assert again.position("never") == 0


def test_ledger_rows_commit_with_the_append(reopen):
    log = reopen()
    d = Discard(1, "src_1", "bad-1", "no_user_anon_id", "no ids", "{}")
    positions = log.append([rec(1)], [d], [Repeat("m-1", 1, 5), Repeat("m-1", 1, 9)])
    assert positions
    assert log.discards(message_id="bad-1")[0][4] == "no_user_anon_id"
    position, count, first_at, last_at = log.repeat("m-1")
    assert (position, count, first_at, last_at) == (positions[0], 2, 5, 9)


def test_readers_never_see_a_partial_append(reopen):
    """Concurrent readers see whole appends only: each append is 100 records."""
    log = reopen()
    seen_sizes: list[int] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen_sizes.append(len(log.read(0, limit=100_000)))

    t = threading.Thread(target=reader)
    t.start()
    for batch in range(20):
        log.append([rec(batch * 100 + i) for i in range(100)])
    stop.set()
    t.join()
    assert all(n % 100 == 0 for n in seen_sizes)


def test_sqlite_log_fsyncs_every_commit(tmp_path):
    """A 200 means durable against power loss: WAL with synchronous=FULL (2)."""
    log = SQLiteLog(tmp_path / "log.db")
    try:
        assert log._write.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert log._write.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        log.close()


def test_sqlite_failed_commit_leaves_nothing_and_the_log_usable(tmp_path):
    log = SQLiteLog(tmp_path / "log.db")
    try:
        log.append([rec(1)])
        # A duplicate position makes the INSERT fail mid-transaction, like an I/O error would.
        log._head -= 1
        with pytest.raises(sqlite3.Error):
            log.append([rec(2), rec(3)])
        assert [e.message_id for e in log.read(0)] == ["m-1"]
        assert log.head() == 1  # recovery re-reads the head from the file
        assert log.append([rec(4)]) == [2]
    finally:
        log.close()
