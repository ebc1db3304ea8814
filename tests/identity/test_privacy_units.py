"""Pieces of a privacy delete that a real server cannot pin down: what SQLite leaves on
disk whatever its build's defaults, an outcome recorded just after an erase, and how
stored free text is searched for the deleted ids."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid

import msgspec
import pytest

from trackpipe.delivery.retry import RetryPolicy
from trackpipe.delivery.state import DeliveryState, Sent
from trackpipe.destinations.base import DELIVERED, fail, retry
from trackpipe.identity.facts import USER
from trackpipe.log.base import Discard, Record
from trackpipe.log.sqlite import SQLiteLog, connect
from trackpipe.pipeline.ingest import DISCARD_PAYLOAD_CHARS
from trackpipe.privacy import erase
from trackpipe.privacy.suppress import Suppressions, id_hash, trait_hash


def test_a_finished_delete_notice_leaves_no_byte_of_its_ids_on_disk(tmp_path):
    """Once sent, a notice's ids are blanked: the UPDATE ran without secure_delete and no
    checkpoint followed, so the old bytes stayed in the page and in the WAL. This SQLite
    build zeroes by default; many do not, so the connection here does not."""
    state = DeliveryState(tmp_path / "deliveries.db")
    try:
        person, anon = f"notice-user-{uuid.uuid4().hex}", f"notice-anon-{uuid.uuid4().hex}"
        email = f"notice-{uuid.uuid4().hex}@example.com"
        db = state._db()
        db.execute("PRAGMA secure_delete=OFF")
        # A second notice, still owed, after it: the first one's old cell is then freed in
        # the middle of the page instead of being written over by its new version.
        for ids in ([person], [anon], [["email", email]]), (["someone-else"], [], []):
            db.execute("INSERT INTO delete_notices (destination, user_ids, anon_ids, traits,"
                       " created_at, state) VALUES ('hook', ?, ?, ?, 0, 'pending')",
                       tuple(map(json.dumps, ids)))
        notice_id, users, anons, traits = state.pending_notice("hook")
        assert (users, anons, traits) == ([person], [anon], [("email", email)])

        state.finish_notice(notice_id, "delivered", "")
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("deliveries.db*"))
        assert person.encode() not in raw and anon.encode() not in raw
        assert email.encode() not in raw
        assert b"someone-else" in raw
        assert db.execute("PRAGMA secure_delete").fetchone() == (0,), "left as it was"
    finally:
        state.close()


def test_a_delete_notice_queued_before_notices_named_traits_is_still_sent(tmp_path):
    # A deliveries.db made before the `traits` column: its table gains it, empty.
    db = sqlite3.connect(tmp_path / "deliveries.db")
    db.execute("CREATE TABLE delete_notices (id INTEGER PRIMARY KEY, destination TEXT NOT NULL,"
               " user_ids TEXT NOT NULL, anon_ids TEXT NOT NULL, created_at INTEGER NOT NULL,"
               " state TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '')")
    db.execute("INSERT INTO delete_notices (destination, user_ids, anon_ids, created_at, state)"
               " VALUES ('wh', '[\"u-1\"]', '[]', 0, 'pending')")
    db.commit()
    db.close()
    state = DeliveryState(tmp_path / "deliveries.db")
    try:
        assert state.pending_notice("wh") == (1, ["u-1"], [], [])
        state.finish_notice(1, "delivered", "")
        assert state.pending_notice("wh") is None
    finally:
        state.close()


def test_only_a_destination_that_uses_profiles_has_the_emails_in_its_delete_notice(tmp_path):
    """The webhook never reads the person's trait identifiers: its notice held their email
    on disk all the same, until sent (for good, under a version rolled back to)."""
    from trackpipe.config import Destination

    SQLiteLog(tmp_path / "log.db").close()
    DeliveryState(tmp_path / "deliveries.db").close()
    hook = Destination(name="hook", type="webhook")
    warehouse = Destination(name="wh", type="duckdb")  # uses profiles, as postgres does
    done = delete(tmp_path, (USER, "u-1"), ("email", "ann@x.io"), destinations=[hook, warehouse])
    assert done["destinations_notified"] == 2
    with opened(tmp_path / "deliveries.db") as db:
        assert db.execute("SELECT destination, user_ids, traits FROM delete_notices"
                          " ORDER BY destination").fetchall() == [
            ("hook", '["u-1"]', "[]"), ("wh", '["u-1"]', '[["email", "ann@x.io"]]')]
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("deliveries.db*"))
    assert raw.count(b"ann@x.io") == 1, "once: in the warehouse's notice"


def test_a_sent_notice_still_naming_its_person_is_blanked_at_start(tmp_path):
    """An older version (rolled back to) knew nothing of `traits`: it sent the notice and
    blanked its ids only, leaving the email there for good."""
    state = DeliveryState(tmp_path / "deliveries.db")
    state._db().execute(
        "INSERT INTO delete_notices (destination, user_ids, anon_ids, traits, created_at,"
        " state) VALUES ('wh', '[]', '[]', '[[\"email\", \"ann@x.io\"]]', 0, 'delivered'),"
        " ('wh', '[\"u-2\"]', '[]', '[[\"email\", \"bob@x.io\"]]', 0, 'pending')")
    state.close()
    DeliveryState(tmp_path / "deliveries.db").close()  # the next start
    with opened(tmp_path / "deliveries.db") as db:
        assert db.execute("SELECT state, user_ids, traits FROM delete_notices").fetchall() == [
            ("delivered", "[]", "[]"), ("pending", '["u-2"]', '[["email", "bob@x.io"]]')]
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("deliveries.db*"))
    assert b"ann@x.io" not in raw and b"bob@x.io" in raw


def test_a_delete_notice_answer_quoting_its_ids_is_not_kept(tmp_path):
    state = DeliveryState(tmp_path / "deliveries.db")
    try:
        db = state._db()
        db.execute("INSERT INTO delete_notices (destination, user_ids, anon_ids, traits,"
                   " created_at, state) VALUES ('hook', '[\"u-1\"]', '[]', '[]', 0, 'pending'),"
                   " ('wh', '[\"u-1\"]', '[]', '[[\"email\", \"ann@x.io\"]]', 0, 'pending')")
        state.finish_notice(1, "failed", '{"error": "no such user: u-1"}')
        state.finish_notice(2, "failed", "no row for Ann@x.io")
        assert db.execute("SELECT state, detail FROM delete_notices").fetchall() == [
            ("failed", erase.REMOVED)] * 2
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


def payload(event: dict) -> str:
    """A discard's payload as the ingest stores it: the event encoded, cut to 2 KB."""
    return msgspec.json.encode(event)[:DISCARD_PAYLOAD_CHARS].decode("utf-8", "replace")


