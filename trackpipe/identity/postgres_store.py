"""The shared identity store: several trackpipe nodes apply their logs to one PostgreSQL.

No node may trust what it read in an earlier transaction, because another
node may have merged those profiles since. So nothing is cached: every
apply() takes a transaction-scoped advisory lock (one writer at a time for
the whole graph, which keeps merges of profiles that two nodes touch at once
consistent), reads the nodes its batch names, and writes, in one transaction
with its own position (one per `consumer`, i.e. per node and log: open_store
names it after the data dir's node id). Readers use REPEATABLE READ, so a
profile is read from one snapshot. The position's name also names the node's
log in the timeline rows it writes (see sql_store.py), and the store keeps the
privacy deletes each other node is to do on its log (erasures, erasure_logs).

A connection lost while idle (a failover, an idle-session kill) shows when the
next transaction's BEGIN fails, and is replaced then. One lost during a
transaction fails it, and the caller retries it (the consumer takes an
OperationalError for an outage): an apply commits its position with its
changes, so an apply whose COMMIT went through before the loss is not applied
twice.

PostgreSQL text cannot hold a NUL character, so no identifier holding one is
stored (an event naming one is passed over, see delivery/process.py): a
lookup of one answers "not found", as the SQLite store does when it has none.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import psycopg
from psycopg import sql

from trackpipe.dsn import scrub
from trackpipe.errors import ConfigError
from trackpipe.identity import repair
from trackpipe.identity.graph import Graph
from trackpipe.identity.sql_store import Db, SQLStore
from trackpipe.identity.store import Forgotten, ReadLog, new_profile_id
from trackpipe.log.base import Entry

LOCK_KEY = 0x7472_6B69_6400  # "trkid": the graph writer lock
_HEAD = re.compile(r"INSERT INTO (\w+) \(([^)]*)\)")
# Beyond this an indexed value (an identifier, a trait's path, a group id) does not fit
# in a B-tree entry of nodes_by_value, traits_pkey or groups_pkey.
INDEXED_LIMIT = 2700

log = logging.getLogger("trackpipe.identity")

SCHEMA = [
    "CREATE SEQUENCE IF NOT EXISTS node_ids",
    """CREATE TABLE IF NOT EXISTS nodes (id BIGINT PRIMARY KEY, kind TEXT NOT NULL,
        value TEXT NOT NULL, profile TEXT NOT NULL, origin TEXT)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS nodes_by_value ON nodes (value, kind)",
    "CREATE INDEX IF NOT EXISTS nodes_by_profile ON nodes (profile)",
    "CREATE INDEX IF NOT EXISTS nodes_by_origin ON nodes (origin) WHERE origin IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS profiles (id TEXT PRIMARY KEY, head BIGINT NOT NULL,
        nodes INTEGER NOT NULL, users INTEGER NOT NULL, merges INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS edges (id BIGSERIAL PRIMARY KEY, a BIGINT NOT NULL,
        b BIGINT NOT NULL, rule TEXT NOT NULL, state TEXT NOT NULL, refusal TEXT,
        joined INTEGER NOT NULL, from_profile TEXT, to_profile TEXT, position BIGINT NOT NULL,
        message_id TEXT NOT NULL, ts TEXT NOT NULL, unmerged_at BIGINT)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS edges_by_pair ON edges (a, b, rule)",
    "CREATE INDEX IF NOT EXISTS edges_by_b ON edges (b)",
    # `log`: the position name of the node whose log `position` is in; '' in rows written
    # before rows named it (see sql_store.py; _key_timeline_by_log migrates the key).
    """CREATE TABLE IF NOT EXISTS timeline (node BIGINT NOT NULL, ts TEXT COLLATE "C" NOT NULL,
        position BIGINT NOT NULL, log TEXT NOT NULL DEFAULT '', kind TEXT, key TEXT,
        PRIMARY KEY (node, ts, position, log))""",
    """CREATE TABLE IF NOT EXISTS traits (node BIGINT NOT NULL, path TEXT NOT NULL,
        value TEXT NOT NULL, ts TEXT COLLATE "C" NOT NULL, position BIGINT NOT NULL,
        PRIMARY KEY (node, path))""",
    """CREATE TABLE IF NOT EXISTS groups (node BIGINT NOT NULL, group_id TEXT NOT NULL,
        traits TEXT NOT NULL, ts TEXT COLLATE "C" NOT NULL, position BIGINT NOT NULL,
        PRIMARY KEY (node, group_id))""",
    "CREATE TABLE IF NOT EXISTS positions (consumer TEXT PRIMARY KEY, position BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS stats (name TEXT PRIMARY KEY, n BIGINT NOT NULL)",
    # Privacy deletes for the other nodes to carry out on their logs (repair.ask): the
    # person's ids, kept until every node asked has done its part.
    """CREATE TABLE IF NOT EXISTS erasures (id BIGSERIAL PRIMARY KEY, ids TEXT NOT NULL,
        legacy TEXT NOT NULL, created_at BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS erasure_logs (erasure BIGINT NOT NULL, log TEXT NOT NULL,
        positions TEXT NOT NULL, PRIMARY KEY (erasure, log))""",
]
# The timeline's key before rows named their log, and what it becomes.
_KEY = "SELECT conname, conkey FROM pg_constraint WHERE conrelid = 'timeline'::regclass " \
       "AND contype = 'p'"
