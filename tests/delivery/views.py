"""`GET /api/v1/events/{messageId}/deliveries`, answered by the route's own code
(admin/destinations.py) over a test's log and deliveries.db, without a server."""

from __future__ import annotations

from types import SimpleNamespace

from trackpipe.admin.destinations import DestinationsAPI


class _ScanLookup:
    """The dedup index's answer (MessageLookup.positions), by a scan of a small test log."""

    def __init__(self, event_log):
        self.log = event_log

    def positions(self, message_id: str) -> list[int]:
        return [e.position for e in self.log.read(0, 100_000) if e.message_id == message_id]


def deliveries(event_log, state, message_id: str, *workers) -> dict | None:
    """The endpoint's body for these workers' destinations (None: its 404)."""
    pipeline = SimpleNamespace(log=event_log, deliveries=state, lookup=_ScanLookup(event_log),
                               settings=SimpleNamespace(destinations=[w.cfg for w in workers]))
    return DestinationsAPI(pipeline)._deliveries(message_id)


def outcome(event_log, state, message_id: str, worker) -> tuple[str, list[tuple[str, int]]]:
    """(state, [(attempt state, attempt number), ...]) the endpoint shows for one worker."""
    [shown] = deliveries(event_log, state, message_id, worker)["deliveries"]
    return shown["state"], [(a["state"], a["attempt"]) for a in shown["attempts"]]
