"""What destinations answered, kept as free text in deliveries.db, and a delete.

An error body may quote a whole batch: other people's events with the deleted
person's. A delete replaces every detail kept for the person's own events'
rows, and elsewhere those that quote one of their ids as a JSON string
(`"u-1"`), which is how an answer echoing a batch writes it; a trait value (an
email) is found so in any case. A bare word is not enough: deleting user "500"
or "1" must not take every "HTTP 500" or "retry in 1 s" with it.
"""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Iterable

import msgspec

from trackpipe.log.sqlite import immediate
from trackpipe.privacy import find

REMOVED = "(removed by a privacy delete: it named a deleted person)"
# The erased events' positions, in a temporary table of the deliveries connection.
ERASED = "erased_positions"
# (table, detail column, key columns, which rows are the erased events' own). Their
# attempts, retries and failures are deleted whole; a batch row covers [lo, hi].
DETAILS = (
    ("batches", "detail", ("id",),
     f"EXISTS (SELECT 1 FROM {ERASED} WHERE p BETWEEN batches.lo AND batches.hi)"),
    ("attempts", "detail", ("id",), "0"),
    ("pending", "last_detail", ("destination", "position"), "0"),
    ("failed", "detail", ("destination", "position"), "0"),
    ("last_errors", "detail", ("destination",), "0"),
    ("delete_notices", "detail", ("id",), "0"),
)

Stale = list[tuple[str, str, tuple[str, ...], list[tuple]]]
"""[(table, column, key columns, [(text, *key)])]"""


def remember(db: sqlite3.Connection, positions: Iterable[int]) -> None:
    """Keep the erased events' positions for `stale` and the caller's deletes."""
    db.execute(f"CREATE TEMP TABLE IF NOT EXISTS {ERASED} (p INTEGER PRIMARY KEY)")
    db.execute(f"DELETE FROM {ERASED}")
    db.executemany(f"INSERT OR IGNORE INTO {ERASED} VALUES (?)", [(p,) for p in positions])


def stale(db: sqlite3.Connection, ids: Iterable[str], trait_values: Iterable[str]) -> Stale:
    """The details to replace, read without holding the write lock (a scan of every
    table; each delivery's record() would wait for it). Call after the log lost the
    person's events and `remember`.

    Rows written after this read do not name the person. A delivery recording an
    outcome asks the log, inside its write transaction, which of its events are gone,
    and keeps no detail of a send that held one (delivery/state.py record). One that
    asked before the log lost them may still hold the write lock: the empty write
    transaction here waits for it to commit, so this read sees its rows."""
    with immediate(db):
        pass
    exact = set().union(*map(find.quoted, ids))
    folded = {f.lower() for v in trait_values for f in find.quoted(v)}
    holds = find.holds(exact, folded)
    found: Stale = []
    for table, column, key, own in DETAILS:
        test, params = find.where(column, exact, folded)
        rows = db.execute(f"SELECT {column}, {', '.join(key)}, {own} FROM {table}"
                          f" WHERE {column} NOT IN ('', ?) AND ({own} OR {test})",
                          (REMOVED, *params))
        found.append((table, column, key, [r[:-1] for r in rows if r[-1] or holds(r[0])]))
    return found


def replace(db: sqlite3.Connection, found: Stale) -> None:
    """In the caller's write transaction, on a connection with secure_delete on. A row
    whose text changed since `stale` read it holds a newer answer, which does not name
    the person (see `stale`), and is left as it is."""
    for table, column, key, rows in found:
        match = " AND ".join(f"{k} = ?" for k in (*key, column))
        db.executemany(f"UPDATE {table} SET {column} = ? WHERE {match}",
                       [(REMOVED, *r[1:], r[0]) for r in rows])


def mentions(values: Iterable[str]):
    """A test of free text for any of `values`, as written or JSON-escaped, standing on its
    own (not inside a longer word or number: "7" is not in "17" nor "u7"). Case-insensitive,
    as trait identifiers (emails) are compared. For a delete notice's own answer, which
    is about no one else."""
    forms = set()
    for value in values:
        if value:
            forms.update((value, msgspec.json.encode(value).decode()[1:-1],
                          json.dumps(value)[1:-1]))
    if not forms:
        return lambda text: False
    alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    pattern = re.compile(rf"(?<![0-9A-Za-z_])(?:{alternatives})(?![0-9A-Za-z_])", re.IGNORECASE)
    return lambda text: pattern.search(text) is not None