_LOG_COLUMN = "SELECT attnum FROM pg_attribute WHERE attrelid = 'timeline'::regclass " \
              "AND attname = 'log' AND NOT attisdropped"
# A constant default: PostgreSQL 11+ adds it without rewriting the table.
_ADD_LOG = "ALTER TABLE timeline ADD COLUMN log TEXT NOT NULL DEFAULT ''"
# How long the schema's statements wait for a table lock at start (an ALTER waiting
# behind a long read would queue every later reader of the table behind itself), and
# how many times a start tries again before it fails.
SCHEMA_LOCK_TIMEOUT = "10s"
SCHEMA_TRIES = 30
# Timeline rows of a batch, each claiming the row of no known log ('') that the same
# event made before rows named their log (an upgraded node applying its log again from
# the start: the entry applied is the proof that the row is this log's), else inserted.
_CLAIM = """WITH new (node, ts, position, log, kind, key) AS (
        SELECT * FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::text[],
                             %s::text[], %s::text[])),
    claimed AS (
        UPDATE timeline t SET log = new.log FROM new
        WHERE t.node = new.node AND t.ts = new.ts COLLATE "C" AND t.position = new.position
            AND t.log = '' AND NOT EXISTS (SELECT 1 FROM timeline m WHERE m.node = t.node
                AND m.ts = t.ts AND m.position = t.position AND m.log = new.log)
        RETURNING t.node, t.ts, t.position)
    INSERT INTO timeline (node, ts, position, log, kind, key)
    SELECT * FROM new WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.node = new.node
        AND c.ts = new.ts COLLATE "C" AND c.position = new.position)
    ON CONFLICT DO NOTHING"""


class PostgresDb(Db):
    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self.types: dict[str, dict[str, str]] = {}

    def learn_types(self) -> None:
        for table, column, type_ in self.fetch(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema()"):
            self.types.setdefault(table, {})[column] = type_

    def fetch(self, sql: str, params: Sequence = ()) -> list[tuple]:
        return self.conn.execute(sql.replace("?", "%s"), params).fetchall()

    def run(self, sql: str, params: Sequence = ()) -> None:
        self.conn.execute(sql.replace("?", "%s"), params)

    def many(self, sql: str, rows: Sequence[Sequence]) -> None:
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)

    def insert(self, head: str, rows: Sequence[Sequence], tail: str = "") -> None:
        """One statement whatever the row count: each column goes as one array and is
        unnested by the server (a statement with thousands of placeholders costs more to
        build on the client than to run)."""
        if not rows:
            return
        table, columns = _HEAD.match(head).groups()
        names = [c.strip() for c in columns.split(",")]
        types = self.types[table]
        arrays = ", ".join(f"%s::{types[c]}[]" for c in names)
        self.conn.execute(f"{head} SELECT * FROM unnest({arrays}) {tail}",
                          [list(col) for col in zip(*rows)])

    def fetch_in(self, sql: str, values: Sequence, before: Sequence = ()) -> list[tuple]:
        return self.fetch(sql.replace("IN ({})", "= ANY(?)"), (*before, list(values)))


# A server that stops answering (a network partition, a hung host, a proxy that holds
# the connection) must not hang identity, and the warehouses that wait for it, for good:
# connecting gives up after 10 s, keepalives notice a peer gone quiet, and a transaction
# still running after TRANSACTION_DEADLINE_S has its socket shut from a watchdog thread.
# Each fails as an outage (OperationalError): retried, on a new connection.
CONNECT = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
           "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 30_000}
