"""The message model: the six Segment call types, their paths, and timestamps.

Timestamps are carried as integer milliseconds since the epoch and emitted
as UTC ISO-8601 with milliseconds and a trailing Z, whatever shape arrived
(`+00:00`, microseconds, `Z`).
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone
from functools import lru_cache

TYPES = ("identify", "track", "page", "screen", "group", "alias")

# Path segment -> the type it implies. Browsers use the first letter.
PATH_TYPES = {**{t: t for t in TYPES}, **{t[0]: t for t in TYPES}}
BATCH_PATHS = ("batch", "b")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
# Any RFC 3339 time Python can hold, before 1970 too (a backfill's history is real).
_MIN_MS = -62135596800000  # 0001-01-01T00:00:00.000Z
_MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
_LEAP_SECOND = re.compile(r"(T\d\d:\d\d:)60", re.ASCII)


def parse_ts(value) -> int | None:
    """ISO-8601 / RFC 3339 string -> ms since the epoch; None when absent or unparseable."""
    if type(value) is not str or len(value) > 40:
        return None
    text = value.upper()  # RFC 3339 allows "t" and "z"
    leap = _LEAP_SECOND.search(text)
    if leap:  # 23:59:60, a leap second: Python has none; it is the next second's start
        text = text[:leap.end(1)] + "59" + text[leap.end():]
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    try:
        ms = (dt - _EPOCH) // _MS + (1000 if leap else 0)
    except OverflowError:
        return None
    return ms if in_range(ms) else None


def format_ts(ms: int) -> str:
    s, milli = divmod(ms, 1000)
    return _second(s) + _MILLI_Z[milli]


# ".000Z" ... ".999Z": a lookup costs a fraction of formatting `milli:03d` anew.
_MILLI_Z = tuple(f".{milli:03d}Z" for milli in range(1000))
# "000" ... "999" -> their value: int() of a slice costs several times a lookup, and
# accepts what a timestamp must not hold (" 12", "1_2", non-ASCII digits).
_MILLI = {f"{milli:03d}": milli for milli in range(1000)}


@lru_cache(maxsize=8192)  # the events of one batch fall in a handful of seconds
def _second(s: int) -> str:
    t = time.gmtime(s)
    return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")


def read_ts(value) -> tuple[int, str] | None:
    """A client's timestamp: (ms, its emitted form), or None when absent or unparseable.

    The shape clients send most (`toISOString()`, or isoformat with ms and
    +00:00) is read by slicing, its second looked up in a cache (the events of
    one batch, and the requests of one moment, share a handful of seconds), and
    kept as it came (with a Z for +00:00); any other shape is emitted anew.
    """
    if type(value) is str:
        n = len(value)
        # ".mmmZ" or ".mmm+00:00" after the second; _MILLI checks the digits
        if (n == 24 and value[23] == "Z" or n == 29 and value[23:] == "+00:00") and (
                value[19] == "."):
            base = _second_ms(value[:19])
            milli = _MILLI.get(value[20:23])
            if base is not None and milli is not None and base + milli <= _MAX_MS:
                return base + milli, value if n == 24 else value[:23] + "Z"
    ms = parse_ts(value)
    return None if ms is None else (ms, format_ts(ms))


@lru_cache(maxsize=8192)
def _second_ms(text: str) -> int | None:
    """"YYYY-MM-DDTHH:MM:SS" (UTC) -> ms since the epoch; None if not a valid time. Its
    shape is checked here, once per second seen, not on every timestamp of that second."""
    if not _CANONICAL_SECOND.match(text):
        return None
    try:
        return (datetime.fromisoformat(text).replace(tzinfo=timezone.utc) - _EPOCH) // _MS
    except (ValueError, OverflowError):
        return None


# The shape read_ts reads by slicing (_second_ms checks the part up to the second).
_CANONICAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(?:Z|\+00:00)\Z", re.ASCII)
_CANONICAL_SECOND = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\Z", re.ASCII)


def in_range(ms: int) -> bool:
    return _MIN_MS <= ms <= _MAX_MS
