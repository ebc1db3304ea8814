"""A suppressed person's events stop at every step of delivery, driven in one process.

A real SQLite log, deliveries.db and catalog.db; workers share the consumers
process's copy of the suppression list (privacy/suppress.py Watch) and the
SuppressionFollower acknowledges a suppression (delivery/process.py). The end
to end version, with a real server and webhook receivers, is
tests/identity/test_privacy_suppress_deliveries.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec
import pytest

from trackpipe import config
from trackpipe.delivery.process import SuppressionFollower
from trackpipe.delivery.state import DeliveryState
from trackpipe.delivery.worker import DestinationWorker
from trackpipe.destinations.base import DELIVERED, Destination, retry
from trackpipe.log.base import Record
from trackpipe.log.sqlite import SQLiteLog
from trackpipe.privacy.suppress import Watch, id_hash, trait_hash
from trackpipe.sources.catalog import Catalog

from support import in_loop

from delivery.views import outcome


class Switch(Destination):
    """Answers 503 to everything while `failing`; a send can be held open (`gate`)."""

    kind = "switch"

    class Settings(msgspec.Struct):
        pass

    def __init__(self):
        super().__init__("switch", self.Settings())
        self.failing = True
        self.gate: asyncio.Event | None = None
        self.sends: list[list[str]] = []
        self.delivered: list[str] = []

    async def send(self, batch):
        ids = [e.message_id for e in batch]
        self.sends.append(ids)
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            return [retry(503, "busy")] * len(batch)
        self.delivered += ids
        return [DELIVERED] * len(batch)


class Rig:
    def __init__(self, path):
        self.log = SQLiteLog(path / "log.db")
        self.state = DeliveryState(path / "deliveries.db")
        self.catalog = Catalog(path)
        self.api_catalog = Catalog(path)  # the admin API's connection, another process's
        self.key = self.catalog.privacy_key()
        self.watch = Watch(self.catalog, ["email"])
        self.owner: dict[str, str] = {}  # messageId -> whose

    def append(self, people: list[tuple[str, dict]]) -> list[str]:
        records = []
        for who, ids in people:
            mid = f"m{self.log.head() + len(records) + 1}"
            body = msgspec.json.encode({"type": "track", "event": "Tested", "messageId": mid,
                                        **ids})
            records.append(Record(mid, 1_700_000_000_000, "track", "Tested", ids.get("userId"),
                                  ids.get("anonymousId"), "src", body))
            self.owner[mid] = who
        self.log.append(records)
        return [r.message_id for r in records]

    def worker(self, destination, name: str, **cfg) -> DestinationWorker:
        cfg = config.Destination(name=name, type="switch",
                                 **{"retry_initial_seconds": 0.01, "batch_size": 10, **cfg})
        self.state.set_cursor(name, 0)
        return DestinationWorker(cfg, destination, self.log, self.state, suppressions=self.watch)

    def suppress(self, *hashes: str) -> int:
        """What the admin API does: the catalog, then a ticket."""
        self.api_catalog.suppress(list(hashes))
        return self.state.ask_suppression()

    def close(self):
        for c in (self.state, self.log, self.catalog, self.api_catalog):
            c.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


async def drain(*workers, steps: int = 200) -> None:
    for _ in range(steps):
        worked = [await w.step() for w in workers]
        if not any(worked) and all(w.state.next_due_in(w.name) is None for w in workers):
            return
        await asyncio.sleep(0.01)


def skipped(state, name) -> int:
    return state.summary(name)["counters"].get("skipped:suppressed", 0)


def mixed(n: int) -> list[tuple[str, dict]]:
    """n events each of U (by userId, by their anonymousId, by their email) and others."""
    people = []
    for k in range(n):
        people += [("U", {"userId": "U"}), ("other", {"userId": f"o{k % 3}"}),
                   ("U", {"anonymousId": "anon-U"}), ("other", {"anonymousId": "anon-x"}),
                   ("U", {"userId": "later-id", "context": {"traits": {"email": " U@Ex.com"}}})]
    return people


def U_HASHES(key: bytes) -> list[str]:
    """What the admin API suppresses for U's profile: userId, anonymousId, email."""
    return [id_hash(key, "U"), id_hash(key, "anon-U"), trait_hash(key, "u@ex.com")]


