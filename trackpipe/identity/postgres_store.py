"""The shared identity store: several trackpipe nodes apply their logs to one PostgreSQL.

No node may trust what it read in an earlier transaction, because another
node may have merged those profiles since. So nothing is cached: every
apply() takes a transaction-scoped advisory lock (one writer at a time for
the whole graph, which keeps merges of profiles that two nodes touch at once
consistent), reads the nodes its batch names, and writes, in one transaction
with its own position (one per `consumer`, i.e. per node and log). Readers
use REPEATABLE READ, so a profile is read from one snapshot.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg

from trackpipe.dsn import scrub
from trackpipe.errors import ConfigError
from trackpipe.identity.graph import Graph
from trackpipe.identity.sql_store import Db, SQLStore
from trackpipe.identity.store import new_profile_id

LOCK_KEY = 0x7472_6B69_6400  # "trkid": the graph writer lock
_HEAD = re.compile(r"INSERT INTO (\w+) \(([^)]*)\)")

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
    """CREATE TABLE IF NOT EXISTS timeline (node BIGINT NOT NULL, ts TEXT COLLATE "C" NOT NULL,
        position BIGINT NOT NULL, kind TEXT, key TEXT, PRIMARY KEY (node, ts, position))""",
    """CREATE TABLE IF NOT EXISTS traits (node BIGINT NOT NULL, path TEXT NOT NULL,
        value TEXT NOT NULL, ts TEXT COLLATE "C" NOT NULL, position BIGINT NOT NULL,
        PRIMARY KEY (node, path))""",
    """CREATE TABLE IF NOT EXISTS groups (node BIGINT NOT NULL, group_id TEXT NOT NULL,
        traits TEXT NOT NULL, ts TEXT COLLATE "C" NOT NULL, position BIGINT NOT NULL,
        PRIMARY KEY (node, group_id))""",
    "CREATE TABLE IF NOT EXISTS positions (consumer TEXT PRIMARY KEY, position BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS stats (name TEXT PRIMARY KEY, n BIGINT NOT NULL)",
]


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


class PostgresStore(SQLStore):
    def __init__(self, dsn: str, settings, consumer: str = "identity", schema: str | None = None):
        super().__init__(settings, consumer)
        options = f"-c search_path={schema}" if schema else None
        try:
            self.conn = psycopg.connect(dsn, autocommit=True, options=options) if options \
                else psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as exc:
            raise ConfigError(f"Cannot connect to the identity store at [identity] postgres_dsn: "
                              f"{scrub(str(exc), dsn)}. Check the host, database and"
                              " credentials.") from None
        self.db = PostgresDb(self.conn)
        with self.write_tx():
            for statement in SCHEMA:
                self.conn.execute(statement)
        self.db.learn_types()

    @contextmanager
    def write_tx(self) -> Iterator[None]:
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            yield

    @contextmanager
    def read_tx(self) -> Iterator[None]:
        with self.conn.transaction():
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

    def close(self) -> None:
        with self.lock:
            self.conn.close()
