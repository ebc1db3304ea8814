"""The log interface every backend implements (SQLite now; JetStream next).

Contract (tests/log/test_contract.py runs it against every backend):
- append() makes its records durable before it returns, and returns their
  positions: strictly increasing integers, in the order given.
- read(after) returns entries with position > after, ascending, and never
  skips an entry that a completed append() returned.
- Each consumer has a durable position; commit() survives a restart.
- The ledger rows passed with an append (discards, repeats) commit with it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple, Sequence


class Record(NamedTuple):
    """One accepted message, as appended. `body` is the normalized message as JSON bytes."""

    message_id: str
    received_at: int  # ms since the epoch, server clock
    type: str
    event: str | None
    user_id: str | None
    anonymous_id: str | None
    source: str
    body: bytes
    ts: int | None = None  # the message's `timestamp` in ms, as the collector stamped it


class Entry(NamedTuple):
    position: int
    message_id: str
    received_at: int
    type: str
    event: str | None
    user_id: str | None
    anonymous_id: str | None
    source: str
    body: bytes  # b"" when a lean read left it out (see EventLog.read)
    ts: int | None = None  # None for entries appended before the log kept it


class Discard(NamedTuple):
    """An event that was answered 200 but not stored, and why (Segment's reason codes)."""

    received_at: int
    source: str | None
    message_id: str | None
    reason: str
    message: str
    payload: str  # the offending event, truncated


class Repeat(NamedTuple):
    """A message whose messageId was already stored within the dedup window."""

    message_id: str
    position: int  # of the stored original
    seen_at: int


class EventLog(ABC):
    @abstractmethod
    def append(
        self, records: Sequence[Record], discards: Sequence[Discard] = (),
        repeats: Sequence[Repeat] = (),
    ) -> list[int]:
        """Durably append records (and ledger rows) in one commit; return their positions."""

    @abstractmethod
    def read(self, after: int, limit: int = 1000, lean: Sequence[str] = ()) -> list[Entry]:
        """Entries with position > after, oldest first.

        `lean` names message types whose body the reader does not need when the
        entry carries its `ts` (identity, for track, page and screen): such
        entries may come back with body b"". A backend may return every body.
        """

    @abstractmethod
    def get(self, positions: Sequence[int]) -> list[Entry]:
        """The entries at these positions (missing ones are left out)."""

    def receipts(self, positions: Sequence[int]) -> list[tuple[int, str, int]]:
        """(position, message_id, received_at) at these positions, ascending."""
        return [(e.position, e.message_id, e.received_at) for e in self.get(positions)]

    @abstractmethod
    def head(self) -> int:
        """Position of the newest entry, 0 when empty."""

    @abstractmethod
    def position(self, consumer: str) -> int:
        """The consumer's durable position (0 if it never committed)."""

    @abstractmethod
    def commit(self, consumer: str, position: int) -> None:
        """Durably record that `consumer` has processed everything up to `position`."""

    def close(self) -> None:
        """Release files and connections."""
