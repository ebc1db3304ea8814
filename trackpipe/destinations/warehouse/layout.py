"""A message -> the rows it makes, in Segment's warehouse layout.

  track     one row in `tracks` (common columns) and one in the event's own table
            (`Order Completed` -> `order_completed`) with the properties flattened
  identify  `identifies` (traits flattened) and, with a userId, the `users` row
  page      `pages` (name, category, properties)     screen  `screens` (name, properties)
  group     `groups` (group_id, traits)              alias   `aliases` (previous_id)

Every row has the common columns (id = messageId, the ids, the four timestamps,
uuid_ts = load time, profile_id) and `context` flattened as context_* columns.
A property or trait whose column would clash with a common column, a context_*
column or one of PostgreSQL's system columns (`xmin`, `ctid`...: ADD COLUMN refuses
them) is prefixed (`properties_id`, `traits_timestamp`, `properties_xmin`), always
and in every warehouse, so it lands in the same column in every row. A context key
with nothing ASCII in it ("", "🎉") is `context_` and its digest, not the bare
`context` a property may name.

The id column holds the messageId, or when that is longer than MAX_ID_BYTES (more
than PostgreSQL can index) or holds a NUL (no text column can), a stand-in: see
`row_id`. The keys of `users` (userId) and `identities` (userId, anonymousId, trait
identifier) follow the same rule.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from typing import Any, NamedTuple

from trackpipe.destinations.warehouse.schema import TEXT, TIMESTAMP, identifier, typed

COMMON = {"id": TEXT, "anonymous_id": TEXT, "user_id": TEXT, "profile_id": TEXT,
          "source_id": TEXT, "received_at": TIMESTAMP, "sent_at": TIMESTAMP,
          "original_timestamp": TIMESTAMP, "timestamp": TIMESTAMP, "uuid_ts": TIMESTAMP}
_MESSAGE_FIELDS = {"anonymous_id": "anonymousId", "user_id": "userId", "source_id": "sourceId",
                   "received_at": "receivedAt", "sent_at": "sentAt",
                   "original_timestamp": "originalTimestamp", "timestamp": "timestamp"}
_EXTRA = {  # table -> its fixed columns beyond COMMON: (column, message field)
    "tracks": {"event": "event", "event_text": "event"},
    "identifies": {}, "pages": {"name": "name", "category": "category"},
    "screens": {"name": "name"}, "groups": {"group_id": "groupId"},
    "aliases": {"previous_id": "previousId"},
}
USERS_FIXED = {"id": TEXT, "profile_id": TEXT, "received_at": TIMESTAMP, "uuid_ts": TIMESTAMP}
FIXED_TYPES = {**COMMON, **USERS_FIXED,
               **{c: TEXT for extra in _EXTRA.values() for c in extra}}
META_TABLES = ("identities", "rejected_values", "schema_changes")
RESERVED_TABLES = frozenset(_EXTRA) | {"users"} | set(META_TABLES)
# PostgreSQL's system columns, which every table has: a column of the name cannot be
# added (42701). DuckDB would take them; they are avoided there too so that both
# warehouses lay an event out in the same columns.
SYSTEM_COLUMNS = frozenset({"xmin", "xmax", "cmin", "cmax", "ctid", "tableoid"})
# The longest messageId the id column holds as it is, in UTF-8 bytes. PostgreSQL cannot
# index a key past about 2.7 KB (54000); the primary keys of the tables and of
# rejected_values (with a table and a column name of up to 63 bytes each) hold this.
MAX_ID_BYTES = 2000
SHORT_ID_CHARS = MAX_ID_BYTES // 4  # so many characters never take more bytes than that
_TABLE_OF_TYPE = {"track": "tracks", "identify": "identifies", "page": "pages",
                  "screen": "screens", "group": "groups", "alias": "aliases"}
_PAYLOAD = {"track": "properties", "page": "properties", "screen": "properties",
            "identify": "traits", "group": "traits"}


class Row(NamedTuple):
    table: str
    fixed: dict[str, Any]  # fixed column -> raw value (type from fixed_columns)
    dynamic: tuple         # per leaf in key order, flat: see `entries`


def entries(dynamic: tuple) -> Iterator[tuple[str, str | None, Any, Any]]:
    """A row's leaves as (column, kind, value as loaded, value as sent); kind None when
    no column can hold the value, with a Rejected in place of the loaded value.

    Kept flat, four items per leaf in one tuple, because what lives until the batch is
    loaded costs garbage-collection time: a tuple per leaf cost more than building it,
    and a list stays tracked for good where a tuple of plain values is untracked (never
    promoted, never scanned again) at the first collection it meets."""
    it = iter(dynamic)
    return zip(it, it, it, it)


class Unloadable(Exception):
    """The message has no shape the warehouse layout knows; it fails for good."""


def row_id(message_id: str) -> str:
    """The id column's value for a messageId (or, in `users` and `identities`, a userId,
    anonymousId or trait identifier): itself, or when it is longer than MAX_ID_BYTES or
    holds a NUL, its first 64 characters (a NUL written as \\u0000), "...sha256:" and the
    SHA-256 of the whole (unique, and the same on a replay). The planner keeps such an id
    whole in rejected_values."""
    if len(message_id) <= SHORT_ID_CHARS and "\x00" not in message_id:
        return message_id
    encoded = message_id.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_ID_BYTES and "\x00" not in message_id:
        return message_id
    head = message_id[:64].replace("\x00", "\\u0000")
    return f"{head}...sha256:{hashlib.sha256(encoded).hexdigest()}"


def key_ids(ids: list[str]) -> list[str]:
    """The keys a person's `users` and `identities` rows may have: each id's stand-in
    (row_id), and the id itself: DuckDB kept a long one, or one holding a NUL, whole in
    `identities` before it had a stand-in there. (PostgreSQL, which takes no NUL, leaves
    those out.)"""
    return list(dict.fromkeys([*ids, *map(row_id, ids)]))


def fixed_columns(table: str) -> dict[str, str]:
    """The columns a table is created with, and their (never changing) types."""
    if table == "users":
        return USERS_FIXED
    return {**COMMON, **{c: TEXT for c in _EXTRA.get(table, _EXTRA["tracks"])}}


def rows_for(message: dict, message_id: str, profile_id: str | None,
             loaded_at: dt.datetime) -> list[Row]:
    kind = message.get("type")
    table = _TABLE_OF_TYPE.get(kind) if isinstance(kind, str) else None
    if table is None:
        raise Unloadable(f"message type {kind!r} has no warehouse table; expected one of "
                         f"{', '.join(_TABLE_OF_TYPE)}")
    fixed = _fixed(message, message_id, profile_id, loaded_at, _EXTRA[table])
    context = message.get("context")
    context_cols = _columns(context, "context", table) if isinstance(context, dict) else ()
    payload_key = _PAYLOAD.get(kind)  # alias has none (a message may still hold a "" key)
    payload = message.get(payload_key) if payload_key else None
    payload_cols = (_columns(payload, "", table, payload_key)
                    if isinstance(payload, dict) else ())
    if kind == "track":
        return _track_rows(message, fixed, context_cols, payload_cols)
    rows = [Row(table, fixed, context_cols + payload_cols)]
    user_id = fixed.get("user_id")
    if kind == "identify" and user_id not in (None, ""):
        # users.id is the table's key: a userId too long to index or holding a NUL gets
        # a stand-in too
        users_fixed = {"id": row_id(user_id) if isinstance(user_id, str) else user_id,
                       "profile_id": profile_id,
                       "received_at": fixed.get("received_at"), "uuid_ts": loaded_at}
        rows.append(Row("users", users_fixed, _columns(payload, "", "users", "traits")
                        if isinstance(payload, dict) else ()))
    return rows


def _track_rows(message: dict, fixed: dict, context_cols: tuple, payload_cols: tuple
                ) -> list[Row]:
    event = message.get("event")
    if not isinstance(event, str) or not event.strip():
        raise Unloadable("a track message needs a non-empty `event` name to choose its table")
    table = event_table(event)
    fixed = {**fixed, "event": table}
    return [Row("tracks", fixed, context_cols),
            Row(table, fixed, context_cols + payload_cols)]


def event_table(event: str) -> str:
    """The table of a track event's own row."""
    table = identifier(event)
    if table.endswith("_pkey"):
        # PostgreSQL names a table's primary key index <table>_pkey, and indexes share
        # the tables' namespace: "Tracks Pkey" would be refused for good.
        return identifier(table + "_table")
    return "_" + table if table in RESERVED_TABLES else table