TRANSACTION_DEADLINE_S = 120.0


class PostgresStore(SQLStore):
    def __init__(self, dsn: str, settings, consumer: str = "identity", schema: str | None = None,
                 adopt: str | None = None):
        """`adopt`: a consumer whose position this one takes over when it has none of its
        own yet (the name every node used before node ids; see store.open_store). The
        position's name `consumer` also names this node's log in timeline rows."""
        super().__init__(settings, consumer, log=consumer)
        self.dsn = dsn
        self.options = f"-c search_path={schema}" if schema else None
        try:
            self.conn = self._connect()
        except psycopg.Error as exc:
            raise ConfigError(f"Cannot connect to the identity store at [identity] postgres_dsn: "
                              f"{scrub(str(exc), dsn)}. Check the host, database and"
                              " credentials.") from None
        self.db = PostgresDb(self.conn)
        for tries_left in range(SCHEMA_TRIES - 1, -1, -1):
            try:
                self._migrate(adopt)
                break
            except psycopg.errors.LockNotAvailable:
                if not tries_left:
                    self.conn.close()
                    raise  # an outage (OperationalError): the start is tried again later
                log.warning("identity: the identity store's tables are locked by another "
                            "session (a long query, a dump?); trying again")
        self.db.learn_types()

    def _migrate(self, adopt: str | None) -> None:
        with self.write_tx(bounded=False):  # rebuilding a large table's key takes a while
            # A lock waited for blocks every later reader of that table behind it: wait
            # a while only, then fail and try again.
            self.conn.execute(f"SET LOCAL lock_timeout = '{SCHEMA_LOCK_TIMEOUT}'")
            for statement in SCHEMA:
                self.conn.execute(statement)
            self._key_timeline_by_log()
            repair.sweep(self.db)  # requests no node waits for any more (README Privacy)
            if adopt is not None and adopt != self.consumer:
                self._adopt(adopt)

    def _connect(self) -> psycopg.Connection:
        if self.options:
            return psycopg.connect(self.dsn, autocommit=True, options=self.options, **CONNECT)
        return psycopg.connect(self.dsn, autocommit=True, **CONNECT)

    def _key_timeline_by_log(self) -> None:
        """Make `log` part of the timeline's key, so that two logs' events of one identifier
        at one timestamp and position are two rows, not one. Once per store: under the
        writer lock (the caller's), so nodes starting at once do it once, and in the
        schema's transaction, so an interrupted one is done again at the next start. It
        builds the key's index again: on a large timeline that takes a while, and every
        node's identity waits for it. Each ALTER only when needed: it locks the table
        against every reader, even when it has nothing to do."""
        if not self.conn.execute(_LOG_COLUMN).fetchall():
            self.conn.execute(_ADD_LOG)
        (log_column,), = self.conn.execute(_LOG_COLUMN).fetchall()
        (name, key), = self.conn.execute(_KEY).fetchall()
        if log_column in key:
            return
        log.warning("identity: adding each timeline row's log to the timeline's key (once; "
                    "every node's identity waits for it)")
        self.conn.execute(sql.SQL("ALTER TABLE timeline DROP CONSTRAINT {}, ADD PRIMARY KEY "
                                  "(node, ts, position, log)").format(sql.Identifier(name)))

    def _adopt(self, old: str) -> None:
        """Rename `old`'s position to ours, unless we have one (under the writer lock, so
        of nodes starting at once only the first takes it)."""
        cur = self.conn.execute(
            "UPDATE positions SET consumer = %s WHERE consumer = %s AND NOT EXISTS "
            "(SELECT 1 FROM positions WHERE consumer = %s) RETURNING position",
            (self.consumer, old, self.consumer))
        taken = cur.fetchone()
        if taken is not None:
            log.info("identity: %s takes over the log position %d kept as %r before node ids",
                     self.consumer, taken[0], old)

    @contextmanager
    def _transaction(self, bounded: bool = True) -> Iterator[None]:
        with ExitStack() as stack:
            expired = threading.Event()
            if bounded:
                stack.enter_context(_deadline(self, TRANSACTION_DEADLINE_S, expired))
            try:
                stack.enter_context(self.conn.transaction())
            except psycopg.OperationalError:
                if not self.conn.broken or expired.is_set():  # refused, closed, or too slow
                    raise
                # Lost while idle, or in an earlier transaction: nothing ran in this one yet,
                # so a new connection starts it again (if the server is down, connect()
                # raises OperationalError, and the caller retries later).
                self.conn = self.db.conn = self._connect()
                log.warning("identity: reconnected to the PostgreSQL identity store")
                stack.enter_context(self.conn.transaction())
            yield

    @contextmanager
    def write_tx(self, bounded: bool = True) -> Iterator[None]:
        with self._transaction(bounded):
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            yield

    @contextmanager
    def read_tx(self) -> Iterator[None]:
        with self._transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield

    def working_graph(self) -> Graph:
        return Graph(self.limits, self._no_ids, new_profile_id)  # never cached: see above

    @staticmethod
    def _no_ids() -> int:
        raise RuntimeError("node ids come from node_ids() inside apply()")

    def node_ids(self, n: int) -> list[int]:
        if not n:
            return []
        rows = self.conn.execute("SELECT nextval('node_ids') FROM generate_series(1, %s)",
                                 (n,)).fetchall()
        return sorted(r[0] for r in rows)

    def apply(self, entries: Sequence[Entry]) -> None:
        try:
            super().apply(entries)
        except (psycopg.DataError, psycopg.errors.ProgramLimitExceeded) as exc:
            # The event's own fault, not the database's (delivery/process.py environmental):
            # said in words, for the log line that names the event passed over.
            where = (f"position {entries[0].position}" if len(entries) == 1 else
                     f"positions {entries[0].position}-{entries[-1].position}")
            raise ValueError(
                f"An event at {where} holds a value the PostgreSQL identity store cannot "
                "keep: a NUL character, or an "
                f"identifier, trait name or group id longer than about {INDEXED_LIMIT} bytes"
                f" ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc

    # -- reads: an identifier holding NUL cannot be stored, so it is not found ------------

    def resolve_many(self, pairs: Sequence[tuple[str | None, str | None]]) -> list[str | None]:
        return super().resolve_many([(None if _nul(u) else u, None if _nul(a) else a)
                                     for u, a in pairs])

    def _named(self, entry: Entry) -> list[tuple[tuple[str, str], ...]]:
        return [keys for keys in super()._named(entry) if not _nul(keys[0][1])]

    def profile(self, ident: str) -> dict | None:
        return None if _nul(ident) else super().profile(ident)

    def timeline(self, ident: str, cursor: str | None = None, limit: int = 100,
                 read: ReadLog | None = None) -> tuple[list[int], str | None]:
        return ([], None) if _nul(ident) else super().timeline(ident, cursor, limit, read)

    def elsewhere(self, ident: str) -> dict[str, int]:
        return {} if _nul(ident) else super().elsewhere(ident)

    def merges(self, ident: str) -> list[dict]:
        return [] if _nul(ident) else super().merges(ident)

    def unmerge(self, profile_id: str, merge_id: str | int) -> list[str]:
        if _nul(profile_id):
            raise LookupError(f"no profile {profile_id!r}")
        return super().unmerge(profile_id, merge_id)

    def forget(self, ident: str, read: ReadLog | None = None) -> Forgotten | None:
        return None if _nul(ident) else super().forget(ident, read)

    def forget_ids(self, pairs: Sequence[tuple[str, str]], read: ReadLog | None = None
                   ) -> list[Forgotten]:
        return super().forget_ids([p for p in pairs if not _nul(p[1])], read)

    def _write_timeline(self, rows: list[tuple]) -> None:
        if rows:
            columns = [list(column) for column in zip(*rows)]
            columns.insert(3, [self.log] * len(rows))  # (node, ts, position, log, kind, key)
            self.conn.execute(_CLAIM, columns)

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def _nul(value) -> bool:
    """Whether `value` holds a NUL, which no text in PostgreSQL holds."""
    return isinstance(value, str) and "\x00" in value


@contextmanager
def _deadline(store: PostgresStore, seconds: float, expired: threading.Event
              ) -> Iterator[None]:
    """Shut the store's socket if the block is still running after `seconds` (see
    TRANSACTION_DEADLINE_S): libpq, blocked in a read or a write, then fails at once."""
    def cut() -> None:
        expired.set()
        try:
            fd = store.conn.pgconn.socket
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            log.error("identity: the PostgreSQL identity store did not answer within %.0f s;"
                      " connecting again", seconds)
        except (OSError, psycopg.Error):
            pass  # closed meanwhile
    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
