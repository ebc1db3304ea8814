"""The embedded event log: one SQLite file in WAL mode, synchronous=FULL.

Why this shape (see ../shared/reference/performance-budget.md): events are
appended under an INTEGER PRIMARY KEY that only grows, so every insert lands
on the right edge of the B-tree; a random text key (messageId) as the
clustered key caps SQLite near 40k rows/s. Deduplication lives elsewhere
(pipeline/dedupe.py). synchronous=FULL makes each commit fsync the WAL, so a
committed event survives power loss, not only a crash. The WAL is
checkpointed from a background thread so no commit pays for it; see
checkpoint_all for how it keeps the WAL from growing under steady load.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import threading
from itertools import chain
from pathlib import Path
from typing import NamedTuple, Sequence

import msgspec

from trackpipe.log.base import Discard, Entry, EventLog, Record, Repeat

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    position     INTEGER PRIMARY KEY,
    message_id   TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    type         TEXT NOT NULL,
    event        TEXT,
    user_id      TEXT,
    anonymous_id TEXT,
    source       TEXT NOT NULL,
    body         BLOB NOT NULL,
    ts           INTEGER
);
CREATE TABLE IF NOT EXISTS discards (
    id          INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,
    source      TEXT,
    message_id  TEXT,
    reason      TEXT NOT NULL,
    message     TEXT NOT NULL,
    payload     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS discards_by_message ON discards (message_id)
    WHERE message_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS repeats (
    message_id      TEXT PRIMARY KEY,
    position        INTEGER NOT NULL,
    count           INTEGER NOT NULL,
    first_repeat_at INTEGER NOT NULL,
    last_repeat_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS consumers (
    name     TEXT PRIMARY KEY,
    position INTEGER NOT NULL
) WITHOUT ROWID;
"""

# A privacy erase or the retention may delete the newest events; positions must
# still never be reused (consumers' cursors are past them), so each delete leaves
# the old head behind as a floor (privacy/erase.py, log/retention.py).
HEAD_FLOOR = "log:head_floor"
HEAD_SQL = ("SELECT max(coalesce((SELECT max(position) FROM events), 0), coalesce((SELECT position"
            f" FROM consumers WHERE name = '{HEAD_FLOOR}'), 0))")
# Run in the deleting transaction, before the delete (privacy erase, retention).
KEEP_HEAD_SQL = (f"INSERT INTO consumers VALUES ('{HEAD_FLOOR}', (SELECT coalesce(max(position), 0)"
                 " FROM events)) ON CONFLICT (name) DO UPDATE SET"
                 " position = max(position, excluded.position)")

COLUMNS = ("position, message_id, received_at, type, event, user_id, anonymous_id, source, body,"
           " ts")
# What a reader selects from a log no writer has opened since it gained `ts`.
COLUMNS_BEFORE_TS = COLUMNS.replace(" ts", " NULL AS ts")
# The consumers' read: a batch of entries as ONE result row. Python's sqlite3 hands
# the GIL back around every row it steps to; in a process where another thread is
# busy (the consumers process: identity beside the destinations' event loop) each
# hand-back can wait out the interpreter's switch interval, and a 2000-row read took
# ~1 ms per row instead of ~2 us. So SQLite builds the batch in one step: the columns
# as a JSON array of arrays (with each body's length), the bodies concatenated.
# `get` (the retries' read) does the same with its positions as one JSON array.
# A lean read leaves out the bodies of the types it names (:lean, a JSON array)
# when the entry has its ts: identity reads ~2.5x faster without them.
_BATCHED = (
    "SELECT json_group_array(json_array(position, message_id, received_at, type, event,"
    " user_id, anonymous_id, source, ts, length(CAST(b AS BLOB)))),"
    " CAST(group_concat(CAST(b AS BLOB), '') AS BLOB) FROM (SELECT {columns}, {body} AS b"
    " FROM events {where})")
ALL_BODIES = "body"
LEAN_BODIES = ("CASE WHEN ts IS NOT NULL AND type IN (SELECT value FROM json_each(:lean))"
               " THEN x'' ELSE body END")
