"""Deleting a person: their events leave the log, the profile store and the delivery queues.

The erase runs in the consumers process, on the identity thread, between two
identity batches (delivery/process.py), so the identity store never applies an
event of the person after it has forgotten them. The admin API queues the
request (`privacy_requests` in deliveries.db) and waits for it.

Every connection that deletes uses `secure_delete` (freed pages are zeroed)
and the WAL is checkpointed and truncated after, so the person's ids do not
linger in free pages or old WAL frames.

Nodes sharing a PostgreSQL identity store each have a log of their own, and
a timeline row's position is one in the log its row names. The node a delete
is sent to erases its own log's positions only (and whatever names the
person), and the store keeps, for each other node, the person's ids and that
node's positions (identity/repair.py ask). Each node's consumers pick those
up here, between two identity batches as for a request of their own: they
suppress the person on that node, forget the profiles holding the request's
identifiers, each with its type (never another person's found by a bare
value), erase from its log, files and destinations as for a local request,
and tell the store their part is done, asking no one else; the store drops
the ids once every node asked has done its part.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Union

from trackpipe import config
from trackpipe.destinations import destination_class
from trackpipe.identity.facts import ANON, USER, normalize_trait
from trackpipe.log.sqlite import KEEP_HEAD_SQL, SQLiteLog, connect, immediate
from trackpipe.privacy import details, find, names
from trackpipe.privacy import suppress as suppression
from trackpipe.privacy.details import REMOVED, mentions
from trackpipe.privacy.suppress import PROFILE, is_trait
from trackpipe.sources.catalog import Catalog

log = logging.getLogger("trackpipe.privacy")

QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS privacy_requests (
    id         INTEGER PRIMARY KEY,
    ids        TEXT NOT NULL,            -- JSON [[kind, id], ...]; emptied once done
    created_at INTEGER NOT NULL,
    done_at    INTEGER,
    result     TEXT                      -- JSON counts, never ids
);
CREATE TABLE IF NOT EXISTS delete_notices (
    id          INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    user_ids    TEXT NOT NULL,           -- JSON; emptied once sent
    anon_ids    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    state       TEXT NOT NULL,           -- pending | delivered | failed
    detail      TEXT NOT NULL DEFAULT '',
    traits      TEXT NOT NULL DEFAULT '[]'   -- JSON [[trait name, value], ...]; emptied too
);
"""


# Whom a delete notice goes to: a destination's config, or its bare name (see _recipients).
Recipient = Union[str, config.Destination]

# A notice's `traits`, in a file made before it: the person's trait identifiers (emails),
# which a warehouse's identities rows hold, each under the profile id it was loaded with.
_NOTICE_TRAITS = "ALTER TABLE delete_notices ADD COLUMN traits TEXT NOT NULL DEFAULT '[]'"


def create_queue(db: sqlite3.Connection) -> None:
    """The queue's tables, and the notices' `traits` column in a file made before it."""
    db.executescript(QUEUE_SCHEMA)
    if "traits" not in {r[1] for r in db.execute("PRAGMA table_info(delete_notices)")}:
        try:
            db.execute(_NOTICE_TRAITS)
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another connection added it meanwhile
                raise


def queue(db: sqlite3.Connection, ids: list[tuple[str | None, str]]) -> int:
    """Queue a delete of these identifiers, (kind, value) as privacy/suppress.py has them."""
    create_queue(db)
    return db.execute("INSERT INTO privacy_requests (ids, created_at) VALUES (?, ?)",
                      (json.dumps([list(i) for i in ids]), int(time.time() * 1000))).lastrowid


def result(db: sqlite3.Connection, request_id: int) -> dict | None:
    row = db.execute("SELECT result FROM privacy_requests WHERE id = ? AND done_at IS NOT NULL",
                     (request_id,)).fetchone()
    return None if row is None else json.loads(row[0])


def process_requests(data_dir: Path, identity, destinations: Iterable[Recipient]) -> int:
    """Carry out every queued delete; `identity` is the store or None. Returns how many.

    One call at a time: two admin requests' threads would each take the whole queue,
    and the second would find the people gone and record zero counts over the first's."""
    with _PROCESSING:
        return _process_requests(data_dir, identity, destinations)


