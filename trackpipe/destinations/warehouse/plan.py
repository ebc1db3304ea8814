"""A batch of events -> one Plan: what to change in the schema and what to load.

Planning is pure (no I/O) and works on a copy of the known schema, so a load that
rolls back leaves the in-memory schema as it was; the destination adopts
`plan.schema` only after its transaction commits.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import operator
from typing import Any, NamedTuple, Sequence

from trackpipe.destinations.base import Event, Outcome, fail
from trackpipe.destinations.warehouse import layout
from trackpipe.destinations.warehouse.schema import (
    BIGINT, BOOLEAN, DOUBLE, JSON, TEXT, TIMESTAMP, Rejected, convert, parse_timestamp,
    raw_text, widen)
from trackpipe.destinations.warehouse.shapes import NO_SHAPE, SLOW, Laid, Shape, ShapeBook

log = logging.getLogger("trackpipe.warehouse")

Schema = dict[str, dict[str, str]]  # table -> column -> logical type
TABLE = "table"  # new_type of a Change that creates a table
# Columns a table may grow to, fixed columns included. PostgreSQL refuses a 1,601st
# (dropped columns count too), and a table with thousands of sparse columns is one
# nobody can query; past the limit a value for a new column goes to rejected_values.
MAX_COLUMNS = 1000
MIN_COLUMNS = 20  # the widest table's fixed columns, and room for a few more
# Tables of track events' own rows a warehouse may hold. Event names are the sender's
# choice, and one built from a URL or an id ("Viewed /product/8812") would otherwise
# create a table per value. Past the limit, a new event's row in `tracks` still loads
# and the row its own table would have held goes to rejected_values whole.
MAX_TABLES = 1000


def check_max_columns(value: int, database_limit: int | None = None) -> None:
    """For a warehouse's `max_columns` setting."""
    if value < MIN_COLUMNS:
        raise ValueError(f"max_columns must be at least {MIN_COLUMNS} (the fixed columns of a"
                         f" table alone take up to 14); it is {value}")
    if database_limit is not None and value > database_limit:
        raise ValueError(f"max_columns must be at most {database_limit}, the database's own"
                         f" limit; it is {value}")


def check_max_tables(value: int) -> None:
    """For a warehouse's `max_tables` setting."""
    if value < 1:
        raise ValueError(f"max_tables must be at least 1; it is {value}")


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
    rejected: list[RejectedValue]          # each value; rejected_rows() makes the rows
    identities: list[tuple[str, str, str]]  # (identifier_type, identifier, profile_id)
    failed: dict[int, Outcome]              # batch index -> why that event cannot load
    schema: Schema                          # the known schema once this plan is applied
    size: int

    def outcomes(self, ok: Outcome) -> list[Outcome]:
        return [self.failed.get(i, ok) for i in range(self.size)]


