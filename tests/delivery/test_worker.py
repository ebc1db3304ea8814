"""The delivery worker and its state, driven step by step in one process.

A real SQLite log and deliveries.db, and a scripted destination that records
every send: each test stops a delivery where a crash, a cancel or a failing
commit would, starts a new worker on the same files, and checks the ledger:
every routed event delivered exactly once (or failed), none lost, none sent
twice unless a send's outcome was never recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from collections import Counter

import msgspec
import pytest

from trackpipe import config
from trackpipe.delivery import replay as replays
from trackpipe.delivery.state import DeliveryState, Sent
from trackpipe.delivery.worker import DestinationWorker, user_key
from trackpipe.destinations.base import DELIVERED, Destination, classify_http, fail, retry
from trackpipe.log.base import Record
from trackpipe.log.sqlite import SQLiteLog

from support import in_loop

from delivery import backlog
from delivery.backlog import append
from delivery.views import deliveries, outcome

files = backlog.files  # the fixture: a real SQLite log and deliveries.db


class Crash(BaseException):
    """Ends a send the way a SIGKILL or a cancel would: nothing after it runs."""


class Scripted(Destination):
    kind = "scripted"

    class Settings(msgspec.Struct):
        pass

    def __init__(self, *, retry_ids=(), crash_on_send: int | None = None):
        super().__init__("scripted", self.Settings())
        self.sends: list[list[str]] = []
        self.retry_ids = set(retry_ids)
        self.crash_on_send = crash_on_send

    async def send(self, batch):
        self.sends.append([e.message_id for e in batch])
        if self.crash_on_send == len(self.sends):
            raise Crash()
        return [retry(503, "busy") if e.message_id in self.retry_ids else DELIVERED
                for e in batch]

    def delivered(self) -> Counter:
        return Counter(m for batch in self.sends for m in batch)


def worker(state, event_log, destination, **cfg) -> DestinationWorker:
    cfg = config.Destination(name="scripted", type="scripted",
                             **{"retry_initial_seconds": 0.01, **cfg})
    return DestinationWorker(cfg, destination, event_log, state)


async def drain(w: DestinationWorker, steps: int = 50) -> None:
    for _ in range(steps):
        if not await w.step() and w.state.next_due_in(w.name) is None:
            return  # nothing fresh, nothing waiting for a retry
        await asyncio.sleep(0.02)


def delete_positions(path, positions) -> None:
    """What a privacy delete leaves in the log: gaps."""
    with sqlite3.connect(path / "log.db") as db:
        db.executemany("DELETE FROM events WHERE position = ?", [(p,) for p in positions])


@in_loop
async def test_ordered_batch_cut_short_by_a_crash_is_sent_again(files):
    _, event_log, state = files
    ids = append(event_log, ["a", "b"])
    first = Scripted(retry_ids={ids[0]})
    # Its retry is due in 1-1.5 s: not before the next two steps, even on a loaded machine.
    w = worker(state, event_log, first, ordered=True, batch_size=10, retry_initial_seconds=1.0)
    await w.step()  # a's event fails retryably: user a is now waiting
    later = append(event_log, ["a", "c", "d"])  # a's next event is held, c and d go
    crashing = Scripted(crash_on_send=1)
    with pytest.raises(Crash):
        await worker(state, event_log, crashing, ordered=True, batch_size=10).step()
    assert crashing.sends == [[later[1], later[2]]]

    after = Scripted()
    await drain(worker(state, event_log, after, ordered=True, batch_size=10), steps=200)
    assert after.delivered() == Counter([ids[0], *later]), "nothing lost, nothing twice"
    assert after.sends[0] == [later[1], later[2]], "the cut-short batch goes first, whole"


@in_loop
async def test_resending_a_batch_with_gaps_sends_only_its_own_range(files):
    path, event_log, state = files
    ids = append(event_log, list("abcdef"))
    crashing = Scripted(crash_on_send=1)
    with pytest.raises(Crash):
        await worker(state, event_log, crashing, batch_size=3).step()
    assert crashing.sends == [ids[:3]]
    delete_positions(path, [2])  # a privacy delete while the process was down

    after = Scripted()
    await drain(worker(state, event_log, after, batch_size=3))
    assert after.sends[0] == [ids[0], ids[2]], "the same batch, less the erased event"
    assert after.delivered() == Counter([ids[0], *ids[2:]])


@in_loop
async def test_a_fresh_read_stops_at_what_identity_has_seen(files):
    path, event_log, state = files
    ids = append(event_log, list("abcdef"))
    delete_positions(path, [1, 2])
    dest = Scripted()
    cfg = config.Destination(name="scripted", type="scripted")
    w = DestinationWorker(cfg, dest, event_log, state, readable_up_to=lambda: 4)
    await drain(w)
    assert dest.delivered() == Counter(ids[2:4]), "positions 5 and 6 wait for identity"
    assert state.cursor("scripted") == 4


@in_loop
async def test_replaying_past_the_cursor_does_not_send_twice(files):
    _, event_log, state = files
    ids = append(event_log, list("abcd"))
    dest = Scripted()
    w = worker(state, event_log, dest, batch_size=2)
    await w.step()  # 1-2 delivered; 3-4 not read yet
    cfg = config.Destination(name="scripted", type="scripted")
    queued = replays.replay(event_log, state, cfg)
    await drain(w)
    assert queued == 2
    assert dest.delivered() == Counter({ids[0]: 2, ids[1]: 2, ids[2]: 1, ids[3]: 1})


@in_loop
async def test_replaying_an_event_that_is_retrying_keeps_its_attempt_count(files):
    _, event_log, state = files
    ids = append(event_log, ["a"])
    w = worker(state, event_log, Scripted(retry_ids={ids[0]}), batch_size=5)
    await w.step()
    replays.replay(event_log, state, config.Destination(name="scripted", type="scripted"))
    row = state._db().execute("SELECT attempts, next_at <= ? FROM pending",
                              (state_now(),)).fetchone()
    assert row == (1, 1), "due now, and the first attempt still counts"


def state_now() -> int:
    from trackpipe.delivery.state import now_ms
    return now_ms()


@in_loop
async def test_a_failing_resend_at_start_is_retried_not_fatal(files, monkeypatch):
    _, event_log, state = files
    ids = append(event_log, list("ab"))
    with pytest.raises(Crash):
        await worker(state, event_log, Scripted(crash_on_send=1)).step()

    after = Scripted()
    w = worker(state, event_log, after)
    reads = {"n": 0}
    real_read = event_log.read

    def flaky_read(*args, **kwargs):
        reads["n"] += 1
        if reads["n"] == 1:
            raise sqlite3.OperationalError("database is locked")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(event_log, "read", flaky_read)
    monkeypatch.setattr("trackpipe.delivery.worker.ERROR_WAIT", 0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    for _ in range(200):
        if after.delivered() == Counter(ids):
            break
        await asyncio.sleep(0.02)
    stop.set()
    await task
    assert after.delivered() == Counter(ids)
    assert after.sends[0] == ids, "resent as the same batch"


class FailingCommit:
    """A connection whose next COMMIT fails, as on a full disk."""

    def __init__(self, db: sqlite3.Connection):
        self.db, self.armed = db, True

    def __getattr__(self, name):
        return getattr(self.db, name)

    def execute(self, sql, *args):
        if sql == "COMMIT" and self.armed:
            self.armed = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)


@in_loop
async def test_a_failed_commit_leaves_the_state_usable(files, monkeypatch):
    _, event_log, state = files
    ids = append(event_log, list("ab"))
    dest = Scripted()
    w = worker(state, event_log, dest)
    db = state._db()
    failing = FailingCommit(db)
    monkeypatch.setattr(state, "_db", lambda: failing)
    with pytest.raises(sqlite3.OperationalError):
        await w.step()
    assert not db.in_transaction, "the failed transaction was rolled back"
    await drain(w)
    assert set(dest.delivered()) == set(ids)
    assert dest.sends[1] == ids, "after the failed record the same batch goes again"
    assert state.cursor("scripted") == 2


class Profiled(Scripted):
    uses_profiles = True


def test_only_a_destination_that_uses_profiles_waits_for_identity(files):
    from trackpipe.delivery.process import IdentityConsumer, worker_for
    _, event_log, state = files
    append(event_log, list("abc"))
    identity = IdentityConsumer(None, event_log)  # has applied nothing yet
    cfg = config.Destination(name="scripted", type="scripted")
    try:
        plain = worker_for(cfg, Scripted(), event_log, state, identity)
        profiled = worker_for(cfg, Profiled(), event_log, state, identity)
        assert (plain.readable_up_to(), plain.resolve) == (3, None)
        assert profiled.readable_up_to() == 0 and profiled.resolve == identity.resolve
    finally:
        identity.close()


@in_loop
async def test_summary_counts_a_batch_recorded_meanwhile_once(files):
    """GET /api/v1/destinations adds delivered + pending: the summary reads both as of one
    moment, so a batch whose outcome commits between its queries counts exactly once
    (read apart, it was missed from both or counted in both, depending on the order)."""
    _, event_log, state = files
    append(event_log, ["u1", "u2", "u3"])
    w = worker(state, event_log, Scripted())
    entries = event_log.read(0, 3)
    state.set_cursor(w.name, 0)
    batch_id = state.begin_batch(w.name, 1, 3, 3)
    sent = [Sent(e.position, e.message_id, e.received_at, user_key(e), 1, 0, DELIVERED)
            for e in entries]

    def record_elsewhere():  # another thread's connection: the worker's, in the server
        state.record(w.name, sent, duration_ms=1.0, policy=w.policy, batch_id=batch_id,
                     cursor=3)

    db = state._db()
    fired = []

    def between_queries(statement: str) -> None:
        if statement.startswith("SELECT count(*), min(received_at) FROM pending") and not fired:
            fired.append(True)
            t = threading.Thread(target=record_elsewhere)
            t.start()
            t.join()

    db.set_trace_callback(between_queries)
    try:
        s = state.summary(w.name)
    finally:
        db.set_trace_callback(None)
    assert fired
    delivered, backlog = s["counters"].get("delivered", 0), 3 - s["cursor"]
    assert delivered + backlog + s["retrying"] + s["failed_now"] == 3
    assert state.summary(w.name)["counters"]["delivered"] == 3


def test_the_delivery_state_wal_is_checkpointed(tmp_path):
    """deliveries.db has no checkpointer thread: its connections must checkpoint after
    their own commits, or every outcome recorded stays in the WAL for good."""
    from trackpipe.delivery.retry import RetryPolicy

    state = DeliveryState(tmp_path / "deliveries.db")
    try:
        state.set_cursor("hook", 0)
        detail = "upstream said no: " + "x" * 200
        position = 0
        for _ in range(300):  # mixed batches: one attempt row per event, ~15 MB in all
            sent = []
            for i in range(100):
                position += 1
                outcome = retry(503, detail) if i == 0 else DELIVERED
                sent.append(Sent(position, f"m{position}", 0, f"u{i}", 1, 0, outcome))
            batch_id = state.begin_batch("hook", position - 99, position, 100)
            state.record("hook", sent, duration_ms=1.0, policy=RetryPolicy(4 * 3600_000, 10),
                         batch_id=batch_id, cursor=position)
        wal = (tmp_path / "deliveries.db-wal").stat().st_size
        # SQLite's autocheckpoint starts the WAL over past 1000 pages (4 MB).
        assert wal < 8 << 20, f"deliveries.db-wal holds {wal:,} bytes"
        assert state.summary("hook")["counters"]["delivered"] == 300 * 99
    finally:
        state.close()


def test_identity_passes_over_an_entry_it_trips_on_and_keeps_going(files, monkeypatch, caplog):
    """A bug met by one entry must not stop identity (and every warehouse behind it) for
    good: after a few failures the batch is applied entry by entry, that one passed over."""
    from trackpipe.config import Identity
    from trackpipe.delivery import process
    from trackpipe.identity.sqlite_store import SQLiteStore
    tmp, event_log, _ = files
    append(event_log, ["u1", "u2", "u3"])
    store = SQLiteStore(tmp / "identity.db", Identity())
    real = store.reader.fact
    tripped = []

    def trips_on_u2(entry):
        if entry.user_id == "u2":
            tripped.append(entry.position)
            raise TypeError("a bug this entry trips")
        return real(entry)
    monkeypatch.setattr(store.reader, "fact", trips_on_u2)
    monkeypatch.setattr(process, "IDENTITY_BATCH", 10)
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    identity = process.IdentityConsumer(store, event_log)
    try:
        with caplog.at_level(logging.ERROR, logger="trackpipe.consumers"):
            asyncio.run(run_identity_until(identity, 3))
        assert identity.position() == 3 and store.position() == 3
        assert len(tripped) == process.ENTRY_BY_ENTRY_AFTER + 1  # then passed over once
        [p1, p2, p3] = store.resolve_many([("u1", None), ("u2", None), ("u3", None)])
        assert p1 and p3 and p2 is None
        assert "passing over position 2" in caplog.text
    finally:
        identity.close()


def test_identity_retries_a_database_failure_without_passing_over(files, monkeypatch):
    from trackpipe.config import Identity
    from trackpipe.delivery import process
    from trackpipe.identity.sqlite_store import SQLiteStore
    tmp, event_log, _ = files
    append(event_log, ["u1", "u2"])
    store = SQLiteStore(tmp / "identity.db", Identity())
    real, failures = store.apply, []

    def disk_full(entries):
        if len(failures) < 6:
            failures.append(1)
            raise sqlite3.OperationalError("database or disk is full")
        return real(entries)
    monkeypatch.setattr(store, "apply", disk_full)
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    identity = process.IdentityConsumer(store, event_log)
    try:
        asyncio.run(run_identity_until(identity, 2))
        assert len(failures) == 6 and identity.position() == 2
        assert all(store.resolve_many([("u1", None), ("u2", None)]))  # nobody passed over
    finally:
        identity.close()


async def run_identity_until(identity, position: int) -> None:
    """Run the identity consumer until it has applied `position` (10 s at most)."""
    stop = asyncio.Event()
    task = asyncio.create_task(identity.run(stop))
    for _ in range(1000):
        if identity.position() == position:
            break
        await _real_sleep(0.01)
    stop.set()
    await task


_real_sleep = asyncio.sleep


async def _no_sleep(_seconds, *args):
    await _real_sleep(0)


@in_loop
async def test_a_retry_whose_event_was_deleted_is_counted_as_skipped(files):
    path, event_log, state = files
    ids = append(event_log, ["a", "b"])
    w = worker(state, event_log, Scripted(retry_ids={ids[0]}), batch_size=10)
    await w.step()  # a's event waits for a retry
    delete_positions(path, [1])  # deleted meanwhile (a privacy delete, or the retention)
    healed = Scripted()
    await drain(worker(state, event_log, healed, batch_size=10))
    assert healed.sends == []
    assert state.summary("scripted")["counters"]["skipped:deleted"] == 1
    assert state.next_due_in("scripted") is None, "nothing left waiting for it"


class Throttled(Scripted):
    """Refuses its first send (429 with a Retry-After, or a plain 503), delivers the rest."""

    def __init__(self, retry_after: float | None):
        super().__init__()
        self.retry_after = retry_after

    async def send(self, batch):
        self.sends.append([e.message_id for e in batch])
        if len(self.sends) == 1:
            return retry(429 if self.retry_after else 503, "slow down", self.retry_after)
        return DELIVERED


@in_loop
async def test_a_retry_after_pauses_the_whole_destination_a_plain_failure_does_not(files):
    _, event_log, state = files
    [a] = append(event_log, ["a"])
    dest = Throttled(retry_after=0.3)
    w = worker(state, event_log, dest, retry_initial_seconds=5.0)
    await w.step()
    [b] = append(event_log, ["b"])
    assert not await w.step() and dest.sends == [[a]], "nothing before the Retry-After ends"
    await asyncio.sleep(0.35)
    assert await w.step() and dest.sends == [[a], [b]]

    [c] = append(event_log, ["c"])
    plain = Throttled(retry_after=None)
    w = worker(state, event_log, plain, retry_initial_seconds=5.0)
    await w.step()
    [d] = append(event_log, ["d"])
    assert await w.step() and plain.sends == [[c], [d]], "a 503 alone holds back only c"


def come_due(state: DeliveryState) -> None:
    """Every pending event due now, each as far ahead of now as it was (so events that
    came due together still do, and no others): no test waits on a backoff."""
    state._db().execute("UPDATE pending SET next_at = next_at - 3600000")


class AsSent(Scripted):
    """Keeps failed requests apart on retry, as a webhook in batch mode (which answers the
    events of a request with one Outcome)."""

    retries_keep_requests = True

    async def send(self, batch):
        outcomes = await super().send(batch)
        refused = retry(503, "busy")
        return [refused if o.state == "retry" else o for o in outcomes]


@in_loop
async def test_failed_requests_due_together_go_again_apart_each_as_sent(files):
    """The failed events of a request are retried as that request (a webhook batch keeps
    its webhook-id): never merged with another's that is due at the same moment (after
    an outage, a Retry-After or a restart), kept together when they fail again."""
    _, event_log, state = files
    first = append(event_log, ["a", "b", "c"])
    dest = AsSent(retry_ids=set(first[1:]))  # a is delivered, b and c are not
    w = worker(state, event_log, dest, batch_size=10, retry_initial_seconds=60)
    await w.step()
    second = append(event_log, ["d", "e"])
    dest.retry_ids.update(second)
    await w.step()
    assert dest.sends == [first, second]

    come_due(state)
    assert await w.step() and await w.step()  # both fail again
    assert dest.sends[2:] == [first[1:], second]
    dest.retry_ids.clear()
    come_due(state)
    await drain(w)
    assert dest.sends[4:] == [first[1:], second], "failed again: still apart"


@in_loop
async def test_a_send_cut_into_requests_is_retried_request_by_request(files):
    """A webhook halves a batch the receiver refused as too large (413): each half is a
    request of its own, with an Outcome of its own, and is retried as such."""
    _, event_log, state = files
    ids = append(event_log, ["a", "b", "c", "d"])

    class Halving(AsSent):
        async def send(self, batch):
            self.sends.append([e.message_id for e in batch])
            if len(self.sends) > 1:
                return DELIVERED
            return [retry(503, "first half")] * 2 + [retry(503, "second half")] * 2

    dest = Halving()
    w = worker(state, event_log, dest, batch_size=10, retry_initial_seconds=60)
    await w.step()
    come_due(state)
    await drain(w)
    assert dest.sends == [ids, ids[:2], ids[2:]]


@in_loop
async def test_a_replay_brings_a_retrying_request_due_whole(files):
    _, event_log, state = files
    ids = append(event_log, ["a", "b", "c", "d"])
    dest = AsSent(retry_ids=set(ids))
    w = worker(state, event_log, dest, batch_size=10, retry_initial_seconds=60)
    await w.step()
    state.replay("scripted", [(2, "u:b", 1_700_000_000_000), (3, "u:c", 1_700_000_000_000)])
    dest.retry_ids.clear()
    assert await w.step()
    assert dest.sends == [ids, ids], "the whole request, not the two replayed"


@in_loop
async def test_ordered_held_events_drain_together_after_each_failed_request(files):
    """Per-user ordering: each user's failed request goes again as it went, then the
    events held behind them go together, not one a request."""
    _, event_log, state = files
    dest = AsSent()
    w = worker(state, event_log, dest, ordered=True, batch_size=10, retry_initial_seconds=60)
    failed = []
    for user in "abc":
        failed += append(event_log, [user])
        dest.retry_ids.update(failed)
        await w.step()
    held = append(event_log, ["a", "b", "c", "a", "b", "c"])
    await w.step()  # all held back behind their users' failed events
    assert dest.sends == [[m] for m in failed]
    dest.retry_ids.clear()
    come_due(state)
    await drain(w)
    assert dest.sends[3:] == [[m] for m in failed] + [held[:3], held[3:]]


@in_loop
async def test_events_never_sent_go_together_whatever_queued_them(files):
    """Replayed events were never part of a request: they are not kept apart."""
    _, event_log, state = files
    ids = append(event_log, ["a", "b", "c", "d"])
    dest = AsSent()
    w = worker(state, event_log, dest, batch_size=10)
    await w.step()
    for position in (3, 1, 4, 2):  # four replays, queued one by one
        state.replay("scripted", [(position, f"u:{'abcd'[position - 1]}", 1_700_000_000_000)])
        await asyncio.sleep(0.002)
    await w.step()
    assert dest.sends == [ids, ids], "one request, in log order"


@in_loop
async def test_failed_requests_due_together_go_together_where_requests_have_no_id(files):
    """A destination whose requests carry no id of their own drains a backlog of small
    failed requests in full batches."""
    _, event_log, state = files
    dest = Scripted()
    w = worker(state, event_log, dest, batch_size=10, retry_initial_seconds=60)
    failed = []
    for user in "abc":
        failed += append(event_log, [user])
        dest.retry_ids.update(failed)
        await w.step()
    dest.retry_ids.clear()
    come_due(state)
    await w.step()
    assert dest.sends == [[m] for m in failed] + [failed]


def test_a_lowered_batch_size_cuts_a_failed_request(tmp_path):
    from trackpipe.delivery.retry import RetryPolicy
    state = DeliveryState(tmp_path / "deliveries.db")
    try:
        policy = RetryPolicy(4 * 3600_000, 10, initial_ms=0.0)
        state.record("hook", [Sent(p, f"m{p}", 0, f"u:{p}", 1, 0, retry(503, "busy"))
                              for p in range(1, 6)], duration_ms=1.0, policy=policy)
        assert [r.position for r in state.due("hook", 3, as_sent=True)] == [1, 2, 3]
        assert [r.position for r in state.due("hook", 10, as_sent=True)] == [1, 2, 3, 4, 5]
    finally:
        state.close()


@in_loop
async def test_a_410_gone_stops_the_destination_until_a_restart(files):
    """R10: the endpoint was removed on purpose; nothing more goes to it, its events wait,
    and the state says so until trackpipe restarts (after its config was fixed)."""
    _, event_log, state = files
    [a] = append(event_log, ["a"])

    class Gone(Scripted):
        async def send(self, batch):
            self.sends.append([e.message_id for e in batch])
            return classify_http(410, b'{"error": "this hook was deleted"}')

    gone = Gone()
    w = worker(state, event_log, gone, retry_initial_seconds=0.01)
    await w.step()
    [b] = append(event_log, ["b"])
    await asyncio.sleep(0.05)
    for _ in range(3):
        assert not await w.step()
    assert gone.sends == [[a]], "nothing after the 410, not even fresh events"
    stopped = state.summary("scripted")["stopped"]
    assert stopped and "410 Gone" in stopped["detail"] and "deleted" in stopped["detail"]
    assert state.where_is("scripted", 1) == "retrying", "its event waits"

    fixed = Scripted()
    await drain(worker(state, event_log, fixed))  # a restart, after the config was fixed
    assert sorted(fixed.delivered()) == [a, b]
    assert state.summary("scripted")["stopped"] is None


def test_a_delete_never_runs_between_identitys_read_and_its_apply(files, monkeypatch):
    """A privacy delete (erase_requests, on the identity thread) that ran between a batch's
    read and its apply erased the person's events, and the apply then made the profile
    again from the events already read."""
    from trackpipe.delivery import process
    _, event_log, _ = files
    append(event_log, ["u1"])
    order: list[str] = []
    reading = threading.Event()
    real_read = event_log.read

    def slow_read(*args, **kwargs):
        reading.set()
        threading.Event().wait(0.2)  # long enough for a delete to be queued meanwhile
        return real_read(*args, **kwargs)

    class Store:
        lean_types = False

        def position(self) -> int:
            return 0

        def apply(self, entries) -> None:
            order.append("apply")

    monkeypatch.setattr(event_log, "read", slow_read)
    identity = process.IdentityConsumer(Store(), event_log)

    async def go():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.create_task(identity.run(stop))
        while not reading.is_set():
            await asyncio.sleep(0.005)
        await loop.run_in_executor(identity.pool, order.append, "delete")  # as erase_requests
        stop.set()
        await task

    try:
        asyncio.run(go())
    finally:
        identity.pool.shutdown(wait=True)
    assert order[:2] == ["apply", "delete"], order


# -- what GET /api/v1/events/{messageId}/deliveries shows --------------------------------


@in_loop
async def test_a_held_event_shows_no_attempt_until_it_goes_and_then_exactly_one(files):
    """A fresh batch's row covers the events held back for per-user ordering too; it must
    not claim them (a phantom attempt 1, then two 'delivered' attempts once sent)."""
    _, event_log, state = files
    [a1] = append(event_log, ["a"])
    dest = Scripted(retry_ids={a1})
    w = worker(state, event_log, dest, ordered=True, batch_size=10, retry_initial_seconds=60)
    await w.step()  # a1 fails retryably: user a now waits
    a2, b1 = append(event_log, ["a", "b"])
    await w.step()  # b1 goes; a2 is held behind a1
    assert dest.sends[-1] == [b1]
    assert outcome(event_log, state, a2, w) == ("queued", [])
    assert outcome(event_log, state, b1, w) == ("delivered", [("delivered", 1)])

    dest.retry_ids.clear()
    come_due(state)
    await drain(w)
    assert dest.delivered()[a2] == 1
    assert outcome(event_log, state, a2, w) == ("delivered", [("delivered", 1)])
    assert outcome(event_log, state, a1, w) == ("delivered", [("retry", 1), ("delivered", 2)])


@in_loop
async def test_a_filter_added_later_does_not_rewrite_what_was_delivered(files):
    _, event_log, state = files
    sent = append(event_log, ["a", "b"])
    await drain(worker(state, event_log, Scripted()))
    deny_tracks = msgspec.convert({"mode": "deny", "types": ["track"]}, config.Filter)
    filtered = worker(state, event_log, Scripted(), filter=deny_tracks)
    [later] = append(event_log, ["c"])
    await drain(filtered)
    assert outcome(event_log, state, sent[0], filtered) == ("delivered", [("delivered", 1)])
    assert outcome(event_log, state, later, filtered) == ("skipped (filter)", [])


@in_loop
async def test_a_read_that_skips_everything_is_recorded_in_one_small_row(files):
    """What a read skips is kept as [first, last] runs, not a position each: a filter
    that skips every event wrote a row the size of the read."""
    _, event_log, state = files
    deny_tracks = msgspec.convert({"mode": "deny", "types": ["track"]}, config.Filter)
    w = worker(state, event_log, Scripted(), filter=deny_tracks, batch_size=500)
    mids = append(event_log, [f"u{i}" for i in range(500)])
    await drain(w)
    [(positions,)] = state._db().execute("SELECT positions FROM unsent").fetchall()
    assert json.loads(positions) == {"filter": [[1, 500]]}
    assert outcome(event_log, state, mids[250], w) == ("skipped (filter)", [])


class FailsFirst(Scripted):
    """Refuses the first send for good (400), delivers every later one."""

    async def send(self, batch):
        self.sends.append([e.message_id for e in batch])
        return [fail(400, "bad") if len(self.sends) == 1 else DELIVERED for _ in batch]


@in_loop
async def test_every_stored_copy_of_a_message_id_shows_its_own_deliveries(files):
    """Past the dedup window a messageId is stored again: the first copy failed, the
    second was delivered; the answer lists both (the top level stays the newest)."""
    _, event_log, state = files
    [mid] = append(event_log, ["a"])
    [copy] = event_log.get([1])
    event_log.append([Record(mid, 1_700_000_100_000, "track", "Tested", "a", None, "src",
                             copy.body)])
    w = worker(state, event_log, FailsFirst(), batch_size=1)
    await drain(w)
    answer = deliveries(event_log, state, mid, w)
    assert [(c["position"], c["deliveries"][0]["state"]) for c in answer["copies"]] == [
        (1, "failed"), (2, "delivered")]
    assert answer["position"] == 2 and answer["deliveries"][0]["state"] == "delivered"


@in_loop
async def test_a_replay_reaches_a_destination_that_has_not_started_yet(files):
    """Added to the config but not started (no cursor): the replay queues up to the log's
    head; once it starts (at the head) it sends them, each once."""
    _, event_log, state = files
    ids = append(event_log, ["a", "b", "c"])
    dest = Scripted()
    w = worker(state, event_log, dest)
    assert replays.replay(event_log, state, w.cfg) == 3
    state.set_cursor(w.name, event_log.head())  # what the consumers process does at start
    await drain(w)
    assert dest.delivered() == Counter(ids)


def test_a_replay_into_a_disabled_destination_or_an_empty_range_is_refused(files):
    _, event_log, state = files
    append(event_log, ["a"])
    disabled = config.Destination(name="off", type="scripted", enabled=False)
    with pytest.raises(replays.ReplayRefused) as refused:
        replays.replay(event_log, state, disabled)
    assert refused.value.status == 409 and "enabled = true" in refused.value.message
    with pytest.raises(replays.ReplayRefused) as refused:
        replays.replay(event_log, state, config.Destination(name="on", type="scripted"),
                       since=2_000, until=1_000)
    assert refused.value.status == 400 and "must be before `until`" in refused.value.message
    assert state.pending_after("off", 0, 10) == [] == state.pending_after("on", 0, 10)


def append_body(event_log: SQLiteLog, user: str, **fields) -> str:
    """One track event of `user` with these extra message fields; returns its messageId."""
    message_id = f"m{event_log.head() + 1}"
    body = msgspec.json.encode({"type": "track", "event": "Tested", "userId": user,
                                "messageId": message_id, **fields})
    event_log.append([Record(message_id, 1_700_000_000_000, "track", "Tested", user, None,
                             "src", body)])
    return message_id


@in_loop
async def test_a_batch_recorded_before_the_upgrade_does_not_claim_what_it_skipped(files):
    """A deliveries.db from before `unsent`: its batch rows span the events their read
    skipped, with no word of which. Those are shown as routing says (as before the
    upgrade), not as delivered; rows recorded after the upgrade say for themselves."""
    path, event_log, state = files
    [sent] = append(event_log, ["a"])
    elsewhere = append_body(event_log, "b", integrations={"All": False})
    w = worker(state, event_log, Scripted(), batch_size=10)
    await drain(w)
    db = state._db()
    db.execute("DROP TABLE unsent")  # the file as the version before wrote it
    db.execute("DROP TABLE drops")
    state.close()
    upgraded = DeliveryState(path / "deliveries.db")
    try:
        assert outcome(event_log, upgraded, elsewhere, w)[0].startswith("skipped (")
        assert outcome(event_log, upgraded, sent, w) == ("delivered", [("delivered", 1)])

        [later] = append(event_log, ["c"])
        await drain(worker(upgraded, event_log, Scripted(), batch_size=10))
        deny_all = worker(upgraded, event_log, Scripted(), filter=msgspec.convert(
            {"mode": "deny", "types": ["track"]}, config.Filter))
        assert outcome(event_log, upgraded, later, deny_all) == ("delivered", [("delivered", 1)])
    finally:
        upgraded.close()


class TwoAnswers(Scripted):
    """Answers the two halves of a send apart (as a webhook does after a 413): both
    retryable, with different statuses."""

    async def send(self, batch):
        self.sends.append([e.message_id for e in batch])
        half = len(batch) // 2
        return [retry(503, "busy")] * half + [retry(429, "slow down")] * (len(batch) - half)


@in_loop
async def test_a_send_answered_apart_shows_each_event_its_own_answer(files):
    """Every event of the send was to be retried, but not for the same answer: the batch
    row's one status and detail would claim the first half's for all of them."""
    _, event_log, state = files
    first, second = append(event_log, ["a", "b"])
    w = worker(state, event_log, TwoAnswers(), batch_size=10, retry_initial_seconds=60)
    await w.step()
    shown = {mid: deliveries(event_log, state, mid, w)["deliveries"][0]["attempts"]
             for mid in (first, second)}
    assert [(a["state"], a["status"], a["detail"]) for a in shown[first]] == [
        ("retry", 503, "busy")]
    assert [(a["state"], a["status"], a["detail"]) for a in shown[second]] == [
        ("retry", 429, "slow down")]


def test_the_deliveries_view_reads_the_cursor_in_the_same_snapshot(files, monkeypatch):
    """A batch recorded between the view's read of the records and its read of the
    cursor made a sent event look as if it was stored before the destination existed."""
    path, event_log, state = files
    [mid] = append(event_log, ["a"])
    w = worker(state, event_log, Scripted())
    state.set_cursor(w.name, 0)
    batch_id = state.begin_batch(w.name, 1, 1, 1)
    other = DeliveryState(path / "deliveries.db")
    steps = DeliveryState._steps

    def recorded_meanwhile(*args):
        found = steps(*args)
        other.record(w.name, [Sent(1, mid, 0, "u:a", 1, 0, DELIVERED)], duration_ms=1.0,
                     policy=w.policy, batch_id=batch_id, cursor=1)
        return found

    monkeypatch.setattr(DeliveryState, "_steps", staticmethod(recorded_meanwhile))
    try:
        assert outcome(event_log, state, mid, w) == ("pending", [])
    finally:
        other.close()
