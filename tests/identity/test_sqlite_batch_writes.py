"""The SQLite identity store writes a batch as a few set-based statements.

Merges within one batch are written as one relabel to the profile that
survives the batch (not one UPDATE per merge, in order), so a chain of merges
in one batch must leave every node where replaying them in order would.
"""

from __future__ import annotations

import time

import msgspec

from trackpipe.config import Identity
from trackpipe.identity.sqlite_store import SQLiteStore
from trackpipe.log.base import Entry


def track(position: int, user: str | None, anon: str | None) -> Entry:
    body = {"type": "track", "event": "E", "userId": user, "anonymousId": anon,
            "messageId": f"m{position}", "timestamp": f"2026-01-01T00:00:{position:02d}.000Z"}
    return Entry(position, f"m{position}", 0, "track", "E", user, anon, "s",
                 msgspec.json.encode(body))


def test_a_chain_of_merges_in_one_batch_ends_in_the_oldest_profile(tmp_path):
    store = SQLiteStore(tmp_path / "identity.db", Identity())
    try:
        # Three visitors, oldest first: each its own profile.
        store.apply([track(1, None, "z"), track(2, None, "y"), track(3, None, "x")])
        before = {a: store.resolve(None, a) for a in "zyx"}
        assert len(set(before.values())) == 3
        # One batch: u signs in on x's device (u joins x), then on y's (x's profile is
        # absorbed by y's, the older), then on z's (y's by z's): two merges chained.
        store.apply([track(4, "u", "x"), track(5, "u", "y"), track(6, "u", "z")])
    finally:
        store.close()

    reopened = SQLiteStore(tmp_path / "identity.db", Identity())  # no cache: the tables only
    try:
        oldest = before["z"]
        assert {reopened.resolve(None, a) for a in "zyx"} == {oldest}
        assert reopened.resolve("u", None) == oldest
        profile = reopened.profile(oldest)
        assert sorted((i["type"], i["value"]) for i in profile["identifiers"]) == [
            ("anonymous_id", "x"), ("anonymous_id", "y"), ("anonymous_id", "z"),
            ("user_id", "u")]
        # The absorbed profiles are gone, and their ids still lead to the survivor.
        rows = reopened.conn.execute("SELECT id FROM profiles").fetchall()
        assert rows == [(oldest,)]
        for absorbed in (before["x"], before["y"]):
            assert reopened.profile(absorbed)["profile_id"] == oldest
    finally:
        reopened.close()


def test_wal_is_reused_while_applies_never_pause(tmp_path, monkeypatch):
    """Checkpointed beside back-to-back applies, the WAL must still start over
    (see SQLiteStore._checkpoint_loop), not grow by everything written."""
    from trackpipe.identity import sqlite_store

    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY_S", 0.05)
    store = SQLiteStore(tmp_path / "identity.db", Identity())
    wal = tmp_path / "identity.db-wal"
    try:
        position, deadline, largest = 0, time.monotonic() + 2.0, 0
        while time.monotonic() < deadline:  # new visitors, back to back, as under load
            batch = [track(position + i, None, f"visitor-{position + i}") for i in range(1, 201)]
            store.apply(batch)
            position += 200
            largest = max(largest, wal.stat().st_size)
        assert position >= 4000, "too few applies to tell (a slow machine?)"
        written = (tmp_path / "identity.db").stat().st_size
        # Every apply wrote new rows: without restarts the WAL outgrows the database.
        assert largest < written / 2, f"WAL reached {largest:,} bytes; database {written:,}"
        assert store.resolve(None, f"visitor-{position}") is not None
    finally:
        store.close()


def test_the_working_set_is_bounded_and_starting_it_afresh_changes_no_answer(tmp_path):
    """The cached graph holds at most `cache_identifiers` (plus one batch): kept for
    good it held every identifier ever seen. A person whose nodes were dropped from
    it is loaded again from the tables when a later event names them."""
    store = SQLiteStore(tmp_path / "identity.db", Identity(cache_identifiers=10))
    try:
        first = [track(i, None, f"visitor-{i}") for i in range(1, 9)]
        store.apply(first)
        born = {e.anonymous_id: store.resolve(None, e.anonymous_id) for e in first}
        for start in range(9, 60, 8):  # new visitors, batch after batch
            store.apply([track(p, None, f"visitor-{p}") for p in range(start, start + 8)])
            assert len(store.working_graph().nodes) <= 10 + 8
        # visitor-1 left the working set long ago; signing in on that device still
        # joins visitor-1's profile, and a second device of the same person joins it too.
        store.apply([track(100, "ann", "visitor-1"), track(101, "ann", "visitor-2")])
        assert store.resolve("ann", None) == born["visitor-1"]
        assert store.resolve(None, "visitor-2") == born["visitor-1"]
        assert store.resolve(None, "visitor-3") == born["visitor-3"]
    finally:
        store.close()
