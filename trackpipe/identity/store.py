"""The identity store interface: what the consumer, the delivery path and the admin API call.

    store = open_store(settings.identity, data_dir)   # SQLite data_dir/identity.db, or PostgreSQL
                                # (shared by nodes: each keeps its own position, see node_id)
    store.apply(entries)        # log entries in position order; idempotent per position: the
                                # store's position commits in the same transaction as the changes
    store.position() -> int     # the last position applied
    store.resolve(user_id, anonymous_id) -> profile id | None
    store.resolve_many([(user_id, anonymous_id), ...]) -> [profile id | None, ...]
    store.resolve_entries(entries) -> [Resolved, ...]  # each entry's person, and the person
                                # of each identifier it names (the delivery path: one lookup)
    store.profile(ident) -> dict | None     # ident: profile id (current or merged away), userId,
                                            # anonymousId, or a trait identifier value (email)
    store.timeline(ident, cursor, limit, read) -> (positions, next_cursor | None)
                                # positions in THIS node's log (read: its EventLog.get)
    store.elsewhere(ident) -> {log: n}      # the person's events other nodes' logs hold
    store.merges(ident) -> [merge record, ...]
    store.unmerge(profile_id, merge_id) -> [resulting profile ids]   # LookupError if no such merge
    store.forget(ident, read) -> Forgotten | None  # privacy delete of the whole person; the
                                # other nodes sharing the store are asked to erase theirs:
    store.ask_others(ids) -> n  # ... also for ids with no profile
    store.erasures() -> [Erasure, ...]   # what other nodes asked this node's log to erase
    store.forget_ids(pairs, read) -> [Forgotten, ...]  # ... the profiles holding exactly
                                # these (kind, value) ids, asking no one again
    store.erased(erasure_id)    # ... done
    store.stats() -> {"profiles", "identifiers", "blocked", "refused"}
    store.close()

A profile is {"profile_id", "user_ids", "anonymous_ids", "identifiers": [{"type", "value"}],
"traits", "groups": [{"group_id", "traits"}], "event_counts", "type_counts", "first_seen",
"last_seen", "merged_profile_ids"}. A merge record is {"id", "at", "position", "message_id",
"kind": "merge" | "refused" | "unmerge", "rule", "edge", "from", "to", "identifiers"}; `id`
is what unmerge() takes. The rules are in graph.py. Every method is thread-safe.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from trackpipe.errors import ConfigError
from trackpipe.log.base import Entry

# base32 in Crockford's alphabet, which keeps the ids in time order when sorted as text.
_CROCKFORD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", "0123456789ABCDEFGHJKMNPQRSTVWXYZ")


class Forgotten(NamedTuple):
    """What forget() removed: (type, value) identifiers, and the positions in this node's
    log of the events attributed to them, so the caller can delete those events from the
    log; `asked`: how many other nodes were asked to erase theirs (see Erasure)."""

    identifiers: list[tuple[str | None, str]]  # None: a userId or an anonymousId
    positions: list[int]
    asked: int = 0


class Erasure(NamedTuple):
    """A privacy delete another node carried out, for this node to do on its own log: the
    person's (type, value) identifiers, the positions in this node's log of the events
    the store had attributed to them, and their timeline rows of no known log
    ((position, log, ts, kind, value), written before rows named their log), which are
    this node's if its log holds the events that made them (store.verify)."""

    id: int
    identifiers: list[tuple[str | None, str]]
    positions: list[int]
    legacy: Sequence[tuple] = ()


class Resolved(NamedTuple):
    """An event's person at delivery time (its userId's, else its anonymousId's), and the
    person the store holds each identifier it names in: its userId, anonymousId, alias
    previousId and configured trait identifiers, keyed (kind, value) as identity keeps
    them (kind user_id, anonymous_id or the trait's name; a trait's value trimmed and
    lower-cased). An identifier is another person's when identity refused to join it."""

    profile_id: str | None
    identifiers: dict[tuple[str, str], str]


NOBODY = Resolved(None, {})

ReadLog = Callable[[Sequence[int]], list[Entry]]
"""This node's EventLog.get: the entries at these positions."""


def new_profile_id() -> str:
    """ "prof_" + a ULID (48-bit ms time, 80 random bits, Crockford base32): sortable by birth."""
    raw = int(time.time() * 1000).to_bytes(6, "big") + os.urandom(10)
    return "prof_" + base64.b32encode(raw)[:26].decode().translate(_CROCKFORD)


