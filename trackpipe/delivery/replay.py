"""Replays: send a range of the log (or what failed) to a destination again.

Replayed events join the destination's retry queue as due now, so the running
worker sends them between fresh batches; the destination's cursor does not
move. A replay reaches only up to that cursor: the events past it have not
been sent yet and go out as fresh ones (queuing them too would send them twice). Routing (integrations, filters, actions) applies as for live events.
Warehouses load idempotently on messageId, so replaying a range twice adds no rows.
"""

from __future__ import annotations

from trackpipe import config
from trackpipe.delivery.routing import Router, Skipped
from trackpipe.delivery.state import DeliveryState
from trackpipe.delivery.worker import user_key
from trackpipe.log.base import EventLog

PAGE = 5000


def replay(event_log: EventLog, state: DeliveryState, cfg: config.Destination, *,
           since: int | None = None, until: int | None = None, failed_only: bool = False) -> int:
    """Queue the events for `cfg`; returns how many were queued."""
    router = Router(cfg)
    cap = state.cursor(cfg.name)
    if failed_only:
        positions = [p for p, _ in state.failed_positions(cfg.name, since, until)]
        entries = []
        for i in range(0, len(positions), PAGE):
            entries.extend(event_log.get(positions[i:i + PAGE]))
        chosen = [e for e in entries if not isinstance(router.route_body(e.body), Skipped)]
        return state.replay(cfg.name, [(e.position, user_key(e), e.received_at) for e in chosen])
    queued, after = 0, 0
    while after < cap:
        page = event_log.read(after, min(PAGE, cap - after))
        if not page:
            break
        after = page[-1].position
        chosen = [(e.position, user_key(e), e.received_at) for e in page
                  if e.position <= cap and (since is None or e.received_at >= since)
                  and (until is None or e.received_at < until)
                  and not isinstance(router.route_body(e.body), Skipped)]
        if chosen:
            queued += state.replay(cfg.name, chosen)
    return queued

