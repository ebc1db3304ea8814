"""What the delivery framework knows, in one SQLite file (data_dir/deliveries.db).

Per destination: its cursor in the log (everything up to it has been routed and
either delivered, skipped, put up for retry or failed), the events waiting for
a retry (`pending`), the events that failed for good (`failed`), and the trace
of every attempt. Every outcome of a send and the cursor move commit in ONE
transaction, so a crash can only repeat a delivery, never lose one.

Tracing every attempt per event would cost a row per delivered event; instead a
fresh read (a run of log positions past the cursor) is recorded as one
`batches` row covering [lo, hi] when all its sent events got the same outcome, and
per-event `attempts` rows are written only for retries, replays and mixed
outcomes. The events of the range that were not in the send (skipped by routing,
suppressed, held back for per-user ordering) are listed beside it (`unsent`), so
the range never claims them; a queued event removed without a send leaves a `drops`
row. A read that sends nothing leaves a row too (state 'skipped'). The batch row is
written before the send (state 'sending'), so after a crash the same range is
re-sent as the same batch (same webhook-id).

synchronous=NORMAL: a power loss can only roll back the newest transactions
whole, which re-delivers (at least once), never skips.
"""

from __future__ import annotations

import bisect
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import msgspec

from trackpipe.destinations.base import Outcome
from trackpipe.log.sqlite import CONSUMER_ROWS, PerThread, durable, immediate, insert_many
from trackpipe.pipeline.clock import StepWatch
from trackpipe.privacy import erase

log = logging.getLogger("trackpipe.delivery")

# Created beside the rest, or by _mark_legacy_batches in a file written before them.
UNSENT_TABLES = ("""
CREATE TABLE IF NOT EXISTS unsent (
    batch       INTEGER PRIMARY KEY,     -- batches.id; no row: every event of its range was sent
    positions   TEXT NOT NULL            -- {reason: [[first, last], ...]}: not in its send
)""", """
CREATE TABLE IF NOT EXISTS legacy_batches (
    destination TEXT PRIMARY KEY,        -- its batch rows up to `hi` predate `unsent`: they
    hi          INTEGER NOT NULL         -- do not say which events of their range went
) WITHOUT ROWID""")

SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (
    destination TEXT PRIMARY KEY,
    position    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    id          INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    lo          INTEGER NOT NULL,
    hi          INTEGER NOT NULL,
    events      INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    state       TEXT NOT NULL,           -- sending | delivered | retry | failed | mixed | skipped
    status      INTEGER,
    duration_ms REAL,
    detail      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS batches_by_range ON batches (destination, hi);
""" + ";".join(UNSENT_TABLES) + """;
CREATE TABLE IF NOT EXISTS drops (
    destination TEXT NOT NULL,           -- a queued event removed without a send
    position    INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    reason      TEXT NOT NULL            -- suppressed | deleted | a routing reason
);
CREATE INDEX IF NOT EXISTS drops_by_position ON drops (position);
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    position    INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    state       TEXT NOT NULL,
    status      INTEGER,
    duration_ms REAL,
    detail      TEXT NOT NULL DEFAULT '',
    attempt     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_by_position ON attempts (position);
CREATE TABLE IF NOT EXISTS pending (
    destination      TEXT NOT NULL,
    position         INTEGER NOT NULL,
    user_key         TEXT,
    attempts         INTEGER NOT NULL,
    first_attempt_at INTEGER NOT NULL,
    next_at          INTEGER NOT NULL,
    last_status      INTEGER,
    last_detail      TEXT NOT NULL DEFAULT '',
    received_at      INTEGER NOT NULL,
    PRIMARY KEY (destination, position)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_due ON pending (destination, next_at);
CREATE INDEX IF NOT EXISTS pending_by_user ON pending (destination, user_key, position);
CREATE TABLE IF NOT EXISTS failed (
    destination TEXT NOT NULL,
    position    INTEGER NOT NULL,
    message_id  TEXT NOT NULL,
    failed_at   INTEGER NOT NULL,
    attempts    INTEGER NOT NULL,
    status      INTEGER,
    detail      TEXT NOT NULL,
    reason      TEXT NOT NULL,           -- terminal | retries_exhausted
    received_at INTEGER NOT NULL,
    PRIMARY KEY (destination, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    destination TEXT NOT NULL,
    name        TEXT NOT NULL,           -- delivered | retries | failed:<reason> | skipped:<reason>
    value       INTEGER NOT NULL,
    PRIMARY KEY (destination, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stops (
    destination TEXT PRIMARY KEY,        -- stopped by a 410 Gone until trackpipe restarts
    at          INTEGER NOT NULL,
    detail      TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS suppression_acks (
    name        TEXT PRIMARY KEY,        -- asked (by the admin API) | taken (by the consumers)
    value       INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_errors (
    destination TEXT PRIMARY KEY,
    at          INTEGER NOT NULL,
    status      INTEGER,
    detail      TEXT NOT NULL
) WITHOUT ROWID;
"""


HELD = "held"  # in `unsent`: held back for per-user ordering; its own attempts follow


def now_ms() -> int:
    return int(time.time() * 1000)


def _mark_legacy_batches(db: sqlite3.Connection) -> None:
    """A file written before `unsent` existed: its batch rows span the events their read
    did not send (skipped, held back), with no word of which. How far those rows reach
    (each destination's cursor then) is kept, so that history() asks routing about them,
    as it did then, instead of taking every event of their range for sent. In the
    transaction that creates `unsent`, so the mark is made once, before any new row."""
    def tables() -> set[str]:
        return {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    if "unsent" in tables() or "cursors" not in tables():
        return  # written with `unsent` from the start, or a new file
    with immediate(db):
        if "unsent" in tables():
            return  # another process opening the file was first
        for table in UNSENT_TABLES:
            db.execute(table)
        db.execute("INSERT OR IGNORE INTO legacy_batches SELECT destination, position"
                   " FROM cursors")


def _set_unsent(db: sqlite3.Connection, batch_id: int,
                skipped: dict[str, Sequence[int]] | None,
                held: Sequence[tuple[int, str, int]]) -> None:
    """Record what of a batch's range did not go in its send, and why (nothing when all
    went: the usual batch costs no statement here)."""
    unsent = {reason: _runs(positions) for reason, positions in (skipped or {}).items()
              if positions}
    if held:
        unsent[HELD] = _runs(p for p, _, _ in held)
    if unsent:
        db.execute("INSERT OR REPLACE INTO unsent VALUES (?, ?)", (batch_id, json.dumps(unsent)))


def _runs(positions: Iterable[int]) -> list[list[int]]:
    """Positions as [first, last] runs: what a read skips is mostly contiguous (a filter
    that skips everything), so a row stays small however large the read."""
    runs: list[list[int]] = []
    for p in sorted(positions):
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    return runs


def _in_runs(position: int, runs: list) -> bool:
    return any(first <= position <= last for first, last in runs)


class Sent(NamedTuple):
    """One event of a send, with what happened to it."""

    position: int
    message_id: str
    received_at: int
    user_key: str | None
    attempt: int            # this attempt's number (1 for a fresh event)
    first_attempt_at: int
    outcome: Outcome


class Retry(NamedTuple):
    """A pending event that is due."""

    position: int
    user_key: str | None
    attempts: int
    first_attempt_at: int
    next_at: int

    def send(self) -> tuple[int, int, int] | None:
        """Which failed request this event was last part of: the events of one request
        share its attempt count, first attempt and (one draw of jitter per request,
        _Rows.of) its next attempt. None for an event never sent (a replay, an event
        held back for per-user ordering): those may go with any others."""
        return (self.next_at, self.attempts, self.first_attempt_at) if self.attempts else None


_decode_retries = msgspec.json.Decoder(list[Retry]).decode


class _Rows:
    """The rows the outcomes of one send leave (DeliveryState.record)."""

    def __init__(self, erased: set[int]):
        self.erased = erased
        self.counts: dict[str, int] = dict.fromkeys(("delivered", "retries"), 0)
        self.attempts: list[tuple] = []
        self.pending: list[tuple] = []
        self.failed: list[tuple] = []
        self.done: list[int] = []
        self.given_up: list[Sent] = []
        self.last_error: Outcome | None = None

    def detail(self, text: str) -> str:
        """What the destination answered, unless the send held an erased event: the answer
        may quote it (an error body echoing the batch)."""
        return erase.REMOVED if self.erased and text else text

    @classmethod
    def of(cls, destination: str, sent: Sequence[Sent], at: int, duration_ms: float, policy,
           uniform: bool, erased: set[int], keep_requests: bool = False) -> "_Rows":
        rows = cls(erased)
        if uniform and sent and sent[0].outcome.state == "delivered":
            # A batch delivered whole (the usual send): its batch row tells it, no row per
            # event; an event erased meanwhile went all the same, and counts so.
            rows.counts["delivered"] = len(sent)
            rows.done = [s.position for s in sent]
            return rows
        counts = rows.counts
        delays: dict[tuple, int] = {}
        for s in sent:
            o = s.outcome
            if o.state != "delivered":
                rows.last_error = o
            if s.position in erased:
                rows.done.append(s.position)
                reason = "delivered" if o.state == "delivered" else "skipped:deleted"
                counts[reason] = counts.get(reason, 0) + 1
                continue
            if not uniform:
                rows.attempts.append((destination, s.position, at, o.state, o.status,
                                      duration_ms, rows.detail(o.detail), s.attempt))
            if o.state == "delivered":
                counts["delivered"] += 1
                rows.done.append(s.position)
                continue
            reason = None
            if o.state == "failed":
                reason = "terminal"
            elif policy.exhausted(s.attempt, s.first_attempt_at, at):
                reason = "retries_exhausted"
            if reason:
                counts[f"failed:{reason}"] = counts.get(f"failed:{reason}", 0) + 1
                rows.failed.append((destination, s.position, s.message_id, at, s.attempt,
                                    o.status, rows.detail(o.detail), reason, s.received_at))
                rows.done.append(s.position)
                rows.given_up.append(s)
            else:
                counts["retries"] += 1
                # One draw of jitter per send: the events of a failed batch come due
                # together (DeliveryState.due). Where requests keep apart, one per
                # request: a send the destination cut into several requests (a webhook
                # halving after a 413) answers each with an Outcome of its own.
                key = (s.attempt, o.retry_after, id(o) if keep_requests else None)
                if key not in delays:
                    delays[key] = policy.delay_ms(s.attempt, o.retry_after)
                rows.pending.append((destination, s.position, s.user_key, s.attempt,
                                     s.first_attempt_at, at + delays[key],
                                     o.status, rows.detail(o.detail), s.received_at))
        return rows


class DeliveryState:
    def __init__(self, path: Path | str, log_path: Path | str | None = None,
                 clock: StepWatch | None = None):
        self.path = Path(path)
        self._clock = clock or StepWatch()  # see _follow_the_clock
        # The log whose positions this file's rows name (see _erased).
        self._log_path = Path(log_path) if log_path else self.path.with_name("log.db")
        self._log = PerThread(self._log_path)
        # The committing connection checkpoints after its own commit (SQLite's default
        # every 1000 pages); without it the WAL grew by ~270 bytes per delivered event.
        self._conns = PerThread(self.path, synchronous="NORMAL", autocheckpoint=1000)
        _mark_legacy_batches(self._db())
        self._db().executescript(SCHEMA)
        erase.create_queue(self._db())
        erase.forget_sent_notices(self._db())

    def _db(self) -> sqlite3.Connection:
        return self._conns.get()

    def close(self) -> None:
        self._conns.close_all()
        self._log.close_all()

    # -- cursors and in-flight batches -----------------------------------------

    def cursor(self, destination: str) -> int:
        row = self._db().execute("SELECT position FROM cursors WHERE destination = ?",
                                 (destination,)).fetchone()
        return row[0] if row else 0

    def set_cursor(self, destination: str, position: int) -> None:
        """Start a new destination at the log's head (it receives events from now on)."""
        self._db().execute("INSERT INTO cursors VALUES (?, ?) ON CONFLICT DO NOTHING",
                           (destination, position))

    def unfinished_batch(self, destination: str) -> tuple[int, int, int] | None:
        """(id, lo, hi) of a fresh batch that was being sent when the process stopped."""
        return self._db().execute(
            "SELECT id, lo, hi FROM batches WHERE destination = ? AND state = 'sending'"
            " AND lo > coalesce((SELECT position FROM cursors WHERE destination = ?), 0)"
            " ORDER BY id DESC LIMIT 1", (destination, destination)).fetchone()

    def begin_batch(self, destination: str, lo: int, hi: int, events: int) -> int:
        cur = self._db().execute(
            "INSERT INTO batches (destination, lo, hi, events, at, state)"
            " VALUES (?,?,?,?,?,'sending')",
            (destination, lo, hi, events, now_ms()))
        return cur.lastrowid

    # -- recording outcomes ----------------------------------------------------

    def record(self, destination: str, sent: Sequence[Sent], *, duration_ms: float,
               policy, batch_id: int | None = None, cursor: int | None = None,
               skipped: dict[str, Sequence[int]] | None = None,
               held: Sequence[tuple[int, str, int]] = (),
               keep_requests: bool = False) -> list[Sent]:
        """Commit the outcome of one send (and, for a fresh batch, the cursor move, the
        positions it skipped, by reason, and the events it held back for per-user ordering).

        An event a privacy delete erased while it was being sent leaves no row (it is
        counted as skipped:deleted), and no detail of this send is kept: the
        destination's answer may quote it. Returns the events that were given up on
        (moved to `failed`)."""
        at = now_ms()
        first = sent[0].outcome if sent else Outcome("delivered")
        # One batch row tells the whole send only when every event got the same answer
        # (a send cut into requests, as after a 413, may get a status per request).
        uniform = batch_id is not None and all(s.outcome is first or _shown(s.outcome)
                                               == _shown(first) for s in sent)
        db = self._db()
        with immediate(db):
            # Only a send that leaves rows naming its events needs to ask the log.
            erased = self._erased([*(s.position for s in sent), *(p for p, _, _ in held)]) \
                if held or not uniform or first.state != "delivered" else set()
            rows = _Rows.of(destination, sent, at, duration_ms, policy, uniform, erased,
                            keep_requests)
            for reason, positions in (skipped or {}).items():
                rows.counts[f"skipped:{reason}"] = (rows.counts.get(f"skipped:{reason}", 0)
                                                    + len(positions))
            if batch_id is not None:
                state = first.state if uniform else "mixed"
                # hi: a resent batch cut short (routing changed) covers only what it read.
                db.execute("UPDATE batches SET state = ?, status = ?, duration_ms = ?, detail = ?,"
                           " at = ?, hi = min(hi, coalesce(?, hi)) WHERE id = ?",
                           (state, first.status if uniform else None, duration_ms,
                            rows.detail(first.detail) if uniform else "", at, cursor, batch_id))
                _set_unsent(db, batch_id, skipped, held)
            # Statements per batch, not per event (executemany): each call into SQLite hands
            # the GIL back, and beside a busy identity thread winning it back can take 5 ms
            # (bench/gil_convoy.py); recording a failed batch of 5000 took 6-8 s that way.
            _insert(db, "INSERT INTO attempts (destination, position, at, state, status,"
                    " duration_ms, detail, attempt) VALUES", rows.attempts)
            _delete_pending(db, destination, rows.done)
            _insert(db, "INSERT OR REPLACE INTO pending VALUES", rows.pending)
            _insert(db, "INSERT OR REPLACE INTO failed VALUES", rows.failed)
            self._count(db, destination, rows.counts)
            self._hold(db, destination, [h for h in held if h[0] not in erased], at)
            if rows.last_error is not None:
                db.execute("INSERT OR REPLACE INTO last_errors VALUES (?,?,?,?)",
                           (destination, at, rows.last_error.status,
                            rows.detail(rows.last_error.detail)))
            if cursor is not None:
                db.execute("INSERT INTO cursors VALUES (?, ?) ON CONFLICT (destination)"
                           " DO UPDATE SET position = max(position, excluded.position)",
                           (destination, cursor))
        return rows.given_up

    def _erased(self, positions: Sequence[int]) -> set[int]:
        """Of these positions, those the log no longer holds: a privacy delete erased them
        while they were being sent. Asked inside the transaction that would write their
        rows: the erase deletes from the log before it takes this file's write lock to
        delete their rows (privacy/erase.py), so either it finds the rows written here or
        this finds the events gone; no row can slip in after it."""
        if not positions or not self._log_path.exists():
            return set()  # no log beside this file (a test's bare delivery state)
        wanted = set(positions)
        found = {p for (p,) in self._log.get().execute(
            "SELECT position FROM events WHERE position IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted(wanted)),)).fetchall()}
        return wanted - found

    def skip(self, destination: str, lo: int, cursor: int, skipped: dict[str, Sequence[int]],
             held: Sequence[tuple[int, str, int]] = (), batch_id: int | None = None) -> None:
        """Move the cursor past the read [lo, cursor], whose events were all routed elsewhere
        (`skipped`: positions by reason) or held back; recorded as a 'skipped' batch row.
        `batch_id`: an unfinished batch that turned out to have nothing left to send."""
        at = now_ms()
        db = self._db()
        with immediate(db):
            erased = self._erased([p for p, _, _ in held])
            self._count(db, destination, {f"skipped:{r}": len(ps) for r, ps in skipped.items()})
            self._hold(db, destination, [h for h in held if h[0] not in erased], at)
            if batch_id is not None:
                db.execute("UPDATE batches SET state = 'skipped', events = 0, at = ?,"
                           " hi = min(hi, ?) WHERE id = ?", (at, cursor, batch_id))
            else:
                batch_id = db.execute("INSERT INTO batches (destination, lo, hi, events, at, state)"
                                      " VALUES (?, ?, ?, 0, ?, 'skipped')",
                                      (destination, lo, cursor, at)).lastrowid
            _set_unsent(db, batch_id, skipped, held)
            db.execute("INSERT INTO cursors VALUES (?, ?) ON CONFLICT (destination)"
                       " DO UPDATE SET position = max(position, excluded.position)",
                       (destination, cursor))

    def drop(self, destination: str, dropped: dict[str, Sequence[int]]) -> None:
        """Remove queued events that will not be sent (positions by reason: deleted from
        the log, or no longer routed here), counted as skipped and recorded as drops."""
        db = self._db()
        with immediate(db):
            for reason, positions in dropped.items():
                removed = self._remove_pending(db, destination, positions, reason)
                self._count(db, destination, {f"skipped:{reason}": len(removed)})

    @staticmethod
    def _remove_pending(db: sqlite3.Connection, destination: str, positions: Sequence[int],
                        reason: str) -> list[int]:
        """Delete these pending rows; each one deleted leaves a `drops` row saying why."""
        removed = [p for (p,) in db.execute(
            "DELETE FROM pending WHERE destination = ? AND position IN"
            " (SELECT value FROM json_each(?)) RETURNING position",
            (destination, json.dumps(list(positions)))).fetchall()]
        at = now_ms()
        _insert(db, "INSERT INTO drops VALUES", [(destination, p, at, reason) for p in removed])
        return removed

    @staticmethod
    def _hold(db: sqlite3.Connection, destination: str,
              held: Sequence[tuple[int, str, int]], at: int) -> None:
        """Per-user ordering: park fresh events (position, user_key, received_at) behind their
        user's retrying event; they go, in order, once it is done. Always in the transaction
        that moves the cursor past them: held and cursor commit together, or neither does."""
        _insert(db, "INSERT OR IGNORE INTO pending VALUES",
                [(destination, p, key, 0, at, at, None, "waiting for an earlier event of this user",
                  rec) for p, key, rec in held])

    @staticmethod
    def _count(db: sqlite3.Connection, destination: str, counts: dict[str, int]) -> None:
        db.executemany("INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (destination, name)"
                       " DO UPDATE SET value = value + excluded.value",
                       [(destination, k, v) for k, v in counts.items() if v])

    # -- retries ---------------------------------------------------------------

    def due(self, destination: str, limit: int, *, ordered: bool = False,
            as_sent: bool = False) -> list[Retry]:
        """Pending events whose next attempt is due, oldest position first. With per-user
        ordering only each user's earliest pending event can be due.

        `as_sent`: only the events of ONE failed request, the oldest due event's, so that
        failed requests that come due together (after an outage, a Retry-After, a
        restart) go again one by one, each as it went (a webhook batch keeps its
        webhook-id). When the oldest due event was never sent (a replay, an event held
        back for per-user ordering), the due events never sent go together."""
        self._follow_the_clock()
        due = self._due("next_at <= ?", (destination, now_ms()), limit, ordered)
        if not as_sent or not due:
            return due
        head = due[0]
        if not head.attempts:
            return [r for r in due if not r.attempts]
        # Its request's events share next attempt, attempt count and first attempt (one
        # draw of jitter per request, _Rows.of): an equality lookup on pending_due.
        return self._due("next_at = ? AND attempts = ? AND first_attempt_at = ?",
                         (destination, head.next_at, head.attempts, head.first_attempt_at),
                         limit, ordered, index="pending_due")

    def _follow_the_clock(self) -> None:
        """Times here are wall-clock times, which every process writing this file shares.
        When the wall clock steps (an NTP correction, `date -s`), every pending retry moves
        with it, so that waits and retry windows count the time that passed: a step back
        no longer held every retry for the length of the step, a step forward no longer
        spent retry windows at once (R22). Seen by the process that sends (it asks for
        due retries many times a second)."""
        step = self._clock.step()
        if step:
            db = self._db()
            with immediate(db):
                db.execute("UPDATE pending SET next_at = next_at + ?,"
                           " first_attempt_at = first_attempt_at + ?", (step, step))
            log.warning("the wall clock stepped %+.0f s: pending retries moved with it",
                        step / 1000)

    def _due(self, where: str, args: tuple, limit: int, ordered: bool,
             index: str | None = None) -> list[Retry]:
        sql = ("SELECT position, user_key, attempts, first_attempt_at, next_at FROM pending p"
               f"{f' INDEXED BY {index}' if index else ''} WHERE destination = ? AND {where}")
        if ordered:
            sql += (" AND (user_key IS NULL OR position = (SELECT min(position) FROM pending q"
                    " WHERE q.destination = p.destination AND q.user_key = p.user_key))")
        # One result row for the whole batch (a row-by-row fetch hands the GIL back per
        # row: see log/sqlite.py READ_SQL).
        (rows,) = self._db().execute(
            "SELECT json_group_array(json_array(position, user_key, attempts, first_attempt_at,"
            f" next_at)) FROM ({sql} ORDER BY position LIMIT ?)", (*args, limit)).fetchone()
        return _decode_retries(rows)

    def next_due_in(self, destination: str) -> float | None:
        row = self._db().execute("SELECT min(next_at) FROM pending WHERE destination = ?",
                                 (destination,)).fetchone()
        return None if row[0] is None else max(0.0, (row[0] - now_ms()) / 1000)

    def pending_positions(self, destination: str, lo: int, hi: int) -> set[int]:
        return {p for (p,) in self._db().execute(
            "SELECT position FROM pending WHERE destination = ? AND position BETWEEN ? AND ?",
            (destination, lo, hi))}

    def waiting_users(self, destination: str, keys: Iterable[str]) -> set[str]:
        keys = [k for k in set(keys) if k is not None]
        if not keys:
            return set()
        db = self._db()
        found = set()
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            found.update(r[0] for r in db.execute(
                f"SELECT DISTINCT user_key FROM pending WHERE destination = ? AND user_key IN"
                f" ({','.join('?' * len(chunk))})", (destination, *chunk)))
        return found

    # -- suppression (privacy/suppress.py, delivery/process.py SuppressionFollower) -----

    def ask_suppression(self) -> int:
        """The admin API changed the suppression list: a ticket the consumers process
        acknowledges (suppression_taken) once no destination can receive their events."""
        db = self._db()
        with immediate(db):
            return db.execute("INSERT INTO suppression_acks VALUES ('asked', 1)"
                              " ON CONFLICT (name) DO UPDATE SET value = value + 1"
                              " RETURNING value").fetchone()[0]

    def suppression_asked(self) -> int:
        return self._ack("asked")

    def suppression_taken(self) -> int:
        return self._ack("taken")

    def _ack(self, name: str) -> int:
        row = self._db().execute("SELECT value FROM suppression_acks WHERE name = ?",
                                 (name,)).fetchone()
        return row[0] if row else 0

    def take_suppression(self, ticket: int) -> None:
        self._db().execute("INSERT INTO suppression_acks VALUES ('taken', ?) ON CONFLICT (name)"
                           " DO UPDATE SET value = max(value, excluded.value)", (ticket,))

    def pending_after(self, destination: str, after: int, limit: int) -> list[int]:
        """Positions waiting for this destination (retries, replays, held events) past
        `after`, in order: a page of them (the primary key's order, no sort)."""
        return [p for (p,) in self._db().execute(
            "SELECT position FROM pending WHERE destination = ? AND position > ?"
            " ORDER BY position LIMIT ?", (destination, after, limit))]

    def drop_suppressed(self, destination: str, positions: Sequence[int]) -> int:
        """Remove these pending events (their person is suppressed), counted as
        skipped:suppressed: only the rows this removes, so that a worker and the purge
        dropping the same event count it once. While a privacy delete is queued they
        wait a second instead (unsent): they may be its person's, whose queued
        deliveries the delete cancels and reports itself."""
        if not positions:
            return 0
        db = self._db()
        with immediate(db):
            if db.execute("SELECT 1 FROM privacy_requests WHERE done_at IS NULL").fetchone():
                db.execute("UPDATE pending SET next_at = max(next_at, ?) WHERE destination = ?"
                           " AND position IN (SELECT value FROM json_each(?))",
                           (now_ms() + 1000, destination, json.dumps(list(positions))))
                return 0
            n = len(self._remove_pending(db, destination, positions, "suppressed"))
            self._count(db, destination, {"skipped:suppressed": n})
        return n

    # -- replay ----------------------------------------------------------------

    def replay(self, destination: str, events: Sequence[tuple[int, str | None, int]]) -> int:
        """Queue (position, user_key, received_at) for delivery now. A failed event starts
        over as a fresh attempt; one already waiting for a retry keeps its attempts and
        only comes due now. Callers keep to positions up to the cursor: past it, the
        fresh read delivers them anyway."""
        at = now_ms()
        db = self._db()
        with immediate(db):
            erased = self._erased([p for p, _, _ in events])  # deleted meanwhile: not queued
            events = [e for e in events if e[0] not in erased]
            db.executemany("DELETE FROM failed WHERE destination = ? AND position = ?",
                           [(destination, p) for p, _, _ in events])
            # A retrying event comes due now with the rest of its failed request, so that
            # the request still goes whole (due(as_sent=True)).
            requests = db.execute(
                "SELECT DISTINCT next_at, attempts, first_attempt_at FROM pending WHERE"
                " destination = ? AND attempts > 0 AND position IN"
                " (SELECT value FROM json_each(?))",
                (destination, json.dumps([p for p, _, _ in events]))).fetchall()
            db.executemany("UPDATE pending INDEXED BY pending_due SET next_at = ? WHERE"
                           " destination = ? AND next_at = ? AND attempts = ?"
                           " AND first_attempt_at = ?",
                           [(at, destination, *request) for request in requests])
            db.executemany("INSERT INTO pending VALUES (?,?,?,0,?,?,NULL,'replay',?)"
                           " ON CONFLICT (destination, position) DO UPDATE"
                           " SET next_at = excluded.next_at",
                           [(destination, p, key, at, at, rec) for p, key, rec in events])
        return len(events)

    def failed_positions(self, destination: str, since: int | None = None,
                         until: int | None = None) -> list[tuple[int, int]]:
        sql, args = "SELECT position, received_at FROM failed WHERE destination = ?", [destination]
        if since is not None:
            sql, args = sql + " AND received_at >= ?", args + [since]
        if until is not None:
            sql, args = sql + " AND received_at < ?", args + [until]
        return self._db().execute(sql + " ORDER BY position", args).fetchall()

    def cancel(self, positions: Sequence[int]) -> int:
        """Privacy delete: drop queued deliveries and traces of these events everywhere."""
        db = self._db()
        rows = [(p,) for p in positions]
        with erase.secure_delete(db), immediate(db):  # their rows name them (user_key)
            n = db.executemany("DELETE FROM pending WHERE position = ?", rows).rowcount
            db.executemany("DELETE FROM failed WHERE position = ?", rows)
            db.executemany("DELETE FROM attempts WHERE position = ?", rows)
            db.executemany("DELETE FROM drops WHERE position = ?", rows)
        return n

    # -- retention (log/retention.py) -------------------------------------------

    def lowest_cursor(self, destinations: Iterable[str]) -> int | None:
        """How far every one of these destinations has routed the log (None: none named)."""
        cursors = dict(self._db().execute("SELECT destination, position FROM cursors"))
        return min((cursors.get(name, 0) for name in destinations), default=None)

    def known_destinations(self) -> list[str]:
        """Every destination that ever ran (each has a cursor from its first start)."""
        return [d for (d,) in self._db().execute("SELECT destination FROM cursors")]

    def leftovers(self, destination: str) -> tuple[int, int]:
        """(events waiting for a retry or a replay, events failed) of this destination."""
        db = self._db()
        return tuple(db.execute(f"SELECT count(*) FROM {table} WHERE destination = ?",
                                (destination,)).fetchone()[0] for table in ("pending", "failed"))

    def held(self, destinations: Sequence[str], lo: int, hi: int) -> set[int]:
        """Positions in [lo, hi] a destination still needs: waiting for a retry, or failed
        (and so replayable). One snapshot: a replay moves an event from failed to pending
        in one transaction, and it must be seen in one or the other."""
        db, found = self._db(), set()
        db.execute("BEGIN")
        try:
            for destination in destinations:  # the primary keys' prefix: no scan
                for table in ("pending", "failed"):
                    found.update(p for (p,) in db.execute(
                        f"SELECT position FROM {table} WHERE destination = ? AND position"
                        " BETWEEN ? AND ?", (destination, lo, hi)))
        finally:
            db.execute("COMMIT")
        return found

    def forget_traces(self, positions: Sequence[int], below: int) -> None:
        """The retention deleted these events: drop every row naming them (attempts, drops,
        and the queued or failed rows of a destination no longer configured, which no
        longer holds the log), the batches that end below `below`, the lowest position the
        log still holds, and the batches around these positions whose range holds no event
        the log still has (one held event at the bottom of the log keeps only its own)."""
        doomed = json.dumps(sorted(positions))
        db = self._db()
        with immediate(db):
            for table in ("attempts", "drops", "pending", "failed"):
                db.execute(f"DELETE FROM {table} WHERE position IN"
                           " (SELECT value FROM json_each(?))", (doomed,))
            # Below `below` no event is left: traces of events the retention never met
            # (a privacy delete leaves `drops`; a forget given up on, attempts) go too.
            for table in ("attempts", "drops"):
                db.execute(f"DELETE FROM {table} WHERE position < ?", (below,))
            for destination in self.known_destinations():
                gone = [i for (i,) in db.execute(
                    "DELETE FROM batches WHERE destination = ? AND hi < ? RETURNING id",
                    (destination, below)).fetchall()]
                if positions:
                    gone += self._forget_emptied(db, destination, min(positions), max(positions))
                db.execute("DELETE FROM unsent WHERE batch IN (SELECT value FROM json_each(?))",
                           (json.dumps(gone),))

    def _forget_emptied(self, db: sqlite3.Connection, destination: str, lo: int,
                        hi: int) -> list[int]:
        """Delete this destination's batch rows that overlap [lo, hi] and whose range the
        log no longer holds any event of; returns their ids."""
        rows = []
        found = db.execute("SELECT id, lo, hi FROM batches WHERE destination = ? AND hi >= ?"
                           " ORDER BY hi", (destination, lo))
        for row in found:
            if row[1] > hi:
                break  # ranges follow the cursor: the rest lie past the deleted positions
            rows.append(row)
        found.close()
        if not rows or not self._log_path.exists():
            return []
        kept = [p for (p,) in self._log.get().execute(
            "SELECT position FROM events WHERE position BETWEEN ? AND ? ORDER BY position",
            (min(r[1] for r in rows), max(r[2] for r in rows)))]
        empty = [i for i, first, last in rows
                 if bisect.bisect_left(kept, first) == bisect.bisect_right(kept, last)]
        db.execute("DELETE FROM batches WHERE id IN (SELECT value FROM json_each(?))",
                   (json.dumps(empty),))
        return empty

    def make_durable(self) -> None:
        """fsync what is committed: the cursors just read must survive a power cut before
        the retention deletes what they have passed (this file runs synchronous=NORMAL)."""
        durable(self.path)

    def stop(self, destination: str, detail: str) -> None:
        self._db().execute("INSERT OR REPLACE INTO stops VALUES (?, ?, ?)",
                           (destination, now_ms(), detail))

    def clear_stop(self, destination: str) -> None:
        self._db().execute("DELETE FROM stops WHERE destination = ?", (destination,))

    def pending_notice(self, destination: str):
        return erase.pending_notice(self._db(), destination)

    def finish_notice(self, notice_id: int, state: str, detail: str) -> None:
        erase.finish_notice(self._db(), notice_id, state, detail)

    # -- inspection --------------------------------------------------------------

    def history(self, destination: str, position: int,
                routed_away: Callable[[], str | None] | None = None
                ) -> tuple[str | None, list[dict]]:
        """What became of the event at `position` for this destination, as recorded:
        (its state, its attempts oldest first). The state is None when nothing about it
        is recorded (it was stored before the destination was added): the caller may
        derive it from routing. `routed_away`: why routing skips the event (None: it does
        not), asked only about a batch row from before `unsent` (_mark_legacy_batches).
        Read in one transaction, the cursor too: a batch recorded meanwhile is seen
        whole or not at all."""
        db = self._db()
        db.execute("BEGIN")
        try:
            queued = self._queued_state(db, destination, position)
            steps = self._steps(db, destination, position, routed_away)
            cursor = self.cursor(destination)
        finally:
            db.execute("COMMIT")
        attempts = [step for _, kind, step in steps if kind == "attempt"]
        if queued is not None:
            return queued, attempts
        if position > cursor:
            return "pending", attempts  # not read yet
        if not steps:
            return None, []
        _, kind, last = steps[-1]
        if kind == "skip":
            return last, attempts
        return {"retry": "retrying"}.get(last["state"], last["state"]), attempts

    @staticmethod
    def _queued_state(db: sqlite3.Connection, destination: str, position: int) -> str | None:
        if db.execute("SELECT 1 FROM failed WHERE destination = ? AND position = ?",
                      (destination, position)).fetchone():
            return "failed"
        row = db.execute("SELECT attempts FROM pending WHERE destination = ? AND position = ?",
                         (destination, position)).fetchone()
        if row:
            return "retrying" if row[0] else "queued"
        return None

    @staticmethod
    def _steps(db: sqlite3.Connection, destination: str, position: int,
               routed_away: Callable[[], str | None] | None = None) -> list[tuple]:
        """(at, "attempt" | "skip", attempt dict | state), in order: the fresh read that
        covered the position, then its attempts and drops."""
        steps: list[tuple] = []
        row = db.execute("SELECT lo, at, state, status, duration_ms, detail, unsent.positions,"
                         " hi <= (SELECT hi FROM legacy_batches l WHERE l.destination ="
                         " batches.destination) FROM batches"
                         " LEFT JOIN unsent ON unsent.batch = batches.id"
                         " WHERE destination = ? AND hi >= ? AND state != 'sending'"
                         " ORDER BY hi LIMIT 1", (destination, position)).fetchone()
        if row and row[0] <= position:
            lo, at, state, status, duration_ms, detail, unsent, legacy = row
            if legacy and unsent is None:  # it does not say what of its range went
                reason = routed_away() if routed_away is not None else None
            else:
                reason = next((r for r, runs in json.loads(unsent or "{}").items()
                               if _in_runs(position, runs)), None)
            if reason is not None and reason != HELD:
                steps.append((at, "skip", f"skipped ({reason})"))
            elif reason is None and state not in ("mixed", "skipped"):
                steps.append((at, "attempt",
                               _attempt(at, state, status, duration_ms, detail, 1)))
        steps += [(at, "attempt", _attempt(at, *rest)) for at, *rest in db.execute(
            "SELECT at, state, status, duration_ms, detail, attempt FROM attempts"
            " WHERE destination = ? AND position = ? ORDER BY id", (destination, position))]
        steps += [(at, "skip", f"skipped ({reason})") for at, reason in db.execute(
            "SELECT at, reason FROM drops WHERE destination = ? AND position = ? ORDER BY rowid",
            (destination, position))]
        return sorted(steps, key=lambda step: step[0])  # stable: ties keep this order

    def where_is(self, destination: str, position: int) -> str:
        """The event's state for this destination: pending, queued, retrying, failed or done."""
        queued = self._queued_state(self._db(), destination, position)
        if queued is not None:
            return queued
        return "done" if position <= self.cursor(destination) else "pending"

    def summary(self, destination: str) -> dict:
        """Counters, cursor, retries and failures as of one moment: read in one transaction,
        so an outcome recorded meanwhile is counted once (delivered) and not also as pending."""
        db = self._db()
        db.execute("BEGIN")
        try:
            return self._summary(db, destination)
        finally:
            db.execute("COMMIT")

    def _summary(self, db: sqlite3.Connection, destination: str) -> dict:
        counters = dict(db.execute("SELECT name, value FROM counters WHERE destination = ?",
                                   (destination,)).fetchall())
        retrying, oldest = db.execute(
            "SELECT count(*), min(received_at) FROM pending WHERE destination = ?",
            (destination,)).fetchone()
        failed_now = db.execute("SELECT count(*) FROM failed WHERE destination = ?",
                                (destination,)).fetchone()[0]
        err = db.execute("SELECT at, status, detail FROM last_errors WHERE destination = ?",
                         (destination,)).fetchone()
        stop = db.execute("SELECT at, detail FROM stops WHERE destination = ?",
                          (destination,)).fetchone()
        cursor = db.execute("SELECT position FROM cursors WHERE destination = ?",
                            (destination,)).fetchone()
        return {
            "cursor": None if cursor is None else cursor[0],  # None: it never started
            "counters": counters,
            "retrying": retrying,
            "oldest_retrying_received_at": oldest,
            "failed_now": failed_now,
            "last_error": None if err is None else {"at": err[0], "status": err[1],
                                                    "detail": err[2]},
            "stopped": None if stop is None else {"at": stop[0], "detail": stop[1]},
        }

    def failed(self, destination: str, limit: int = 100, after: int = 0) -> list[dict]:
        """A page of the failed store, by position: up to `limit` past position `after`."""
        rows = self._db().execute(
            "SELECT position, message_id, failed_at, attempts, status, detail, reason FROM failed"
            " WHERE destination = ? AND position > ? ORDER BY position LIMIT ?",
            (destination, after, limit)).fetchall()
        keys = ("position", "message_id", "failed_at", "attempts", "status", "detail", "reason")
        return [dict(zip(keys, r)) for r in rows]


def _shown(outcome: Outcome) -> tuple:
    """What an attempt shows of an outcome."""
    return outcome.state, outcome.status, outcome.detail


def _attempt(at, state, status, duration_ms, detail, attempt) -> dict:
    return {"at": at, "state": state, "status": status,
            "duration_ms": None if duration_ms is None else round(duration_ms, 1),
            "detail": detail, "attempt": attempt}


def _insert(db: sqlite3.Connection, head: str, rows: Sequence[tuple]) -> None:
    """`head` is "INSERT ... VALUES"; CONSUMER_ROWS rows per statement."""
    if rows:
        insert_many(db, head, len(rows[0]), rows, max_rows=CONSUMER_ROWS)


def _delete_pending(db: sqlite3.Connection, destination: str, positions: list[int]) -> None:
    """One statement for all of them, like _insert; none when no pending row lies in their
    range, as for a fresh batch delivered whole (encoding its thousand positions for a
    DELETE that finds nothing cost more than the rest of its recording)."""
    if positions and db.execute(
            "SELECT 1 FROM pending WHERE destination = ? AND position BETWEEN ? AND ? LIMIT 1",
            (destination, min(positions), max(positions))).fetchone():
        db.execute("DELETE FROM pending WHERE destination = ? AND position IN"
                   " (SELECT value FROM json_each(?))", (destination, json.dumps(positions)))
