"""The `duckdb` destination: Segment's warehouse layout in one embedded DuckDB file.

Same layout and type policy as `postgres`. DuckDB lets one process hold a file
read-write and nobody else read it meanwhile, and the point of this destination
is that people query the file themselves (duckdb CLI, Python). So the file is
opened for each batch and closed right after; while someone else holds it the
load waits briefly (LOCK_WAIT_SECONDS) and then reports a retry, so readers get in
between loads. Keep reading sessions short, or open a copy of the file.

Rows go in column-wise: one `INSERT ... SELECT unnest($1::T[]), ...` per table,
`ON CONFLICT (id) DO NOTHING`, in one transaction per batch. DuckDB calls block,
so they run in a thread (asyncio.to_thread).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

import duckdb
import msgspec

from trackpipe.destinations.base import DestinationError, Outcome, fail, retry
from trackpipe.destinations.warehouse.common import Warehouse
from trackpipe.destinations.warehouse.layout import META_TABLES, key_ids, row_id
from trackpipe.destinations.warehouse.plan import (
    MAX_COLUMNS, MAX_TABLES, Plan, Schema, TableLoad, check_max_columns, check_max_tables,
    rejected_rows)
from trackpipe.destinations.warehouse.schema import quote
from trackpipe.destinations.warehouse.sql import (
    DUCKDB, create_meta, delete_person, insert_from, qualified)

SCHEMA = "main"
LOCK_WAIT_SECONDS = 3.0


class DuckDBWarehouse(Warehouse):
    kind = "duckdb"
    dialect = DUCKDB
    db_errors = (duckdb.Error,)

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        path: str
        """The DuckDB database file, e.g. "/var/lib/trackpipe/analytics.duckdb";
        created (with its directory) when missing."""
        max_columns: int = MAX_COLUMNS
        """Columns a table may grow to; past it, values for new columns go to
        rejected_values."""
        max_tables: int = MAX_TABLES
        """Tables of track events' own rows the warehouse may hold; past it, a new
        event's row loads into tracks only and the rest of it goes to rejected_values."""

        def __post_init__(self):
            if not self.path.strip() or self.path.strip() == ":memory:":
                raise ValueError("path must name a database file, e.g. \"analytics.duckdb\"")
            check_max_columns(self.max_columns)
            check_max_tables(self.max_tables)

    # -- the file, open only while a batch loads ----------------------------------------

    def _with_db(self, work: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        con = self._open()
        try:
            return work(con)
        finally:
            con.close()

    def _open(self) -> duckdb.DuckDBPyConnection:
        path = Path(self.settings.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline, pause = time.monotonic() + LOCK_WAIT_SECONDS, 0.02
        while True:
            try:
                return duckdb.connect(str(path))
            except duckdb.IOException as exc:
                if not _locked(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def _read_schema(self) -> Schema:
        return await asyncio.to_thread(self._with_db, self._read_schema_sync)

    def _read_schema_sync(self, con) -> Schema:
        schema: Schema = {}
        rows = con.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = ? ORDER BY table_name, ordinal_position", [SCHEMA]).fetchall()
        for table, column, sql_type in rows:
            schema.setdefault(table, {})[column] = self.dialect.logical(sql_type)
        for meta in META_TABLES:
            if schema.pop(meta, None) is None:
                con.execute(create_meta(self.dialect, SCHEMA, meta))
        return schema

    # -- loading --------------------------------------------------------------------------

    async def _apply(self, todo: Plan) -> None:
        await asyncio.to_thread(self._with_db,
                                lambda con: _transaction(con, self._apply_sync, todo))

    def _apply_sync(self, con, todo: Plan) -> None:
        for change in todo.changes:
            for sql, params in self._ddl(SCHEMA, change, todo.loaded_at):
                con.execute(sql, params or None)
        for load in todo.loads:
            self._insert(con, load)
        at = todo.loaded_at
        if todo.identities:
            self._insert_rows(con, "identities", IDENTITY_COLUMNS,
                              [(*i, at) for i in todo.identities],
                              " ON CONFLICT (identifier_type, identifier) DO UPDATE"
                              " SET profile_id = EXCLUDED.profile_id,"
                              " updated_at = EXCLUDED.updated_at"
                              " WHERE t.profile_id IS DISTINCT FROM EXCLUDED.profile_id")
        if todo.rejected:
            self._insert_rows(con, "rejected_values", REJECTED_COLUMNS,
                              [(*r, at) for r in rejected_rows(todo.rejected)],
                              " ON CONFLICT DO NOTHING")
        if todo.changes:
            self._insert_rows(con, "schema_changes", CHANGE_COLUMNS,
                              [self.change_row(c, at) for c in todo.changes], "")

    def _insert(self, con, load: TableLoad) -> None:
        names = [c for c, _ in load.columns]
        sql = insert_from(SCHEMA, load.table, self._unnest(load.columns), names, load.upsert)
        con.execute(sql, [list(col) for col in zip(*load.rows)])

    def _insert_rows(self, con, table: str, columns, rows, conflict: str) -> None:
        source = self._unnest(columns)
        con.execute(f"INSERT INTO {qualified(SCHEMA, table)} AS t SELECT * FROM {source}{conflict}",
                    [list(col) for col in zip(*rows)])

    def _unnest(self, columns) -> str:
        """A subquery turning one list parameter per column back into rows."""
        cols = ", ".join(f"unnest(${n}::{self.dialect.sql_type(t)}[]) AS {quote(c)}"
                         for n, (c, t) in enumerate(columns, 1))
        return f"(SELECT {cols})"

    def _classify(self, exc: Exception) -> Outcome:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = f"DuckDB {type(exc).__name__}: {text}"
        if isinstance(exc, duckdb.IOException):
            if _locked(exc):
                return retry(None, detail + "; another process holds the file, so this load"
                             " waits for it to close (keep reading sessions short)")
            if "not a valid DuckDB database" in text or "Permission denied" in text:
                return fail(None, detail + f"; check the path setting ({self.settings.path})")
            return retry(None, detail)  # disk full, I/O hiccup: worth another attempt
        if isinstance(exc, duckdb.CatalogException):
            return retry(None, detail + "; the tables changed under trackpipe, re-reading them")
        return fail(None, detail)

    def _refused_data(self, exc: Exception) -> bool:
        return isinstance(exc, (duckdb.ConversionException, duckdb.ConstraintException,
                                duckdb.OutOfRangeException, duckdb.InvalidInputException))

    # -- health check and privacy deletes -----------------------------------------------

    async def check(self) -> str:
        try:
            await asyncio.to_thread(self._with_db, _probe)
        except (duckdb.Error, OSError) as exc:
            raise DestinationError(
                f"DuckDB destination {self.name!r}: cannot create and alter tables in"
                f" {self.settings.path}: {exc}. Check the path setting and that no other"
                " process keeps the file open.") from None
        return f"opened {self.settings.path}; can create and alter tables"

    async def delete_user(self, user_ids, anonymous_ids, traits=()) -> Outcome:
        users, anons = [str(u) for u in user_ids], [str(a) for a in anonymous_ids]
        async with self._lock:
            try:
                tables = list(await self._known_schema())
                deleted = await asyncio.to_thread(
                    self._with_db, lambda con: _transaction(con, _delete, tables, users, anons,
                                                            traits))
            except duckdb.Error as exc:
                return self._classify(exc)
            finally:
                self.forget()
        return Outcome("delivered", None, f"deleted {deleted} rows")


IDENTITY_COLUMNS = [("identifier_type", "text"), ("identifier", "text"), ("profile_id", "text"),
                    ("updated_at", "timestamp")]
REJECTED_COLUMNS = [("table_name", "text"), ("column_name", "text"), ("message_id", "text"),
                    ("value", "text"), ("reason", "text"), ("rejected_at", "timestamp")]
CHANGE_COLUMNS = [("at", "timestamp"), ("table_name", "text"), ("column_name", "text"),
                  ("old_type", "text"), ("new_type", "text"), ("message_id", "text")]


def _locked(exc: Exception) -> bool:
    return "Could not set lock" in str(exc)


def _transaction(con, work, *args) -> Any:
    con.execute("BEGIN TRANSACTION")
    try:
        result = work(con, *args)
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
    return result


def _probe(con) -> None:
    con.execute("BEGIN TRANSACTION")
    con.execute("CREATE TABLE _trackpipe_check (id VARCHAR)")
    con.execute("ALTER TABLE _trackpipe_check ADD COLUMN probe BIGINT")
    con.execute("ROLLBACK")


def _delete(con, tables: list[str], users: list[str], anons: list[str],
            traits: list[tuple[str, str]]) -> int:
    ids: list[str] = []
    for table in (t for t in tables if t != "users"):
        sql = delete_person(SCHEMA, table, "$1::VARCHAR[]", "$2::VARCHAR[]")
        ids += [r[0] for r in con.execute(sql, [users, anons]).fetchall()]
    count = len(ids)
    # users and identities are keyed by an id's stand-in when it cannot be a key itself;
    # so is the rejected_values row that keeps such an identifier whole
    user_keys, anon_keys = key_ids(users), key_ids(anons)
    count += _delete_traits(con, traits)
    statements = [
        (f"DELETE FROM {qualified(SCHEMA, 'identities')} WHERE (identifier_type = 'user_id'"
         " AND list_contains($1::VARCHAR[], identifier)) OR (identifier_type = 'anonymous_id'"
         " AND list_contains($2::VARCHAR[], identifier)) RETURNING 1", [user_keys, anon_keys]),
        (f"DELETE FROM {qualified(SCHEMA, 'rejected_values')}"
         " WHERE list_contains($1::VARCHAR[], message_id) OR (table_name = 'users'"
         " AND list_contains($2::VARCHAR[], message_id)) OR (table_name = 'identities'"
         " AND (column_name = 'user_id' AND list_contains($2::VARCHAR[], message_id)"
         " OR column_name = 'anonymous_id' AND list_contains($3::VARCHAR[], message_id)))"
         " RETURNING 1", [ids, user_keys, anon_keys])]
    if "users" in tables:
        statements.append((f"DELETE FROM {qualified(SCHEMA, 'users')}"
                           " WHERE list_contains($1::VARCHAR[], id) RETURNING 1", [user_keys]))
    for sql, params in statements:
        count += len(con.execute(sql, params).fetchall())
    return count


def _delete_traits(con, traits: list[tuple[str, str]]) -> int:
    """The rows of the person's trait identifiers (emails, as identity forgot them), found
    by value: the profile id a row was loaded with may be gone (merged away) or another
    person's (an unmerge). One kept whole under its stand-in leaves rejected_values too."""
    if not traits:
        return 0
    keys = [[kind for kind, _ in traits], [row_id(value) for _, value in traits]]
    pairs = "(SELECT unnest($1::VARCHAR[]), unnest($2::VARCHAR[]))"
    deleted = con.execute(f"DELETE FROM {qualified(SCHEMA, 'identities')} WHERE"
                          f" (identifier_type, identifier) IN {pairs} RETURNING 1", keys)
    count = len(deleted.fetchall())
    con.execute(f"DELETE FROM {qualified(SCHEMA, 'rejected_values')} WHERE table_name ="
                f" 'identities' AND (column_name, message_id) IN {pairs}", keys)
    return count
