"""The pieces under the stores: reading facts, the merge rules, the profile folds."""

from __future__ import annotations

import json
import sqlite3
import time

import msgspec
import pytest

from trackpipe.config import Identity
from trackpipe.errors import ConfigError
from trackpipe.identity.consumer import catch_up
from trackpipe.identity.facts import Reader
from trackpipe.identity.graph import Limits, Profile, rebuild, refuse
from trackpipe.identity.profiles import flatten, fold_counts, fold_groups, fold_traits
from trackpipe.identity.store import new_profile_id, open_store
from trackpipe.log.base import Entry, Record
from trackpipe.log.sqlite import SQLiteLog

LIMITS = Limits(["", "null", "Anonymous"], max_identifiers=4, max_merges=2)


def entry(type_, body: dict | bytes, user=None, anon=None, event=None, position=1) -> Entry:
    raw = body if isinstance(body, bytes) else msgspec.json.encode({"type": type_, **body})
    return Entry(position, f"m{position}", 1_714_557_600_123, type_, event, user, anon, "s", raw)


def test_reader_takes_identify_traits_from_traits_over_context_traits():
    fact = Reader(["email"]).fact(entry("identify", {
        "timestamp": "2024-05-01T10:00:00.000Z", "traits": {"email": " Ada@X.io", "a": {"b": 1}},
        "context": {"traits": {"email": "other@x.io", "a": {"c": 2}, "d": 3}}}, user="u1"))
    assert fact.traits == {"email": " Ada@X.io", "a": {"b": 1, "c": 2}, "d": 3}
    assert fact.trait_ids == [("email", "ada@x.io")]
    assert fact.ts == "2024-05-01T10:00:00.000Z" and fact.user == "u1"


def test_reader_counts_tracks_by_name_and_pages_by_type_and_reads_alias_and_group():
    reader = Reader([])
    assert reader.fact(entry("track", {}, user="u", event="Order Completed")).count_key == \
        ("event", "Order Completed")
    assert reader.fact(entry("page", {}, anon="a")).count_key == ("type", "page")
    assert reader.fact(entry("alias", {"previousId": 42}, user="u")).previous == "42"
    assert reader.fact(entry("group", {"groupId": "g", "traits": {"n": 1}}, user="u")).group == \
        ("g", {"n": 1})
    assert reader.fact(entry("identify", {"traits": {"email": "x@y"}}, user="u")).trait_ids == []


def test_reader_survives_odd_bodies_and_falls_back_to_received_at():
    fact = Reader(["email"]).fact(entry("track", b"[1, 2]", user="u", event="E"))
    assert (fact.user, fact.ts) == ("u", "2024-05-01T10:00:00.123Z")
    fact = Reader(["email"]).fact(entry("identify", {"context": "nope", "timestamp": 5},
                                        anon="a"))
    assert fact.anon == "a" and fact.traits is None


def test_blocked_values_compare_trimmed_and_case_insensitively():
    assert LIMITS.is_blocked(" anonymous ") and LIMITS.is_blocked("NULL") and LIMITS.is_blocked("")
    assert not LIMITS.is_blocked("anon-1")


@pytest.mark.parametrize("a, b, rule, merge, expected", [
    ((2, 1, 0), (1, 1, 0), "user_anonymous", True, "distinct_user_ids"),
    ((2, 1, 0), (1, 1, 0), "trait", True, "distinct_user_ids"),
    ((2, 1, 0), (1, 1, 0), "alias", True, None),
    ((3, 1, 0), (2, 0, 0), "user_anonymous", True, "max_identifiers"),
    ((2, 1, 1), (1, 0, 1), "user_anonymous", True, "max_merges"),
    ((2, 1, 1), (1, 0, 1), "user_anonymous", False, None),
    ((2, 1, 0), (2, 0, 0), "user_anonymous", True, None),
])
def test_refusal_rules_in_order(a, b, rule, merge, expected):
    assert refuse(LIMITS, Profile("p", 1, *a), Profile("q", 2, *b), rule, merge) == expected


