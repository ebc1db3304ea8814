"""The per-event shortcuts of a batched delivery, pinned against their general paths.

A fresh batch delivered whole is recorded without a row, a pending delete or an
attempt per event (state.py); its events are routed and recorded without
namedtuple constructors (routing.py, worker.py); one outcome for a whole send is
scrubbed once (worker.py). Each test holds where a shortcut could go wrong.
"""

from __future__ import annotations

import asyncio
import sqlite3

import msgspec
import pytest

from trackpipe import config
from trackpipe.delivery.retry import RetryPolicy
from trackpipe.delivery.routing import Routed, Router, Skipped
from trackpipe.delivery.state import DeliveryState, Sent
from trackpipe.delivery.worker import DestinationWorker, user_key
from trackpipe.destinations.base import DELIVERED, Destination, retry

from support import in_loop

from delivery import backlog
from delivery.backlog import append

files = backlog.files  # the fixture: a real SQLite log and deliveries.db

POLICY = RetryPolicy(3_600_000, 10)


def pending(state: DeliveryState) -> list[tuple]:
    return state._db().execute("SELECT destination, position FROM pending"
                               " ORDER BY destination, position").fetchall()


def sent(positions, outcome=DELIVERED) -> list[Sent]:
    return [Sent(p, f"m{p}", 0, f"u:{p}", 1, 0, outcome) for p in positions]


# -- state.py: a batch delivered whole ---------------------------------------------------

def test_a_delivered_send_removes_exactly_its_own_pending_rows(files):
    """The pending delete is skipped only when no pending row lies in the send's range: a
    row inside it (at either end, or between) goes; rows outside it and another
    destination's rows in it stay."""
    _, event_log, state = files
    append(event_log, list("abcdefghi"))
    state.record("hook", sent([2, 3, 5, 7, 9], retry(503, "busy")), duration_ms=1.0,
                 policy=POLICY)
    state.record("other", sent([5], retry(503, "busy")), duration_ms=1.0, policy=POLICY)
    state.record("hook", sent([7, 3, 5, 4]), duration_ms=1.0, policy=POLICY)
    assert pending(state) == [("hook", 2), ("hook", 9), ("other", 5)]


def test_a_delivered_batch_counts_and_moves_the_cursor_with_no_row_per_event(files):
    _, _, state = files
    batch_id = state.begin_batch("hook", 1, 4, 4)
    state.record("hook", sent([1, 2, 3, 4]), duration_ms=1.0, policy=POLICY,
                 batch_id=batch_id, cursor=4, skipped={}, held=[])
    summary = state.summary("hook")
    assert summary["counters"] == {"delivered": 4} and summary["cursor"] == 4
    db = state._db()
    assert db.execute("SELECT count(*) FROM attempts").fetchone() == (0,)
    assert db.execute("SELECT state, status FROM batches").fetchall() == [("delivered", 200)]
    shown, attempts = state.history("hook", 3)
    assert shown == "delivered"
    assert [(a["state"], a["status"], a["attempt"]) for a in attempts] == [("delivered", 200, 1)]


def test_a_delivered_batch_with_an_erased_event_counts_it_delivered_with_no_row(files):
    """A batch that held events back asks the log what a privacy delete erased meanwhile:
    an erased event of a delivered batch went all the same (counted delivered, as the
    general path counts it), and nothing of its own is left behind."""
    path, event_log, state = files
    append(event_log, ["a", "b", "c"])
    with sqlite3.connect(path / "log.db") as db:
        db.execute("DELETE FROM events WHERE position = 2")
    batch_id = state.begin_batch("hook", 1, 3, 2)
    state.record("hook", sent([1, 2]), duration_ms=1.0, policy=POLICY, batch_id=batch_id,
                 cursor=3, skipped={}, held=[(3, "u:c", 0)])
    assert state.summary("hook")["counters"] == {"delivered": 2}
    assert pending(state) == [("hook", 3)], "only the held event waits"
    assert state._db().execute("SELECT count(*) FROM attempts").fetchone() == (0,)


def test_a_send_with_one_failure_is_not_taken_for_a_delivered_batch(files):
    _, event_log, state = files
    append(event_log, ["a", "b", "c"])
    batch_id = state.begin_batch("hook", 1, 3, 3)
    state.record("hook", [*sent([1, 2]), *sent([3], retry(503, "busy"))], duration_ms=1.0,
                 policy=POLICY, batch_id=batch_id, cursor=3, skipped={}, held=[])
    assert state.summary("hook")["counters"] == {"delivered": 2, "retries": 1}
    assert pending(state) == [("hook", 3)]