_PROCESSING = threading.Lock()


def _process_requests(data_dir: Path, identity, destinations: Iterable[Recipient]) -> int:
    db = connect(data_dir / "deliveries.db", synchronous="NORMAL")
    try:
        db.execute("PRAGMA secure_delete=ON")  # every write here removes someone's ids
        create_queue(db)
        todo = db.execute("SELECT id, ids FROM privacy_requests WHERE done_at IS NULL").fetchall()
        for request_id, ids in todo:
            counts = erase(data_dir, identity, _identifiers(ids), db, list(destinations))
            db.execute("UPDATE privacy_requests SET ids = '[]', done_at = ?, result = ?"
                       " WHERE id = ?", (int(time.time() * 1000), json.dumps(counts), request_id))
        asked = _asked(identity)
        for erasure in asked:
            _erase_for_another_node(data_dir, identity, erasure, db, list(destinations))
        if todo or asked:
            _scrub(db)
        return len(todo) + len(asked)
    finally:
        db.close()


_STORE_DOWN_LOGGED = [0.0]  # when the last "cannot ask the store" warning went out


def _asked(identity) -> list:
    """The deletes other nodes asked this one to do. The store is asked every 0.2 s: while
    it is down (identity itself says so and waits), this says it once a minute, and the
    requests of this node's own still go on."""
    if identity is None:
        return []
    try:
        return identity.erasures()
    except Exception as exc:  # noqa: BLE001 - an outage of the store; tried again shortly
        if time.monotonic() - _STORE_DOWN_LOGGED[0] > 60:
            _STORE_DOWN_LOGGED[0] = time.monotonic()
            log.warning("privacy: cannot read the deletes other nodes asked for from the "
                        "identity store (%r); trying again", exc)
        return []


def _erase_for_another_node(data_dir: Path, identity, erasure, db: sqlite3.Connection,
                            destinations: list[Recipient]) -> None:
    """Carry out here a delete another node was sent (see the module's docstring), and keep
    its outcome as a done request of this node's, and in its privacy audit."""
    catalog = Catalog(data_dir)
    try:
        key = catalog.privacy_key()
        by_value = suppression.hashes(key, erasure.identifiers)
        catalog.suppress([h for hs in by_value.values() for h in hs])  # the ingest reloads it
        counts = erase(data_dir, identity, erasure.identifiers, db, destinations,
                       positions=erasure.positions, legacy=erasure.legacy, ask=False)
        now = int(time.time() * 1000)
        result = {**counts, "asked_by_another_node": True}
        db.execute("INSERT INTO privacy_requests (ids, created_at, done_at, result)"
                   " VALUES ('[]', ?, ?, ?)", (now, now, json.dumps(result)))
        identity.erased(erasure.id)
        subject = suppression.id_hash(key, erasure.identifiers[0][1]) if erasure.identifiers \
            else ""
        catalog.audit("delete", subject, json.dumps(result))
    finally:
        catalog.db.close()


def _identifiers(queued: str) -> list[tuple[str | None, str]]:
    """(kind, value) pairs; a request queued by an older version holds bare ids."""
    return [(None, i) if isinstance(i, str) else (i[0], i[1]) for i in json.loads(queued)]


class Person:
    """The identifiers of the person being deleted, by kind. `unknown`: ids given with no
    profile to say what they are, taken as a userId and as an anonymousId both."""

    def __init__(self) -> None:
        self.users: set[str] = set()
        self.anons: set[str] = set()
        self.unknown: set[str] = set()
        self.traits: dict[str, set[str]] = {}  # trait name -> normalised values

    def add(self, kind: str | None, value: str) -> None:
        if kind == USER:
            self.users.add(value)
        elif kind == ANON:
            self.anons.add(value)
        elif kind is None:
            self.unknown.add(value)
        elif is_trait(kind):
            self.traits.setdefault(kind, set()).add(normalize_trait(value))

    @property
    def ids(self) -> set[str]:
        """Their userIds and anonymousIds, of either kind."""
        return self.users | self.anons | self.unknown

    @property
    def as_users(self) -> set[str]:
        return self.users | self.unknown

    @property
    def as_anons(self) -> set[str]:
        return self.anons | self.unknown

    def trait_values(self) -> set[str]:
        return set().union(*self.traits.values())

    def values(self) -> set[str]:
        return self.ids | self.trait_values()

    def named_in(self, named: names.Names) -> bool:
        """Whether an event naming these (id field, id) and (trait, value) is theirs."""
        ids, traits = named
        for field, value in ids:
            if value in self.unknown or value in (
                    self.users if field == "userId" else self.anons if field == "anonymousId"
                    else self.users | self.anons):  # previousId: either kind
                return True
        return any(value in self.traits.get(name, ()) for name, value in traits)


