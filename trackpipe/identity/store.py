"""The identity store interface: what the consumer, the delivery path and the admin API call.

    store = open_store(settings.identity, data_dir)   # SQLite data_dir/identity.db, or PostgreSQL
    store.apply(entries)        # log entries in position order; idempotent per position: the
                                # store's position commits in the same transaction as the changes
    store.position() -> int     # the last position applied
    store.resolve(user_id, anonymous_id) -> profile id | None
    store.resolve_many([(user_id, anonymous_id), ...]) -> [profile id | None, ...]
    store.profile(ident) -> dict | None     # ident: profile id (current or merged away), userId,
                                            # anonymousId, or a trait identifier value (email)
    store.timeline(ident, cursor, limit) -> (positions, next_cursor | None)
    store.merges(ident) -> [merge record, ...]
    store.unmerge(profile_id, merge_id) -> [resulting profile ids]   # LookupError if no such merge
    store.forget(ident) -> Forgotten | None  # privacy delete of the whole person
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
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from trackpipe.errors import ConfigError
from trackpipe.log.base import Entry

# base32 in Crockford's alphabet, which keeps the ids in time order when sorted as text.
_CROCKFORD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", "0123456789ABCDEFGHJKMNPQRSTVWXYZ")


class Forgotten(NamedTuple):
    """What forget() removed: (type, value) identifiers, and the log positions of the events
    attributed to them, so the caller can delete those events from the log."""

    identifiers: list[tuple[str, str]]
    positions: list[int]


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
    def profile(self, ident: str) -> dict | None: ...

    @abstractmethod
    def timeline(self, ident: str, cursor: str | None = None, limit: int = 100
                 ) -> tuple[list[int], str | None]: ...

    @abstractmethod
    def merges(self, ident: str) -> list[dict]: ...

    @abstractmethod
    def unmerge(self, profile_id: str, merge_id: str | int) -> list[str]: ...

    @abstractmethod
    def forget(self, ident: str) -> Forgotten | None: ...

    @abstractmethod
    def stats(self) -> dict: ...

    def close(self) -> None:
        """Release connections."""


def open_store(settings, data_dir: str | os.PathLike, consumer: str = "identity") -> IdentityStore:
    """The store `settings` (config.Identity) asks for. `consumer` names whose log position
    it keeps: nodes sharing one PostgreSQL store each pass their own name."""
    if settings.store == "sqlite":
        from trackpipe.identity.sqlite_store import SQLiteStore
        return SQLiteStore(Path(data_dir) / "identity.db", settings, consumer)
    if settings.store == "postgres":
        if not settings.postgres_dsn:
            raise ConfigError('[identity] store = "postgres" needs postgres_dsn, e.g. '
                              'postgres_dsn = "postgresql://trackpipe@db-host/trackpipe".')
        from trackpipe.identity.postgres_store import PostgresStore
        return PostgresStore(settings.postgres_dsn, settings, consumer)
    raise ConfigError(f'[identity] store = {settings.store!r} is not a store trackpipe has; '
                      'use "sqlite" (embedded) or "postgres" (shared by several nodes).')
