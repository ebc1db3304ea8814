"""The embedded identity store: data_dir/identity.db.

identity.db is derived data: it can be rebuilt by replaying the log from
position 0 (all of it, unless a retention has deleted old events), so it runs
with synchronous=NORMAL (WAL). A power cut may lose the last transactions, and
with them the position they moved, so the consumer simply applies those
entries again; the retention makes the file durable before it deletes what
the position has passed (make_durable).

The consumers process is its only writer in normal operation, so it keeps the
graph's working set (identifier -> profile, profile sizes, known edges) in
memory between batches. Another process (the admin API's unmerge, a privacy
delete) may still commit; `PRAGMA data_version` changes when one did, and the
cache is dropped then.

A batch of events of 1000 different people dirties pages all over the
timeline and counts B-trees, so the writer gets a large page cache, and the
WAL is checkpointed by a thread of its own (SQLite releases the GIL while
it copies pages) instead of inside every commit.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from itertools import chain
from pathlib import Path

from trackpipe.identity.graph import Graph
from trackpipe.identity.sql_store import Db, SQLStore
from trackpipe.identity.store import new_profile_id
from trackpipe.log.sqlite import CONSUMER_ROWS, checkpoint_all, durable, insert_many

CHECKPOINT_EVERY_S = 0.5

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    id      INTEGER PRIMARY KEY,
    kind    TEXT NOT NULL,              -- user_id | anonymous_id | a trait name
    value   TEXT NOT NULL,
    profile TEXT NOT NULL,
    origin  TEXT                        -- the profile id this identifier was born with
);
CREATE UNIQUE INDEX IF NOT EXISTS nodes_by_value ON nodes (value, kind);
CREATE INDEX IF NOT EXISTS nodes_by_profile ON nodes (profile);
CREATE INDEX IF NOT EXISTS nodes_by_origin ON nodes (origin) WHERE origin IS NOT NULL;
CREATE TABLE IF NOT EXISTS profiles (
    id     TEXT PRIMARY KEY,
    head   INTEGER NOT NULL,            -- oldest node: its origin is the profile id
    nodes  INTEGER NOT NULL,
    users  INTEGER NOT NULL,
    merges INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS edges (
    id           INTEGER PRIMARY KEY,
    a            INTEGER NOT NULL,
    b            INTEGER NOT NULL,
    rule         TEXT NOT NULL,         -- user_anonymous | alias | trait
    state        TEXT NOT NULL,         -- applied | refused | unmerged
    refusal      TEXT,
    joined       INTEGER NOT NULL,      -- 1 when it joined two existing profiles
    from_profile TEXT,
    to_profile   TEXT,
    position     INTEGER NOT NULL,
    message_id   TEXT NOT NULL,
    ts           TEXT NOT NULL,
    unmerged_at  INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS edges_by_pair ON edges (a, b, rule);
CREATE INDEX IF NOT EXISTS edges_by_b ON edges (b);
CREATE TABLE IF NOT EXISTS timeline (
    node INTEGER NOT NULL, ts TEXT NOT NULL, position INTEGER NOT NULL,
    log TEXT NOT NULL DEFAULT '',       -- whose log `position` is in: '', the data dir's one log
    kind TEXT, key TEXT,                -- what the event counts as: ("event", name) | ("type", page)
    PRIMARY KEY (node, ts, position, log)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS traits (
    node INTEGER NOT NULL, path TEXT NOT NULL, value TEXT NOT NULL, ts TEXT NOT NULL,
    position INTEGER NOT NULL, PRIMARY KEY (node, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups (
    node INTEGER NOT NULL, group_id TEXT NOT NULL, traits TEXT NOT NULL, ts TEXT NOT NULL,
    position INTEGER NOT NULL, PRIMARY KEY (node, group_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS positions (consumer TEXT PRIMARY KEY, position INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS stats (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""


@lru_cache(maxsize=None)
def _timeline_insert(n: int) -> str:
    """INSERT of n timeline rows, (node, ts, position, kind, key) each: parameter 1 is
    their log, and row i's are 5i+2 .. 5i+6 (CONSUMER_ROWS rows at most)."""
    rows = ",".join(f"(?{5 * i + 2},?{5 * i + 3},?{5 * i + 4},?1,?{5 * i + 5},?{5 * i + 6})"
                    for i in range(n))
    return f"INSERT INTO timeline (node, ts, position, log, kind, key) VALUES {rows} " \
           "ON CONFLICT DO NOTHING"


def _add_log_column(conn: sqlite3.Connection) -> None:
    """An identity.db from before timeline rows named their log gets the column, every row
    in the data dir's one log (''). Its key stays (node, ts, position): one log cannot
    hold two events at one position."""
    if "log" not in {row[1] for row in conn.execute("PRAGMA table_info(timeline)")}:
        conn.execute("ALTER TABLE timeline ADD COLUMN log TEXT NOT NULL DEFAULT ''")


