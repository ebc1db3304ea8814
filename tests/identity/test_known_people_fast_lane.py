"""Events of people identity already knows take a fast lane (graph.py `_settled`, cached
per (userId, anonymousId) pair in `Graph.settled`): only their timeline row is written.
These pin that the lane is taken only where the full rules would change nothing else."""

from __future__ import annotations

import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trackpipe.config import Identity
from trackpipe.identity.graph import Graph
from trackpipe.identity.sqlite_store import SQLiteStore
from trackpipe.log.base import Entry

TS = 1_796_601_600_000


def event(position: int, type_: str, user: str | None = None, anon: str | None = None,
          lean: bool = False, **fields) -> Entry:
    """A log entry; `lean`: without its body, as a lean read gives a track or page."""
    ts = TS + position * 1000
    body = {"type": type_, "userId": user, "anonymousId": anon, "messageId": f"m{position}",
            "timestamp": f"2026-12-07T00:{position // 60 % 60:02d}:{position % 60:02d}.000Z",
            **fields}
    return Entry(position, f"m{position}", ts, type_, fields.get("event"), user, anon, "s",
                 b"" if lean else msgspec.json.encode(body), ts)


def track(position: int, user: str | None, anon: str | None) -> Entry:
    return event(position, "track", user, anon, lean=True, event="Viewed")


@pytest.fixture
def store(tmp_path):
    store = SQLiteStore(tmp_path / "identity.db", Identity(trait_identifiers=["email"]))
    yield store
    store.close()


def test_known_ids_not_yet_joined_are_joined_by_their_first_event_together(store):
    store.apply([track(1, "u", None), track(2, None, "a")])
    store.apply([track(3, "u", None), track(4, None, "a")])  # each settled on its own
    assert store.resolve("u", None) != store.resolve(None, "a")
    store.apply([track(5, "u", "a")])
    assert store.resolve("u", None) == store.resolve(None, "a")
    assert [m["rule"] for m in store.merges("u") if m["kind"] == "merge"] == ["user_anonymous"]


def test_an_event_naming_an_anonymous_id_only_an_alias_named_keeps_it_anonymous(store):
    # p is known only as an alias's previousId: an event naming it as an anonymousId
    # decides it stays one, so a later userId p (here in the same batch) is someone else.
    store.apply([track(1, "u", None), event(2, "alias", "u", None, previousId="p")])
    store.apply([track(3, None, "p"), track(4, None, "p"), track(5, "p", None)])
    assert store.resolve("p", None) != store.resolve("u", None)
    assert store.resolve(None, "p") == store.resolve("u", None)


def test_calls_of_a_settled_pair_that_say_more_still_count(store):
    store.apply([track(1, "u", "a"), track(2, "u", "a")])
    store.apply([track(3, "u", "a"),
                 event(4, "identify", "u", "a", traits={"plan": "pro"}),
                 event(5, "group", "u", "a", groupId="g", traits={"n": 1}),
                 event(6, "alias", "u", "a", previousId="old"),
                 event(7, "track", "u", "a", event="Viewed",
                       context={"traits": {"email": "U@x.io"}}),
                 track(8, "u", "a")])
    found = store.profile("u")
    assert found["traits"] == {"plan": "pro"}
    assert found["groups"] == [{"group_id": "g", "traits": {"n": 1}}]
    assert {(i["type"], i["value"]) for i in found["identifiers"]} == {
        ("user_id", "u"), ("anonymous_id", "a"), ("anonymous_id", "old"), ("email", "u@x.io")}
    assert found["event_counts"] == {"Viewed": 5}


def test_blocked_ids_are_counted_every_time(store):
    store.apply([track(1, "u", "anonymous"), track(2, "u", "anonymous")])
    store.apply([track(3, "u", "anonymous")])
    assert store.stats()["blocked"] == 3


# -- the lane against the full rules, over random event sequences -----------------------

USERS, ANONS = ["u0", "u1", "p0"], ["a0", "a1", "p0"]
maybe = st.none().__or__
calls = st.one_of(
    st.tuples(st.just("track"), maybe(st.sampled_from(USERS)), maybe(st.sampled_from(ANONS)),
              st.booleans()),
    st.tuples(st.just("page"), maybe(st.sampled_from(USERS)), maybe(st.sampled_from(ANONS)),
              st.booleans()),
    st.tuples(st.just("identify"), maybe(st.sampled_from(USERS)),
              maybe(st.sampled_from(ANONS)), st.sampled_from([None, "e@x.io", "f@x.io"])),
    st.tuples(st.just("alias"), maybe(st.sampled_from(USERS)), maybe(st.sampled_from(ANONS)),
              st.sampled_from(["p0", "p1", "a0", "u1"])),
    st.tuples(st.just("group"), st.sampled_from(USERS), st.none(), st.just("g")),
)


