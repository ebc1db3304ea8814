"""The SQL both warehouses share, and the few places their dialects differ."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Callable

from trackpipe.destinations.warehouse.schema import (
    BIGINT, BOOLEAN, DOUBLE, EXACT_IN_DOUBLE, TEXT, TIMESTAMP, quote)

META_DDL = {  # every name quoted: `at` is a keyword in DuckDB
    "identities": '("identifier_type" {text} NOT NULL, "identifier" {text} NOT NULL,'
                  ' "profile_id" {text}, "updated_at" {timestamp},'
                  ' PRIMARY KEY ("identifier_type", "identifier"))',
    "rejected_values": '("table_name" {text} NOT NULL, "column_name" {text} NOT NULL,'
                       ' "message_id" {text} NOT NULL, "value" {text}, "reason" {text},'
                       ' "rejected_at" {timestamp},'
                       ' PRIMARY KEY ("table_name", "column_name", "message_id"))',
    "schema_changes": '("at" {timestamp}, "table_name" {text}, "column_name" {text},'
                      ' "old_type" {text}, "new_type" {text}, "message_id" {text})',
}


@dataclass(frozen=True)
class Dialect:
    types: dict[str, str]                      # logical type -> SQL type
    to_text_from_timestamp: Callable[[str], str]  # USING expression keeping ISO-8601 form
    param: str                                 # a positional parameter's placeholder

    def sql_type(self, logical: str) -> str:
        return self.types[logical]

    def logical(self, sql_type: str) -> str:
        """A column's logical type from the catalog; an unknown type (someone altered the
        column by hand, say to numeric(12,2)) is treated as text: values are planned as
        text and the database casts them (in PostgreSQL, postgres.py `_casts`)."""
        wanted = sql_type.lower()
        for logical, name in self.types.items():
            if name.lower() == wanted:
                return logical
        return TEXT

    def widen_using(self, column: str, old: str, new: str) -> str:
        q = quote(column)
        if new == TEXT and old == TIMESTAMP:
            return self.to_text_from_timestamp(q)
        return f"CAST({q} AS {self.sql_type(new)})"


def postgres_timestamp_text(q: str) -> str:
    """ISO 8601 in UTC, and " BC" after a year before 1 AD, as PostgreSQL itself writes it
    (to_char's YYYY has no era: 1 BC would read as 1 AD, another instant). The text casts
    back to the same timestamptz."""
    utc = f"({q} AT TIME ZONE 'UTC')"
    return (f"""to_char({utc}, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
            f" || CASE WHEN {utc} < '0001-01-01' THEN ' BC' ELSE '' END")


POSTGRES = Dialect(
    {BOOLEAN: "boolean", BIGINT: "bigint", DOUBLE: "double precision",
     TIMESTAMP: "timestamp with time zone", TEXT: "text"},
    postgres_timestamp_text, "%s")

DUCKDB = Dialect(
    {BOOLEAN: "BOOLEAN", BIGINT: "BIGINT", DOUBLE: "DOUBLE",
     TIMESTAMP: "TIMESTAMP WITH TIME ZONE", TEXT: "VARCHAR"},
    lambda q: f"strftime({q} AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%fZ')", "?")


def qualified(schema: str, table: str) -> str:
    return f"{quote(schema)}.{quote(table)}"


def create_meta(d: Dialect, schema: str, table: str) -> str:
    body = META_DDL[table].format(text=d.sql_type(TEXT), timestamp=d.sql_type(TIMESTAMP))
    return f"CREATE TABLE IF NOT EXISTS {qualified(schema, table)} {body}"


def create_table(d: Dialect, schema: str, table: str, columns: dict[str, str]) -> str:
    cols = ", ".join(f"{quote(c)} {d.sql_type(t)}" for c, t in columns.items())
    return f'CREATE TABLE IF NOT EXISTS {qualified(schema, table)} ({cols}, PRIMARY KEY ("id"))'


def add_column(d: Dialect, schema: str, table: str, column: str, logical: str) -> str:
    return (f"ALTER TABLE {qualified(schema, table)} ADD COLUMN IF NOT EXISTS"
            f" {quote(column)} {d.sql_type(logical)}")


def widen_column(d: Dialect, schema: str, table: str, column: str, old: str, new: str,
                 at: dt.datetime) -> list[tuple[str, tuple]]:
    """The statements (with their parameters) that widen a column, to run in one
    transaction: bigint -> double first keeps the integers it would round."""
    alter = (f"ALTER TABLE {qualified(schema, table)} ALTER COLUMN {quote(column)}"
             f" TYPE {d.sql_type(new)} USING {d.widen_using(column, old, new)}")
    if (old, new) != (BIGINT, DOUBLE):
        return [(alter, ())]
    return [keep_rounded(d, schema, table, column, at), (alter, ())]


def keep_rounded(d: Dialect, schema: str, table: str, column: str,
                 at: dt.datetime) -> tuple[str, tuple]:
    """Copy to rejected_values, as exact text, each integer of a bigint column that a double
    rounds (beyond +/-2^53; compared, not abs(), which overflows on -2^63). message_id is
    the row's id: the messageId, or in `users` the userId. A row may have had a value for
    the column rejected already (a second key naming it): that one moves to the reason."""
    q, p, text = quote(column), d.param, d.sql_type(TEXT)
    reason = (f"integer beyond +/-2^53, rounded in its column when {table}.{column} was"
              " widened from bigint to double; this is its exact value")
    if table == "users":
        reason += " (message_id is the users row's id, its userId)"
    sql = (f"INSERT INTO {qualified(schema, 'rejected_values')} AS r"
           f" SELECT CAST({p} AS {text}), CAST({p} AS {text}), \"id\", CAST({q} AS {text}),"
           f" CAST({p} AS {text}), CAST({p} AS {d.sql_type(TIMESTAMP)})"
           f" FROM {qualified(schema, table)}"
           f" WHERE {q} > {EXACT_IN_DOUBLE} OR {q} < -{EXACT_IN_DOUBLE}"
           " ON CONFLICT (table_name, column_name, message_id) DO UPDATE"
           " SET value = EXCLUDED.value, reason = EXCLUDED.reason"
           " || '; before that, this row''s value ' || COALESCE(r.value, 'null')"
           " || ' was rejected for the column: ' || COALESCE(r.reason, '')")
    return sql, (table, column, reason, at)


def insert_from(schema: str, table: str, source: str, columns: list[str], upsert: bool,
                exprs: dict[str, str] | None = None) -> str:
    """Rows of `source` into the table; an id already there is left alone, except in
    `users`, where a newer identify fills in its values (older ones never overwrite).
    `exprs` gives, for some columns, the SQL to select instead of the column itself."""
    cols = ", ".join(quote(c) for c in columns)
    exprs = exprs or {}
    values = ", ".join(exprs.get(c, quote(c)) for c in columns)
    head = f"INSERT INTO {qualified(schema, table)} AS t ({cols}) SELECT {values} FROM {source}"
    if not upsert:
        return head + ' ON CONFLICT ("id") DO NOTHING'
    sets = ", ".join(f"{quote(c)} = COALESCE(EXCLUDED.{quote(c)}, t.{quote(c)})"
                     for c in columns if c != "id")
    return (head + f' ON CONFLICT ("id") DO UPDATE SET {sets}'
            " WHERE t.received_at IS NULL OR EXCLUDED.received_at >= t.received_at")


def delete_person(schema: str, table: str, user_ids: str, anonymous_ids: str) -> str:
    """A person's rows in an event table; `user_ids` and `anonymous_ids` are the SQL
    of two array parameters."""
    where = (f'"user_id" IN (SELECT unnest({user_ids}))'
             f' OR "anonymous_id" IN (SELECT unnest({anonymous_ids}))')
    if table == "aliases":  # an alias row also names the person by previous_id
        where += (f' OR "previous_id" IN (SELECT unnest({user_ids}))'
                  f' OR "previous_id" IN (SELECT unnest({anonymous_ids}))')
    return f'DELETE FROM {qualified(schema, table)} WHERE {where} RETURNING "id"'
