"""Exact messageId deduplication with bounded memory.

The index maps a 64-bit hash of each stored messageId to the log positions
that hold it; a hit is confirmed against the messageId in the log, so hash
collisions cost a lookup, never a wrong answer. It lives in its own SQLite
file (ids.db) so its random-key B-tree writes never hold up a log commit.

New entries go to an in-memory table that a background thread flushes in
large sorted transactions (many entries per dirtied page instead of one).
The log is this index's journal: ids.db records the last position it holds
(`indexed_through`), and on start every later log entry is re-added. Memory
is bounded by the flush size, not by the number of ids in the window: when
the flusher falls behind, add() waits for it.
"""

from __future__ import annotations

import sqlite3
import threading
from hashlib import blake2b
from pathlib import Path
from typing import Iterable, Sequence

import msgspec

from trackpipe.log.base import EventLog
from trackpipe.log.sqlite import WAL_KEEP_BYTES, PerThread, connect, immediate, insert_many

SCHEMA = """
CREATE TABLE IF NOT EXISTS ids (
    h        INTEGER NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (h, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""

FLUSH_AT = 50_000
FORGET_CHUNK = 10_000  # index entries a delete transaction, when the retention drops them
FLUSH_EVERY_S = 2.0


def message_hash(message_id: str) -> int:
    return int.from_bytes(blake2b(message_id.encode(), digest_size=8).digest(), "little",
                          signed=True)


class MessageIndex:
    def __init__(self, path: Path | str, log: EventLog, flush_at: int = FLUSH_AT):
        self.path = Path(path)
        self.flush_at = flush_at
        db = connect(self.path, synchronous="NORMAL")  # the log re-creates anything lost
        db.executescript(SCHEMA)
        row = db.execute("SELECT value FROM state WHERE key = 'indexed_through'").fetchone()
        db.close()
        self._through = row[0] if row else 0
        self._active: dict[int, list[int]] = {}
        self._frozen: dict[int, list[int]] = {}
        self._active_last = self._through
        self._conns = PerThread(self.path, synchronous="NORMAL")
        self._lock = threading.Condition()
        self._failing = False  # the last flush failed (disk full): retry slowly
        self._stop = threading.Event()
        self._replay(log)
        self._flusher = threading.Thread(target=self._flush_loop, name="dedupe-flush", daemon=True)
        self._flusher.start()

    def _replay(self, log: EventLog) -> None:
        """Re-add what the log holds past the index. The flusher is not running yet, so
        flush here whenever the memory table is full (add() would wait for it forever)."""
        after = self._through
        while batch := log.read(after, 10_000):
            self.add([(message_hash(e.message_id), e.position) for e in batch])
            after = batch[-1].position
            if len(self._active) >= self.flush_at:
                self.flush()

    def _db(self) -> sqlite3.Connection:
        return self._conns.get()

    def candidates(self, hashes: Iterable[int]) -> dict[int, list[int]]:
        """hash -> log positions that may hold a messageId with that hash."""
        hashes = set(hashes)
        found: dict[int, list[int]] = {}
        with self._lock:
            for table in (self._active, self._frozen):
                for h in table.keys() & hashes:  # a set operation in C, not a lookup in Python
                    found.setdefault(h, []).extend(table[h])
        # One statement for the whole group: each call into SQLite costs a GIL hand-off.
        # A join with the (distinct) hashes as its outer loop: `h IN (SELECT ...)` had SQLite
        # build a temporary b-tree of them first, 2/3 of the lookup's cost.
        for h, position in self._db().execute(
                "SELECT h, position FROM json_each(?) CROSS JOIN ids ON h = value",
                (msgspec.json.encode(hashes),)):
            found.setdefault(h, []).append(position)
        return found

    def add(self, pairs: list[tuple[int, int]]) -> None:
        with self._lock:
            while (len(self._active) >= 2 * self.flush_at and not self._failing
                   and not self._stop.is_set()):
                self._lock.notify_all()
                self._lock.wait(1.0)  # backpressure: memory stays bounded
            active = self._active
            for h, position in pairs:
                if h in active:
                    active[h].append(position)
                else:
                    active[h] = [position]
            if pairs:
                self._active_last = pairs[-1][1]
            if len(active) >= self.flush_at:
                self._lock.notify_all()

    def accepting(self) -> bool:
        """False while flushes fail and memory is full: the committer then answers 503."""
        with self._lock:
            held = len(self._active) + len(self._frozen)
        return not (self._failing and held >= 2 * self.flush_at)

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if len(self._active) < self.flush_at or self._failing:
                    self._lock.wait(FLUSH_EVERY_S)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._active or self._frozen:
                return
            self._frozen, self._active = self._active, {}
            through = self._active_last
        rows = sorted((h, p) for h, positions in self._frozen.items() for p in positions)
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            insert_many(conn, "INSERT OR IGNORE INTO ids VALUES", 2, rows)
            conn.execute("INSERT INTO state VALUES ('indexed_through', ?) ON CONFLICT (key)"
                         " DO UPDATE SET value = excluded.value", (through,))
            conn.execute("COMMIT")
        except sqlite3.Error:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            with self._lock:  # keep the entries in memory; the next round tries again
                for h, positions in self._frozen.items():
                    self._active.setdefault(h, [])[:0] = positions
                self._frozen = {}
                self._failing = True
            return
        with self._lock:
            self._frozen = {}
            self._through = through
            self._failing = False
            self._lock.notify_all()
        try:  # ids.db has no checkpointer thread of its own: keep its WAL small here
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        self._flusher.join(timeout=10)
        self.flush()
        self._conns.close_all()


class MessageLookup:
    """messageId -> positions, for processes other than the writer, which only read the
    index (and, for the log's retention, delete entries of deleted events).

    The writer's in-memory table is not visible here, so ids stored since the
    index's last flush are found by scanning that stretch of the log (at most
    a few flushes' worth of rows).
    """

    def __init__(self, path: Path | str, log: EventLog):
        self.path = Path(path)
        self.log = log
        self._conns = PerThread(self.path, synchronous="NORMAL")
        self._schema_ready = False

    def _db(self) -> sqlite3.Connection:
        return self._conns.get()

    def positions(self, message_id: str) -> list[int]:
        conn = self._db()
        conn.execute("BEGIN")  # one snapshot for both reads
        try:
            found = [p for (p,) in conn.execute("SELECT position FROM ids WHERE h = ?",
                                                (message_hash(message_id),))]
            row = conn.execute("SELECT value FROM state WHERE key = 'indexed_through'").fetchone()
        finally:
            conn.execute("COMMIT")
        through = row[0] if row else 0
        return sorted(set(found) | set(self.log.tail_positions(message_id, through)))

    def forget(self, gone: Sequence[tuple[int, str]]) -> None:
        """The log's retention deleted these (position, messageId): their entries go too,
        sorted so that neighbouring deletes share pages. An entry still in the writer's
        memory table lands later; it points at nothing, which costs a lookup, never a
        wrong answer. The deletes dirty pages all over the file (the keys are random), so
        the WAL is checkpointed after each chunk: nothing else does while no events arrive."""
        rows = sorted((message_hash(message_id), position) for position, message_id in gone)
        conn = self._db()
        if not self._schema_ready:
            conn.executescript(SCHEMA)  # the writer makes it on start; a test may not have
            conn.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
            self._schema_ready = True
        for i in range(0, len(rows), FORGET_CHUNK):
            with immediate(conn):
                conn.executemany("DELETE FROM ids WHERE h = ? AND position = ?",
                                 rows[i:i + FORGET_CHUNK])
            # PASSIVE never waits for (or holds up) the writer's flusher. Once it copies
            # everything, the next transaction starts the WAL over instead of growing it.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        self._conns.close_all()