def plan(batch: Sequence[Event], known: Schema, loaded_at: dt.datetime,
         max_columns: int = MAX_COLUMNS, shapes: ShapeBook | None = None,
         max_tables: int = MAX_TABLES) -> Plan:
    """`shapes`, when given, lays out track events of known shapes without the walk
    (shapes.py) and learns the shapes of the others."""
    event_tables = sum(1 for name in known if name not in layout.RESERVED_TABLES)
    tables: dict[str, _Table] = {}
    users: dict[Any, list[tuple[str, layout.Row]]] = {}
    identities: dict[tuple[str, str], str] = {}
    failed: dict[int, Outcome] = {}
    # (table, column, message id) -> every value rejected there: see _one_row
    fixed_rejects: dict[tuple[str, str, str], list[RejectedValue]] = {}
    # id(shape) -> its rows' two tables, when its cells fit them as they are (_targets)
    fits: dict[int, tuple] = {}
    for i, event in enumerate(batch):
        laid = shapes.lay_out(event, loaded_at) if shapes is not None else SLOW
        if laid.__class__ is tuple and _add_laid(tables, known, max_columns, event, laid, fits):
            identities.update(event.identities)  # as they are: see _identity_rows
            continue
        message_id = layout.row_id(event.message_id)  # itself, unless no key can hold it
        try:
            rows = layout.rows_for(event.message, message_id, event.profile_id, loaded_at)
        except layout.Unloadable as exc:
            failed[i] = fail(None, str(exc))
            continue
        except Exception as exc:  # a bug met by one message must not stop its batch for good
            log.exception("warehouse: message %s could not be laid out", event.message_id)
            failed[i] = fail(None, f"trackpipe could not lay this message out ({exc!r}); this"
                                   " is a bug: report it, then replay the event once fixed")
            continue
        if message_id != event.message_id:
            _reject_stand_in(fixed_rejects, rows[0].table, "id", message_id, event.message_id,
                             "messageId", "its rows have as id")
        converted: set[int] = set()
        no_table = False  # its own table could not be created (max_tables)
        for row in rows:
            if id(row.fixed) not in converted:  # rows of one message share their fixed values
                converted.add(id(row.fixed))
                fixed_values(row, message_id, fixed_rejects)
            if row.table == "users":
                user_id = event.message.get("userId")  # (as sent: fixed_values nulls a NUL)
                if row.fixed["id"] != user_id and isinstance(user_id, str):
                    _reject_stand_in(fixed_rejects, "users", "id", message_id, user_id,
                                     "userId", "its users row has as id")
                users.setdefault(row.fixed["id"], []).append((message_id, row))
                continue
            table = tables.get(row.table)
            if table is None:
                if row.table not in known and row.table not in layout.RESERVED_TABLES:
                    if event_tables >= max_tables:  # (a new table is always the slow path's)
                        _reject_row(fixed_rejects, row, event, message_id, event_tables)
                        no_table = True
                        continue
                    event_tables += 1
                table = tables[row.table] = _Table(row.table, known.get(row.table),
                                                   max_columns)
            table.add(message_id, row)
        identities.update(event.identities)
        if laid == NO_SHAPE and rows[0].table == "tracks" and not no_table:
            shapes.learn(event.message)  # (a shape for a name with no table is of no use)
        fits.clear()  # the slow path may have added or widened columns (or a shape)
    if users:
        table = tables["users"] = _Table("users", known.get("users"), max_columns,
                                         upsert=True)
        for rows in users.values():
            table.add(*_merge(rows))
    ids = _identity_rows(batch, identities, failed, fixed_rejects)
    schema, changes, rejected = dict(known), [], fixed_rejects
    loads = [t.load(schema, changes, rejected) for t in tables.values()]
    return Plan(loaded_at, changes, loads, [e for es in rejected.values() for e in es], ids,
                failed, schema, len(batch))


def _identity_rows(batch: Sequence[Event], merged: dict[tuple[str, str], str],
                   failed: dict[int, Outcome], rejected: dict) -> list[tuple[str, str, str]]:
    """The identities rows of the events that did not fail, whose identities `merged`
    holds as they are, a later event's over an earlier's: as they are their keys when
    each identifier is short and holds no NUL (layout.row_id). When one is not, the
    mapping is made again event by event, with stand-ins (_identities)."""
    if not all(len(value) <= layout.SHORT_ID_CHARS and "\x00" not in value
               for _, value in merged):
        merged = {}
        for i, event in enumerate(batch):
            if i not in failed:
                _identities(event, merged, rejected)
    return [(kind, value, profile) for (kind, value), profile in merged.items()]


def _identities(event: Event, out: dict[tuple[str, str], str], rejected: dict) -> None:
    """Each identifier the event names, with the profile identity holds IT in (not the
    event's: identity may have refused to join them). One too long to index or holding a
    NUL is mapped under its stand-in (as in `users`), and kept whole in rejected_values
    with the stand-in as message_id."""
    for (kind, value), profile_id in event.identities.items():
        key = layout.row_id(value)
        if key != value:
            _reject_stand_in(rejected, "identities", kind, key, value,
                             _ID_NAMES.get(kind, f"{kind} trait"),
                             "its identities row has as identifier")
        out[(kind, key)] = profile_id


_ID_NAMES = {"user_id": "userId", "anonymous_id": "anonymousId"}


def _add_laid(tables: dict, known: Schema, max_columns: int, event: Event, laid: Laid,
              fits: dict) -> bool:
    """Add a laid-out track event's two rows when both tables have each of its columns,
    of the kind of its value; False (nothing added) when the slow path must add them."""
    shape, track_row, event_row, dynamic = laid
    targets = fits.get(id(shape))
    if targets is None:
        targets = fits[id(shape)] = _targets(tables, known, max_columns, shape)
    if not targets:
        return False
    tracks, own = targets
    tracks.add_laid(event.message_id, shape.track_columns, track_row, dynamic)
    own.add_laid(event.message_id, shape.event_columns, event_row, dynamic)
    return True


