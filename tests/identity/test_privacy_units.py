"""Pieces of a privacy delete that a real server cannot pin down: what SQLite leaves on
disk whatever its build's defaults, an outcome recorded just after an erase, and how
stored free text is searched for the deleted ids."""

from __future__ import annotations

import json
import sqlite3
import uuid

import msgspec
import pytest

from trackpipe.delivery.retry import RetryPolicy
from trackpipe.delivery.state import DeliveryState, Sent
from trackpipe.destinations.base import DELIVERED, fail, retry
from trackpipe.log.base import Record
from trackpipe.log.sqlite import SQLiteLog
from trackpipe.privacy import erase


def test_a_finished_delete_notice_leaves_no_byte_of_its_ids_on_disk(tmp_path):
    """Once sent, a notice's ids are blanked: the UPDATE ran without secure_delete and no
    checkpoint followed, so the old bytes stayed in the page and in the WAL. This SQLite
    build zeroes by default; many do not, so the connection here does not."""
    state = DeliveryState(tmp_path / "deliveries.db")
    try:
        person, anon = f"notice-user-{uuid.uuid4().hex}", f"notice-anon-{uuid.uuid4().hex}"
        db = state._db()
        db.execute("PRAGMA secure_delete=OFF")
        # A second notice, still owed, after it: the first one's old cell is then freed in
        # the middle of the page instead of being written over by its new version.
        for ids in ([person], [anon]), (["someone-else"], []):
            db.execute("INSERT INTO delete_notices (destination, user_ids, anon_ids, created_at,"
                       " state) VALUES ('hook', ?, ?, 0, 'pending')", tuple(map(json.dumps, ids)))
        notice_id, users, anons = state.pending_notice("hook")
        assert (users, anons) == ([person], [anon])

        state.finish_notice(notice_id, "delivered", "")
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("deliveries.db*"))
        assert person.encode() not in raw and anon.encode() not in raw
        assert b"someone-else" in raw
        assert db.execute("PRAGMA secure_delete").fetchone() == (0,), "left as it was"
    finally:
        state.close()


def test_a_delete_notice_answer_quoting_its_ids_is_not_kept(tmp_path):
    state = DeliveryState(tmp_path / "deliveries.db")
    try:
        db = state._db()
        db.execute("INSERT INTO delete_notices (destination, user_ids, anon_ids, created_at,"
                   " state) VALUES ('hook', '[\"u-1\"]', '[]', 0, 'pending')")
        state.finish_notice(1, "failed", '{"error": "no such user: u-1"}')
        assert db.execute("SELECT state, detail FROM delete_notices").fetchall() == [
            ("failed", erase.REMOVED)]
    finally:
        state.close()


def test_an_outcome_for_an_erased_event_leaves_no_row_and_no_detail(tmp_path):
    """The send began before the erase and is recorded after it: its event is gone from the
    log, so it is neither queued for a retry nor kept as failed, and the answer, which may
    quote it, is not kept for the others of the batch either."""
    log = SQLiteLog(tmp_path / "log.db")
    state = DeliveryState(tmp_path / "deliveries.db")
    try:
        log.append([Record(f"m{i}", 1, "track", "E", f"u{i}", None, "src",
                           msgspec.json.encode({"userId": f"u{i}"})) for i in (1, 2, 3)])
        state.set_cursor("hook", 0)
        batch_id = state.begin_batch("hook", 1, 3, 3)
        erase_from_log(tmp_path, 1)  # what the erase does first
        quoted = '{"batch": [{"userId": "u1"}, ...]}'
        sent = [Sent(1, "m1", 1, "u:u1", 1, 0, retry(503, quoted)),
                Sent(2, "m2", 1, "u:u2", 1, 0, retry(503, quoted)),
                Sent(3, "m3", 1, "u:u3", 1, 0, DELIVERED)]
        state.record("hook", sent, duration_ms=1.0, policy=RetryPolicy(3_600_000, 10),
                     batch_id=batch_id, cursor=3)
        db = state._db()
        assert db.execute("SELECT position, last_detail FROM pending").fetchall() == [
            (2, erase.REMOVED)]
        details = db.execute("SELECT detail FROM attempts UNION ALL"
                             " SELECT detail FROM last_errors").fetchall()
        assert details and "u1" not in str(details)
        counters = state.summary("hook")["counters"]
        assert counters == {"delivered": 1, "retries": 1, "skipped:deleted": 1}

        # A terminal answer for an erased event: no failed row (it could never be replayed).
        erase_from_log(tmp_path, 2)
        given_up = state.record("hook", [Sent(2, "m2", 1, "u:u2", 2, 0, fail(400, quoted))],
                                duration_ms=1.0, policy=RetryPolicy(3_600_000, 10))
        assert given_up == [] and db.execute("SELECT * FROM failed").fetchall() == []
        assert db.execute("SELECT * FROM pending").fetchall() == []
    finally:
        state.close()
        log.close()


def erase_from_log(path, position: int) -> None:
    with sqlite3.connect(path / "log.db") as db:
        db.execute("DELETE FROM events WHERE position = ?", (position,))


@pytest.mark.parametrize("text, found", [
    ('{"userId":"7"}', True),
    ("no such user 7.", True),
    ("user 17", False),
    ("u7 and 7b", False),
    ("HTTP 503", False),
    ('{"userId":"zq\\"77"}', True),   # as JSON escapes it
    ("Zq\"77 refused", True),           # as written, any case (emails are compared so)
])
def test_a_stored_detail_names_a_deleted_id_only_where_it_stands_alone(text, found):
    assert erase.mentions(["7", 'zq"77'])(text) is found