@in_loop
async def test_retrying_held_and_unread_events_of_a_suppressed_person_never_go(rig):
    plain, ordered = Switch(), Switch()
    workers = [rig.worker(plain, "plain"), rig.worker(ordered, "ordered", ordered=True)]
    follower = SuppressionFollower(rig.watch, rig.state, rig.log, workers)
    ids = rig.append(mixed(30))  # 150 events, read 10 at a time
    for _ in range(4):  # the first batches fail: retrying (and held, for `ordered`)
        for w in workers:
            await w.step()
    for w in workers:
        summary = rig.state.summary(w.name)
        assert summary["retrying"] and summary["cursor"] < rig.log.head()  # unread too
    held = rig.state.pending_after("ordered", 0, 1000)
    assert any(rig.owner[f"m{p}"] == "U" for p in held), "U's events wait at `ordered`"

    ticket = rig.suppress(*U_HASHES(rig.key))
    await follower.follow()
    assert rig.state.suppression_taken() == ticket
    for w in workers:  # purged from the queue at once, before anything else is sent
        left = rig.state.pending_after(w.name, 0, 1000)
        assert left and not [p for p in left if rig.owner[f"m{p}"] == "U"]

    plain.failing = ordered.failing = False
    sent_before = {w.name: len(d.sends) for w, d in zip(workers, (plain, ordered))}
    await drain(*workers)
    others = [m for m in ids if rig.owner[m] == "other"]
    theirs = [m for m in ids if rig.owner[m] == "U"]
    for w, dest in zip(workers, (plain, ordered)):
        after = [m for batch in dest.sends[sent_before[w.name]:] for m in batch]
        assert not set(after) & set(theirs), f"{w.name}: U's events sent after the suppress"
        assert Counter(dest.delivered) == Counter(others), w.name
        assert skipped(rig.state, w.name) == len(theirs), w.name
        assert rig.state.summary(w.name)["retrying"] == 0


@in_loop
async def test_suppress_is_acknowledged_only_after_a_send_of_theirs_in_flight_ends(rig):
    dest = Switch()
    w = rig.worker(dest, "plain")
    follower = SuppressionFollower(rig.watch, rig.state, rig.log, [w])
    ids = rig.append(mixed(4))
    dest.gate = asyncio.Event()
    sending = asyncio.create_task(w.step())  # U's events are in this request
    while not dest.sends:
        await asyncio.sleep(0.01)
    assert {rig.owner[m] for m in dest.sends[0]} == {"U", "other"}

    ticket = rig.suppress(*U_HASHES(rig.key))
    following = asyncio.create_task(follower.follow())
    await asyncio.sleep(0.3)
    assert not following.done() and rig.state.suppression_taken() < ticket
    dest.gate.set()  # the request fails (503): its events of U must not be retried
    await sending
    await following
    assert rig.state.suppression_taken() == ticket
    queued = rig.state.pending_after("plain", 0, 1000)
    assert queued and not [p for p in queued if rig.owner[f"m{p}"] == "U"]

    dest.gate, dest.failing = None, False
    await drain(w)
    assert Counter(dest.delivered) == Counter(m for m in ids if rig.owner[m] == "other")
    assert skipped(rig.state, "plain") == sum(rig.owner[m] == "U" for m in ids)


@in_loop
async def test_unsuppress_lets_later_events_through_and_leaves_the_purged_ones_out(rig):
    dest = Switch()
    w = rig.worker(dest, "plain")
    follower = SuppressionFollower(rig.watch, rig.state, rig.log, [w])
    first = rig.append([("U", {"userId": "U"}), ("other", {"userId": "o"})])
    await w.step()  # both fail: retrying
    rig.suppress(id_hash(rig.key, "U"))
    await follower.follow()
    assert rig.state.pending_after("plain", 0, 10) == [2]

    # Unsuppressed; the ingest lets U's next event in at once. The worker meets it before
    # the follower has looked at the catalog again: it must not skip it.
    rig.api_catalog.unsuppress([id_hash(rig.key, "U")])
    later = rig.append([("U", {"userId": "U"})])
    dest.failing = False
    await drain(w)
    assert sorted(dest.delivered) == sorted([first[1], *later])
    assert first[0] not in dest.sends[-1] and skipped(rig.state, "plain") == 1


@in_loop
async def test_nobody_suppressed_means_no_test_per_event(rig):
    w = rig.worker(Switch(), "plain")
    assert w._muted([]) is None
    rig.api_catalog.suppress([id_hash(rig.key, "someone")])
    rig.watch.refresh()
    assert w._muted([]) is not None


@in_loop
async def test_during_a_privacy_delete_their_queued_events_wait_unsent_for_it(rig):
    """A delete suppresses first, then cancels the person's queued deliveries and reports
    how many: the workers leave those to it (they send none of them meanwhile)."""
    from trackpipe.privacy import erase
    dest = Switch()
    w = rig.worker(dest, "plain")
    ids = rig.append([("U", {"userId": "U"}), ("other", {"userId": "o"})])
    await w.step()  # both retrying
    db = rig.state._db()
    request = erase.queue(db, [("user_id", "U")])
    rig.api_catalog.suppress([id_hash(rig.key, "U")])
    rig.watch.refresh()  # the follower's next poll, within 0.1 s
    dest.failing = False
    await asyncio.sleep(0.05)
    await w.step()
    assert dest.delivered == [ids[1]] and rig.state.pending_after("plain", 0, 10) == [1]
    db.execute("UPDATE privacy_requests SET done_at = 1 WHERE id = ?", (request,))
    db.execute("UPDATE pending SET next_at = 0")
    await drain(w)
    assert dest.delivered == [ids[1]] and rig.state.pending_after("plain", 0, 10) == []
    assert skipped(rig.state, "plain") == 1


