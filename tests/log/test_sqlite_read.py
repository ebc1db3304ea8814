"""SQLiteLog.read() fetches a batch as one result row (see _BATCHED in log/sqlite.py):
it must give back exactly what a plain row-by-row SELECT does."""

from __future__ import annotations

import sqlite3

import msgspec
import pytest

from trackpipe.log.base import Entry, Record
from trackpipe.log.sqlite import COLUMNS, SCHEMA, SQLiteLog


def records() -> list[Record]:
    odd = ["plain", "naïve 🚀", "line\nbreak", "quote\"back\\slash", "", "\u2028sep"]
    out = []
    for i in range(60):
        text = odd[i % len(odd)]
        body = msgspec.json.encode({"type": "track", "event": text, "properties": {"n": i,
                                    "s": text * (i % 4)}, "messageId": f"m{i}"})
        out.append(Record(f"m{i}-{text}", 1_700_000_000_000 + i, "track",
                          text if i % 3 else None, f"u{text}" if i % 2 else None,
                          None if i % 5 == 0 else f"a{i}", "src_1", body))
    return out


def row_by_row(path, after: int, limit: int) -> list[Entry]:
    conn = sqlite3.connect(path)
    try:
        return [Entry(*row) for row in conn.execute(
            f"SELECT {COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
            (after, limit))]
    finally:
        conn.close()


@pytest.fixture
def log_path(tmp_path):
    """A log holding records(), its writer open while the test runs."""
    path = tmp_path / "log.db"
    log = SQLiteLog(path)
    log.append(records())
    yield path
    log.close()


def change(path, sql: str, *args) -> None:
    """Edit the log file behind SQLiteLog's back."""
    conn = sqlite3.connect(path)
    conn.execute(sql, args)
    conn.commit()
    conn.close()


def test_read_matches_a_row_by_row_select(log_path):
    change(log_path, "DELETE FROM events WHERE position IN (7, 8, 30)")  # a privacy delete's gaps
    reader = SQLiteLog(log_path, writable=False)
    for after, limit in ((0, 1000), (0, 1), (5, 4), (29, 2), (55, 10), (60, 5), (99, 3)):
        got = reader.read(after, limit)
        assert got == row_by_row(log_path, after, limit), (after, limit)
        assert all(type(e.body) is bytes for e in got)
    assert reader.read(60, 10) == []
    reader.close()


def test_a_body_stored_as_text_reads_as_its_utf8_bytes(log_path):
    change(log_path, "UPDATE events SET body = ? WHERE position = 2", '{"x":"é"}')
    reader = SQLiteLog(log_path, writable=False)
    assert reader.read(0, 10)[1].body == '{"x":"é"}'.encode()
    reader.close()


def test_a_batch_over_sqlites_length_limit_is_read_row_by_row(log_path):
    reader = SQLiteLog(log_path, writable=False)
    reader._reader().setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 4000)  # one batch: ~10 KB
    assert reader.read(0, 100) == row_by_row(log_path, 0, 100)
    reader.close()


def test_get_matches_a_row_by_row_select(log_path):
    change(log_path, "DELETE FROM events WHERE position = 8")
    reader = SQLiteLog(log_path, writable=False)
    wanted = [40, 3, 8, 60, 61, 3, 1]  # unsorted, one deleted, one past the head, one twice
    conn = sqlite3.connect(log_path)
    expected = [Entry(*row) for row in conn.execute(
        f"SELECT {COLUMNS} FROM events WHERE position IN (40, 3, 8, 60, 61, 1) ORDER BY position")]
    conn.close()
    assert reader.get(wanted) == expected
    assert [e.position for e in expected] == [1, 3, 40, 60]
    assert reader.get([]) == [] and reader.get([99]) == []
    reader.close()


# -- lean reads and the ts column ---------------------------------------------------------

