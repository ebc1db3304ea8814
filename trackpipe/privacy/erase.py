"""Deleting a person: their events leave the log, the profile store and the delivery queues.

The erase runs in the consumers process, on the identity thread, between two
identity batches (delivery/process.py), so the identity store never applies an
event of the person after it has forgotten them. The admin API queues the
request (`privacy_requests` in deliveries.db) and waits for it.

Every connection that deletes uses `secure_delete` (freed pages are zeroed)
and the WAL is checkpointed and truncated after, so the person's ids do not
linger in free pages or old WAL frames.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable

from trackpipe.log.sqlite import KEEP_HEAD_SQL, connect

QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS privacy_requests (
    id         INTEGER PRIMARY KEY,
    ids        TEXT NOT NULL,            -- JSON list of ids; emptied once done
    created_at INTEGER NOT NULL,
    done_at    INTEGER,
    result     TEXT                      -- JSON counts, never ids
);
CREATE TABLE IF NOT EXISTS delete_notices (
    id          INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    user_ids    TEXT NOT NULL,           -- JSON; emptied once sent
    anon_ids    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    state       TEXT NOT NULL,           -- pending | delivered | failed
    detail      TEXT NOT NULL DEFAULT ''
);
"""


def queue(db: sqlite3.Connection, ids: list[str]) -> int:
    db.executescript(QUEUE_SCHEMA)
    return db.execute("INSERT INTO privacy_requests (ids, created_at) VALUES (?, ?)",
                      (json.dumps(ids), int(time.time() * 1000))).lastrowid


def result(db: sqlite3.Connection, request_id: int) -> dict | None:
    row = db.execute("SELECT result FROM privacy_requests WHERE id = ? AND done_at IS NOT NULL",
                     (request_id,)).fetchone()
    return None if row is None else json.loads(row[0])


def process_requests(data_dir: Path, identity, destinations: Iterable[str]) -> int:
    """Carry out every queued delete; `identity` is the store or None. Returns how many.

    One call at a time: two admin requests' threads would each take the whole queue,
    and the second would find the people gone and record zero counts over the first's."""
    with _PROCESSING:
        return _process_requests(data_dir, identity, destinations)


_PROCESSING = threading.Lock()


def _process_requests(data_dir: Path, identity, destinations: Iterable[str]) -> int:
    db = connect(data_dir / "deliveries.db", synchronous="NORMAL")
    try:
        db.executescript(QUEUE_SCHEMA)
        todo = db.execute("SELECT id, ids FROM privacy_requests WHERE done_at IS NULL").fetchall()
        for request_id, ids in todo:
            counts = erase(data_dir, identity, json.loads(ids), db, list(destinations))
            db.execute("UPDATE privacy_requests SET ids = '[]', done_at = ?, result = ? WHERE id = ?",
                       (int(time.time() * 1000), json.dumps(counts), request_id))
        if todo:
            _scrub(db)
        return len(todo)
    finally:
        db.close()


def erase(data_dir: Path, identity, ids: list[str], deliveries: sqlite3.Connection,
          destinations: list[str]) -> dict:
    user_ids, anon_ids, positions = set(ids), set(ids), set()
    profiles = 0
    if identity is not None:
        for ident in ids:
            gone = identity.forget(ident)
            if gone is None:
                continue
            profiles += 1
            positions.update(gone.positions)
            for kind, value in gone.identifiers:
                (user_ids if kind == "user_id" else anon_ids).add(value)
    events, message_ids = _erase_log(data_dir / "log.db", user_ids, anon_ids, positions)
    positions.update(p for p, _ in message_ids)
    rows = [(p,) for p in positions]
    deliveries.execute("PRAGMA secure_delete=ON")
    deliveries.execute("BEGIN IMMEDIATE")
    cancelled = deliveries.executemany("DELETE FROM pending WHERE position = ?", rows).rowcount
    deliveries.executemany("DELETE FROM failed WHERE position = ?", rows)
    deliveries.executemany("DELETE FROM attempts WHERE position = ?", rows)
    now = int(time.time() * 1000)
    deliveries.executemany(
        "INSERT INTO delete_notices (destination, user_ids, anon_ids, created_at, state)"
        " VALUES (?, ?, ?, ?, 'pending')",
        [(d, json.dumps(sorted(user_ids)), json.dumps(sorted(anon_ids)), now) for d in destinations])
    deliveries.execute("COMMIT")
    return {"profiles": profiles, "events": events, "deliveries_cancelled": cancelled,
            "identifiers": len(user_ids | anon_ids), "destinations_notified": len(destinations)}


def _erase_log(path: Path, user_ids: set[str], anon_ids: set[str], positions: set[int]):
    db = connect(path)
    try:
        db.execute("PRAGMA secure_delete=ON")
        db.execute("CREATE TEMP TABLE IF NOT EXISTS gone_users (v TEXT PRIMARY KEY)")
        db.execute("CREATE TEMP TABLE IF NOT EXISTS gone_anons (v TEXT PRIMARY KEY)")
        db.execute("CREATE TEMP TABLE IF NOT EXISTS gone_positions (p INTEGER PRIMARY KEY)")
        db.execute("BEGIN IMMEDIATE")
        for table, values in (("gone_users", user_ids), ("gone_anons", anon_ids),
                              ("gone_positions", positions)):
            db.execute(f"DELETE FROM {table}")
            db.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?)", [(v,) for v in values])
        found = db.execute(
            "SELECT position, message_id FROM events WHERE position IN (SELECT p FROM gone_positions)"
            " OR user_id IN (SELECT v FROM gone_users) OR anonymous_id IN (SELECT v FROM gone_anons)"
        ).fetchall()
        db.execute(KEEP_HEAD_SQL)
        db.executemany("DELETE FROM events WHERE position = ?", [(p,) for p, _ in found])
        db.executemany("DELETE FROM repeats WHERE message_id = ?", [(m,) for _, m in found])
        for value in user_ids | anon_ids:  # discarded payloads may name them too
            db.execute("DELETE FROM discards WHERE instr(payload, ?) > 0", (value,))
        db.execute("COMMIT")
        _scrub(db)
        return len(found), found
    finally:
        db.close()


def _scrub(db: sqlite3.Connection) -> None:
    """Push the deletions through the WAL into the (zeroed) main file and empty the WAL."""
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.OperationalError:
        pass  # busy: the next checkpoint does it


def pending_notice(db: sqlite3.Connection, destination: str):
    """(id, user_ids, anonymous_ids) of the oldest delete notice still owed to `destination`."""
    row = db.execute("SELECT id, user_ids, anon_ids FROM delete_notices WHERE destination = ?"
                     " AND state = 'pending' ORDER BY id LIMIT 1", (destination,)).fetchone()
    return None if row is None else (row[0], json.loads(row[1]), json.loads(row[2]))


def finish_notice(db: sqlite3.Connection, notice_id: int, state: str, detail: str) -> None:
    db.execute("UPDATE delete_notices SET state = ?, detail = ?, user_ids = '[]', anon_ids = '[]'"
               " WHERE id = ?", (state, detail, notice_id))