async def until(check, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


@in_loop
async def test_a_hanging_send_does_not_hold_back_the_list_for_the_other_workers(rig):
    """C's events hang in a send to X (up to SEND_TIMEOUT): a suppress of C waits for it,
    but D, suppressed meanwhile, is skipped by Y from the next poll on."""
    x, y = Switch(), Switch()
    y.failing = False
    wx, wy = rig.worker(x, "x"), rig.worker(y, "y")
    follower = SuppressionFollower(rig.watch, rig.state, rig.log, [wx, wy])
    stop = asyncio.Event()
    following = asyncio.create_task(follower.run(stop))
    rig.append([("C", {"userId": "C"}), ("o", {"userId": "o"})])
    x.gate = asyncio.Event()
    hanging = asyncio.create_task(wx.step())
    await until(lambda: x.sends)
    await wy.step()
    c_ticket = rig.suppress(id_hash(rig.key, "C"))
    await asyncio.sleep(0.3)
    d_ticket = rig.suppress(id_hash(rig.key, "D"))
    await asyncio.sleep(0.5)  # several polls
    assert id_hash(rig.key, "D") in rig.watch.list.hashes, "the list is taken on every poll"
    ids = rig.append([("D", {"userId": "D"}), ("o", {"userId": "o2"})])
    await wy.step()
    assert ids[0] not in y.delivered and ids[1] in y.delivered
    assert rig.state.suppression_taken() < c_ticket  # X's send of C's events is still open
    x.gate.set()
    await hanging
    await until(lambda: rig.state.suppression_taken() == d_ticket)
    assert not [p for p in rig.state.pending_after("x", 0, 100) if rig.owner[f"m{p}"] == "C"]
    stop.set()
    await following


@in_loop
async def test_a_suppress_after_an_unsuppress_waits_for_a_send_of_theirs(rig):
    """A is unsuppressed while the follower waits for another send; a worker reloads the
    list itself and sends A's event; A suppressed again must wait for that send, though
    the follower never saw the list without A."""
    x, y = Switch(), Switch()
    y.failing = False
    wx, wy = rig.worker(x, "x"), rig.worker(y, "y")
    follower = SuppressionFollower(rig.watch, rig.state, rig.log, [wx, wy])
    a = id_hash(rig.key, "A")
    rig.suppress(a)
    await follower.follow()
    rig.append([("C", {"userId": "C"})])
    x.gate = asyncio.Event()
    hanging = asyncio.create_task(wx.step())  # C's event hangs at X
    await until(lambda: x.sends)
    await wy.step()
    rig.suppress(id_hash(rig.key, "C"))
    stop = asyncio.Event()
    following = asyncio.create_task(follower.run(stop))  # waits for X
    await asyncio.sleep(0.3)
    rig.api_catalog.unsuppress([a])
    ids = rig.append([("C", {"userId": "C"}), ("A", {"userId": "A"})])
    y.gate = asyncio.Event()
    sending = asyncio.create_task(wy.step())  # A's event goes to Y (rightly, for now)
    await until(lambda: len(y.sends) == 2)
    assert ids[1] in y.sends[-1]
    ticket = rig.suppress(a)
    x.gate.set()
    await hanging
    await asyncio.sleep(0.5)
    assert not sending.done()
    assert rig.state.suppression_taken() < ticket, "acknowledged while A's send is open"
    y.gate.set()
    await sending
    await until(lambda: rig.state.suppression_taken() == ticket)
    stop.set()
    await following


@in_loop
async def test_their_events_show_as_skipped_suppressed_not_as_part_of_a_send(rig):
    """GET /api/v1/events/{id}/deliveries: a batch's range does not claim their event,
    which was never sent, and one read on its own is not 'stored before the destination
    was added'."""
    dest = Switch()
    dest.failing = False
    w = rig.worker(dest, "plain")
    follower = SuppressionFollower(rig.watch, rig.state, rig.log, [w])
    rig.suppress(*U_HASHES(rig.key))
    await follower.follow()
    before, theirs, after = rig.append([("other", {"userId": "o1"}), ("U", {"userId": "U"}),
                                        ("other", {"userId": "o2"})])
    await drain(w)
    assert dest.sends == [[before, after]]
    assert outcome(rig.log, rig.state, theirs, w) == ("skipped (suppressed)", [])
    assert outcome(rig.log, rig.state, after, w) == ("delivered", [("delivered", 1)])
    [alone] = rig.append([("U", {"anonymousId": "anon-U"})])
    await drain(w)
    assert outcome(rig.log, rig.state, alone, w) == ("skipped (suppressed)", [])
    assert skipped(rig.state, "plain") == 2


@in_loop
async def test_a_retrying_event_purged_by_a_suppress_shows_skipped_with_its_attempt(rig):
    dest = Switch()  # 503s: the event waits for a retry
    w = rig.worker(dest, "plain", retry_initial_seconds=60)
    follower = SuppressionFollower(rig.watch, rig.state, rig.log, [w])
    [theirs] = rig.append([("U", {"userId": "U"})])
    await w.step()
    assert outcome(rig.log, rig.state, theirs, w) == ("retrying", [("retry", 1)])
    rig.suppress(*U_HASHES(rig.key))
    await follower.follow()
    assert outcome(rig.log, rig.state, theirs, w) == ("skipped (suppressed)", [("retry", 1)])
