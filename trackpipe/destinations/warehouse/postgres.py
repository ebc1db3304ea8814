"""The `postgres` destination: Segment's warehouse layout in a PostgreSQL schema.

Each batch is one transaction: schema changes, then per table a COPY into a
temporary staging table and `INSERT ... SELECT ... ON CONFLICT (id) DO NOTHING`,
then the identities, rejected values and schema-change records. The connection
is kept between batches and the known schema is cached, so a batch is planned without
a catalog query. The staging tables are kept too (emptied at each commit) while their
table's columns stay the same: creating them costs catalog writes that, per batch,
weighed as much as a tenth of the load.

The cache may be stale, though: another writer on the schema (a second destination, a
second node) widens a column, or a person alters one by hand. Binary COPY sends each
value in the binary format of the type trackpipe believes the column has, and the
server takes it on trust: a boolean written into what is now a text column is stored
as the character 0x01, a bigint into numeric as 0.00. So each load first locks the
tables it writes and reads their column types, in one round trip (`_lock_columns`):
a column whose type differs from the cached one makes the batch be planned again
with the types read (`StaleSchema`, common.py), before anything is written; a column
of a type trackpipe does not make (numeric(12,2), varchar(20), timestamp without
time zone...) gets its values as text, cast by the database, and a value the cast
refuses goes to rejected_values (`_load_cast`).

Classification (by SQLSTATE class): 08 connection, 40 serialization/deadlock,
53 insufficient resources, 57 operator intervention (admin shutdown), 58 system
I/O -> retry; a table or column that vanished or appeared under us (42P01, 42703,
42P07) -> retry with the schema re-read; anything else, such as 42501 permission
denied -> failed for good. A failure of class 22 (data exception), 23 (integrity)
or 54 (a row wider than a page) may be one event's doing: the batch is then loaded
in halves so only the events at fault fail. So may 42701 (duplicate column), which
no race causes (columns are added IF NOT EXISTS): it means a column name the
database refuses, such as a system column's (layout.py prefixes those), and a retry
would meet it again, forever.
"""

from __future__ import annotations

import hashlib

import psycopg
import msgspec
from psycopg import sql

from trackpipe.destinations.base import DestinationError, Outcome, fail, retry
from trackpipe.destinations.warehouse.common import StaleSchema, Warehouse
from trackpipe.destinations.warehouse.layout import META_TABLES, key_ids, row_id
from trackpipe.destinations.warehouse.plan import (
    MAX_COLUMNS, MAX_TABLES, TABLE, Plan, RejectedValue, Schema, TableLoad, check_max_columns,
    check_max_tables, rejected_rows)
from trackpipe.destinations.warehouse.schema import BIGINT, BOOLEAN, DOUBLE, TEXT, TIMESTAMP, quote
from trackpipe.destinations.warehouse.sql import (
    POSTGRES, create_meta, delete_person, insert_from, qualified)
from trackpipe.dsn import check as check_dsn, scrub

RETRY_CLASSES = ("08", "40", "53", "57", "58")
POSTGRES_COLUMN_LIMIT = 1600
DATA_CLASSES = ("22", "23", "54")  # data exception, integrity, limit exceeded (row too big)
REFUSED_NAMES = ("42701",)  # a column name the database will not take, now or on a retry
SCHEMA_MOVED = ("42P01", "42703", "42P07")
CONNECT_TIMEOUT = 10
IDENTITY_COLUMNS = [("identifier_type", TEXT), ("identifier", TEXT), ("profile_id", TEXT),
                    ("updated_at", TIMESTAMP)]
REJECTED_COLUMNS = [("table_name", TEXT), ("column_name", TEXT), ("message_id", TEXT),
                    ("value", TEXT), ("reason", TEXT), ("rejected_at", TIMESTAMP)]
COPY_TYPES = {BOOLEAN: "bool", BIGINT: "int8", DOUBLE: "float8", TIMESTAMP: "timestamptz",
              TEXT: "text"}