# -- routing.py: the message that goes on as stored ----------------------------------------

def router(**fields) -> Router:
    return Router(msgspec.convert({"name": "hook", "type": "webhook", **fields},
                                  config.Destination))


@pytest.mark.parametrize("integrations, options", [
    (None, None), ({}, None), ({"hook": {"k": 1}}, {"k": 1}), ({"All": True}, None)])
def test_route_body_gives_a_routed_that_is_a_routed(integrations, options):
    body = msgspec.json.encode({"type": "track", "event": "E", "integrations": integrations})
    routed = router().route_body(body)
    assert type(routed) is Routed and routed == Routed(None, options, None, body)
    assert (routed.message, routed.options, routed.action, routed.raw) == \
        (None, options, None, body)


@pytest.mark.parametrize("integrations", [{"hook": False}, {"All": False}])
def test_route_body_still_skips_what_integrations_turn_off(integrations):
    body = msgspec.json.encode({"type": "track", "event": "E", "integrations": integrations})
    assert router().route_body(body) == Skipped("integrations")


# -- worker.py: what a send leaves -----------------------------------------------------------

class OneAnswer(Destination):
    """Answers a whole send with one Outcome (as a webhook batch does), or one per event."""

    kind = "one-answer"
    secret_fields = ("token",)
    retries_keep_requests = True

    class Settings(msgspec.Struct):
        token: str = "tok-3f9a1c77"

    def __init__(self, answers):
        super().__init__("one-answer", self.Settings())
        self.answers = list(answers)
        self.sends: list[list[int]] = []

    async def send(self, batch):
        self.sends.append([e.position for e in batch])
        return self.answers.pop(0)


def worker(state, event_log, destination, **cfg) -> DestinationWorker:
    cfg = config.Destination(name="hook", type="one-answer",
                             **{"retry_initial_seconds": 0.01, "batch_size": 10, **cfg})
    return DestinationWorker(cfg, destination, event_log, state)


@in_loop
async def test_one_answer_for_a_batch_is_scrubbed_and_shared(files):
    _, event_log, state = files
    append(event_log, ["a", "b", "c"])
    answer = retry(503, "bad token tok-3f9a1c77")
    w = worker(state, event_log, OneAnswer([answer]))
    await w.step()
    rows = state._db().execute("SELECT position, user_key, attempts, last_detail FROM pending"
                               " ORDER BY position").fetchall()
    masked = "bad token ********"
    assert rows == [(1, "u:a", 1, masked), (2, "u:b", 1, masked), (3, "u:c", 1, masked)]
    # one answer, so one request: the three come due together, as one retry
    due = state._db().execute("SELECT DISTINCT next_at, first_attempt_at FROM pending")
    assert len(due.fetchall()) == 1


@in_loop
async def test_a_retried_batch_records_its_attempt_and_first_attempt(files):
    _, event_log, state = files
    append(event_log, ["a", "b"])
    w = worker(state, event_log, OneAnswer([retry(503, "busy"), retry(503, "busy"),
                                            DELIVERED]))
    await w.step()
    first = state._db().execute("SELECT DISTINCT first_attempt_at FROM pending").fetchall()
    for _ in range(100):
        if len(w.destination.sends) == 2:
            break
        await w.step()
        await asyncio.sleep(0.02)
    rows = state._db().execute("SELECT position, attempts, first_attempt_at FROM pending"
                               " ORDER BY position").fetchall()
    assert rows == [(1, 2, first[0][0]), (2, 2, first[0][0])]
    attempts = state._db().execute("SELECT position, attempt FROM attempts"
                                   " ORDER BY position").fetchall()
    assert attempts == [(1, 2), (2, 2)]


@in_loop
async def test_an_ordered_destination_still_holds_a_waiting_users_events(files):
    _, event_log, state = files
    append(event_log, ["a", "b"])
    w = worker(state, event_log, OneAnswer([[retry(503, "busy"), DELIVERED], DELIVERED]),
               ordered=True, retry_initial_seconds=60)
    await w.step()  # a's event fails: user a waits
    append(event_log, ["a", "c", "c"])
    await w.step()
    assert w.destination.sends == [[1, 2], [4]], "a's later event held; c's second cut off"
    assert pending(state) == [("hook", 1), ("hook", 3)]


def test_user_key_is_the_user_else_the_anonymous_id(files):
    _, event_log, _ = files
    append(event_log, ["a"])
    [entry] = event_log.read(0)
    assert user_key(entry) == "u:a"
    assert user_key(entry._replace(user_id=None, anonymous_id="x")) == "a:x"
