"""Feeding the log to an identity store: the loop the consumers process runs, in its
simplest synchronous form (the CLI's rebuild, the benchmark and the tests use it)."""

from __future__ import annotations

from trackpipe.identity.store import IdentityStore
from trackpipe.log.base import EventLog

BATCH = 1000


def catch_up(store: IdentityStore, log: EventLog, batch: int = BATCH) -> int:
    """Apply every log entry after the store's position; returns how many were applied."""
    applied = 0
    position = store.position()
    while entries := log.read(position, batch):
        store.apply(entries)
        applied += len(entries)
        position = entries[-1].position
    return applied