READ_WHERE = "WHERE position > :after ORDER BY position LIMIT :limit"
GET_WHERE = "WHERE position IN (SELECT value FROM json_each(:positions)) ORDER BY position"


class _Reads(NamedTuple):
    columns: str
    read: str
    lean: str | None  # None before the log has `ts`: every body is read
    get: str


def _reads(has_ts: bool) -> _Reads:
    columns = COLUMNS if has_ts else COLUMNS_BEFORE_TS
    return _Reads(columns,
                  _BATCHED.format(columns=columns, body=ALL_BODIES, where=READ_WHERE),
                  _BATCHED.format(columns=columns, body=LEAN_BODIES, where=READ_WHERE)
                  if has_ts else None,
                  _BATCHED.format(columns=columns, body=ALL_BODIES, where=GET_WHERE))


READS = _reads(True)
_decode_meta = msgspec.json.Decoder(list[tuple[int, str, int, str, str | None, str | None,
                                               str | None, str, int | None, int]]).decode

CHECKPOINT_EVERY_S = 1.0
UNHELD_PASSES = 3  # checkpoint passes beside the commits before the one that holds them
# A WAL larger than this (after a burst) is cut back to it when SQLite starts it over.
WAL_KEEP_BYTES = 64 << 20

# Filters the admin API may apply; each maps to a column test.
FILTERS = {
    "type": "type = ?",
    "event": "event = ?",
    "user_id": "user_id = ?",
    "anonymous_id": "anonymous_id = ?",
    "message_id": "message_id = ?",
    "source": "source = ?",
    "since": "received_at >= ?",
    "until": "received_at < ?",
}


# Every call into SQLite releases the GIL and must take it back from the busy
# event loop, which can cost up to the interpreter's switch interval. So the
# writer makes few, large calls: one multi-row INSERT holds as many rows as
# SQLite's variable limit allows (executemany() would hand the GIL back per row).
MAX_VARIABLES = 32766
# Consumers' inserts into tables with scattered keys (identity's timeline, delivery
# retries) go this many rows to a statement: a statement of 1000 rows cost SQLite
# more to prepare than it saved (the identity timeline insert ran 2.5x slower than
# executemany), 128 rows matched executemany and still hands the GIL back 1/128 as often.
CONSUMER_ROWS = 128


def insert_many(conn: sqlite3.Connection, head: str, width: int, rows: Sequence[tuple],
                tail: str = "", max_rows: int | None = None) -> None:
    """`head` is e.g. "INSERT INTO t VALUES"; rows are `width`-tuples; `tail` e.g. an
    ON CONFLICT clause; `max_rows` caps the rows per statement."""
    one = "(" + ",".join("?" * width) + ")"
    step = min(MAX_VARIABLES // width, max_rows or MAX_VARIABLES)
    for i in range(0, len(rows), step):
        chunk = rows[i:i + step]
        conn.execute(f"{head} {','.join([one] * len(chunk))} {tail}",
                     list(chain.from_iterable(chunk)))


# The log's append: the rows are the Records themselves, flattened (no row tuple built per
# event), and each row's position is the first one's (?1) plus its index in the statement.
RECORD_WIDTH = len(Record._fields)
EVENT_ROWS = (MAX_VARIABLES - 1) // RECORD_WIDTH


@functools.lru_cache(maxsize=64)
def _events_insert(rows: int) -> str:
    """The INSERT of `rows` events (kept: the same text is neither rebuilt nor rehashed)."""
    fields = ",?" * RECORD_WIDTH
    return (f"INSERT INTO events ({COLUMNS}) VALUES "
            + ",".join([f"(?1+{i}{fields})" for i in range(rows)]))


def connect(path: Path, *, synchronous: str = "FULL", autocheckpoint: int = 0
            ) -> sqlite3.Connection:
    """`autocheckpoint` 0 (the default) leaves checkpoints to the file's owner: the log's
    checkpointer thread, the dedup index's flusher. A file without one must pass
    SQLite's usual 1000 pages, or its WAL is never copied back and grows for ever."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30,
                           cached_statements=512)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any failure. A failed COMMIT (a full
    disk) can leave the transaction open, and the connection would go on holding the
    file's write lock, so that is rolled back too."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def damage(path: Path) -> str | None:
    """What SQLite's quick_check finds wrong with the file (None when it is sound or does
    not exist yet). It reads every page: about a second a GB when cached."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(path)  # not read-only: a WAL left by a crash is recovered first
        try:
            problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:  # not a database at all
        return str(exc)
    return None if problems == ["ok"] else "; ".join(problems)


