"""The durable event log: append-only, ordered by integer position, read by many consumers."""

from trackpipe.log.base import Discard, Entry, EventLog, Record, Repeat

__all__ = ["Discard", "Entry", "EventLog", "Record", "Repeat"]