def erase(data_dir: Path, identity, ids: list[tuple[str | None, str]],
          deliveries: sqlite3.Connection, destinations: list[Recipient],
          positions: Iterable[int] = (), legacy: list = (), ask: bool = True) -> dict:
    """Erase the person from this node. `positions`: more of their events in this node's
    log, and `legacy` timeline rows that may be (another node's request carries them);
    `ask`: ask the other nodes sharing the identity store to erase theirs (not when
    carrying out such a request)."""
    person = Person()
    for kind, value in ids:
        person.add(kind, value)
    positions = set(positions)
    profiles = others = 0
    if identity is not None:
        event_log = SQLiteLog(data_dir / "log.db", writable=False)
        try:
            positions |= identity.verify(legacy, event_log.get)
            profiles, others = _forget(identity, ids, person, positions, event_log.get, ask)
        finally:
            event_log.close()
    # The log first, then this file's rows under its write lock: a delivery recording its
    # outcome meanwhile (delivery/state.py record) either finds the event gone, or wrote
    # its rows before, and they are deleted here.
    events, message_ids = _erase_log(data_dir / "log.db", person, positions)
    positions.update(p for p, _ in message_ids)
    deliveries.execute("PRAGMA secure_delete=ON")
    details.remember(deliveries, positions)
    stale = details.stale(deliveries, person.ids, person.trait_values())
    now = int(time.time() * 1000)
    users, anons = sorted(person.as_users), sorted(person.as_anons)
    traits = json.dumps(sorted([kind, v] for kind, vs in person.traits.items() for v in vs))
    notify = _recipients(destinations) if users or anons else []
    erased = f"position IN (SELECT p FROM {details.ERASED})"
    with immediate(deliveries):
        cancelled = deliveries.execute(f"DELETE FROM pending WHERE {erased}").rowcount
        deliveries.execute(f"DELETE FROM failed WHERE {erased}")
        deliveries.execute(f"DELETE FROM attempts WHERE {erased}")
        details.replace(deliveries, stale)
        deliveries.executemany(
            "INSERT INTO delete_notices (destination, user_ids, anon_ids, traits, created_at,"
            " state) VALUES (?, ?, ?, ?, ?, 'pending')",
            [(name, json.dumps(users), json.dumps(anons), traits if profiled else "[]", now)
             for name, profiled in notify])
    return {"profiles": profiles, "events": events, "deliveries_cancelled": cancelled,
            "identifiers": len(person.values()), "destinations_notified": len(notify),
            "other_nodes": others}


def _recipients(destinations: Iterable[Recipient]) -> list[tuple[str, bool]]:
    """(name, whether its notice keeps the person's trait identifiers) of each destination.
    Only a destination that uses profiles reads them (a warehouse finds its identities rows
    by them); in the others' notices an email would only wait on disk until sent. A bare
    name says nothing of its type: its notice keeps them, as a warehouse's must."""
    return [(d, True) if isinstance(d, str)
            else (d.name, destination_class(d.type).uses_profiles) for d in destinations]