class SQLiteDb(Db):
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def fetch(self, sql: str, params: Sequence = ()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence = ()) -> None:
        self.conn.execute(sql, params)

    def many(self, sql: str, rows: Sequence[Sequence]) -> None:
        if rows:
            self.conn.executemany(sql, rows)

    # A batch's writes as a few statements, not one per row (executemany): identity
    # runs beside the destinations' event loop (see log/sqlite.py, MAX_VARIABLES and
    # CONSUMER_ROWS; bench/gil_convoy.py).

    def insert(self, head: str, rows: Sequence[Sequence], tail: str = "") -> None:
        if rows:
            insert_many(self.conn, f"{head} VALUES", len(rows[0]), rows, tail,
                        max_rows=CONSUMER_ROWS)

    def relabel(self, moves: dict[str, str]) -> None:
        if moves:
            self.conn.execute(
                "UPDATE nodes SET profile = m.new FROM (SELECT value ->> 0 AS old,"
                " value ->> 1 AS new FROM json_each(?)) AS m WHERE nodes.profile = m.old",
                (json.dumps(list(moves.items())),))

    def delete_profiles(self, ids: Sequence[str]) -> None:
        if ids:
            self.conn.execute("DELETE FROM profiles WHERE id IN (SELECT value FROM json_each(?))",
                              (json.dumps(list(ids)),))


class SQLiteStore(SQLStore):
    def __init__(self, path: str | Path, settings, consumer: str = "identity"):
        super().__init__(settings, consumer)
        self.path = Path(path)
        self.cache_identifiers = settings.cache_identifiers
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 10000")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")  # rebuildable from the log: see above
        self.db = SQLiteDb(self.conn)
        with self.write_tx():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            _add_log_column(self.conn)
        self._graph: Graph | None = None
        self._version = -1
        self._next_node = 0
        self._closed = threading.Event()
        self._checkpointer: threading.Thread | None = None

    def apply(self, entries) -> None:
        if self._checkpointer is None:
            self._become_writer()
        super().apply(entries)

    def _become_writer(self) -> None:
        self.conn.execute("PRAGMA cache_size = -65536")  # 64 MiB
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, daemon=True,
                                              name="identity-checkpoint")
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            while not self._closed.wait(CHECKPOINT_EVERY_S):
                try:
                    checkpoint_all(conn, self.lock, passes_beside=1)  # the last between applies
                except sqlite3.Error:
                    pass  # busy or disk full: the next round tries again
        finally:
            conn.close()

    @contextmanager
    def write_tx(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextmanager
    def read_tx(self) -> Iterator[None]:
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def working_graph(self) -> Graph:
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        if (self._graph is None or version != self._version
                or len(self._graph.nodes) > self.cache_identifiers):
            # The cache only saves reloading what a batch names; kept for good it held
            # every identifier ever seen (1M new visitors: ~450 MB).
            self._graph = Graph(self.limits, self._new_node_id, new_profile_id)
            self._next_node = self.conn.execute("SELECT coalesce(max(id), 0) FROM nodes"
                                                ).fetchone()[0]
            self._version = version
        return self._graph

    def _new_node_id(self) -> int:
        self._next_node += 1
        return self._next_node

    def node_ids(self, n: int) -> list[int]:
        first = self._next_node + 1
        self._next_node += n
        return list(range(first, first + n))

    def forget_cache(self) -> None:
        self._graph = None

    def _write_timeline(self, rows: list[tuple]) -> None:
        """A row per event: this store's one log is bound once per statement, not per row."""
        for i in range(0, len(rows), CONSUMER_ROWS):
            chunk = rows[i:i + CONSUMER_ROWS]
            self.conn.execute(_timeline_insert(len(chunk)), [self.log, *chain.from_iterable(chunk)])

    def forget(self, ident: str, read=None):
        with self.lock:
            self.conn.execute("PRAGMA secure_delete = ON")  # the person's ids must not linger
            try:
                gone = super().forget(ident, read)
            finally:
                self.conn.execute("PRAGMA secure_delete = OFF")
            if gone is not None:
                self._checkpoint()
            return gone

    def forget_ids(self, pairs, read=None):
        with self.lock:
            self.conn.execute("PRAGMA secure_delete = ON")
            try:
                gone = super().forget_ids(pairs, read)
            finally:
                self.conn.execute("PRAGMA secure_delete = OFF")
            if gone:
                self._checkpoint()
            return gone

    def _checkpoint(self) -> None:
        """Push the deletes from the WAL into the main file and empty the WAL."""
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError:
            pass  # a reader holds the WAL: the next checkpoint does it

    def make_durable(self) -> None:
        durable(self.path)  # synchronous=NORMAL leaves the newest commits to the next checkpoint

    def close(self) -> None:
        self._closed.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=10)
        with self.lock:
            self.conn.close()