def discard(event: dict) -> Discard:
    return Discard(1, "src", None, "missing_event", "no event", payload(event))


def delete(data_dir, *ids: tuple[str | None, str], destinations=()) -> dict:
    """Queue a delete of these (kind, value) identifiers and carry it out, with no identity
    store (as the server does without one), notifying these destinations."""
    with opened(data_dir / "deliveries.db") as db:
        request_id = erase.queue(db, list(ids))
        assert erase.process_requests(data_dir, None, list(destinations)) == 1
        return erase.result(db, request_id)


def opened(path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(path, isolation_level=None))


@contextlib.contextmanager
def lock_watch(path):
    """Another writer of a file, taking its write lock over and over while the block runs:
    the longest it had to wait (watch["waits"]) is how long someone else held it."""
    watch: dict = {"waits": [0.0], "errors": []}
    stop = threading.Event()

    def take_the_lock_again_and_again() -> None:
        db = connect(path)
        try:
            while not stop.is_set():
                started = time.perf_counter()
                db.execute("BEGIN IMMEDIATE")
                watch["waits"].append(time.perf_counter() - started)
                db.execute("COMMIT")
                time.sleep(0.002)
        except sqlite3.Error as exc:  # the 30 s busy timeout ran out
            watch["errors"].append(exc)
        finally:
            db.close()

    thread = threading.Thread(target=take_the_lock_again_and_again)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join()