def _fixed(message: dict, message_id: str, profile_id: str | None, loaded_at: dt.datetime,
           extra: dict[str, str]) -> dict[str, Any]:
    fixed: dict[str, Any] = {"id": message_id, "profile_id": profile_id, "uuid_ts": loaded_at}
    for column, field in _MESSAGE_FIELDS.items():
        fixed[column] = message.get(field)
    for column, field in extra.items():
        fixed[column] = message.get(field)
    return fixed


def _columns(obj: dict, prefix: str, table: str, clash_prefix: str = "") -> tuple:
    """The `entries` of every non-null leaf; Segment creates a column only once a non-null
    value arrives."""
    out: list[Any] = []
    names = _NAMES.get((table, clash_prefix))
    if names is None or len(names) >= NAMES_MAX:
        if len(_NAMES) >= NAMES_MAX:
            _NAMES.clear()
        names = _NAMES[(table, clash_prefix)] = {}
    _walk(obj, prefix + "_" if prefix else "", names, table, clash_prefix, out)
    return tuple(out)


# (table, clash prefix) -> key path -> column: a cache, since a name costs a regex or
# two. Bounded, because keys are the sender's choice (an id used as a key makes one per
# event) and this process runs for months.
_NAMES: dict[tuple[str, str], dict[str, str]] = {}
NAMES_MAX = 50_000


def _walk(obj: dict, prefix: str, names: dict, table: str, clash_prefix: str, out: list) -> None:
    for key, value in obj.items():
        if value is None:
            continue
        path = prefix + key if key.__class__ is str else prefix + str(key)
        if value.__class__ is dict and value:
            _walk(value, path + "_", names, table, clash_prefix, out)
            continue
        column = names.get(path)
        if column is None:
            column = names[path] = column_for(path, table, clash_prefix)
        got = typed(value)
        if got.__class__ is tuple:
            out += (column, *got)
        else:
            out += (column, None, got, value)


def column_for(path: str, table: str, clash_prefix: str = "") -> str:
    """The column of a key path (keys joined with "_"), as the layout names it. The one
    place a property, trait or context column is named (shapes.py calls it too)."""
    column = identifier(path)
    if not clash_prefix and column == "context":
        # a context key with nothing ASCII in it ("", "🎉") would name the bare `context`,
        # a property's column: it is named as such a key alone is, after `context`
        column = identifier("context_" + identifier(path[len("context_"):]))
    elif clash_prefix and (column in fixed_columns(table) or column in SYSTEM_COLUMNS
                           or column.startswith("context_")):
        column = identifier(f"{clash_prefix}_{path}")
    return column