def durable(path: Path) -> None:
    """fsync an SQLite file in WAL mode and its WAL: every commit so far survives a power
    cut, also in a file that runs synchronous=NORMAL (which syncs only at checkpoints)."""
    for name in (f"{path}-wal", str(path)):
        try:
            fd = os.open(name, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def checkpoint_all(conn: sqlite3.Connection, writer_lock, passes_beside: int) -> None:
    """Checkpoint so that the next commit can start the WAL over.

    SQLite starts the WAL over (overwriting it instead of appending) only when a
    commit finds every frame in it checkpointed. Under steady load a commit always
    lands while a checkpoint runs, so the log's WAL grew without end: ~110 MB after
    10 s of /v1/track, and each commit's fsync then also had to journal the file's
    new size (~440 us a commit instead of ~270 us, measured in isolation). So
    `passes_beside` passes run while commits go on, each with less to copy than the
    one before, and a last pass, holding the writer's lock, copies the few frames
    left. For the log, one pass before the held one held commits 6-19 ms under
    /v1/track load (up to 42 ms under batches); three held them 0.1-3.3 ms (0.1-7.5 ms).
    """
    for _ in range(passes_beside):
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    with writer_lock:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(events)")}


def _add_ts_column(conn: sqlite3.Connection) -> None:
    """Logs written before entries kept their `ts` get the column (NULL for old rows)."""
    if "ts" not in _columns(conn):
        conn.execute("ALTER TABLE events ADD COLUMN ts INTEGER")


class PerThread:
    """One connection per thread to one SQLite file (a connection must not be shared
    between threads mid-transaction); close_all() closes every one of them."""

    def __init__(self, path: Path, synchronous: str = "FULL", autocheckpoint: int = 0):
        self.path, self.synchronous, self.autocheckpoint = path, synchronous, autocheckpoint
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def get(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path, synchronous=self.synchronous,
                                              autocheckpoint=self.autocheckpoint)
            with self._lock:
                self._all.append(conn)
        return conn

    def close_all(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


class SQLiteLog(EventLog):
    """`writable=False` opens a reader: queries and consumer positions, no appends.

    Exactly one writable instance (the log writer) may exist per file.
    """

    def __init__(self, path: Path | str, *, writable: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writable = writable
        self._readers = PerThread(self.path)
        self._closed = threading.Event()
        self._write: sqlite3.Connection | None = None
        self._sql = READS
        if not writable:
            # The writer adds `ts` to an older log when it opens it; a reader that
            # comes first (a CLI command before the server's first start since the
            # upgrade) reads that log as it is, every ts NULL.
            columns = _columns(self._reader())
            if columns and "ts" not in columns:
                self._sql = _reads(False)
            return
        self._write = connect(self.path)
        self._write.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
        self._write.executescript(SCHEMA)
        _add_ts_column(self._write)
        self._commit_lock = threading.Lock()  # a commit, or the checkpoint's last step
        self._head = self._write.execute(HEAD_SQL).fetchone()[0]
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="log-checkpoint",
                                              daemon=True)
        self._checkpointer.start()

    # -- writing (one thread: the committer) --------------------------------

    def append(self, records: Sequence[Record], discards: Sequence[Discard] = (),
               repeats: Sequence[Repeat] = ()) -> list[int]:
        first = self._head + 1
        conn = self._write
        with self._commit_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                for i in range(0, len(records), EVENT_ROWS):
                    chunk = records[i:i + EVENT_ROWS]
                    conn.execute(_events_insert(len(chunk)),
                                 [first + i, *chain.from_iterable(chunk)])
                if discards:
                    conn.executemany(
                        "INSERT INTO discards (received_at, source, message_id, reason, message,"
                        " payload) VALUES (?,?,?,?,?,?)", discards)
                if repeats:
                    conn.executemany(
                        "INSERT INTO repeats VALUES (?1, ?2, 1, ?3, ?3) ON CONFLICT (message_id)"
                        " DO UPDATE SET count = count + 1, last_repeat_at = ?3, position = ?2",
                        repeats)
                conn.execute("COMMIT")
            except sqlite3.Error:
                self._recover_writer()
                raise
        self._head = first + len(records) - 1
        return list(range(first, self._head + 1))

    def _recover_writer(self) -> None:
        """After a failed commit (disk full, I/O error) leave the writer usable for the next try."""
        try:
            self._write.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        if self._write.in_transaction:
            self._write.close()
            self._write = connect(self.path)
        try:  # a commit reported as failed may have landed (an fsync error after the write)
            self._head = self._write.execute(HEAD_SQL).fetchone()[0]
        except sqlite3.Error:
            pass

    def commit(self, consumer: str, position: int) -> None:
        # The calling thread's own connection: consumers never queue behind the ingest writer.
        self._reader().execute("INSERT INTO consumers VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                               " SET position = excluded.position", (consumer, position))

    def probe_write(self, size: int) -> None:
        """Raise sqlite3.Error unless a commit of about `size` bytes fits now (for /ready).

        A small probe would fit in the WAL space a failed commit left behind
        while a real group still would not; so the probe writes that much.
        """
        conn = self._reader()
        conn.execute("CREATE TABLE IF NOT EXISTS ready_probe (blob BLOB)")
        conn.execute("INSERT INTO ready_probe VALUES (zeroblob(?))",
                     (min(max(size, 1 << 20), 4 << 20),))
        conn.execute("DELETE FROM ready_probe")

    # -- reading (any thread) -------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        return self._readers.get()

    def head(self) -> int:
        if self.writable:
            return self._head
        return self._reader().execute(HEAD_SQL).fetchone()[0]

    def read(self, after: int, limit: int = 1000, lean: Sequence[str] = ()) -> list[Entry]:
        """Up to `limit` entries past `after`, in one call into SQLite (see _BATCHED)."""
        params = {"after": after, "limit": limit}
        if lean and self._sql.lean:
            return self._batched(self._sql.lean, READ_WHERE, {**params, "lean": json.dumps(list(lean))})
        return self._batched(self._sql.read, READ_WHERE, params)

    def get(self, positions: Sequence[int]) -> list[Entry]:
        if not positions:
            return []
        return self._batched(self._sql.get, GET_WHERE, {"positions": json.dumps(list(positions))})

    def _batched(self, sql: str, where: str, params: dict) -> list[Entry]:
        conn = self._reader()
        try:
            meta, bodies = conn.execute(sql, params).fetchone()
        except sqlite3.DataError:  # over SQLite's length limit (1 GB): row by row instead
            return [Entry(*row) for row in conn.execute(
                f"SELECT {self._sql.columns} FROM events {where}", params)]
        if bodies is None:
            return []
        rows = _decode_meta(meta)
        if sum(row[-1] for row in rows) != len(bodies):  # cannot happen; never guess
            raise sqlite3.DatabaseError("the log's batched read returned inconsistent lengths")
        entries, offset, last = [], 0, -1
        append = entries.append
        new = tuple.__new__  # Entry(...) would run its Python __new__ for each entry
        for position, message_id, received_at, type_, event, user_id, anonymous_id, source, \
                ts, size in rows:
            if position <= last:  # SQLite feeds the aggregate in the subquery's order
                raise sqlite3.DatabaseError("the log's batched read came out of order")
            end = offset + size
            append(new(Entry, (position, message_id, received_at, type_, event, user_id,
                               anonymous_id, source, bodies[offset:end], ts)))
            offset, last = end, position
        return entries

    def receipts(self, positions: Sequence[int]) -> list[tuple[int, str, int]]:
        """(position, message_id, received_at) at these positions: the dedup check's read."""
        if not positions:
            return []
        cur = self._reader().execute(
            "SELECT position, message_id, received_at FROM events WHERE position IN"
            " (SELECT value FROM json_each(?)) ORDER BY position",
            (msgspec.json.encode(list(positions)),))
        return cur.fetchall()

    def oldest_received_at(self) -> int | None:
        """When the oldest event the log still holds arrived (ms), or None when it holds none."""
        row = self._reader().execute(
            "SELECT received_at FROM events ORDER BY position LIMIT 1").fetchone()
        return None if row is None else row[0]

    def tail_positions(self, message_id: str, after: int) -> list[int]:
        """Positions after `after` holding this messageId (a scan: keep the stretch short)."""
        return [p for (p,) in self._reader().execute(
            "SELECT position FROM events WHERE position > ? AND message_id = ?",
            (after, message_id))]

    def position(self, consumer: str) -> int:
        row = self._reader().execute("SELECT position FROM consumers WHERE name = ?",
                                     (consumer,)).fetchone()
        return row[0] if row else 0

    def query(self, filters: dict, *, before: int | None = None, after: int | None = None,
              limit: int = 100, scan: int = 200_000) -> tuple[list[Entry], int | None, int]:
        """Filtered page of entries, newest first (or oldest first when `after` is given).

        No secondary indexes slow the append path, so a query scans at most
        `scan` positions per call. Returns (entries, cursor, scanned): the
        cursor continues the scan (None when there is nothing further), and
        `scanned` is the last position looked at when reading oldest first,
        from where a follower resumes.
        """
        where, args = [], []
        for name, value in filters.items():
            where.append(FILTERS[name])
            args.append(value)
        head = self.head()  # read first: anything appended during the query comes next time
        # Below the oldest event there is nothing to scan (a retention deleted it).
        (first,) = self._reader().execute("SELECT min(position) FROM events").fetchone()
        bottom = head if first is None else first - 1
        if after is not None:
            after = max(after, bottom)
            lo, hi, order = after, min(after + scan, head) + 1, "ASC"
        else:
            hi = (head + 1) if before is None else before
            lo, order = max(hi - scan, bottom, 0), "DESC"
        where += ["position > ?", "position < ?"]
        args += [lo, hi]
        cur = self._reader().execute(
            f"SELECT {self._sql.columns} FROM events WHERE {' AND '.join(where)}"
            f" ORDER BY position {order} LIMIT ?", (*args, limit))
        entries = [Entry(*row) for row in cur]
        if order == "ASC":
            scanned = entries[-1].position if len(entries) == limit else max(hi - 1, lo)
            return entries, (scanned if scanned < head else None), scanned
        if len(entries) == limit:
            return entries, entries[-1].position, lo
        return entries, (lo + 1 if lo > bottom else None), lo

    # -- the ledger of what was not stored -------------------------------------

    def discards(self, *, message_id: str | None = None, reason: str | None = None,
                 before: int | None = None, limit: int = 100) -> list[tuple]:
        where, args = ["id < ?"], [before if before is not None else 2**62]
        if message_id is not None:
            where.append("message_id = ?")
            args.append(message_id)
        if reason is not None:
            where.append("reason = ?")
            args.append(reason)
        cur = self._reader().execute(
            "SELECT id, received_at, source, message_id, reason, message, payload FROM discards"
            f" WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?", (*args, limit))
        return cur.fetchall()

    def repeat(self, message_id: str) -> tuple | None:
        return self._reader().execute(
            "SELECT position, count, first_repeat_at, last_repeat_at FROM repeats"
            " WHERE message_id = ?", (message_id,)).fetchone()

    # -- housekeeping ---------------------------------------------------------

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database every CHECKPOINT_EVERY_S (see checkpoint_all)."""
        conn = connect(self.path)
        try:
            while not self._closed.wait(CHECKPOINT_EVERY_S):
                try:
                    checkpoint_all(conn, self._commit_lock, UNHELD_PASSES)
                except sqlite3.Error:
                    pass  # disk full or busy: the next round tries again
        finally:
            conn.close()

    def close(self) -> None:
        self._closed.set()
        if self._write is not None:
            self._checkpointer.join(timeout=5)
            try:
                self._write.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._write.close()
        self._readers.close_all()