# The column SQL types of the tables (and views) of one schema, in format_type's
# spelling: numeric(12,2), timestamp(3) with time zone, a domain's own name. The cached
# schema and the types read under the load's locks both come from it, so that a type
# one read spells otherwise (information_schema calls a domain by its base type, and
# drops the precision) never looks changed at every attempt.
COLUMN_TYPES = ("SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod)"
                " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = {schema} AND c.relkind IN ('r', 'p', 'v', 'f')"
                " AND a.attnum > 0 AND NOT a.attisdropped")
# Whether a text goes into a column of a SQL type as an INSERT would put it there: a
# value the type refuses goes to rejected_values instead of failing its event. A
# PL/pgSQL assignment has an INSERT's rules (CAST has not: it cuts a text to
# varchar(20) silently). (PostgreSQL 16 has pg_input_is_valid; a temporary function
# works on every version and needs no privilege.)
FITS = """CREATE OR REPLACE FUNCTION {name}(value text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    DECLARE
        assigned {sql_type} := value;
    BEGIN
        RETURN true;
    END;
EXCEPTION WHEN data_exception OR integrity_constraint_violation THEN
    RETURN false;
END $$"""


class PostgresWarehouse(Warehouse):
    kind = "postgres"
    dialect = POSTGRES
    db_errors = (psycopg.Error,)
    secret_fields = ("dsn",)

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        dsn: str
        """libpq connection string or URL, e.g. "postgresql://trackpipe@db/analytics"."""
        schema: str = "trackpipe"
        """Schema holding the tables; created when missing."""
        max_columns: int = MAX_COLUMNS
        """Columns a table may grow to (PostgreSQL allows 1,600); past it, values for new
        columns go to rejected_values."""
        max_tables: int = MAX_TABLES
        """Tables of track events' own rows the warehouse may hold; past it, a new
        event's row loads into tracks only and the rest of it goes to rejected_values."""

        def __post_init__(self):
            check_dsn(self.dsn, "dsn")
            if not self.schema.strip():
                raise ValueError("schema must not be empty; the default is \"trackpipe\"")
            check_max_columns(self.max_columns, POSTGRES_COLUMN_LIMIT)
            check_max_tables(self.max_tables)

    def __init__(self, name, settings):
        super().__init__(name, settings)
        self._conn: psycopg.AsyncConnection | None = None
        # staging table key -> its columns, for the staging tables of this connection
        self._stages: dict[str, tuple] = {}

    # -- connection and schema ---------------------------------------------------------

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.settings.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                application_name=f"trackpipe {self.name}")
            self._stages.clear()
        return self._conn

    async def _read_schema(self) -> Schema:
        conn = await self._connection()
        name = self.settings.schema
        await self._ensure_schema(conn)
        cur = await conn.execute(sql.SQL(COLUMN_TYPES + " ORDER BY c.relname, a.attnum").format(
            schema=sql.Literal(name)))
        schema: Schema = {}
        for table, column, sql_type in await cur.fetchall():
            schema.setdefault(table, {})[column] = self.dialect.logical(sql_type)
        for meta in META_TABLES:
            if schema.pop(meta, None) is None:
                await conn.execute(create_meta(self.dialect, name, meta))
        return schema

    async def _ensure_schema(self, conn: psycopg.AsyncConnection) -> None:
        # Look first: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when
        # the schema exists, which a least-privilege role does not have.
        name = self.settings.schema
        found = await (await conn.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,))).fetchone()
        if not found:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(name)}")

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        self._stages.clear()

    # -- loading ------------------------------------------------------------------------

    async def _apply(self, todo: Plan) -> None:
        conn = await self._connection()
        try:
            async with conn.transaction(), conn.cursor() as cur:
                found = await self._lock_columns(cur, todo)
                stale = self._stale(todo, found)
                if stale:
                    raise StaleSchema(stale)
                for change in todo.changes:
                    for statement, params in self._ddl(self.settings.schema, change,
                                                       todo.loaded_at):
                        await cur.execute(statement, params or None)
                refused: list[RejectedValue] = []  # values cast by the database, refused
                for load in todo.loads:
                    casts = self._casts(todo, load, found)
                    if casts:
                        refused += await self._load_cast(cur, load, casts)
                    else:
                        await self._load(cur, load, list(todo.schema[load.table].items()))
                await self._meta(cur, todo, refused)
        except psycopg.Error as exc:
            if self._refused_data(exc) and not conn.closed:
                self._stages.clear()  # rolled back, staging tables made in it with it
            else:
                await self.close()  # a fresh connection next time: no half-state survives
            raise
        except BaseException:
            self._stages.clear()  # rolled back: staging tables made or dropped are unknown
            raise

    async def _lock_columns(self, cur, todo: Plan) -> dict[str, dict[str, str]]:
        """Lock the tables the plan writes, so that no one alters them before we commit,
        then read their columns: table -> column -> SQL type. One round trip. Tables the
        plan creates are not locked (they should not exist); the others in name order
        (no deadlock between two trackpipes), those it alters as ALTER TABLE would."""
        created = {c.table for c in todo.changes if c.new_type == TABLE}
        altered = {c.table for c in todo.changes} - created
        tables = sorted({load.table for load in todo.loads} | altered)
        statements = [sql.SQL("LOCK TABLE {} IN {} MODE").format(
            sql.Identifier(self.settings.schema, t),
            sql.SQL("ACCESS EXCLUSIVE" if t in altered else "ROW EXCLUSIVE"))
            for t in tables if t not in created]
        statements.append(sql.SQL(COLUMN_TYPES + " AND c.relname = ANY({tables})").format(
            schema=sql.Literal(self.settings.schema), tables=sql.Literal(tables)))
        # no parameters, so one message of several statements; each sees what the locks
        # before it waited for
        await cur.execute(sql.SQL("; ").join(statements), prepare=False)
        while cur.description is None:
            cur.nextset()
        found: dict[str, dict[str, str]] = {}
        for table, column, sql_type in await cur.fetchall():
            found.setdefault(table, {})[column] = sql_type
        return found

    def _stale(self, todo: Plan, found: dict[str, dict[str, str]]) -> str | None:
        """How the tables differ from the schema `todo` was planned against, for the
        columns it writes or changes; None when they do not. (A property's column that
        is gone is added back by the new plan; a fixed column stays missing, and its
        load fails with 42703, retried, as a table gone does with 42P01.)"""
        created = {c.table for c in todo.changes if c.new_type == TABLE}
        before = {(c.table, c.column): c.old_type
                  for c in todo.changes if c.table not in created}
        written = [(load.table, column) for load in todo.loads for column, _ in load.columns]
        for table, column in [*before, *written]:
            if table in created:
                if table in found:
                    return f"table {table} exists already"
                continue
            sql_type = found.get(table, {}).get(column)
            planned = before.get((table, column), todo.schema[table].get(column))
            if sql_type is None and planned is not None:
                return f"column {table}.{column} is gone"
            if sql_type is not None and planned is None:
                return f"column {table}.{column} exists already, as {sql_type}"
            if sql_type is not None and self.dialect.logical(sql_type) != planned:
                return (f"column {table}.{column} is {sql_type}, not"
                        f" {self.dialect.sql_type(planned)}")
        return None

    def _casts(self, todo: Plan, load: TableLoad, found: dict[str, dict[str, str]]
               ) -> dict[str, str]:
        """The load's columns whose SQL type is not the one their values are written in
        (a type trackpipe does not make, set by hand): column -> that type."""
        types = found.get(load.table, {})
        ours = {c.column for c in todo.changes if c.table == load.table}
        if None in ours:  # the plan created the table: every column is trackpipe's
            return {}
        return {column: types[column] for column, logical in load.columns
                if column not in ours and column in types
                and types[column] != self.dialect.sql_type(logical)}

    async def _load_cast(self, cur, load: TableLoad, casts: dict[str, str]
                         ) -> list[RejectedValue]:
        """Stage the rows in trackpipe's types, then insert them with each of `casts`
        cast from text by the database. A value its column's type refuses is inserted
        as NULL; it is returned, for rejected_values, where it shares the row of the
        values the plan rejected for the same column of the message (_meta)."""
        stage = await self._stage(cur, load.table + " (cast)", load.columns, load.columns,
                                  load.rows)
        exprs, refused = {}, []
        reason = "the column's type is {}, set outside trackpipe, and this value does not" \
                 " convert to it"
        if load.table == "users":
            reason += " (message_id is the users row's id, its userId)"
        logical = dict(load.columns)
        for column, sql_type in casts.items():
            fits = await self._fits(cur, sql_type)
            # as trackpipe writes it as text: a date-time in UTC (CAST would write it in
            # the session's time zone, the server's setting, dropped by a timestamp column)
            text = self.dialect.widen_using(column, logical[column], TEXT)
            exprs[column] = f"CASE WHEN {fits}({text}) THEN CAST({text} AS {sql_type}) END"
            await cur.execute(f'SELECT "id", {text} FROM {stage}'
                              f" WHERE {quote(column)} IS NOT NULL AND NOT {fits}({text})")
            refused += [RejectedValue(load.table, column, row_id, value,
                                      reason.format(sql_type))
                        for row_id, value in await cur.fetchall()]
        names = [c for c, _ in load.columns]
        await cur.execute(insert_from(self.settings.schema, load.table, stage, names,
                                      load.upsert, exprs))
        return refused

    async def _fits(self, cur, sql_type: str) -> str:
        """The name of a temporary function telling whether a text goes into a column of
        `sql_type` (FITS), made for this transaction's connection."""
        name = "pg_temp.trackpipe_fits_" + hashlib.sha1(sql_type.encode()).hexdigest()[:16]
        await cur.execute(FITS.format(name=name, sql_type=sql_type))
        return name

    async def _load(self, cur, load: TableLoad, table_columns: list[tuple[str, str]]) -> None:
        if not load.upsert and await self._copy_new(cur, load):
            return
        stage = await self._stage(cur, load.table, table_columns, load.columns, load.rows)
        names = [c for c, _ in load.columns]
        await cur.execute(insert_from(self.settings.schema, load.table, stage, names, load.upsert))

    async def _copy_new(self, cur, load: TableLoad) -> bool:
        """COPY the rows straight into their table, in a savepoint; False, with nothing
        written, when an id is there already (a replay, a retry), which the staging
        table and ON CONFLICT then sort out. About twice as cheap for the server in the
        common case, where every id is new."""
        try:
            async with cur.connection.transaction():
                await self._copy(cur, qualified(self.settings.schema, load.table),
                                 load.columns, load.rows)
        except psycopg.errors.UniqueViolation:
            return False
        return True

    async def _stage(self, cur, key: str, stage_columns: list[tuple[str, str]],
                     columns: list[tuple[str, str]], rows) -> str:
        """A temporary table named for `key` holding `rows` (in `columns`, a subset of
        `stage_columns`)."""
        # In pg_temp by name: an unqualified DROP of one this session has not made yet went
        # down the search path and dropped a table of that name in the user's schema.
        stage = "pg_temp._trackpipe_stage_" + hashlib.sha1(key.encode()).hexdigest()[:16]
        if self._stages.get(key) != tuple(stage_columns):
            cols = ", ".join(f"{quote(c)} {self.dialect.sql_type(t)}" for c, t in stage_columns)
            await cur.execute(f"DROP TABLE IF EXISTS {stage}")
            await cur.execute(f"CREATE TEMP TABLE {stage} ({cols}) ON COMMIT DELETE ROWS")
            self._stages[key] = tuple(stage_columns)
        await self._copy(cur, stage, columns, rows)
        return stage

    async def _copy(self, cur, table: str, columns: list[tuple[str, str]], rows) -> None:
        """Binary COPY (about 5x text COPY) of `rows` into `columns` of `table`."""
        names = ", ".join(quote(c) for c, _ in columns)
        async with cur.copy(f"COPY {table} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([COPY_TYPES[t] for _, t in columns])
            for row in rows:
                await copy.write_row(row)

    async def _meta(self, cur, todo: Plan, refused: list[RejectedValue]) -> None:
        """Identities, rejected values (a value the database refused first: it is the
        one loaded, the first the message had for its column) and schema changes."""
        s, at = self.settings.schema, todo.loaded_at
        if todo.identities:
            stage = await self._stage(cur, "identities (meta)", IDENTITY_COLUMNS,
                                      IDENTITY_COLUMNS, [(*i, at) for i in todo.identities])
            await cur.execute(
                f"INSERT INTO {qualified(s, 'identities')} SELECT * FROM {stage}"
                " ON CONFLICT (identifier_type, identifier) DO UPDATE"
                " SET profile_id = EXCLUDED.profile_id, updated_at = EXCLUDED.updated_at"
                # unchanged mappings are not rewritten: cheaper, and updated_at stays the
                # time the identifier was last assigned to a (new) person
                " WHERE identities.profile_id IS DISTINCT FROM EXCLUDED.profile_id")
        if todo.rejected or refused:
            rows = [(*r, at) for r in rejected_rows([*refused, *todo.rejected])]
            stage = await self._stage(cur, "rejected_values (meta)", REJECTED_COLUMNS,
                                      REJECTED_COLUMNS, rows)
            await cur.execute(f"INSERT INTO {qualified(s, 'rejected_values')}"
                              f" SELECT * FROM {stage} ON CONFLICT DO NOTHING")
        if todo.changes:
            async with cur.copy(f"COPY {qualified(s, 'schema_changes')} FROM STDIN") as copy:
                for change in todo.changes:
                    await copy.write_row(self.change_row(change, at))

    def _classify(self, exc: Exception) -> Outcome:
        state = getattr(exc, "sqlstate", None)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        text = scrub(text, self.settings.dsn)
        if state is None:  # no answer from the server: connection refused, dropped, timed out
            if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
                return retry(None, f"PostgreSQL unreachable: {text}")
            return fail(None, f"PostgreSQL client error: {text}")
        detail = f"PostgreSQL {state}: {text}"
        if state == "42501":
            detail += (f"; grant the role USAGE and CREATE on schema {self.settings.schema!r}"
                       " (and ownership of its tables) or use a role that has them")
        if state[:2] in RETRY_CLASSES or state in SCHEMA_MOVED:
            return retry(None, detail)
        return fail(None, detail)

    def _refused_data(self, exc: Exception) -> bool:
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in DATA_CLASSES or state in REFUSED_NAMES

    # -- health check and privacy deletes -----------------------------------------------

    async def check(self) -> str:
        try:
            async with await psycopg.AsyncConnection.connect(
                    self.settings.dsn, connect_timeout=CONNECT_TIMEOUT) as conn:
                await self._probe(conn)
                info = conn.info
                return (f"connected to {info.host}:{info.port}/{info.dbname} as {info.user};"
                        f" can create and alter tables in schema {self.settings.schema!r}")
        except psycopg.Error as exc:
            raise DestinationError(f"PostgreSQL destination {self.name!r}: "
                                   f"{self._classify(exc).detail}. Check the dsn setting and"
                                   " that the role may create tables in the schema.") from None

    async def _probe(self, conn: psycopg.AsyncConnection) -> None:
        """Create the schema if needed, then create and alter a table and roll it back."""
        s = quote(self.settings.schema)
        await self._ensure_schema(conn)
        await conn.commit()
        await conn.execute(f"CREATE TABLE {s}._trackpipe_check (id text)")
        await conn.execute(f"ALTER TABLE {s}._trackpipe_check ADD COLUMN probe bigint")
        await conn.rollback()

    async def delete_user(self, user_ids, anonymous_ids, traits=()) -> Outcome:
        users, anons = [str(u) for u in user_ids], [str(a) for a in anonymous_ids]
        async with self._lock:
            try:
                tables = list(await self._known_schema())
                deleted = await self._delete(tables, users, anons, traits)
            except psycopg.Error as exc:
                await self.close()
                return self._classify(exc)
            finally:
                self.forget()
        return Outcome("delivered", None, f"deleted {deleted} rows")

    async def _lock_for_delete(self, cur, tables) -> None:
        """Lock the tables a delete writes first, in the order a load locks them
        (_lock_columns): deleting table by table in another order, a delete held one
        that a load altering two tables waited for, while it waited for the other."""
        if not tables:
            return
        await cur.execute(sql.SQL("; ").join(
            sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(
                sql.Identifier(self.settings.schema, t)) for t in sorted(tables)),
            prepare=False)

    async def _delete(self, tables, users: list[str], anons: list[str],
                      traits: list[tuple[str, str]]) -> int:
        conn, s, ids, count = await self._connection(), self.settings.schema, [], 0
        # `users` and `identities` key a long id, or one holding a NUL, by its stand-in.
        # PostgreSQL takes no NUL, and no row holds an id with one (an event row, NULL).
        user_keys, anon_keys = _without_nul(key_ids(users)), _without_nul(key_ids(anons))
        users, anons = _without_nul(users), _without_nul(anons)
        async with conn.transaction(), conn.cursor() as cur:
            await self._lock_for_delete(cur, tables)
            for table in (t for t in tables if t != "users"):
                await cur.execute(delete_person(s, table, "%s::text[]", "%s::text[]"),
                                  (users, anons) * (2 if table == "aliases" else 1))
                ids += [r[0] for r in await cur.fetchall()]
            count += await self._delete_traits(cur, traits)
            statements = [
                (f"DELETE FROM {qualified(s, 'identities')} WHERE (identifier_type = 'user_id'"
                 " AND identifier = ANY(%s)) OR (identifier_type = 'anonymous_id'"
                 " AND identifier = ANY(%s))", (user_keys, anon_keys)),
                (f"DELETE FROM {qualified(s, 'rejected_values')} WHERE message_id = ANY(%s)"
                 " OR (table_name = 'users' AND message_id = ANY(%s))"
                 " OR (table_name = 'identities' AND (column_name = 'user_id'"
                 " AND message_id = ANY(%s) OR column_name = 'anonymous_id'"
                 " AND message_id = ANY(%s)))", (ids, user_keys, user_keys, anon_keys))]
            if "users" in tables:
                statements.append((f"DELETE FROM {qualified(s, 'users')} WHERE id = ANY(%s)",
                                   (user_keys,)))
            for statement, params in statements:
                await cur.execute(statement, params)
                count += cur.rowcount
        return count + len(ids)


    async def _delete_traits(self, cur, traits: list[tuple[str, str]]) -> int:
        """The rows of the person's trait identifiers (emails, as identity forgot them),
        found by value: the profile id a row was loaded with may be gone (merged away) or
        another person's (an unmerge). One kept whole under its stand-in leaves
        rejected_values too. (A stand-in holds no NUL; no row has a trait name with one.)"""
        traits = [(kind, value) for kind, value in traits if "\x00" not in kind]
        if not traits:
            return 0
        s, pairs = self.settings.schema, "(SELECT * FROM unnest(%s::text[], %s::text[]))"
        keys = ([kind for kind, _ in traits], [row_id(value) for _, value in traits])
        await cur.execute(f"DELETE FROM {qualified(s, 'identities')} WHERE"
                          f" (identifier_type, identifier) IN {pairs}", keys)
        count = cur.rowcount
        await cur.execute(f"DELETE FROM {qualified(s, 'rejected_values')} WHERE table_name ="
                          f" 'identities' AND (column_name, message_id) IN {pairs}", keys)
        return count


def _without_nul(ids: list[str]) -> list[str]:
    return [i for i in ids if "\x00" not in i]