def test_a_delete_holds_the_logs_write_lock_briefly_however_many_discards(tmp_path):
    """The discards naming the person were found by Python reading all of them (~200 µs a
    2 KB payload) inside the delete's write transaction: 30,000 held the log's write lock
    5-7 s, and with 175,000 the log writer's commits (30 s busy timeout) failed."""
    log = SQLiteLog(tmp_path / "log.db")
    DeliveryState(tmp_path / "deliveries.db").close()
    filler = {f"k{j}": f"value number {j}" for j in range(200)}  # cut to 2 KB, like most
    theirs = {i for i in range(0, 25_000, 1_000)}
    for chunk in range(0, 25_000, 5_000):
        log.append([], [discard({"type": "track", "messageId": f"m{i}",
                                 "userId": "victim" if i in theirs else f"user-{i}",
                                 "context": {"traits": {"email": f"u{i}@example.com"}},
                                 "properties": filler}) for i in range(chunk, chunk + 5_000)])
    log.close()
    with opened(tmp_path / "log.db") as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the log's checkpointer keeps it so

    with lock_watch(tmp_path / "log.db") as watch:
        delete(tmp_path, (None, "victim"), ("email", "victim@example.com"))
    assert not watch["errors"]
    longest = max(watch["waits"])
    assert longest < 0.5, f"the log's write lock was held {longest:.2f} s"
    with opened(tmp_path / "log.db") as db:
        left = {p for (p,) in db.execute("SELECT payload FROM discards")}
    assert len(left) == 25_000 - len(theirs) and '"victim"' not in str(left)


# Two deletes: a userId with an ASCII email, then a non-ASCII email.
FIRST = ((None, 'vic"tim'), ("email", "kim@example.com"))
SECOND = (("email", "élodie.k@example.com"),)
PAYLOADS = {  # name -> (the invalid event, which delete erases it: 1, 2, or None)
    "their userId": ({"userId": 'vic"tim'}, 1),
    "their previousId": ({"type": "alias", "previousId": 'vic"tim'}, 1),
    "their id, cut short": ({"userId": 'vic"tim', "properties": {"x": "y" * 3000}}, 1),
    "their id, deep in a cut payload": ({"properties": {"x": "y" * 10, "userId": 'vic"tim',
                                                        "z": "y" * 3000}}, 1),
    "their email, padded, other case": ({"traits": {"email": " KIM@example.COM\n"}}, 1),
    "their email, Kelvin sign": ({"traits": {"email": "\u212aim@example.com"}}, 1),
    "their other email, other case": ({"traits": {"email": " élodie.k@EXAMPLE.COM"}}, 2),
    "their other email, cased and cut": ({"context": {"traits": {
        "email": "ÉLODIE.K@example.com"}}, "properties": {"x": "y" * 3000}}, 2),
    "their other email, Kelvin sign": ({"traits": {"email": "Élodie.\u212a@example.com"}}, 2),
    "someone else": ({"userId": "victim"}, None),
    "their id as a property": ({"userId": "u2", "properties": {"who": 'vic"tim'}}, None),
    "their email elsewhere": ({"userId": "u3", "properties": {"to": "kim@example.com"}}, None),
    "a key ending like userId": ({'x"userId': 'vic"tim', "properties": {"x": "y" * 3000}},
                                 None),
}


