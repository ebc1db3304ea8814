"""The log's append and read fast paths: the rows go in as the Records themselves, flattened
(each position is the first one's plus its index), and a read builds its Entries directly."""

from __future__ import annotations

import sqlite3

from trackpipe.log import sqlite as sqlite_log
from trackpipe.log.base import Entry, Record
from trackpipe.log.sqlite import SQLiteLog


def records(start: int, n: int) -> list[Record]:
    """Every nullable field is None in some of them; bodies differ in length."""
    return [Record(f"m{i}", 1_000 + i, "track" if i % 2 else "page", None if i % 3 else f"e{i}",
                   None if i % 4 == 1 else f"u{i}", None if i % 4 == 2 else f"a{i}", "src",
                   b"{" + b"x" * i + b"}", None if i % 5 == 0 else 2_000 + i)
            for i in range(start, start + n)]


def test_an_append_over_several_statements_keeps_positions_and_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_log, "EVENT_ROWS", 4)  # 10 records: statements of 4, 4 and 2
    log = SQLiteLog(tmp_path / "log.db")
    try:
        first, second = records(0, 10), records(10, 3)
        assert log.append(first) == list(range(1, 11))
        assert log.append(second) == [11, 12, 13]
        assert log.read(0) == [Entry(p, *r) for p, r in enumerate(first + second, 1)]
        db = sqlite3.connect(tmp_path / "log.db")
        try:
            kinds = db.execute("SELECT DISTINCT typeof(position), typeof(body) FROM events")
            assert kinds.fetchall() == [("integer", "blob")]
        finally:
            db.close()
    finally:
        log.close()


def test_an_empty_append_commits_its_ledger_rows_and_moves_nothing(tmp_path):
    log = SQLiteLog(tmp_path / "log.db")
    try:
        log.append(records(0, 2))
        assert log.append([], repeats=[("m0", 1, 5_000)]) == []
        assert log.head() == 2
        assert log.repeat("m0") == (1, 1, 5_000, 5_000)
        assert log.append(records(2, 1)) == [3]
    finally:
        log.close()


def test_a_read_returns_entries(tmp_path):
    log = SQLiteLog(tmp_path / "log.db")
    try:
        log.append(records(0, 6))
        reader = SQLiteLog(tmp_path / "log.db", writable=False)
        try:
            for entries in (reader.read(0), reader.read(0, lean=["track"]), reader.get([2, 5])):
                assert entries and all(type(e) is Entry for e in entries)
                assert all(e.position == int(e.message_id[1:]) + 1 for e in entries)
            lean = reader.read(0, lean=["track"])
            assert [e.body == b"" for e in lean] == [e.type == "track" and e.ts is not None
                                                     for e in lean]
            assert lean[1] == reader.read(0)[1]._replace(body=b"") and lean[1].ts == 2_001
        finally:
            reader.close()
    finally:
        log.close()
