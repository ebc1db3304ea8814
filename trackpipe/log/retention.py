"""Retention: events older than `log.retention_seconds` leave the log once nothing needs them.

Off by default (0: the log keeps every event). When set, an event is deleted
only when it is older than that, identity and every enabled destination have
read past it, and no destination holds it for a retry or in its failed store:
a failure stays replayable however old it gets. The retention is at least the
dedup window (config.py checks), so deduplication never looks for a deleted event.

The consumers process runs it on a thread of its own (delivery/process.py),
for about BUDGET_S at a time. It reads outside any transaction and deletes in
small ones, pausing after each as long as it held the log, so the log writer's
commits wait for one chunk at most. Freed pages take new events: the file
stops growing; it does not shrink.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path

from trackpipe.log.sqlite import HEAD_FLOOR, KEEP_HEAD_SQL, connect, immediate

CHUNK = 500  # events a delete transaction: ~5 ms of the log's write lock for ~1 KB events
PAUSE_S = 0.005  # at least this long between two chunks: the writer's next commit goes first
BUDGET_S = 0.5  # one prune's work; a prune that runs out says so (`more`)
# The lowest position the log still holds; with every event gone, the kept head + 1.
LOWEST_SQL = ("SELECT coalesce((SELECT min(position) FROM events),"
              f" (SELECT position + 1 FROM consumers WHERE name = '{HEAD_FLOOR}'))")


@dataclass
class Pruned:
    events: int = 0
    discards: int = 0
    repeats: int = 0
    after: int = 0  # every old event up to here is deleted or held: the next prune's start
    more: bool = False  # it ran out of its budget with old events left


def prune(path: Path, *, read_up_to: int, older_than: int, after: int = 0,
          held: Callable[[int, int], set[int]] = lambda lo, hi: set(),
          forget: Callable[[Sequence[tuple[int, str]], int], None] = lambda gone, below: None,
          chunk: int = CHUNK, budget_s: float = BUDGET_S) -> Pruned:
    """Delete the events older than `older_than` (ms) past position `after`, up to
    `read_up_to`, except those `held(lo, hi)` names. `forget(gone, below)` hears of each
    chunk deleted, as (position, messageId) pairs, with the lowest position the log still
    holds (or the head + 1)."""
    deadline = time.monotonic() + budget_s
    db = connect(path)
    try:
        pruned = Pruned(after=after)
        while True:
            rows = db.execute("SELECT position, received_at, message_id FROM events"
                              " WHERE position > ? AND position <= ? ORDER BY position LIMIT ?",
                              (pruned.after, read_up_to, chunk)).fetchall()
            # Positions follow arrival, so the old events come first; stop at a young one.
            old = list(takewhile(lambda row: row[1] < older_than, rows))
            if not old:
                break
            kept = held(old[0][0], old[-1][0])
            doomed = [(p, message_id) for p, _, message_id in old if p not in kept]
            if doomed:
                started = time.monotonic()
                with immediate(db):
                    db.execute(KEEP_HEAD_SQL)  # the head's position is never handed out again
                    db.execute("DELETE FROM events WHERE position IN"
                               " (SELECT value ->> 0 FROM json_each(?))", (json.dumps(doomed),))
                    (below,) = db.execute(LOWEST_SQL).fetchone()
                hold = time.monotonic() - started
                forget(doomed, below)
                pruned.events += len(doomed)
            else:
                hold = 0.0
            pruned.after = old[-1][0]
            if len(old) < chunk:
                break
            if time.monotonic() > deadline:
                pruned.more = True
                return pruned
            time.sleep(max(PAUSE_S, hold))
        pruned.discards = _prune_discards(db, older_than, chunk)
        pruned.repeats = _prune_repeats(db, older_than, read_up_to, chunk)
        return pruned
    finally:
        db.close()


def _prune_discards(db, older_than: int, chunk: int) -> int:
    deleted = 0
    while True:
        rows = db.execute("SELECT id, received_at FROM discards ORDER BY id LIMIT ?",
                          (chunk,)).fetchall()
        old = [i for i, _ in takewhile(lambda row: row[1] < older_than, rows)]
        if not old:
            return deleted
        with immediate(db):
            db.execute("DELETE FROM discards WHERE id <= ?", (old[-1],))
        deleted += len(old)
        if len(old) < chunk:
            return deleted
        time.sleep(PAUSE_S)


def _prune_repeats(db, older_than: int, read_up_to: int, chunk: int) -> int:
    """A repeat's record goes with the event it repeated, once no repeat came recently."""
    ids = [m for (m,) in db.execute("SELECT message_id FROM repeats WHERE last_repeat_at < ?"
                                    " AND position <= ?", (older_than, read_up_to))]
    for i in range(0, len(ids), chunk):
        with immediate(db):
            db.execute("DELETE FROM repeats WHERE message_id IN (SELECT value FROM json_each(?))"
                       " AND last_repeat_at < ?", (json.dumps(ids[i:i + chunk]), older_than))
        time.sleep(PAUSE_S)
    return len(ids)