def _forget(identity, ids, person: Person, positions: set[int], read, ask: bool
            ) -> tuple[int, int]:
    """Forget the person's profiles in the identity store, adding their identifiers to
    `person` and the positions of their events in this node's log to `positions`.
    Returns (profiles forgotten, other nodes asked to erase theirs)."""
    if not ask:
        return _forget_exactly(identity, ids, person, positions, read), 0
    profiles = others = 0
    # The profile id first: forgetting a bare value picks whichever profile has it, and
    # that may be another person's (their userId spelt like this one's anonymousId).
    gone_values: set[str] = set()
    for kind, value in sorted(ids, key=lambda i: i[0] != PROFILE):
        if kind not in (PROFILE, USER, ANON, None) or value in gone_values:
            continue  # a trait reading of an unknown id, or an id its profile took along
        gone = identity.forget(value, read)
        if gone is None:
            continue
        profiles += 1
        others = max(others, gone.asked)
        positions.update(gone.positions)
        person.unknown.discard(value)
        for k, v in gone.identifiers:
            person.add(k, v)
            gone_values.add(v)
    person.unknown -= person.users | person.anons
    if ask and not profiles:  # no profile here: another node may not have applied theirs yet
        others = identity.ask_others(ids)
    return profiles, others


def _forget_exactly(identity, ids, person: Person, positions: set[int], read) -> int:
    """Carrying out another node's request: forget only the profiles holding one of its
    (kind, value) identifiers, never one found by a bare value (another person's userId
    may be spelt like this person's anonymousId), and ask no one again (the node the
    delete was sent to asked every node). An id the request gives with no type (its node
    had no profile to tell) reads as a userId and as an anonymousId, as in the log (see
    Person). Returns how many profiles were forgotten."""
    pairs = [(k, v) for k, v in ids if k not in (None, PROFILE)]
    pairs += [(k, v) for kind, v in ids if kind is None for k in (USER, ANON)]
    forgotten = identity.forget_ids(pairs, read) if pairs else []
    for gone in forgotten:
        positions.update(gone.positions)
        for k, v in gone.identifiers:
            person.add(k, v)
    person.unknown -= person.users | person.anons
    return len(forgotten)


def _erase_log(path: Path, person: Person, positions: set[int]):
    """Erase the person's events and discards from the log: (how many events, their
    [(position, message_id)]).

    Their rows are found without holding the log's write lock (a scan of every event
    and discard, and Python reading the discards that may be theirs: the ingest's
    commits must not wait for that), then deleted by key in a short write transaction.
    A row stored after the scan is not theirs: their identifiers were suppressed before
    the delete was queued (admin/people.py), and the ingest drops a suppressed person's
    events and invalid events before they reach the log (sources/http.py). Only a
    request already past that check when the suppression took effect can still land,
    as it could just after an erase done in one transaction. Rows are never rewritten,
    but the retention's pruning can free a discard's id for a new one: a discard is
    deleted by its id and the payload that was read."""
    db = connect(path)
    try:
        db.execute("PRAGMA secure_delete=ON")
        found = _their_events(db, person, positions)
        discards = _their_discards(db, person)
        with immediate(db):
            db.execute(KEEP_HEAD_SQL)
            events = db.executemany("DELETE FROM events WHERE position = ?",
                                    [(p,) for p, _ in found]).rowcount
            db.executemany("DELETE FROM repeats WHERE message_id = ?", [(m,) for _, m in found])
            db.executemany("DELETE FROM discards WHERE id = ? AND payload = ?", discards)
        _scrub(db)
        return events, found
    finally:
        db.close()


def _their_events(db: sqlite3.Connection, person: Person, positions: set[int]) -> list:
    """[(position, message_id)] of their events: those identity named, and those whose
    userId or anonymousId is theirs."""
    for table, values in (("gone_users", person.as_users), ("gone_anons", person.as_anons),
                          ("gone_positions", positions)):
        column = "p INTEGER" if table == "gone_positions" else "v TEXT"
        db.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} ({column} PRIMARY KEY)")
        db.execute(f"DELETE FROM {table}")
        db.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?)", [(v,) for v in values])
    return db.execute(
        "SELECT position, message_id FROM events"
        " WHERE position IN (SELECT p FROM gone_positions)"
        " OR user_id IN (SELECT v FROM gone_users)"
        " OR anonymous_id IN (SELECT v FROM gone_anons)"
    ).fetchall()