def entries(calls_) -> list[Entry]:
    out = []
    for position, (type_, user, anon, extra) in enumerate(calls_, start=1):
        if type_ in ("track", "page"):
            out.append(event(position, type_, user, anon, lean=extra,
                             **({"event": "E"} if type_ == "track" else {})))
        elif type_ == "identify":
            traits = {"email": extra} if extra else {"n": position}
            out.append(event(position, type_, user, anon, traits=traits))
        elif type_ == "alias":
            out.append(event(position, type_, user, anon, previousId=extra))
        else:
            out.append(event(position, type_, user, anon, groupId=extra, traits={"n": 1}))
    return out


def dump(store: SQLiteStore) -> list:
    """Every table, each profile id renamed by its first appearance (they are random)."""
    tables = {"nodes": "id", "profiles": "head", "edges": "id",
              "timeline": "node, ts, position, log", "traits": "node, path",
              "groups": "node, group_id", "positions": "consumer", "stats": "name"}
    rows = [(t, *row) for t, key in tables.items()
            for row in store.conn.execute(f"SELECT * FROM {t} ORDER BY {key}")]
    names: dict[str, str] = {}
    text = re.sub(r"prof_[0-9A-Z]{26}", lambda m: names.setdefault(m[0], f"P{len(names)}"),
                  repr(rows))
    return [text]


def run(tmp_path, name: str, calls_, cuts, settings_) -> list:
    store = SQLiteStore(tmp_path / f"{name}.db", settings_)
    try:
        batch = entries(calls_)
        for start, end in zip([0, *cuts], [*cuts, len(batch)]):
            store.apply(batch[start:end])
        return dump(store)
    finally:
        store.close()


@pytest.mark.parametrize("trait_identifiers", [[], ["email"]])
@settings(max_examples=60, deadline=None)
@given(st.lists(calls, min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_the_fast_lane_writes_what_the_full_rules_write(tmp_path_factory, trait_identifiers,
                                                         calls_, rnd):
    tmp_path = tmp_path_factory.mktemp("lane")
    settings_ = Identity(trait_identifiers=trait_identifiers)
    cuts = sorted(rnd.sample(range(1, len(calls_)), min(3, len(calls_) - 1)))
    fast = run(tmp_path, "fast", calls_, cuts, settings_)
    settled = Graph._settled
    Graph._settled = lambda self, user, anon: None  # every event through the full rules
    try:
        full = run(tmp_path, "full", calls_, cuts, settings_)
    finally:
        Graph._settled = settled
    assert fast == full


def test_a_batch_of_facts_is_each_entry_s_fact():
    """Reader.facts works out a batch's timestamps and counts once each: the same facts."""
    from trackpipe.identity.facts import Reader

    base = [track(1, "u", "a"), track(2, "u", None), event(3, "page", None, "a", lean=True),
            event(4, "screen", "u", None, lean=True), event(5, "track", "u", "a", lean=True),
            event(6, "identify", "u", "a", traits={"email": "E@x.io"}),
            event(7, "track", "u", None, event="Other"), track(8, None, "a")]
    # The same ts twice, an entry without one (then its received_at), and a track
    # named differently at the same ts.
    entries_ = base + [base[0]._replace(position=9), base[1]._replace(position=10, ts=None),
                       base[4]._replace(position=11, event="Viewed", ts=base[0].ts)]
    for names in ([], ["email"]):
        reader = Reader(names)
        assert reader.facts(entries_) == ([reader.fact(e) for e in entries_], [])
    # Those of a settled pair (and no body) come as their timeline rows instead.
    reader = Reader([])
    owners = {("u", "a"): 7, ("u", None): 8}
    facts, rows = reader.facts(entries_, owners)
    assert [f.position for f in facts] == [3, 6, 7, 8]  # not settled, or with a body
    assert rows == [(owners[(f.user, f.anon)], f.ts, f.position, *(f.count_key or (None, None)))
                    for f in map(reader.fact, entries_) if f.position in (1, 2, 4, 5, 9, 10, 11)]
    assert rows[0][1:] == ("2026-12-07T00:00:01.000Z", 1, "event", "Viewed")