def _targets(tables: dict, known: Schema, max_columns: int, shape: Shape
             ) -> tuple[_Table, _Table] | tuple[()]:
    """The tables of a shape's two rows (`tracks`, its own), when its cells fit them as
    they are; else ()."""
    n = shape.n_context
    for name, columns, kinds in (("tracks", shape.columns[:n], shape.kinds[:n]),
                                 (shape.table, shape.columns, shape.kinds)):
        table = tables.get(name)
        types = table.types if table is not None else known.get(name)
        if types is None:
            return ()  # a new table: the slow path records its creation
        get = types.get
        for column, kind in zip(columns, kinds):
            if get(column) != kind:
                return ()
    for name in ("tracks", shape.table):
        if name not in tables:
            tables[name] = _Table(name, known.get(name), max_columns)
    return tables["tracks"], tables[shape.table]


def _merge(rows: list[tuple[str, layout.Row]]) -> tuple[str, layout.Row]:
    """One `users` row from a user's identifies in this batch: later traits win."""
    rows = sorted(rows, key=lambda r: str(r[1].fixed.get("received_at") or ""))
    dynamic: dict[str, tuple] = {}
    profile = None
    for _, row in rows:
        seen: set[str] = set()
        for entry in layout.entries(row.dynamic):
            if entry[0] not in seen:
                seen.add(entry[0])
                dynamic[entry[0]] = entry
        profile = row.fixed.get("profile_id") or profile
    message_id, last = rows[-1]
    return message_id, last._replace(fixed={**last.fixed, "profile_id": profile},
                                     dynamic=tuple(x for entry in dynamic.values()
                                                   for x in entry))