def test_rebuild_replays_edges_in_order_under_the_rules():
    nodes = [(1, "user_id"), (2, "user_id"), (3, "anonymous_id"), (4, "anonymous_id")]
    # the alias (edge 10) was unmerged; a3 had been seen with both users
    edges = [(11, 1, 3, "user_anonymous", 0), (12, 2, 3, "user_anonymous", 0),
             (13, 2, 4, "user_anonymous", 1)]
    components, merges, refused = rebuild(LIMITS, nodes, edges)
    assert sorted(components) == [[1, 3], [2, 4]]
    assert refused == [(12, "distinct_user_ids")]
    assert merges == {1: 0, 2: 1}


def test_flatten_and_fold_traits_let_later_leaves_win():
    older = [(p, v, "2024-01-01T00:00:00.000Z", 1) for p, v in flatten(
        {"address": {"city": "Lyon", "zip": "1"}, "tags": ["a"], "x": 1})]
    newer = [(p, v, "2024-02-01T00:00:00.000Z", 2) for p, v in flatten(
        {"address": {"city": "Paris"}, "x": {"y": True}, "empty": {}})]
    assert fold_traits(newer + older) == {"address": {"city": "Paris", "zip": "1"},
                                          "tags": ["a"], "x": {"y": True}, "empty": {}}
    assert json.loads(next(iter(flatten({"a": {"b": 1}})))[0]) == ["a", "b"]


def test_fold_groups_and_counts():
    rows = [("g1", '{"n":1}', "2024-01-02T00:00:00.000Z", 1),
            ("g1", '{"n":2}', "2024-01-01T00:00:00.000Z", 5),
            ("g0", "{}", "2024-01-01T00:00:00.000Z", 2)]
    assert fold_groups(rows) == [{"group_id": "g0", "traits": {}},
                                 {"group_id": "g1", "traits": {"n": 1}}]
    assert fold_counts([("event", "E", 2), ("type", "page", 1), ("event", "E", 1)]) == \
        ({"E": 3}, {"page": 1})


def test_profile_ids_are_unique_and_sort_by_birth():
    first = new_profile_id()
    time.sleep(0.002)
    ids = {new_profile_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(i.startswith("prof_") and len(i) == 31 for i in ids)
    assert all(first < i for i in ids)


def test_open_store_explains_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="postgres_dsn"):
        open_store(Identity(store="postgres"), tmp_path)
    with pytest.raises(ConfigError, match='"sqlite"'):
        open_store(Identity(store="redis"), tmp_path)
    with pytest.raises(ConfigError, match="Cannot connect"):
        open_store(Identity(store="postgres", postgres_dsn="postgresql://nobody@127.0.0.1:1/x"),
                   tmp_path)


def test_catch_up_applies_the_log_once(tmp_path):
    log = SQLiteLog(tmp_path / "log.db")
    store = open_store(Identity(), tmp_path)
    try:
        log.append([Record(f"m{i}", 1, "track", "E", f"u{i % 3}", "a1" if i == 0 else None,
                           "s", msgspec.json.encode({"type": "track", "event": "E"}))
                    for i in range(25)])
        assert catch_up(store, log, batch=10) == 25
        assert catch_up(store, log, batch=10) == 0
        assert store.position() == log.head()
        assert store.profile("u0")["event_counts"] == {"E": 9}
        assert (tmp_path / "identity.db").exists()
    finally:
        store.close()
        log.close()


def test_a_forgotten_person_leaves_no_trace_in_the_sqlite_file(tmp_path):
    store = open_store(Identity(trait_identifiers=["email"]), tmp_path)
    try:
        store.apply([entry("identify", {"traits": {"email": "secret-mail@x.io", "n": "SecretName"},
                                        "context": {}}, user="secret-user", anon="secret-anon"),
                     entry("track", {}, user="other-user", event="E", position=2)])
        assert store.forget("secret-user") is not None
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / "identity.db")
    conn.execute("VACUUM")
    conn.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("identity.db*"))
    assert b"other-user" in raw
    for secret in (b"secret-user", b"secret-anon", b"secret-mail", b"SecretName"):
        assert secret not in raw