def test_a_delete_finds_every_discard_naming_the_person_however_it_is_written(tmp_path):
    """SQLite picks the discards that may be theirs, by the forms their ids take in a
    payload, and Python decides: none of theirs may be missed, whatever the escaping,
    the case (SQLite folds only ASCII letters), or where the payload was cut."""
    log = SQLiteLog(tmp_path / "log.db")
    DeliveryState(tmp_path / "deliveries.db").close()
    log.append([], [discard({"case": name, **event}) for name, (event, _) in PAYLOADS.items()])
    log.close()

    def left() -> set[str]:
        with opened(tmp_path / "log.db") as db:
            return {name for name in PAYLOADS if db.execute(
                "SELECT 1 FROM discards WHERE instr(payload, ?)", (f'"case":"{name}"',)
            ).fetchone()}
    for step, ids in enumerate((FIRST, SECOND), 1):
        delete(tmp_path, *ids)
        assert left() == {name for name, (_, erased_by) in PAYLOADS.items()
                          if erased_by is None or erased_by > step}


@pytest.mark.parametrize("number, payload_id", [
    ("7", 7), ("7", 7.0), ("100000000000000000000", 1e20), ("1e-05", 0.00001)])
def test_a_delete_finds_a_discard_naming_the_person_by_a_number(tmp_path, number, payload_id):
    log = SQLiteLog(tmp_path / "log.db")
    DeliveryState(tmp_path / "deliveries.db").close()
    log.append([], [discard({"anonymousId": payload_id}), discard({"anonymousId": 17})])
    log.close()
    delete(tmp_path, (None, number))
    with opened(tmp_path / "log.db") as db:
        assert db.execute("SELECT payload FROM discards").fetchall() == [('{"anonymousId":17}',)]


def test_a_delete_keeps_the_error_details_that_only_share_a_word_with_an_id(tmp_path):
    """Deleting user "500" replaced every stored "HTTP 500" with the privacy note, and user
    "1" every "retry in 1 s": a detail names someone where it quotes their id as a JSON
    string (an error body echoing a batch), or when it was kept for one of their events."""
    log = SQLiteLog(tmp_path / "log.db")
    log.append([Record(f"m{i}", 1, "track", "E", user, None, "src",
                       msgspec.json.encode({"userId": user}))
                for i, user in enumerate(["500", "1", "bystander"], 1)])
    log.close()
    state = DeliveryState(tmp_path / "deliveries.db")
    db = state._db()
    http, retry = "HTTP 500 Internal Server Error", "retry in 1 s"
    rows = {  # (table, its row as inserted) -> whether the detail is kept
        ("batches", (1, "hook", 1, 2, 2, 0, "retry", 500, 1.0, http)): False,  # theirs
        ("batches", (2, "hook", 3, 3, 1, 0, "retry", 500, 1.0, http)): True,
        ("attempts", (1, "hook", 3, 0, "retry", 500, 1.0, http, 1)): True,
        ("attempts", (2, "hook", 3, 0, "retry", 400, 1.0, '[{"userId":"500"}]', 1)): False,
        ("attempts", (3, "hook", 3, 0, "retry", 400, 1.0, '[{"userId": "1"}]', 1)): False,
        ("attempts", (4, "hook", 3, 0, "retry", 400, 1.0, 'no: "ann@example.COM"', 1)): False,
        ("attempts", (5, "hook", 3, 0, "retry", 400, 1.0, "mail ann@example.com", 1)): True,
        ("pending", ("hook", 3, "u:bystander", 1, 0, 0, 503, retry, 0)): True,
        ("failed", ("other", 3, "m3", 0, 5, 500, f"{http}; gave up, {retry}", "terminal", 0)):
            True,
        ("last_errors", ("hook", 0, 500, http)): True,
        ("delete_notices", (1, "hook", "[]", "[]", 0, "failed", f"{http}, {retry}", "[]")):
            True,
    }
    for table, row in rows:
        db.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(row))})", row)
    state.close()

    delete(tmp_path, (None, "500"), ("email", "ann@example.com"))
    delete(tmp_path, (None, "1"))
    with opened(tmp_path / "deliveries.db") as db:
        def detail(table: str, row: tuple) -> str | None:
            column, _, key = DETAIL_COLUMNS[table]
            found = db.execute(f"SELECT {column} FROM {table} WHERE"
                               f" {' AND '.join(f'{k} = ?' for k in key)}",
                               row[:len(key)]).fetchone()
            return found and found[0]
        kept = {(table, row): detail(table, row) == row[DETAIL_COLUMNS[table][1]]
                for table, row in rows}
        assert kept == rows
        assert detail("batches", (1,)) == erase.REMOVED


