"""One destination's delivery loop: read the log past its cursor, route, send, record.

Each destination has its own worker (an asyncio task), its own cursor and its
own retry queue, so a slow or failing destination only ever delays itself.
Retries that are due go before fresh events (for a webhook, each failed
request again as it went, so it keeps its webhook-id); a fresh batch is
recorded as 'sending' before it goes out, so after a crash, a cancel or a
failed commit exactly that batch is sent again (receivers see the same
webhook-id) before anything newer. Nothing about a fresh batch (its cursor move, its events held
for per-user ordering) commits before its outcome does. A Retry-After is about
the destination, not only the events it refused: nothing at all goes to it
until it expires.

A suppressed person's events (privacy/suppress.py) are skipped wherever they
are met: read fresh from the log, resent from an unfinished batch, due for a
retry or a replay, or held for per-user ordering. They count as
skipped:suppressed, and a queued one leaves `pending`. The test is the
ingest's own (Suppressions.names); while nobody is suppressed it costs nothing
per event. What the worker is sending is its `flight`, with the version of the
list it was checked against: delivery/process.py SuppressionFollower waits for
a flight checked against an older list before it acknowledges a suppression.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from typing import Awaitable, Callable, Sequence

from trackpipe import config
from trackpipe.delivery.retry import RetryPolicy
from trackpipe.delivery.routing import Router, Skipped
from trackpipe.delivery.state import DeliveryState, Retry, Sent, now_ms
from trackpipe.destinations.base import GONE, Destination, Event, Outcome, retry
from trackpipe.identity.store import NOBODY, Resolved
from trackpipe.log.base import Entry, EventLog
from trackpipe.privacy.suppress import Watch

log = logging.getLogger("trackpipe.delivery")

SEND_TIMEOUT = 120.0  # a destination that hangs longer than this is failing, retryably
IDLE_WAIT = 0.05
ERROR_WAIT = 1.0  # after an unexpected error (a bug, a locked or full disk), before trying again

# entries -> each one's person and the person of each identifier it names (IdentityStore
# resolve_entries), for a destination that uses profiles
Resolver = Callable[[Sequence[Entry]], Awaitable[list[Resolved]]]


class DestinationWorker:
    def __init__(self, cfg: config.Destination, destination: Destination, log_: EventLog,
                 state: DeliveryState, *, readable_up_to: Callable[[], int] | None = None,
                 resolve: Resolver | None = None, suppressions: Watch | None = None):
        self.name = cfg.name
        self.cfg = cfg
        self.destination = destination
        self.log = log_
        self.state = state
        self.router = Router(cfg)
        self.policy = RetryPolicy.of(cfg)
        self.batch_size = cfg.batch_size or destination.default_batch_size
        self.readable_up_to = readable_up_to or log_.head  # identity must have seen an event first
        self.resolve = resolve
        self._next_notice_check = 0.0
        self._started = False
        self._resumed = False  # an unfinished fresh batch, if any, has been sent again
        # A Retry-After holds the whole destination until then (monotonic); kept in memory
        # only, so a restart may try at once (the refused events still wait their turn).
        self._paused_until = 0.0
        self.suppressions = suppressions
        # (entries, list generation they were checked against) while a step handles them
        self.flight: tuple[Sequence[Entry], int] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    worked = await self.step()
                except Exception:  # nothing may end the worker for good; it tries again in a while
                    log.exception("destination %s: delivery step failed", self.name)
                    self._resumed = False  # a batch may be left 'sending': it goes again first
                    worked = False
                    await _wait(stop, ERROR_WAIT)
                if not worked:
                    due_in = self.state.next_due_in(self.name)
                    await _wait(stop, min(IDLE_WAIT, due_in or IDLE_WAIT))
        finally:
            if self._started:
                await self.destination.close()

    async def step(self) -> bool:
        try:
            return await self._step()
        finally:
            self.flight = None

    async def _step(self) -> bool:
        if not self._started:
            await self.destination.start()
            self._started = True
            self.state.clear_stop(self.name)  # a restart (after a config fix) tries again
        if time.monotonic() < self._paused_until:
            return False
        if not self._resumed:
            unfinished = self.state.unfinished_batch(self.name)
            if unfinished:
                await self._resend(*unfinished)
            self._resumed = True
            if unfinished:
                return True
        if self.destination.supports_delete and time.monotonic() >= self._next_notice_check:
            self._next_notice_check = time.monotonic() + 1.0
            await self._forward_delete()
        due = self.state.due(self.name, self.batch_size, ordered=self.cfg.ordered,
                             as_sent=self.destination.retries_keep_requests)
        if due:
            await self._send_retries(due)
            return True
        return await self._send_fresh()

    # -- fresh events from the log ------------------------------------------------

    async def _send_fresh(self) -> bool:
        cursor = self.state.cursor(self.name)
        cap = self.readable_up_to()
        if cap <= cursor:
            return False
        # A privacy delete leaves gaps, so `limit` alone could read past the cap.
        entries = [e for e in self.log.read(cursor, limit=min(self.batch_size, cap - cursor))
                   if e.position <= cap]
        if not entries:
            return False
        batch, skipped, held, last = self._route_fresh(entries)
        if not batch:
            self.state.skip(self.name, entries[0].position, last, skipped, held=held)
            return True
        batch_id = self.state.begin_batch(self.name, entries[0].position, last, len(batch))
        await self._deliver(batch, batch_id=batch_id, cursor=last, skipped=skipped, held=held)
        return True

    def _route_fresh(self, entries: Sequence[Entry]):
        muted = self._muted(entries)
        batch: list[tuple[Entry, object]] = []
        skipped: dict[str, list[int]] = defaultdict(list)  # reason -> positions
        held: list[tuple[int, str, int]] = []
        ordered = self.cfg.ordered
        waiting = (self.state.waiting_users(self.name, (user_key(e) for e in entries))
                   if ordered else ())
        in_batch: set[str] = set()
        last = entries[0].position - 1
        for entry in entries:
            key = user_key(entry) if ordered else None  # only per-user ordering asks whose
            if ordered and key in in_batch:
                break  # one event per user per request, so a retry can never overtake
            last = entry.position
            if muted is not None and muted(entry):
                skipped["suppressed"].append(entry.position)
                continue
            routed = self.router.route_body(entry.body)
            if isinstance(routed, Skipped):
                skipped[routed.reason].append(entry.position)
                continue
            if ordered:
                if key in waiting:
                    held.append((entry.position, key, entry.received_at))
                    continue
                in_batch.add(key)
            batch.append((entry, routed))
        if skipped.get("suppressed") and self.suppressions.refresh():
            return self._route_fresh(entries)  # the list changed (an unsuppress?): again
        return batch, skipped, held, last

    async def _resend(self, batch_id: int, lo: int, hi: int) -> None:
        """Send the fresh batch [lo, hi] again, routed (and held) as the first time; less
        what a privacy delete removed since, or a replay has queued on its own."""
        queued = self.state.pending_positions(self.name, lo, hi)
        entries = [e for e in self.log.read(lo - 1, limit=hi - lo + 1)
                   if e.position <= hi and e.position not in queued]
        batch, skipped, held, cursor = [], {}, [], hi
        if entries:
            batch, skipped, held, last = self._route_fresh(entries)
            if last < entries[-1].position:  # cut short (routing changed): read the rest fresh
                cursor = last
        if batch:
            await self._deliver(batch, batch_id=batch_id, cursor=cursor, skipped=skipped, held=held)
        else:
            self.state.skip(self.name, lo, cursor, skipped, held=held, batch_id=batch_id)

    # -- retries and replays ------------------------------------------------------

    async def _send_retries(self, due: Sequence[Retry]) -> None:
        by_position = {e.position: e for e in self.log.get([r.position for r in due])}
        muted = self._muted(list(by_position.values()))
        batch, attempts, why, suppressed = [], [], defaultdict(list), []
        for r in due:
            entry = by_position.get(r.position)
            if muted is not None and entry is not None and muted(entry):
                suppressed.append(r.position)
                continue
            routed = None if entry is None else self.router.route_body(entry.body)
            if routed is None or isinstance(routed, Skipped):
                # Deleted from the log (a privacy delete, or a replay of an event the
                # retention took meanwhile), or no longer routed here: counted as skipped.
                why["deleted" if routed is None else routed.reason].append(r.position)
                continue
            batch.append((entry, routed))
            attempts.append(r)
        if suppressed and self.suppressions.refresh():
            return await self._send_retries(due)  # the list changed (an unsuppress?): again
        if suppressed:
            self.state.drop_suppressed(self.name, suppressed)
        if why:
            self.state.drop(self.name, why)
        if batch:
            await self._deliver(batch, retries=attempts)

    async def _forward_delete(self) -> None:
        """A privacy delete: pass it on to a destination that can delete a person."""
        notice = self.state.pending_notice(self.name)
        if notice is None:
            return
        notice_id, user_ids, anon_ids, traits = notice
        try:
            outcome = await asyncio.wait_for(self._delete_user(user_ids, anon_ids, traits),
                                             SEND_TIMEOUT)
        except Exception as exc:
            outcome = retry(None, f"{type(exc).__name__}: {exc}")
        [outcome] = self.destination.scrub_outcomes([outcome])
        self._honour_retry_after([outcome])
        if outcome.state != "retry":
            self.state.finish_notice(notice_id, outcome.state, outcome.detail)
        else:
            self._next_notice_check = time.monotonic() + 30.0

    async def _delete_user(self, user_ids, anon_ids, traits) -> Outcome:
        # The person's trait identifiers (emails) go to a destination that uses profiles: a
        # warehouse's identities rows hold them, under profile ids a merge or an unmerge
        # since may have made stale, so it finds them by value. The others take the ids.
        if self.destination.uses_profiles:
            return await self.destination.delete_user(user_ids, anon_ids, traits)
        return await self.destination.delete_user(user_ids, anon_ids)

    # -- suppressed people --------------------------------------------------------

    def _muted(self, entries: Sequence[Entry]):
        """The test for a suppressed person's event, or None while nobody is suppressed.
        These entries become the flight, checked against the list as it is now: nothing
        in a step awaits between this and the test (the list only changes on this loop)."""
        watch = self.suppressions
        if watch is None:
            return None
        self.flight = (entries, watch.list.generation)
        return watch.names if watch.list.hashes else None

    # -- sending and recording ----------------------------------------------------

    async def _deliver(self, batch, *, batch_id: int | None = None, cursor: int | None = None,
                       skipped: dict | None = None, held: Sequence = (),
                       retries: Sequence[Retry] | None = None) -> None:
        people = await self._people([e for e, _ in batch])
        # positional, stored_time and identities too: keywords would cost a dict per event
        events = [Event(e.position, e.message_id, r.message, p.profile_id, r.options, r.action,
                        r.raw, e.ts if e.ts is not None else e.received_at, p.identifiers)
                  for (e, r), p in zip(batch, people)]
        started = time.perf_counter()
        outcomes = await self._send(events)
        duration_ms = (time.perf_counter() - started) * 1000
        self._honour_retry_after(outcomes)
        self._stop_if_gone(outcomes)
        sent = _sent(batch, outcomes, retries, now_ms())
        given_up = self.state.record(self.name, sent, duration_ms=duration_ms, policy=self.policy,
                                     batch_id=batch_id, cursor=cursor, skipped=skipped, held=held,
                                     keep_requests=self.destination.retries_keep_requests)
        for s in given_up:
            log.warning("destination %s: event %s failed (%s): %s", self.name, s.message_id,
                        s.outcome.status, s.outcome.detail)

    def _stop_if_gone(self, outcomes: Sequence[Outcome]) -> None:
        """410 Gone: the endpoint was removed on purpose, so no request goes to it again
        until trackpipe restarts (once its config is fixed). Its events wait meanwhile;
        the API, the CLI and trackpipe_delivery_stopped say so (R10)."""
        gone = next((o for o in outcomes if o.state == "retry" and o.status == GONE), None)
        if gone is not None:
            self._paused_until = math.inf
            self.state.stop(self.name, f"410 Gone: {gone.detail}")
            log.error("destination %s answered 410 Gone: nothing more is sent to it until"
                      " trackpipe restarts; its events wait (fix its config, then restart)",
                      self.name)

    def _honour_retry_after(self, outcomes: Sequence[Outcome]) -> None:
        """A tool that says when to come back (429, 503 with Retry-After) gets nothing
        before then: no fresh batch, no other retry, no delete (capped like the retries'
        waits, by retry_max_delay_seconds). A failure without one pauses nothing."""
        asked = [o.retry_after for o in outcomes if o.state == "retry" and o.retry_after]
        if asked:
            wait = min(max(asked), self.policy.max_delay_ms / 1000)
            self._paused_until = max(self._paused_until, time.monotonic() + wait)

    async def _send(self, events: list[Event]) -> list[Outcome]:
        """The destination's outcomes, its secrets masked in their details: a tool may
        echo a credential in its answer, and these are stored, logged and shown. One
        outcome for the whole batch is scrubbed once, then shared by every event."""
        result = await self._outcomes(events)
        if isinstance(result, Outcome):
            return self.destination.scrub_outcomes([result]) * len(events)
        return self.destination.scrub_outcomes(result)

    async def _outcomes(self, events: list[Event]) -> Outcome | list[Outcome]:
        """One outcome per event, or one that applies to all of them."""
        try:
            result = await asyncio.wait_for(self.destination.send(events), SEND_TIMEOUT)
        except asyncio.TimeoutError:
            return retry(None, f"no answer within {SEND_TIMEOUT:.0f} s")
        except Exception as exc:  # the seam says a raise is a retryable failure of the batch
            log.warning("destination %s: send raised %s", self.name,
                        self.destination.scrub(repr(exc)))
            return retry(None, f"{type(exc).__name__}: {exc}")
        if isinstance(result, Outcome):
            return result
        result = list(result)
        if len(result) != len(events):
            return retry(None, f"destination answered {len(result)} outcomes for "
                               f"{len(events)} events")
        return result

    async def _people(self, entries: Sequence[Entry]) -> list[Resolved]:
        """Each event's person, and the person of each identifier it names, as identity
        holds them now: one lookup for the batch (a warehouse's `identities` rows)."""
        if self.resolve is None:
            return [NOBODY] * len(entries)
        return await self.resolve(entries)


def user_key(entry: Entry) -> str:
    """Whose event this is, for per-user ordering."""
    return f"u:{entry.user_id}" if entry.user_id else f"a:{entry.anonymous_id}"


_new_tuple = tuple.__new__


def _sent(batch, outcomes: Sequence[Outcome], retries: Sequence[Retry] | None,
          at: int) -> list[Sent]:
    """What record() takes of a send: each event with its outcome and attempt. Sent(...)
    is built without namedtuple's Python-level __new__: a fresh batch makes one per event."""
    if not retries:
        return [_new_tuple(Sent, (e.position, e.message_id, e.received_at, user_key(e), 1, at,
                                  o)) for (e, _), o in zip(batch, outcomes)]
    return [_new_tuple(Sent, (e.position, e.message_id, e.received_at, user_key(e),
                              r.attempts + 1, r.first_attempt_at if r.attempts else at, o))
            for (e, _), o, r in zip(batch, outcomes, retries)]


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
