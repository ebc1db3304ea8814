"""Retention: events older than `log.retention_seconds` leave the log once nothing needs them.

Off by default (0: the log keeps every event). When set, an event is deleted
only when it is older than that, identity and every enabled destination have
read past it, and no destination holds it for a retry or in its failed store:
a failure stays replayable however old it gets. The retention is at least the
dedup window (config.py checks), so deduplication never looks for a deleted event.

It runs in the consumers process, on the identity thread between two identity
batches (delivery/process.py), where every reader's position is known, for
about BUDGET_S at a time, so that a large first prune does not hold identity
up. It reads outside any transaction and deletes in small ones, so the log
writer's commits wait for one chunk at most. Freed pages take new events: the
file stops growing; it does not shrink.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path

from trackpipe.log.sqlite import HEAD_FLOOR, KEEP_HEAD_SQL, connect

CHUNK = 2000
PAUSE_S = 0.005  # between two chunks: the writer's next commit goes first
BUDGET_S = 0.5  # one prune's work; a prune that runs out says so (`more`) and goes on later


@dataclass
class Pruned:
    events: int = 0
    discards: int = 0
    repeats: int = 0
    more: bool = False  # ran out of its budget with old events left ...
    after: int = 0  # ... past this position: where the next prune starts


def prune(path: Path, *, read_up_to: int, older_than: int,
          held: Callable[[int, int], set[int]] = lambda lo, hi: set(),
          forget: Callable[[Sequence[int]], None] = lambda positions: None,
          after: int = 0, chunk: int = CHUNK, budget_s: float = BUDGET_S) -> Pruned:
    """Delete what is older than `older_than` (ms) from past `after` up to position
    `read_up_to`, except what `held(lo, hi)` names; `forget(positions)` hears of each
    chunk deleted. A prune that runs out of budget goes on from its `after`, so events
    held for good at the bottom of the log are walked past once, not on every prune."""
    deadline = time.monotonic() + budget_s
    db = connect(path)
    try:
        pruned = Pruned()
        # Consumers that keep their own position in the log hold it back too.
        (lowest,) = db.execute("SELECT min(position) FROM consumers WHERE name != ?",
                               (HEAD_FLOOR,)).fetchone()
        if lowest is not None:
            read_up_to = min(read_up_to, lowest)
        while True:
            rows = db.execute("SELECT position, received_at FROM events WHERE position > ?"
                              " AND position <= ? ORDER BY position LIMIT ?",
                              (after, read_up_to, chunk)).fetchall()
            # Positions follow arrival, so the old events come first; stop at a young one.
            old = [p for p, _ in takewhile(lambda row: row[1] < older_than, rows)]
            if not old:
                break
            kept = held(old[0], old[-1])
            doomed = [p for p in old if p not in kept]
            if doomed:
                with _writing(db):
                    db.execute(KEEP_HEAD_SQL)  # the head's position is never handed out again
                    db.execute("DELETE FROM events WHERE position IN"
                               " (SELECT value FROM json_each(?))", (json.dumps(doomed),))
                forget(doomed)
                pruned.events += len(doomed)
            if len(old) < chunk:
                break
            after = old[-1]
            if time.monotonic() > deadline:
                pruned.more, pruned.after = True, after
                return pruned
            time.sleep(PAUSE_S)
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
        with _writing(db):
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
        with _writing(db):
            db.execute("DELETE FROM repeats WHERE message_id IN (SELECT value FROM json_each(?))"
                       " AND last_repeat_at < ?", (json.dumps(ids[i:i + chunk]), older_than))
        time.sleep(PAUSE_S)
    return len(ids)


class _writing:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False