DETAIL_COLUMNS = {  # table -> (detail column, its index in a row, the key columns first in a row)
    "batches": ("detail", 9, ("id",)), "attempts": ("detail", 7, ("id",)),
    "pending": ("last_detail", 7, ("destination", "position")),
    "failed": ("detail", 6, ("destination", "position")),
    "last_errors": ("detail", 3, ("destination",)), "delete_notices": ("detail", 6, ("id",))}


def test_suppression_drops_a_cut_short_discard_by_the_ids_it_names(tmp_path):
    """A discard cut to 2 KB is read pair by pair, only the id fields and trait identifiers
    (decoding every pair cost ~200 µs a discard on the event loop)."""
    key = b"k" * 32
    suppressed = Suppressions(key, [id_hash(key, "gone"), trait_hash(key, "gone@example.com"),
                                    id_hash(key, "1234")])  # what a cut-short 12345 reads as
    blob = {"blob": "x" * 3000}
    events = {  # the invalid event -> whether it is dropped
        "by userId": ({"userId": "gone", "properties": blob}, True),
        "by a nested email": ({"context": {"traits": {"email": " GONE@example.com"}},
                               "properties": blob}, True),
        "someone else": ({"userId": "gone-not", "properties": blob}, False),
        "a key ending like userId": ({'x"userId': "gone", "properties": blob}, False),
        # cut just after "userId":1234 (with its "case" first, as below)
        "the id cut short": ({"properties": {"x": "y" * 1986}, "userId": 12345}, False),
    }
    discards = [discard({"case": name, **event}) for name, (event, _) in events.items()]
    _, kept, dropped = suppressed.drop([], discards, ["email"])
    assert {d.payload.split('"')[3] for d in kept} == {
        name for name, (_, gone) in events.items() if not gone}
    assert dropped == 2


def test_a_delete_erases_the_events_of_a_previous_id_identity_has_not_applied_yet(tmp_path):
    """An alias's previousId identity saw only there is a userId to be (graph.py _as_user):
    the old userId's events still waiting in the log are the person's."""
    from trackpipe.config import Identity
    from trackpipe.identity.sqlite_store import SQLiteStore

    def record(type_: str, user: str, **fields) -> Record:
        body = {"type": type_, "userId": user, "timestamp": "2024-05-01T10:00:00.000Z",
                **fields}
        return Record(f"m-{type_}", 1, type_, fields.get("event"), user, None, "src",
                      msgspec.json.encode(body))
    log = SQLiteLog(tmp_path / "log.db")
    log.append([record("alias", "new-id", previousId="old-id"),
                record("track", "old-id", event="Old Event")], [])
    alias = log.read(0, 1)
    log.close()
    DeliveryState(tmp_path / "deliveries.db").close()
    identity = SQLiteStore(tmp_path / "identity.db", Identity(), "identity")
    identity.apply(alias)  # the old userId's event is not applied yet
    with opened(tmp_path / "deliveries.db") as db:
        request_id = erase.queue(db, [(None, "new-id")])
        assert erase.process_requests(tmp_path, identity, []) == 1
        assert erase.result(db, request_id)["events"] == 2
    identity.close()
    with opened(tmp_path / "log.db") as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (0,)