class IdentityStore(ABC):
    consumer: str  # whose log position this store keeps
    # Message types apply() can take without their bodies when the entries carry their
    # ts (the consumer then reads them lean; see EventLog.read).
    lean_types: tuple[str, ...] = ()

    @abstractmethod
    def apply(self, entries: Sequence[Entry]) -> None: ...

    @abstractmethod
    def position(self) -> int: ...

    def make_durable(self) -> None:
        """Make every applied batch survive a power cut (before the log's retention deletes
        what the position has passed). A store that commits durably has nothing to do."""

    def resolve(self, user_id: str | None, anonymous_id: str | None) -> str | None:
        return self.resolve_many([(user_id, anonymous_id)])[0]

    @abstractmethod
    def resolve_many(self, pairs: Sequence[tuple[str | None, str | None]]) -> list[str | None]: ...

    @abstractmethod
    def resolve_entries(self, entries: Sequence[Entry]) -> list[Resolved]: ...

    @abstractmethod
    def profile(self, ident: str) -> dict | None: ...

    @abstractmethod
    def timeline(self, ident: str, cursor: str | None = None, limit: int = 100,
                 read: ReadLog | None = None) -> tuple[list[int], str | None]:
        """A page of the positions of the person's events in this node's log, in timestamp
        order (a page may hold fewer than `limit`: follow next_cursor). `read` reads this
        node's log, to tell which rows written before rows named their log are its own;
        without it those are left out."""

    def elsewhere(self, ident: str) -> dict[str, int]:
        """How many of the person's events each other node's log holds (by position name)."""
        return {}

    @abstractmethod
    def merges(self, ident: str) -> list[dict]: ...

    @abstractmethod
    def unmerge(self, profile_id: str, merge_id: str | int) -> list[str]: ...

    @abstractmethod
    def forget(self, ident: str, read: ReadLog | None = None) -> Forgotten | None: ...

    def ask_others(self, ids: Sequence[tuple[str | None, str]]) -> int:
        """Ask the other nodes sharing the store to erase the events naming `ids` from their
        logs; returns how many were asked. A store of one log has no one to ask."""
        return 0

    def forget_ids(self, pairs: Sequence[tuple[str, str]], read: ReadLog | None = None
                   ) -> list[Forgotten]:
        """Forget the profiles holding one of these exact (kind, value) identifiers, and ask
        no other node: carrying out a delete another node asked for (see Erasure)."""
        return []

    def erasures(self) -> list[Erasure]:
        """The deletes other nodes asked this node to carry out on its log."""
        return []

    def erased(self, erasure_id: int) -> None:
        """This node has carried out erasure `erasure_id`."""

    def verify(self, rows: Sequence[tuple], read: ReadLog | None) -> set[int]:
        """The positions of timeline rows that are this node's log's (see Erasure)."""
        return set()

    @abstractmethod
    def stats(self) -> dict: ...

    def close(self) -> None:
        """Release connections."""


# The position's name in a store of its own (SQLite, in the data dir), and the name every
# node used in a shared PostgreSQL store before node ids: the first node to start with node
# ids takes that row over (PostgresStore `adopt`), so an upgraded node resumes where it was.
CONSUMER = "identity"
NODE_ID_FILE = "node_id"
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

log = logging.getLogger("trackpipe.identity")


def node_id(data_dir: str | os.PathLike) -> str:
    """This data dir's node id: the text of data_dir/node_id, made (32 random hex digits)
    the first time it is asked for. It names this node's log position in a store several
    nodes share, so it must differ between the nodes: an operator may write a name of
    their own there before the first start, and must not copy it to a second node."""
    path = Path(data_dir) / NODE_ID_FILE
    if not path.exists():
        _create_node_id(path)
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not _NODE_ID.fullmatch(text):
        raise ConfigError(f"{path} holds {text[:80]!r}, which is not a node id: write 1-64 "
                          "letters, digits, '.', '_' or '-' there (a name no other node "
                          "sharing the identity store uses), or delete the file to get a "
                          "new random id (this node then applies its whole log again). If "
                          "this node ran with another id before, remove that id's rows from "
                          "the store, or privacy deletes keep the person's ids there for it: "
                          "DELETE FROM positions WHERE consumer = 'identity:<old id>'; DELETE "
                          "FROM erasure_logs WHERE log = 'identity:<old id>' (README, "
                          "Privacy).")
    return text


def _create_node_id(path: Path) -> None:
    """Written whole and then linked into place, so that a reader never sees it half
    written and of two processes starting at once, both keep the first one's id."""
    temp = path.with_name(f"{NODE_ID_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(uuid.uuid4().hex + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return
        log.info("identity: this data dir's node id is now %s (%s)", path.read_text().strip(),
                 path)
    finally:
        temp.unlink(missing_ok=True)


def open_store(settings, data_dir: str | os.PathLike, consumer: str | None = None
               ) -> IdentityStore:
    """The store `settings` (config.Identity) asks for. `consumer` names whose log position
    it keeps; by default "identity" in the SQLite store (one per data dir, so one per log),
    and "identity:<node id>" in PostgreSQL, which several nodes with logs of their own
    share (see node_id). A node whose id changes leaves its old position behind, and
    privacy deletes wait for it: README, Privacy, says how to remove it."""
    if settings.store == "sqlite":
        from trackpipe.identity.sqlite_store import SQLiteStore
        return SQLiteStore(Path(data_dir) / "identity.db", settings, consumer or CONSUMER)
    if settings.store == "postgres":
        if not settings.postgres_dsn:
            raise ConfigError('[identity] store = "postgres" needs postgres_dsn, e.g. '
                              'postgres_dsn = "postgresql://trackpipe@db-host/trackpipe".')
        from trackpipe.identity.postgres_store import PostgresStore
        if consumer is not None:
            return PostgresStore(settings.postgres_dsn, settings, consumer)
        return PostgresStore(settings.postgres_dsn, settings, f"{CONSUMER}:{node_id(data_dir)}",
                             adopt=CONSUMER)
    raise ConfigError(f'[identity] store = {settings.store!r} is not a store trackpipe has; '
                      'use "sqlite" (embedded) or "postgres" (shared by several nodes).')