class _Table:
    """One table's rows of a batch, typed as they arrive: the column types widen as values
    need, and each row keeps its cells as column -> value as loaded. A value that does not
    load as its column's final type as it is (an int in a double column, anything but text
    in a text column) is converted once all rows are in, only in the columns that need it.

    A row laid out by a shape (add_laid) comes as a tuple of values in its layout's
    column order instead, and loads as it is when every row of the table has that
    layout (the usual batch of known track events): no dict, no per-cell work."""

    def __init__(self, name: str, known: dict[str, str] | None, max_columns: int,
                 upsert: bool = False):
        self.name, self.known, self.upsert = name, known, upsert
        self.max_columns = max_columns
        self.fixed = layout.fixed_columns(name)
        self.types = dict(known if known is not None else self.fixed)
        # (message id, fixed, cells, dynamic), or from add_laid (message id, layout, row,
        # dynamic): a laid row's layout is a tuple of its columns, a dict row's fixed a dict
        self.rows: list[tuple[str, dict | tuple, dict | tuple, tuple]] = []
        self.layout: tuple | None = None  # the last laid row's
        self.uniform = True  # every row is a laid row of one layout (none yet: see load)
        self.ids: set = set()
        self.first_cause: dict[str, str] = {}  # column -> the message that (re)typed it
        self.mixed: set[str] = set()           # columns holding values to convert
        self.rejected: dict[tuple[str, str, str], list[RejectedValue]] = {}

    def add(self, message_id: str, row: layout.Row) -> None:
        if row.fixed["id"] in self.ids:  # a messageId sent twice in one batch loads once
            return
        self.ids.add(row.fixed["id"])
        types, cells = self.types, {}
        for column, kind, loaded, raw in layout.entries(row.dynamic):
            if kind is None or column in cells:
                self._reject_cell(column, message_id, loaded if kind is None else None, raw)
                continue
            current = types.get(column)
            if current is None and len(types) >= self.max_columns:
                self._reject(column, message_id, raw, Rejected(
                    f"table {self.name!r} has {len(types)} columns, as many as max_columns"
                    " allows, so no column was added for this value"))
                continue
            cells[column] = loaded
            if kind != current:
                if kind == JSON:  # always stored as text, so turned into text right away
                    kind, cells[column] = TEXT, raw_text(loaded)
                new = widen(current, kind)
                if new != current:
                    types[column] = new
                    self.first_cause.setdefault(column, message_id)
                if kind != new or (current is not None and new != current):
                    self.mixed.add(column)  # this value, or the ones before, to convert
        self.uniform = False
        self.rows.append((message_id, row.fixed, cells, row.dynamic))

    def add_laid(self, message_id: str, layout: tuple, row: tuple, dynamic: tuple) -> None:
        """A row of the values of `layout`'s columns, each of its column's type already
        (shapes.py); its id is the message id, as a shape lays out only such events."""
        if message_id in self.ids:
            return
        self.ids.add(message_id)
        if layout is not self.layout:  # (shapes intern layouts: equal ones are one object)
            if self.rows:
                self.uniform = False
            self.layout = layout
        self.rows.append((message_id, layout, row, dynamic))

    def load(self, schema: Schema, changes: list[Change], rejected: dict) -> TableLoad:
        """The rows as tuples in column order; records the table's changes and rejections."""
        if self.known is None:
            changes.append(Change(self.name, None, None, TABLE, self.rows[0][0]))
        for column, message_id in self.first_cause.items():
            old = self.known.get(column) if self.known else None
            if self.types[column] != old:
                changes.append(Change(self.name, column, old, self.types[column], message_id))
        schema[self.name] = self.types
        if self.uniform and self.layout is not None:
            types = {**self.types, **self.fixed}  # (a fixed column's type is its own)
            return TableLoad(self.name, [(c, types[c]) for c in self.layout],
                             [r[2] for r in self.rows], self.upsert)
        if self.mixed:  # the laid rows too may hold values to convert: as dict rows
            self.rows = [self._cells(*r) if r[1].__class__ is tuple else r for r in self.rows]
        dynamic = self._dynamic()
        if self.mixed:
            self._convert([c for c in dynamic if c in self.mixed])
        for entries in self.rejected.values():
            for entry in entries:
                _keep(rejected, entry)
        columns = [*self.fixed, *dynamic]
        fixed_of, reorders = operator.itemgetter(*self.fixed), {}
        rows = []
        for entry in self.rows:
            if entry[1].__class__ is dict:
                _, fixed, cells, _ = entry
                rows.append(fixed_of(fixed) + tuple(map(cells.get, dynamic)))
                continue
            _, layout, row, _ = entry
            reorder = reorders.get(id(layout))
            if reorder is None:
                reorder = reorders[id(layout)] = _reorder(layout, columns)
            rows.append(reorder(row))
        return TableLoad(self.name, [*self.fixed.items(), *((c, self.types[c]) for c in dynamic)],
                         rows, self.upsert)

    def _dynamic(self) -> list[str]:
        """The columns of the rows but the fixed ones, in the order they first appear."""
        seen: dict[str, None] = {}
        layouts: set[int] = set()
        for _, fixed_or_layout, cells, _ in self.rows:
            if fixed_or_layout.__class__ is dict:
                seen.update(dict.fromkeys(cells))
            elif id(fixed_or_layout) not in layouts:  # each layout once
                layouts.add(id(fixed_or_layout))
                seen.update(dict.fromkeys(c for c in fixed_or_layout if c not in self.fixed))
        return list(seen)

    def _cells(self, message_id: str, layout: tuple, row: tuple, dynamic: tuple) -> tuple:
        """A laid row as add() keeps a row: (message id, fixed, cells, dynamic)."""
        cells = dict(zip(layout, row))
        fixed = {column: cells.pop(column) for column in self.fixed}
        return message_id, fixed, cells, dynamic

    def _convert(self, mixed: list[str]) -> None:
        for message_id, _, cells, dynamic in self.rows:
            for column in mixed:
                value = cells.get(column)
                if value is None:
                    continue
                kind = _KIND_OF.get(value.__class__, TEXT)
                column_type = self.types[column]
                if kind == column_type:
                    continue
                raw = _raw(dynamic, column) if kind == TIMESTAMP else value
                loaded = convert(raw, kind, value, column_type)
                if loaded.__class__ is Rejected:
                    self._reject(column, message_id, raw, loaded)
                    loaded = None
                cells[column] = loaded

    def _reject_cell(self, column, message_id, why: Rejected | None, raw) -> None:
        if why is None:  # a second key naming the same column
            why = Rejected(f"two keys of the message map to column {column!r}; the first one"
                           " was loaded", raw)
        self._reject(column, message_id, why.value, why)

    def _reject(self, column, message_id, value, why: Rejected) -> None:
        _reject(self.rejected, self.name, column, message_id, value, why)


def _reorder(layout: tuple, columns: list[str]) -> Any:
    """row in `layout`'s column order -> the tuple of its values of `columns`, None for
    each column the layout does not have."""
    where = {column: i for i, column in enumerate(layout)}
    get = operator.itemgetter(*(where.get(c, len(layout)) for c in columns))
    if len(where) == len(columns):
        return get
    return lambda row: get(row + (None,))


# the kind of a value as loaded; JSON values were turned into text when added
_KIND_OF = {bool: BOOLEAN, int: BIGINT, float: DOUBLE, dt.datetime: TIMESTAMP, str: TEXT}


