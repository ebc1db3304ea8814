"""A batch of events -> one Plan: what to change in the schema and what to load.

Planning is pure (no I/O) and works on a copy of the known schema, so a load that
rolls back leaves the in-memory schema as it was; the destination adopts
`plan.schema` only after its transaction commits.
"""

from __future__ import annotations

import datetime as dt
import operator
from typing import Any, NamedTuple, Sequence

from trackpipe.destinations.base import Event, Outcome, fail
from trackpipe.destinations.warehouse import layout
from trackpipe.destinations.warehouse.schema import (
    TEXT, TIMESTAMP, Rejected, convert, parse_timestamp, raw_text, widen)

Schema = dict[str, dict[str, str]]  # table -> column -> logical type
TABLE = "table"  # new_type of a Change that creates a table


class Change(NamedTuple):
    table: str
    column: str | None   # None when the table itself is created
    old_type: str | None
    new_type: str
    message_id: str      # the event whose value caused it


class RejectedValue(NamedTuple):
    table: str
    column: str
    message_id: str
    value: str
    reason: str


class TableLoad(NamedTuple):
    table: str
    columns: list[tuple[str, str]]  # (column, logical type) in the order of each row tuple
    rows: list[tuple]
    upsert: bool                    # `users`: latest values win instead of first row wins


class Plan(NamedTuple):
    loaded_at: dt.datetime
    changes: list[Change]
    loads: list[TableLoad]
    rejected: list[RejectedValue]
    identities: list[tuple[str, str, str]]  # (identifier_type, identifier, profile_id)
    failed: dict[int, Outcome]              # batch index -> why that event cannot load
    schema: Schema                          # the known schema once this plan is applied
    size: int

    def outcomes(self, ok: Outcome) -> list[Outcome]:
        return [self.failed.get(i, ok) for i in range(self.size)]


def plan(batch: Sequence[Event], known: Schema, loaded_at: dt.datetime) -> Plan:
    by_table: dict[str, list[tuple[str, layout.Row]]] = {}
    users: dict[Any, list[tuple[str, layout.Row]]] = {}
    identities: dict[tuple[str, str], str] = {}
    failed: dict[int, Outcome] = {}
    typer = _Typer(known)
    for i, event in enumerate(batch):
        try:
            rows = layout.rows_for(event.message, event.message_id, event.profile_id, loaded_at)
        except layout.Unloadable as exc:
            failed[i] = fail(None, str(exc))
            continue
        converted: set[int] = set()
        for row in rows:
            if id(row.fixed) not in converted:  # rows of one message share their fixed values
                converted.add(id(row.fixed))
                typer.fixed_values(row, event.message_id)
            group = users.setdefault(row.fixed["id"], []) if row.table == "users" \
                else by_table.setdefault(row.table, [])
            group.append((event.message_id, row))
        _identities(event, identities)
    loads = [typer.load(table, rows, upsert=False) for table, rows in by_table.items()]
    if users:
        loads.append(typer.load("users", [_merge(rows) for rows in users.values()], upsert=True))
    ids = [(kind, value, profile) for (kind, value), profile in identities.items()]
    return Plan(loaded_at, typer.changes, loads, list(typer.rejected.values()), ids, failed,
                typer.schema, len(batch))


def _identities(event: Event, out: dict[tuple[str, str], str]) -> None:
    if not event.profile_id:
        return
    for kind, field in (("user_id", "userId"), ("anonymous_id", "anonymousId")):
        value = event.message.get(field)
        if value not in (None, ""):
            out[(kind, value if isinstance(value, str) else raw_text(value))] = event.profile_id


def _merge(rows: list[tuple[str, layout.Row]]) -> tuple[str, layout.Row]:
    """One `users` row from a user's identifies in this batch: later traits win."""
    rows = sorted(rows, key=lambda r: str(r[1].fixed.get("received_at") or ""))
    dynamic: dict[str, tuple[str, str, Any]] = {}
    profile = None
    for _, row in rows:
        seen: set[str] = set()
        for cell in row.dynamic:
            if cell[0] not in seen:
                seen.add(cell[0])
                dynamic[cell[0]] = cell
        profile = row.fixed.get("profile_id") or profile
    message_id, last = rows[-1]
    return message_id, last._replace(fixed={**last.fixed, "profile_id": profile},
                                     dynamic=list(dynamic.values()))


