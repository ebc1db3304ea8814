"""The contract every identity store passes (see trackpipe/identity/store.py and graph.py).

Each case runs against the SQLite store and against the PostgreSQL store on
this machine (a fresh schema per test, dropped afterwards).
"""

from __future__ import annotations

import json
import os
import threading
import uuid

import msgspec
import pytest

from trackpipe.config import Identity
from trackpipe.events import read_ts
from trackpipe.identity.postgres_store import PostgresStore
from trackpipe.identity.sqlite_store import SQLiteStore
from trackpipe.log.base import Entry

PG_DSN = os.environ.get("TRACKPIPE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def _unavailable(reason: str):
    if os.environ.get("TRACKPIPE_REQUIRE_SERVICES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _pg_schema():
    import psycopg
    try:
        conn = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        _unavailable(f"PostgreSQL is not reachable at {PG_DSN}: {exc}")
    schema = f"identity_test_{uuid.uuid4().hex[:12]}"
    conn.execute(f"CREATE SCHEMA {schema}")
    return conn, schema


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request, tmp_path):
    """open(**settings) -> a store; every store opened in a test shares one location."""
    opened = []
    cleanup = []
    if request.param == "postgres":
        conn, schema = _pg_schema()
        cleanup.append(lambda: conn.execute(f"DROP SCHEMA {schema} CASCADE"))
        cleanup.append(conn.close)

    def open_store(consumer="identity", **settings):
        cfg = Identity(**{"trait_identifiers": ["email"], **settings})
        if request.param == "sqlite":
            store = SQLiteStore(tmp_path / "identity.db", cfg, consumer)
        else:
            store = PostgresStore(PG_DSN, cfg, consumer, schema=schema)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()
    for step in cleanup:
        step()


@pytest.fixture
def store(stores):
    return stores()


class Log:
    """Entries as the collector stores them, at increasing positions."""

    def __init__(self):
        self.position = 0

    def __call__(self, type_: str, user: str | None = None, anon: str | None = None,
                 ts: str | None = None, **fields) -> Entry:
        self.position += 1
        ts = ts or f"2024-05-01T10:00:{self.position:02d}.000Z"
        body = {"type": type_, "userId": user, "anonymousId": anon, "timestamp": ts,
                "messageId": f"msg-{self.position}", "sourceId": "src_1", **fields}
        return Entry(self.position, f"msg-{self.position}", 1_714_557_600_000, type_,
                     fields.get("event"), user, anon, "src_1", msgspec.json.encode(body))


@pytest.fixture
def log():
    return Log()


def same_profile(store, *idents) -> str:
    ids = {store.profile(i)["profile_id"] for i in idents}
    assert len(ids) == 1, f"{idents} resolve to {ids}"
    return ids.pop()


def all_timeline(store, ident, limit=1000) -> list[int]:
    return store.timeline(ident, None, limit)[0]


# -- stitching -------------------------------------------------------------------------

def test_anonymous_events_join_the_person_who_identifies(store, log):
    anon = [log("page", anon="a1", name="Home"), log("track", anon="a1", event="Product Added")]
    store.apply(anon)
    before = store.profile("a1")["profile_id"]
    later = [log("identify", "u1", "a1", traits={"name": "Ada"}),
             log("track", "u1", "a1", event="Order Completed")]
    store.apply(later)
    profile = store.profile("u1")
    assert profile["profile_id"] == before == store.profile("a1")["profile_id"]
    assert profile["user_ids"] == ["u1"] and profile["anonymous_ids"] == ["a1"]
    assert all_timeline(store, "u1") == [e.position for e in anon + later]
    assert store.resolve("u1", None) == store.resolve(None, "a1") == before
    assert store.position() == later[-1].position


def test_alias_joins_two_user_ids(store, log):
    store.apply([log("identify", "old-id", "a1"), log("identify", "new-id", "a2"),
                 log("alias", "new-id", "a2", previousId="old-id")])
    profile = store.profile("new-id")
    assert sorted(profile["user_ids"]) == ["new-id", "old-id"]
    assert same_profile(store, "old-id", "new-id", "a1", "a2")
    [merge] = [m for m in store.merges("old-id") if m["edge"] == "alias"]
    assert merge["kind"] == "merge" and merge["rule"] == "alias"


def test_alias_with_user_id_equal_to_previous_id_is_a_no_op(store, log):
    # analytics-next's alias('u2') after identify('u1') sends userId == previousId == "u1".
    store.apply([log("identify", "u1", "a1"), log("alias", "u1", "a1", previousId="u1")])
    assert store.profile("u1")["user_ids"] == ["u1"]
    assert [m["edge"] for m in store.merges("u1")] == ["user_anonymous"]


def test_an_alias_that_comes_before_the_old_user_ids_events_joins_them_all_the_same(stores, log):
    # The server sent the alias while the old userId's events waited in a phone's queue.
    stores().apply([log("alias", "new-id", ts="2024-05-01T10:00:10.000Z", previousId="old-id")])
    store = stores()  # another store object: what it knows of old-id comes from the rows
    store.apply([log("track", "old-id", ts="2024-05-01T10:00:05.000Z", event="Old Event"),
                 log("identify", "new-id", traits={"plan": "pro"})])
    pid = same_profile(store, "old-id", "new-id")
    profile = store.profile(pid)
    assert sorted(profile["user_ids"]) == ["new-id", "old-id"] and profile["anonymous_ids"] == []
    assert profile["event_counts"] == {"Old Event": 1} and profile["traits"] == {"plan": "pro"}
    assert store.resolve("old-id", None) == store.resolve("new-id", None) == pid
    [merge] = store.merges("old-id")
    assert (merge["kind"], merge["edge"]) == ("merge", "alias")
    assert {(i["type"], i["value"]) for i in merge["identifiers"]} == {
        ("user_id", "old-id"), ("user_id", "new-id")}
    # the same within one batch
    store.apply([log("alias", "new-2", previousId="old-2"), log("track", "old-2", event="E")])
    assert sorted(store.profile("old-2")["user_ids"]) == ["new-2", "old-2"]


def test_a_previous_id_an_event_named_as_an_anonymous_id_stays_one(stores, log):
    stores().apply([log("alias", "u1", previousId="dev-1"), log("track", anon="dev-1", event="E"),
                    log("alias", "u2", previousId="dev-2"), log("track", "u3", "dev-2", event="E")])
    store = stores()
    store.apply([log("identify", "dev-1"), log("identify", "dev-2")])
    assert store.profile("u1")["anonymous_ids"] == ["dev-1"]
    assert store.profile("u2")["anonymous_ids"] == ["dev-2"]
    assert store.profile("u1")["profile_id"] != store.resolve("dev-1", None)
    assert store.profile("u2")["profile_id"] != store.resolve("dev-2", None)


def test_a_previous_id_named_as_a_user_id_then_as_an_anonymous_id_in_one_batch(stores, log):
    stores().apply([log("alias", "u1", previousId="old")])
    store = stores()  # what it knows of "old" comes from the rows
    store.apply([log("identify", "old"), log("track", anon="old", event="E")])
    profile = store.profile("u1")
    assert sorted(profile["user_ids"]) == ["old", "u1"] and profile["anonymous_ids"] == []
    assert store.profile(store.resolve(None, "old"))["anonymous_ids"] == ["old"]
    assert store.resolve(None, "old") != profile["profile_id"]
    store.apply([log("alias", "u2", previousId="old-2")])  # a graph that holds "old-2"
    store.apply([log("identify", "old-2"), log("track", anon="old-2", event="E")])
    assert sorted(store.profile("u2")["user_ids"]) == ["old-2", "u2"]


def test_a_previous_id_made_a_user_id_is_kept_apart_as_rule_1_would_have(stores, log):
    # Had "old" been sent as a userId first, dev's identify as u2 would have been refused:
    # "old" becomes that userId, and the profile is rebuilt without that edge.
    stores().apply([log("alias", anon="dev", previousId="old"), log("identify", "u2", "dev")])
    store = stores()
    store.apply([log("track", "old", event="E")])
    assert store.profile("u2")["identifiers"] == [{"type": "user_id", "value": "u2"}]
    profile = store.profile("old")
    assert profile["user_ids"] == ["old"] and profile["anonymous_ids"] == ["dev"]
    assert [m["rule"] for m in store.merges("u2") if m["kind"] == "refused"] == [
        "distinct_user_ids"]
    # the same within one batch, and through a trait identifier
    store.apply([log("alias", anon="dev-2", previousId="old-2"), log("identify", "u3", "dev-2"),
                 log("track", "old-2", event="E")])
    assert store.profile("u3")["user_ids"] == ["u3"]
    assert store.profile("old-2")["anonymous_ids"] == ["dev-2"]
    store.apply([log("alias", anon="x", previousId="p1"), log("identify", anon="x",
                                                              traits={"email": "e@x.io"}),
                 log("alias", anon="y", previousId="p2"), log("identify", anon="y",
                                                              traits={"email": "e@x.io"}),
                 log("track", "p1", event="E"), log("track", "p2", event="E")])
    assert store.profile("p1")["user_ids"] == ["p1"] and store.profile("p2")["user_ids"] == ["p2"]
    assert store.profile("e@x.io")["anonymous_ids"] == ["x"]
    assert store.profile("p2")["anonymous_ids"] == ["y"]


def test_an_alias_without_user_id_joins_previous_id_to_its_anonymous_id(store, log):
    store.apply([log("identify", "u-old", "a-old", traits={"x": 1}),
                 log("alias", anon="a-new", previousId="u-old"),
                 log("track", anon="a-new", event="E")])
    pid = same_profile(store, "u-old", "a-old", "a-new")
    assert store.profile(pid)["event_counts"] == {"E": 1}
    [merge] = [m for m in store.merges("a-new") if m["edge"] == "alias"]
    assert merge["kind"] == "merge"
    assert {(i["type"], i["value"]) for i in merge["identifiers"]} == {
        ("user_id", "u-old"), ("anonymous_id", "a-new")}


def test_an_alias_without_user_id_is_refused_as_any_alias(stores, log):
    store = stores(max_identifiers_per_profile=2)
    store.apply([log("identify", "u-old", "a-old"), log("track", anon="a-new", event="E"),
                 log("alias", anon="a-new", previousId="u-old")])
    assert store.profile("a-new")["profile_id"] != store.profile("u-old")["profile_id"]
    [refused] = [m for m in store.merges("a-new") if m["kind"] == "refused"]
    assert (refused["rule"], refused["edge"]) == ("max_identifiers", "alias")
    assert store.stats()["refused"] == 1


def test_a_shared_anonymous_id_never_joins_two_user_ids(store, log):
    store.apply([log("identify", "u1", "shared-device"), log("track", "u2", event="Signed In")])
    late = log("track", "u2", "shared-device", event="Order Completed")
    store.apply([late])
    assert store.profile("u1")["profile_id"] != store.profile("u2")["profile_id"]
    assert store.profile("shared-device")["user_ids"] == ["u1"]
    assert late.position in all_timeline(store, "u2")
    assert late.position not in all_timeline(store, "u1")
    assert store.resolve("u2", "shared-device") == store.profile("u2")["profile_id"]
    refused = [m for m in store.merges("u2") if m["kind"] == "refused"]
    assert [(m["rule"], m["position"], m["message_id"]) for m in refused] == [
        ("distinct_user_ids", late.position, late.message_id)]
    assert {i["value"] for i in refused[0]["identifiers"]} == {"u2", "shared-device"}
    assert store.merges("u1")[-1]["kind"] == "refused"  # both sides can see why


def test_an_alias_may_join_what_a_shared_id_may_not(store, log):
    store.apply([log("identify", "u1", "a1"), log("identify", "u2", "a1"),
                 log("alias", "u2", previousId="u1")])
    assert same_profile(store, "u1", "u2", "a1")


def test_blocked_values_never_become_identifiers(stores, log):
    store = stores(blocked_values=["anonymous", "0"])
    store.apply([log("identify", "0", "a1"), log("identify", "u2", " Anonymous "),
                 log("identify", "u3", "anonymous"), log("track", "0", "anonymous", event="E")])
    assert store.profile("0") is None and store.profile("anonymous") is None
    assert store.profile("u2")["profile_id"] != store.profile("u3")["profile_id"]
    assert store.profile("a1")["user_ids"] == []
    assert store.resolve("0", "anonymous") is None
    assert store.stats()["blocked"] == 5


def test_max_identifiers_refuses_the_edge_that_would_exceed_it(stores, log):
    store = stores(max_identifiers_per_profile=3)
    store.apply([log("identify", "u1", f"a{i}") for i in range(4)])
    profile = store.profile("u1")
    assert profile["anonymous_ids"] == ["a0", "a1"]
    assert store.profile("a3")["user_ids"] == []
    assert [m["rule"] for m in store.merges("u1") if m["kind"] == "refused"] == \
        ["max_identifiers", "max_identifiers"]


def test_max_merges_counts_joined_profiles_not_new_identifiers(stores, log):
    store = stores(max_merges_per_profile=1)
    store.apply([log("page", anon="a1"), log("page", anon="a2"), log("page", anon="a3")])
    store.apply([log("identify", "u1", "a1"),   # a1's profile gains u1: not a merge
                 log("identify", "u1", "a2"),   # joins a2's profile: merge 1
                 log("identify", "u1", "a3")])  # would be merge 2
    assert sorted(store.profile("u1")["anonymous_ids"]) == ["a1", "a2"]
    refused = [m for m in store.merges("u1") if m["kind"] == "refused"]
    assert [m["rule"] for m in refused] == ["max_merges"]


# -- trait identifiers and profile data -----------------------------------------------

def test_trait_identifiers_join_and_never_join_two_users(store, log):
    store.apply([log("identify", anon="a1", traits={"email": "Ada@Example.com"}),
                 log("identify", "u1", traits={"email": "ada@example.com "}),
                 log("track", "u2", event="E", context={"traits": {"email": "ADA@example.com"}})])
    assert same_profile(store, "a1", "u1", "ada@example.com", "ADA@EXAMPLE.COM")
    profile = store.profile("u1")
    assert {"type": "email", "value": "ada@example.com"} in profile["identifiers"]
    assert store.profile("u2")["profile_id"] != profile["profile_id"]
    assert [m["rule"] for m in store.merges("u2") if m["kind"] == "refused"] == \
        ["distinct_user_ids"]


def test_traits_merge_by_timestamp_with_nested_objects(store, log):
    store.apply([
        log("identify", "u1", ts="2024-05-01T10:00:05.000Z",
            traits={"plan": "pro", "address": {"city": "Paris", "street": "1 Rue"}}),
        # arrives later in the log but happened earlier: loses where it overlaps
        log("identify", "u1", ts="2024-05-01T09:00:00.000Z",
            traits={"plan": "free", "name": "Ada", "address": {"city": "Lyon", "zip": "69001"}}),
        # context.traits count for identify; the call's own traits win over them
        log("identify", "u1", ts="2024-05-01T11:00:00.000Z", traits={"title": "CTO"},
            context={"traits": {"title": "ignored", "company": {"name": "ACME"}}}),
        log("track", "u1", ts="2024-05-01T12:00:00.000Z", event="E",
            context={"traits": {"plan": "not an identify"}}),
    ])
    assert store.profile("u1")["traits"] == {
        "plan": "pro", "name": "Ada", "title": "CTO", "company": {"name": "ACME"},
        "address": {"city": "Paris", "street": "1 Rue", "zip": "69001"}}


def test_an_empty_object_merges_into_an_object_and_replaces_a_null(store, log):
    store.apply([
        log("identify", "u1", traits={"prefs": {"color": "red"}, "plan": {"tier": 1}}),
        log("identify", "u1", traits={"prefs": None}),
        log("identify", "u1", traits={"prefs": {}, "plan": {}}),
    ])
    # as the calls deep-merged in timestamp order: the null cleared prefs for good
    assert store.profile("u1")["traits"] == {"prefs": {}, "plan": {"tier": 1}}


def test_traits_of_every_identifier_fold_into_the_profile(store, log):
    store.apply([log("identify", anon="a1", traits={"color": "red", "size": 1}),
                 log("identify", "u1", traits={"size": 2}),
                 log("identify", "u1", "a1")])
    assert store.profile("a1")["traits"] == {"color": "red", "size": 2}


def test_groups_keep_the_latest_traits_per_group(store, log):
    store.apply([log("group", "u1", groupId="org-1", traits={"name": "Old", "plan": "a"}),
                 log("group", "u1", groupId="org-2", traits={"name": "Two"}),
                 log("group", "u1", groupId="org-1", traits={"name": "New"})])
    assert store.profile("u1")["groups"] == [
        {"group_id": "org-1", "traits": {"name": "New"}},
        {"group_id": "org-2", "traits": {"name": "Two"}}]


def test_counts_and_first_and_last_seen(store, log):
    store.apply([log("page", anon="a1", ts="2024-05-01T08:00:00.000Z"),
                 log("track", "u1", "a1", event="Order Completed"),
                 log("track", "u1", event="Order Completed"),
                 log("track", "u1", event="Product Viewed", ts="2024-05-02T08:00:00.000Z"),
                 log("screen", "u1", name="Home")])
    profile = store.profile("a1")
    assert profile["event_counts"] == {"Order Completed": 2, "Product Viewed": 1}
    assert profile["type_counts"] == {"page": 1, "screen": 1}
    assert profile["first_seen"] == "2024-05-01T08:00:00.000Z"
    assert profile["last_seen"] == "2024-05-02T08:00:00.000Z"


def lean(entry: Entry) -> Entry:
    """The entry as a lean read gives it: no body, the ts the collector stamped."""
    return entry._replace(body=b"", ts=read_ts(msgspec.json.decode(entry.body)["timestamp"])[0])


def test_entries_read_without_their_bodies_count_and_order_by_their_ts(stores, log):
    store = stores(trait_identifiers=[])
    assert set(store.lean_types) == {"track", "page", "screen"}
    entries = [log("page", anon="a1", ts="2024-05-01T10:00:03.000Z"),
               log("track", anon="a1", event="E", ts="2024-05-01T10:00:01.000Z"),
               log("identify", "u1", "a1", ts="2024-05-01T10:00:02.000Z"),
               log("track", "u1", event="E", ts="2024-05-01T10:00:09.000Z")]
    store.apply([lean(e) if e.type in store.lean_types else e for e in entries])
    profile = store.profile("u1")
    assert (profile["first_seen"], profile["last_seen"]) == ("2024-05-01T10:00:01.000Z",
                                                             "2024-05-01T10:00:09.000Z")
    assert profile["event_counts"] == {"E": 2} and profile["type_counts"] == {"page": 1}
    assert store.timeline("u1", None, 10)[0] == [entries[i].position for i in (1, 2, 0, 3)]
    # With trait identifiers, a track's context.traits can join people: bodies are needed.
    assert stores(consumer="other", trait_identifiers=["email"]).lean_types == ()


# -- timeline ----------------------------------------------------------------------------

def test_timeline_is_in_timestamp_order_with_paging(store, log):
    entries = [log("page", anon="a1", ts="2024-05-01T10:00:03.000Z"),
               log("track", anon="a1", event="E", ts="2024-05-01T10:00:01.000Z"),
               log("identify", "u1", "a1", ts="2024-05-01T10:00:02.000Z"),
               log("track", "u1", event="E", ts="2024-05-01T10:00:02.000Z"),
               log("track", "u1", event="E", ts="2024-05-01T10:00:09.000Z")]
    store.apply(entries)
    expected = [entries[i].position for i in (1, 2, 3, 0, 4)]
    pages, cursor = [], None
    while True:
        positions, cursor = store.timeline("u1", cursor, 2)
        pages.append(positions)
        if cursor is None:
            break
    assert pages == [expected[:2], expected[2:4], expected[4:]]
    assert store.timeline("nobody", None, 10) == ([], None)
    with pytest.raises(ValueError):
        store.timeline("u1", "not-a-cursor", 2)


# -- idempotence and durability ----------------------------------------------------------

def test_applying_the_same_positions_again_changes_nothing(stores, log):
    store = stores()
    batch = [log("page", anon="a1"), log("identify", "u1", "a1"),
             log("track", "u1", event="E"), log("track", "u2", "a1", event="E")]
    store.apply(batch)
    first = (store.profile("u1"), store.merges("u1"), all_timeline(store, "u1"))
    store.apply(batch)
    store.apply(batch[2:])
    again = stores()  # a restart: the position was committed with the changes
    assert again.position() == batch[-1].position
    again.apply(batch)
    assert (again.profile("u1"), again.merges("u1"), all_timeline(again, "u1")) == first
    assert first[0]["event_counts"] == {"E": 1}


def test_a_second_store_sees_what_the_first_one_changed(stores, log):
    writer, admin = stores(), stores()
    writer.apply([log("page", anon="a1"), log("identify", "u1", "a1")])
    assert writer.resolve(None, "a1") == writer.resolve("u1", None)
    [merge] = admin.merges("u1")
    admin.unmerge(admin.profile("u1")["profile_id"], merge["id"])
    writer.apply([log("track", "u1", "a1", event="E")])  # must not trust a stale cache
    assert writer.resolve(None, "a1") != writer.resolve("u1", None)
    assert store_ids(writer, "a1") == {"a1"}


def store_ids(store, ident) -> set[str]:
    return {i["value"] for i in store.profile(ident)["identifiers"]}


# -- merged ids, unmerge, forget ----------------------------------------------------------

def test_the_older_profile_id_survives_and_the_younger_keeps_resolving(store, log):
    store.apply([log("page", anon="a1")])
    older = store.profile("a1")["profile_id"]
    store.apply([log("identify", "u1")])
    younger = store.profile("u1")["profile_id"]
    store.apply([log("identify", "u1", "a1")])
    profile = store.profile(younger)
    assert profile["profile_id"] == older and profile["merged_profile_ids"] == [younger]
    assert store.profile(older)["profile_id"] == older
    [merge] = store.merges(older)
    assert (merge["from"], merge["to"]) == (younger, older)


def test_unmerge_splits_the_profile_and_the_edge_stays_off(store, log):
    store.apply([log("page", anon="a1"), log("identify", "u1"),
                 log("track", "u1", "a1", event="E"), log("identify", "u1", "a2")])
    pid = store.profile("u1")["profile_id"]
    [bad] = [m for m in store.merges("u1") if {"type": "anonymous_id", "value": "a1"}
             in m["identifiers"]]
    profiles = store.unmerge(pid, bad["id"])
    assert len(profiles) == 2 and set(profiles) == {store.profile("a1")["profile_id"],
                                                     store.profile("u1")["profile_id"]}
    assert store_ids(store, "u1") == {"u1", "a2"} and store_ids(store, "a1") == {"a1"}
    store.apply([log("track", "u1", "a1", event="E")])  # seen again: stays apart
    assert store.profile("a1")["profile_id"] != store.profile("u1")["profile_id"]
    kinds = [(m["kind"], m["rule"]) for m in store.merges("a1")]
    assert ("unmerge", "unmerged") in kinds
    with pytest.raises(LookupError):
        store.unmerge(store.profile("u1")["profile_id"], bad["id"])
    with pytest.raises(LookupError):
        store.unmerge(pid, "m999999")


def test_unmerge_replays_the_rules_over_the_remaining_edges(store, log):
    # Once u1 and u2 are one person (alias), a3 seen with both is consistent; without
    # the alias, a3 must not keep u1 and u2 together.
    store.apply([log("identify", "u1"), log("identify", "u2"),
                 log("alias", "u2", previousId="u1"),
                 log("track", "u1", "a3", event="E"), log("track", "u2", "a3", event="E")])
    pid = store.profile("u1")["profile_id"]
    [alias] = [m for m in store.merges("u1") if m["edge"] == "alias"]
    store.unmerge(pid, alias["id"])
    assert store.profile("u1")["profile_id"] != store.profile("u2")["profile_id"]
    assert store.profile("u1")["profile_id"] == pid  # the oldest identifier keeps the id
    assert store_ids(store, "a3") == {"u1", "a3"}


def test_unmerge_replays_the_edges_in_their_order_however_many_identifiers(store, log):
    """The edges are read in chunks of identifiers (an IN list has a limit); past 500 of
    them, replaying each chunk's edges in turn applied u1-a9 after the alias that needs it
    and split u1 off for good."""
    store.apply([log("identify", "u2", f"z{i}") for i in range(501)])
    store.apply([log("identify", "u1", "a9"), log("alias", "u2", previousId="a9")])
    pid = store.profile("u1")["profile_id"]
    assert store.profile("u2")["profile_id"] == pid
    [z5] = [m for m in store.merges("u1") if {"type": "anonymous_id", "value": "z5"}
            in m["identifiers"]]
    store.unmerge(pid, z5["id"])
    assert store.profile("u1")["profile_id"] == store.profile("u2")["profile_id"]
    assert store_ids(store, "z5") == {"z5"}
    assert not [m for m in store.merges("u1") if m["kind"] == "refused"]


def test_forget_removes_the_person_and_returns_what_to_delete(store, log):
    entries = [log("page", anon="a1"), log("identify", "u1", "a1",
                                           traits={"email": "ada@example.com"}),
               log("track", "u1", event="E"), log("track", "u2", "a1", event="E"),
               log("track", "u9", event="Other person")]
    store.apply(entries)
    gone = store.forget("ada@example.com")
    assert sorted(gone.identifiers) == [("anonymous_id", "a1"), ("email", "ada@example.com"),
                                        ("user_id", "u1")]
    assert gone.positions == [e.position for e in entries[:3]]
    for ident in ("u1", "a1", "ada@example.com"):
        assert store.profile(ident) is None
    assert all("a1" not in json.dumps(m) for m in store.merges("u2"))  # refusals too
    assert store.profile("u9")["event_counts"] == {"Other person": 1}
    assert store.forget("u1") is None


def test_resolve_many_in_order(store, log):
    store.apply([log("identify", "u1", "a1"), log("page", anon="a2")])
    p1, p2 = store.profile("u1")["profile_id"], store.profile("a2")["profile_id"]
    assert store.resolve_many([("u1", None), (None, "a1"), ("nobody", "a2"), (None, None),
                               ("u1", "a2")]) == [p1, p1, p2, None, p1]


def test_resolve_entries_finds_the_person_of_each_identifier_an_event_names(stores, log):
    # The warehouse's `identities` rows: each identifier with ITS profile, which is not
    # the event's when identity refused to join them.
    store = stores(blocked_values=["undefined"])
    entries = [log("identify", "u3", "a3"), log("identify", "u4", "a3"),  # a3: u3's
               log("alias", "u3", previousId="old3"),
               log("track", "u5", "undefined", event="E", context={"traits": {"email": "X@y"}}),
               log("identify", "u6", traits={"email": " X@Y "})]  # refused: u5's email
    store.apply(entries)
    p3, p4, p5, p6 = (store.profile(u)["profile_id"] for u in ("u3", "u4", "u5", "u6"))
    assert store.resolve_entries(entries + [log("page", "nobody")]) == [
        (p3, {("user_id", "u3"): p3, ("anonymous_id", "a3"): p3}),
        (p4, {("user_id", "u4"): p4, ("anonymous_id", "a3"): p3}),
        (p3, {("user_id", "u3"): p3, ("anonymous_id", "old3"): p3}),
        (p5, {("user_id", "u5"): p5, ("email", "x@y"): p5}),  # a blocked value is no one's
        (p6, {("user_id", "u6"): p6, ("email", "x@y"): p5}),
        (None, {})]


def test_resolve_entries_reads_only_nodes_and_decodes_only_bodies_naming_someone(stores, log):
    # On identity's thread, per delivery batch: it read each identifier's profile and edges
    # too (four statements where one query of the nodes answers), and decoded every body
    # of a type other than track, page and screen, each track's too with trait identifiers.
    entries = [log("identify", "u1", "a1", traits={"email": "X@y", "plan": "pro"}),
               log("track", "u1", "a1", event="E"),  # no email in it
               log("alias", "u1", previousId="old1"),
               log("group", "u1", groupId="g1", traits={"name": "G"})]
    stores().apply(entries)
    for trait_identifiers, decoded in (["email"], [1, 3]), ([], [3]):
        store = stores(trait_identifiers=trait_identifiers)  # nothing cached yet
        p1 = store.profile("u1")["profile_id"]
        statements, facts = _spy(store.db, "fetch"), _spy(store.reader, "fact")
        assert store.resolve_entries(entries) == [
            (p1, {("user_id", "u1"): p1, ("anonymous_id", "a1"): p1, ("email", "x@y"): p1}
             if trait_identifiers else {("user_id", "u1"): p1, ("anonymous_id", "a1"): p1}),
            (p1, {("user_id", "u1"): p1, ("anonymous_id", "a1"): p1}),
            (p1, {("user_id", "u1"): p1, ("anonymous_id", "old1"): p1}),
            (p1, {("user_id", "u1"): p1})]
        assert [sql.split(" WHERE")[0] for sql in statements] == [
            "SELECT kind, value, profile FROM nodes"]
        assert [entry.position for entry in facts] == decoded


def _spy(obj, name: str) -> list:
    """The first argument of each call of obj.name from now on."""
    calls, real = [], getattr(obj, name)

    def spy(first, *args, **kwargs):
        calls.append(first)
        return real(first, *args, **kwargs)
    setattr(obj, name, spy)
    return calls


def test_two_nodes_applying_at_once_keep_one_consistent_graph(stores):
    # Each node has its own log (own positions) and its own position in the shared store.
    nodes = {name: (stores(consumer=name), Log()) for name in ("node-a", "node-b")}
    errors = []

    def feed(name):
        store, log = nodes[name]
        try:
            for round_ in range(15):
                store.apply([log("track", anon=f"a{i}-{name}", event="E") for i in range(10)] +
                            [log("identify", f"u{i}", f"a{i}-{name}") for i in range(10)])
        except Exception as exc:  # noqa: BLE001 - surfaced below: a thread cannot fail a test
            errors.append(exc)

    threads = [threading.Thread(target=feed, args=(name,)) for name in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = nodes["node-a"][0]
    for i in range(10):
        assert store_ids(store, f"u{i}") == {f"u{i}", f"a{i}-node-a", f"a{i}-node-b"}
        assert store.profile(f"u{i}")["event_counts"] == {"E": 30}
    assert store.stats()["profiles"] == 10 and store.stats()["identifiers"] == 30
    assert [s.position() for s, _ in nodes.values()] == [300, 300]