def _raw(dynamic: tuple, column: str) -> Any:
    """The value as sent behind a row's cell: the first valid one for its column."""
    return next(raw for c, kind, _, raw in layout.entries(dynamic)
                if c == column and kind is not None)


def fixed_values(row: layout.Row, message_id: str, rejected: dict) -> None:
    """Convert a row's fixed values (receivedAt, userId...) to their column types, in place."""
    fixed = row.fixed
    for column, value in fixed.items():
        if value.__class__ is str and "\x00" not in value \
                and layout.FIXED_TYPES[column] == TEXT:
            continue  # the common case, kept cheap
        if value is not None and value.__class__ is not dt.datetime:
            fixed[column] = _fixed(rejected, row.table, message_id, column,
                                   layout.FIXED_TYPES[column], value)


def _fixed(rejected, table, message_id, column, type_, value):
    if type_ == TIMESTAMP:
        parsed = parse_timestamp(value) if isinstance(value, str) else None
        if parsed is None:
            _reject(rejected, table, column, message_id, value,
                    Rejected("not an ISO-8601 date-time exact to the microsecond"))
        return parsed
    if isinstance(value, str) and "\x00" not in value:
        return value
    if isinstance(value, str):
        _reject(rejected, table, column, message_id, value,
                Rejected("text contains a NUL character"))
        return None
    return raw_text(value)


def _reject_row(rejected: dict, row: layout.Row, event: Event, message_id: str,
                event_tables: int) -> None:
    """A track event's own row when no table may be created for it: kept whole, as one
    rejected value (column "*") holding its values by column as JSON."""
    values = {column: raw for column, _, _, raw in layout.entries(row.dynamic)}
    _reject(rejected, row.table, "*", message_id, values, Rejected(
        f"the warehouse has {event_tables} event tables, as many as max_tables allows, so no"
        f" table was created for event {event.message.get('event')!r}; its row in tracks"
        " was loaded"))


def _reject_stand_in(rejected: dict, table: str, column: str, key: str, whole: str,
                     what: str, where: str) -> None:
    """An id that cannot be a key as it is (layout.row_id), kept whole; `key` is its
    stand-in, `where` says what holds the stand-in ("its users row has as id")."""
    _reject(rejected, table, column, key, whole, Rejected(
        f"{_why_no_key(whole, what)}, so {where} its first 64 characters and the SHA-256 of"
        f" the whole; this value is the whole {what}"))


def _why_no_key(value: str, what: str) -> str:
    if "\x00" in value:
        return f"the {what} holds a NUL character, which no text column can"
    size = len(value.encode("utf-8", "surrogatepass"))
    return (f"the {what} is {size:,} bytes, more than the {layout.MAX_ID_BYTES:,} an id"
            " column holds (PostgreSQL cannot index a longer key)")


def _reject(rejected: dict, table, column, message_id, value, why: Rejected) -> None:
    _keep(rejected, RejectedValue(table, column, message_id, raw_text(value), why.reason))


def _keep(rejected: dict, entry: RejectedValue) -> None:
    """Every rejected value is kept, under rejected_values' key (table, column, message);
    the same one twice (a message sent twice in a batch) only once."""
    entries = rejected.setdefault(entry[:3], [])
    if entry not in entries:
        entries.append(entry)


def rejected_rows(entries: Sequence[RejectedValue]) -> list[RejectedValue]:
    """The rejected_values rows of rejected values, one per table, column and message
    (see _one_row); the values of one row in the order given."""
    by_key: dict[tuple[str, str, str], list[RejectedValue]] = {}
    for entry in entries:
        _keep(by_key, entry)
    return [_one_row(e) for e in by_key.values()]


def _one_row(entries: list[RejectedValue]) -> RejectedValue:
    """The rejected_values row of one table, column and message. A second value rejected
    there (two keys naming the column, each holding a NUL) cannot have a row of its own
    (that is the table's key), so then the row holds them all: value is a JSON array of
    {"value", "reason"}, in the order they were met, each value as its own row would hold
    it. The same every time the message loads, so a replay neither adds nor grows a row."""
    if len(entries) == 1:
        return entries[0]
    values = [{"value": e.value, "reason": e.reason} for e in entries]
    return entries[0]._replace(
        value=json.dumps(values, ensure_ascii=False),
        reason=f"{len(entries)} values of this message were rejected for this column; value"
               " is a JSON array of each (value, as text, and reason)")