class _Typer:
    """Applies the type policy table by table, collecting changes and rejections."""

    def __init__(self, known: Schema):
        self.known = known
        self.schema: Schema = dict(known)
        self.changes: list[Change] = []
        self.rejected: dict[tuple[str, str, str], RejectedValue] = {}

    def load(self, table: str, rows: list[tuple[str, layout.Row]], upsert: bool) -> TableLoad:
        rows = list(_unique(rows))
        fixed = layout.fixed_columns(table)
        known = self.known.get(table)
        if known is None:
            self.changes.append(Change(table, None, None, TABLE, rows[0][0]))
        types = dict(known if known is not None else fixed)
        cells, first_cause = self._kinds(table, rows, types)
        for column, message_id in first_cause.items():
            old = known.get(column) if known else None
            if types[column] != old:
                self.changes.append(Change(table, column, old, types[column], message_id))
        self.schema[table] = types
        dynamic = _in_order(cells)
        columns = [*fixed.items(), *((c, types[c]) for c in dynamic)]
        dynamic_types = [(c, types[c]) for c in dynamic]
        fixed_of = _getter(fixed)
        out = [self._row(table, mid, row, cell, fixed_of, dynamic_types)
               for (mid, row), cell in zip(rows, cells)]
        return TableLoad(table, columns, out, upsert)

    def _kinds(self, table, rows, types):
        """Each row's cells as column -> typed value, widening `types` as values need."""
        cells, first_cause = [], {}
        for message_id, row in rows:
            cell: dict[str, tuple] = {}
            for column, got in row.dynamic:
                if got.__class__ is not tuple or column in cell:
                    self._reject_cell(table, column, message_id, got)
                    continue
                cell[column] = got
                kind, current = got[0], types.get(column)
                if kind != current:
                    new = widen(current, kind)
                    if new != current:
                        types[column] = new
                        first_cause.setdefault(column, message_id)
            cells.append(cell)
        return cells, first_cause

    def _reject_cell(self, table, column, message_id, got) -> None:
        if got.__class__ is not Rejected:  # a second key naming the same column
            got = Rejected(f"two keys of the message map to column {column!r}; the first one"
                           " was loaded", got[2])
        self._reject(table, column, message_id, got.value, got)

    def _row(self, table, message_id, row, cell, fixed, dynamic) -> tuple:
        get = cell.get
        values = fixed(row.fixed)
        for column, column_type in dynamic:
            got = get(column)
            if got is None:
                values.append(None)
            elif got[0] == column_type:
                values.append(got[1])
            else:
                loaded = convert(got[2], got[0], got[1], column_type)
                if loaded.__class__ is Rejected:
                    self._reject(table, column, message_id, got[2], loaded)
                    loaded = None
                values.append(loaded)
        return tuple(values)

    def fixed_values(self, row: layout.Row, message_id: str) -> None:
        """Convert a row's fixed values (receivedAt, userId...) to their column types, in place."""
        fixed = row.fixed
        for column, value in fixed.items():
            if value.__class__ is str and "\x00" not in value \
                    and layout.FIXED_TYPES[column] == TEXT:
                continue  # the common case, kept cheap
            if value is not None and value.__class__ is not dt.datetime:
                fixed[column] = self._fixed(row.table, message_id, column,
                                            layout.FIXED_TYPES[column], value)

    def _fixed(self, table, message_id, column, type_, value):
        if type_ == TIMESTAMP:
            parsed = parse_timestamp(value) if isinstance(value, str) else None
            if parsed is None:
                self._reject(table, column, message_id, value,
                             Rejected("not an ISO-8601 date-time"))
            return parsed
        if isinstance(value, str) and "\x00" not in value:
            return value
        if isinstance(value, str):
            self._reject(table, column, message_id, value,
                         Rejected("text contains a NUL character"))
            return None
        return raw_text(value)

    def _reject(self, table, column, message_id, value, why: Rejected) -> None:
        key = (table, column, message_id)
        if key not in self.rejected:
            self.rejected[key] = RejectedValue(table, column, message_id, raw_text(value),
                                               why.reason)


def _getter(columns) -> Any:
    """row.fixed -> a list of its values in `columns` order (itemgetter runs in C)."""
    get = operator.itemgetter(*columns)
    return lambda fixed: list(get(fixed))


def _unique(rows):
    """The rows of a table, one per id: a messageId sent twice in one batch loads once."""
    seen: set = set()
    for message_id, row in rows:
        if row.fixed["id"] not in seen:
            seen.add(row.fixed["id"])
            yield message_id, row


def _in_order(cells) -> list[str]:
    return list(dict.fromkeys(c for cell in cells for c in cell))