def _their_discards(db: sqlite3.Connection, person: Person) -> list[tuple[int, str]]:
    """(id, payload) of the invalid events kept with their payload that name the person,
    by the ids the payload names, not by a substring (user "7" is not in "17"). SQLite
    keeps the payloads holding one of their ids' forms; only those are read here."""
    exact = set().union(*map(find.in_payload, person.ids))
    folded = set().union(*map(find.folded_in_payload, person.trait_values()))
    test, params = find.where("payload", exact, folded)
    trait_names = tuple(person.traits)
    rows = db.execute(f"SELECT id, payload FROM discards WHERE {test}", params)
    return [(i, payload) for i, payload in rows
            if person.named_in(names.of_payload(payload, trait_names))]


def _scrub(db: sqlite3.Connection, wait: bool = True) -> None:
    """Push the deletions through the WAL into the (zeroed) main file and empty the WAL.
    `wait` False: try once, never waiting on the busy handler (for a caller on an event
    loop); if a reader or writer is busy, the next delete's checkpoint empties it."""
    (timeout,) = db.execute("PRAGMA busy_timeout").fetchone()
    if not wait:
        db.execute("PRAGMA busy_timeout=0")
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.OperationalError:
        pass  # busy: the next checkpoint does it
    finally:
        if not wait:
            db.execute(f"PRAGMA busy_timeout={int(timeout)}")


def forget_sent_notices(db: sqlite3.Connection) -> None:
    """Blank what a notice no longer owed still holds of its person. A version rolled back
    to, which knows nothing of `traits`, sent notices and left their emails there for good.
    Called at start; only writes (and takes the write lock) when there is something to blank."""
    sent = "state != 'pending' AND (traits != '[]' OR user_ids != '[]' OR anon_ids != '[]')"
    if db.execute(f"SELECT 1 FROM delete_notices WHERE {sent} LIMIT 1").fetchone() is None:
        return
    with secure_delete(db):
        db.execute(f"UPDATE delete_notices SET user_ids = '[]', anon_ids = '[]', traits = '[]'"
                   f" WHERE {sent}")
    _scrub(db, wait=False)  # busy: the next delete's checkpoint empties the WAL


def pending_notice(db: sqlite3.Connection, destination: str):
    """(id, user_ids, anonymous_ids, traits) of the oldest delete notice still owed to
    `destination`; traits: the person's [(trait name, normalised value), ...]."""
    row = db.execute("SELECT id, user_ids, anon_ids, traits FROM delete_notices WHERE"
                     " destination = ? AND state = 'pending' ORDER BY id LIMIT 1",
                     (destination,)).fetchone()
    return None if row is None else (row[0], json.loads(row[1]), json.loads(row[2]),
                                     [tuple(t) for t in json.loads(row[3])])


def finish_notice(db: sqlite3.Connection, notice_id: int, state: str, detail: str) -> None:
    """Record the notice's outcome and forget whom it named: the ids' old bytes are zeroed
    (secure_delete) and the WAL that held them emptied. A destination's answer that
    quotes them is not kept either."""
    row = db.execute("SELECT user_ids, anon_ids, traits FROM delete_notices WHERE id = ?",
                     (notice_id,)).fetchone()
    if row is not None and detail and mentions(
            json.loads(row[0]) + json.loads(row[1]) + [v for _, v in json.loads(row[2])])(detail):
        detail = REMOVED
    with secure_delete(db):
        db.execute("UPDATE delete_notices SET state = ?, detail = ?, user_ids = '[]',"
                   " anon_ids = '[]', traits = '[]' WHERE id = ?", (state, detail, notice_id))
    _scrub(db, wait=False)  # called on the consumers' event loop: every destination waits


@contextlib.contextmanager
def secure_delete(db: sqlite3.Connection):
    """secure_delete on for a shared connection, then back as it was (some SQLite builds
    have it on by default, most not: never rely on the default)."""
    (before,) = db.execute("PRAGMA secure_delete").fetchone()
    db.execute("PRAGMA secure_delete=ON")
    try:
        yield db
    finally:
        db.execute(f"PRAGMA secure_delete={int(before)}")