def mixed() -> list[Record]:
    """Records of every kind a lean read must tell apart."""
    out = []
    for i in range(40):
        type_ = ("track", "identify", "page", "group")[i % 4]
        out.append(Record(f"m{i}", 1_700_000_000_000 + i, type_, "E" if type_ == "track" else None,
                          "u", None, "src_1", b'{"n":%d}' % i,
                          None if i % 5 == 0 else 1_600_000_000_000 + i))
    return out


def test_a_lean_read_leaves_out_only_the_named_types_bodies_that_have_a_ts(tmp_path):
    path = tmp_path / "log.db"
    log = SQLiteLog(path)
    log.append(mixed())
    reader = SQLiteLog(path, writable=False)
    full = row_by_row(path, 0, 1000)
    assert [e.ts for e in full] == [r.ts for r in mixed()]
    for after, limit in ((0, 1000), (3, 7), (39, 5)):
        expected = [e._replace(body=b"") if e.type in ("track", "page") and e.ts is not None
                    else e for e in full if e.position > after][:limit]
        assert reader.read(after, limit, ("track", "page")) == expected
    assert reader.read(0, 1000) == full  # a plain read keeps every body
    reader.close()
    log.close()


def test_a_batch_whose_every_body_is_left_out_is_still_read(tmp_path):
    path = tmp_path / "log.db"
    log = SQLiteLog(path)
    log.append([Record(f"m{i}", 1, "track", "E", "u", None, "s", b"{}", 5) for i in range(3)])
    reader = SQLiteLog(path, writable=False)
    assert [(e.position, e.body, e.ts) for e in reader.read(0, 10, ("track",))] == [
        (1, b"", 5), (2, b"", 5), (3, b"", 5)]
    reader.close()
    log.close()


def test_a_lean_batch_over_sqlites_length_limit_is_read_row_by_row_with_its_bodies(log_path):
    reader = SQLiteLog(log_path, writable=False)
    reader._reader().setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 4000)
    assert reader.read(0, 100, ("track",)) == row_by_row(log_path, 0, 100)
    reader.close()


# The log's schema as it was before entries kept their ts.
OLD_SCHEMA = SCHEMA.replace(",\n    ts           INTEGER\n", "\n")
assert OLD_SCHEMA != SCHEMA


def old_log(tmp_path):
    """A log file as trackpipe wrote it before entries kept their ts: one entry."""
    path = tmp_path / "log.db"
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA)
    conn.execute("INSERT INTO events VALUES (1, 'old', 1, 'track', 'E', 'u', NULL, 's', '{}')")
    conn.commit()
    conn.close()
    return path


def test_a_log_written_before_ts_gets_the_column_and_its_old_entries_keep_their_bodies(tmp_path):
    path = old_log(tmp_path)
    log = SQLiteLog(path)
    log.append([Record("new", 2, "track", "E", "u", None, "s", b'{"a":1}', 7)])
    reader = SQLiteLog(path, writable=False)
    got = reader.read(0, 10, ("track",))
    assert [(e.message_id, e.body, e.ts) for e in got] == [("old", b"{}", None), ("new", b"", 7)]
    reader.close()
    log.close()
    log = SQLiteLog(path)  # opening it again changes nothing
    assert [e.ts for e in log.read(0, 10)] == [None, 7]
    log.close()


def test_a_reader_that_opens_an_old_log_before_any_writer_reads_it_as_it_is(tmp_path):
    """A CLI command run after an upgrade, before the server's first start."""
    path = old_log(tmp_path)
    reader = SQLiteLog(path, writable=False)
    old = Entry(1, "old", 1, "track", "E", "u", None, "s", b"{}", None)
    assert reader.read(0, 10) == reader.read(0, 10, ("track",)) == reader.get([1]) == [old]
    assert [e.message_id for e in reader.query({}, limit=10)[0]] == ["old"]
    assert "ts" not in {row[1] for row in sqlite3.connect(path).execute(
        "PRAGMA table_info(events)")}  # a reader never changes the file
    reader.close()

