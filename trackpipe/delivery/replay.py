"""Replays: send a range of the log (or what failed) to a destination again.

Replayed events join the destination's retry queue as due now, so the running
worker sends them between fresh batches; the destination's cursor does not
move. A replay reaches only up to that cursor: the events past it have not
been sent yet and go out as fresh ones (queuing them too would send them twice).
Routing (integrations, filters, actions) applies as for live events.
Warehouses load idempotently on messageId, so replaying a range twice adds no rows.

A destination in the config that has not started yet (trackpipe has not run with it)
has no cursor: a replay reaches up to the log's head, and it gets them once it starts
(it then reads fresh from the head as of its start). A replay into a disabled
destination, or over an empty range, is refused (ReplayRefused): nothing would send it,
and its queued events would hold the log's retention.
"""

from __future__ import annotations

from trackpipe import config
from trackpipe.delivery.routing import Router, Skipped
from trackpipe.delivery.state import DeliveryState
from trackpipe.delivery.worker import user_key
from trackpipe.log.base import EventLog

PAGE = 5000


class ReplayRefused(Exception):
    """A replay that cannot send anything; `status` is the admin API's answer (400, 409)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def check(cfg: config.Destination, since: int | None, until: int | None,
          given: dict | None = None) -> None:
    """Raise ReplayRefused for a replay that could never send anything. `given` holds the
    bounds as the user wrote them, for the message: an ISO time reads better than the
    epoch ms it became."""
    if since is not None and until is not None and since >= until:
        shown = given or {"since": since, "until": until}
        raise ReplayRefused(400, "invalid_parameter", f"`since` ({shown['since']}) must be"
                            f" before `until` ({shown['until']}, exclusive): the range holds"
                            " no event.")
    if not cfg.enabled:
        raise ReplayRefused(409, "destination_disabled", f"Destination {cfg.name!r} is disabled:"
                            " nothing would send a replay to it. Set `enabled = true` in its"
                            " config and restart trackpipe, then replay.")


def replay(event_log: EventLog, state: DeliveryState, cfg: config.Destination, *,
           since: int | None = None, until: int | None = None, failed_only: bool = False,
           given: dict | None = None) -> int:
    """Queue the events for `cfg`; returns how many were queued. Raises ReplayRefused.
    `given`: the bounds as the user wrote them (see check)."""
    check(cfg, since, until, given)
    router = Router(cfg)
    started = cfg.name in state.known_destinations()
    cap = state.cursor(cfg.name) if started else event_log.head()
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

