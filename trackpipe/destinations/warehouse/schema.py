"""Column names and the type evolution policy.

Names. Tables and columns are snake_case (`Order Completed` -> `order_completed`,
`firstName` -> `first_name`), nested keys are joined with `_`
(`context.page.path` -> `context_page_path`), accents are dropped (`é` -> `e`) and
other non-ASCII characters vanish (`a🎉b` -> `ab`), any other run of characters outside
[a-z0-9] becomes `_`, a name with nothing left is `_` and 8 hex digits of its SHA-1
(`🎉` -> `_c20dbb2b`), a leading digit gets a `_` prefix, and a name longer than 63 bytes (the
PostgreSQL limit) is cut to 54 bytes plus `_` and 8 hex digits of its hash, so
two long names stay apart. Every identifier is quoted in SQL, so reserved words
are fine.

Types. A column's type comes from the first non-null value it sees:

    bool -> boolean      int -> bigint      float -> double
    ISO-8601 date-time string (`2024-05-01T10:00:00Z`, offset optional, naive = UTC)
                         -> timestamp (timestamptz), when it is exact to the microsecond:
                            digits past the 6th of the fraction must be zeros, since a
                            timestamp column holds microseconds (`...00.123456789Z` is text)
    other string -> text       object or array -> text holding JSON

A later value that does not fit WIDENS the column, never narrows it:

    bigint -> double -> text        boolean -> text        timestamp -> text

(bigint meeting double becomes double; any other pair becomes text.) Widening is
`ALTER COLUMN ... TYPE ... USING` a cast, logged and recorded in `schema_changes`.
Text is the end of every path, so a column never fails a row for being too narrow.
Widening bigint to double rounds the integers already stored beyond +/-2^53, so in
the same transaction, just before the ALTER, each of them is copied to
`rejected_values` as its exact digits (message_id = the row's id: its messageId, or
in `users` its userId); the column keeps the rounded double.

Rejected values. A value that no column type of the policy can hold faithfully is
written to `rejected_values` (table, column, messageId, the value as text, the
reason) and its cell is left NULL; the rest of the row is loaded:

  - an integer outside the 64-bit range (send it as a string to keep every digit);
  - an integer beyond +/-2^53 bound for a double column (it would be rounded);
  - a float that is NaN or infinite;
  - a string containing a NUL character (PostgreSQL text cannot hold one);
  - a value for a fixed column (receivedAt, userId...) that its type cannot hold;
  - a second key that maps to a column already filled in the same row
    (`firstName` and `first_name` both name `first_name`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import unicodedata
from functools import lru_cache
from typing import Any, NamedTuple

import msgspec

BOOLEAN, BIGINT, DOUBLE, TIMESTAMP, TEXT = "boolean", "bigint", "double", "timestamp", "text"
JSON = "json"  # a value kind only: objects and arrays load as text
MAX_IDENTIFIER_BYTES = 63
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EXACT_IN_DOUBLE = 2**53

_encode_json = msgspec.json.Encoder().encode


class Rejected(NamedTuple):
    """Why a value cannot be stored; the value goes to `rejected_values`."""

    reason: str
    value: Any = None


# -- names ---------------------------------------------------------------------------

_ACRONYM = re.compile(r"([A-Z]+)([A-Z][a-z])")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_UNSAFE = re.compile(r"[^a-z0-9]+")


@lru_cache(maxsize=65536)
def identifier(name: str) -> str:
    """A safe, snake_case SQL identifier for a key path, table or event name."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    snake = _CAMEL.sub(r"\1_\2", _ACRONYM.sub(r"\1_\2", ascii_name)).lower()
    safe = _UNSAFE.sub("_", snake).strip("_")
    if not safe:  # nothing ASCII survived: keep distinct names distinct
        safe = "_" + _digest(name)
    elif safe[0].isdigit():
        safe = "_" + safe
    if len(safe) > MAX_IDENTIFIER_BYTES:
        safe = safe[:MAX_IDENTIFIER_BYTES - 9] + "_" + _digest(name)
    return safe


def _digest(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- value kinds and the widening policy ---------------------------------------------

_TIMESTAMP_SHAPE = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}(:?\d{2})?)?", re.ASCII)


def parse_timestamp(value: str) -> dt.datetime | None:
    """An aware datetime for an ISO-8601 date-time string, else None (naive means UTC).
    None too when the fraction has non-zero digits past the microsecond, which a
    timestamp column would drop: such a string is text, kept whole."""
    if len(value) < 16 or value[4] != "-":
        return None
    shape = _TIMESTAMP_SHAPE.fullmatch(value)
    if shape is None:
        return None
    fraction = shape[2]  # "." and up to 9 digits
    if fraction is not None and len(fraction) > 7 and fraction[7:].strip("0"):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)  # 3.11: takes "Z"; digits past µs dropped
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def typed(value: Any) -> tuple[str, Any, Any] | Rejected:
    """(the column type a non-null value asks for, the value as that type loads it, the
    value as sent), or why the value cannot be stored at all."""
    cls = value.__class__
    if cls is str:
        if len(value) >= 16 and value[4] == "-":
            when = parse_timestamp(value)
            if when is not None:
                return TIMESTAMP, when, value
        if "\x00" in value:
            return Rejected("text contains a NUL character, which the warehouse cannot store",
                            value)
        return TEXT, value, value
    if cls is float:
        if math.isfinite(value):
            return DOUBLE, value, value
        return Rejected("number is NaN or infinite", value)
    if cls is bool:
        return BOOLEAN, value, value
    if cls is int:
        if INT64_MIN <= value <= INT64_MAX:
            return BIGINT, value, value
        return Rejected("integer outside the 64-bit range; send it as a string to keep every"
                        " digit", value)
    return JSON, value, value


def widen(current: str | None, kind: str) -> str:
    """The column type after a value of `kind` arrives in a column of type `current`."""
    wanted = TEXT if kind == JSON else kind
    if current is None or current == wanted:
        return wanted
    if {current, wanted} == {BIGINT, DOUBLE}:
        return DOUBLE
    return TEXT


def convert(raw: Any, kind: str, loaded: Any, column_type: str) -> Any:
    """A value of `kind` (`loaded` = as that kind loads) as the column's type will load it,
    or a Rejected when it cannot be."""
    if kind == column_type:
        return loaded
    if column_type == TEXT:
        return as_text(raw, kind)
    if column_type == DOUBLE and kind == BIGINT:
        if abs(raw) > EXACT_IN_DOUBLE:
            return Rejected("integer too large for a double precision column without rounding")
        return float(raw)
    return Rejected(f"a {kind} value cannot be stored in a {column_type} column")


def as_text(value: Any, kind: str) -> str:
    if kind == BOOLEAN:
        return "true" if value else "false"
    if kind == JSON:
        return raw_text(value)
    if kind in (BIGINT, DOUBLE):
        return repr(value)
    return value


def raw_text(value: Any) -> str:
    """Any value as text, for the `value` column of rejected_values."""
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    try:
        return _encode_json(value).decode()
    except (TypeError, OverflowError, ValueError, msgspec.EncodeError):
        return json.dumps(value, default=repr)  # huge integers, NaN: stdlib json writes them
