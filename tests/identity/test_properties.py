"""Properties of the identity graph over random identify / alias / track sequences.

A small pool of ids makes collisions (shared devices, repeated aliases,
shared emails) common. Checked after every sequence, on the SQLite store:
1. the same events in another order and other batches give the same partition of
   identifiers, whenever neither run had to refuse a merge;
2. no profile holds two userIds without an alias having joined them: a profile holds
   at most 1 + (number of alias merges in it) userIds;
3. every identifier seen belongs to exactly one profile;
4. profile() of every identifier of a profile returns that same profile;
5. a profile's traits are the identify calls' traits deep-merged in timestamp order,
   whatever order and batches the calls arrive in.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from trackpipe.config import Identity
from trackpipe.identity.facts import deep_merge
from trackpipe.identity.sqlite_store import SQLiteStore
from trackpipe.log.base import Entry

USERS = ["u0", "u1", "u2"]
LATE = ["u8", "u9"]  # userIds the seed leaves out: an alias may name them before their events
ANONS = ["a0", "a1", "a2", "a3"]
EMAILS = ["e0@x.io", "e1@x.io"]
PREVIOUS = USERS + LATE + ANONS + ["p0"]  # p0: a previousId no event ever names otherwise
SETTINGS = Identity(trait_identifiers=["email"])

maybe = st.none().__or__
event = st.one_of(
    st.tuples(st.just("identify"), maybe(st.sampled_from(USERS + LATE)),
              maybe(st.sampled_from(ANONS)), maybe(st.sampled_from(EMAILS))),
    st.tuples(st.just("track"), maybe(st.sampled_from(USERS + LATE)),
              maybe(st.sampled_from(ANONS)), st.none()),
    st.tuples(st.just("alias"), st.sampled_from(USERS + LATE), st.none(),
              st.sampled_from(PREVIOUS)),
    # an alias with no userId joins previousId to its anonymousId
    st.tuples(st.just("alias"), st.none(), st.sampled_from(ANONS), st.sampled_from(PREVIOUS)),
).filter(lambda e: e[1] or e[2] or (e[0] == "identify" and e[3]))


# USERS and ANONS appear once on their own first; LATE userIds do not, so an alias may name
# one before or after its first event, and the edges must be the same either way.
SEED = [("identify", u, None, None) for u in USERS] + [("track", None, a, None) for a in ANONS]


def entries(events) -> list[Entry]:
    out = []
    for i, (type_, user, anon, extra) in enumerate(SEED + list(events), start=1):
        body = {"type": type_, "userId": user, "anonymousId": anon,
                "timestamp": f"2024-05-01T10:{i // 60:02d}:{i % 60:02d}.000Z"}
        if type_ == "identify" and extra:
            body["traits"] = {"email": extra}
        if type_ == "alias":
            body["previousId"] = extra
        out.append(Entry(i, f"m{i}", 0, type_, "E" if type_ == "track" else None, user, anon,
                         "s", msgspec.json.encode(body)))
    return out


def run(events, cuts: list[int]) -> tuple[set, list[dict], bool]:
    """Apply in batches split at `cuts`; return (partition, profiles, any refusal)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "identity.db", SETTINGS)
        try:
            batch = entries(events)
            cuts = [len(SEED) + c for c in cuts]
            for start, end in zip([0, *cuts], [*cuts, len(batch)]):
                store.apply(batch[start:end])
            return inspect(store, batch)
        finally:
            store.close()


def inspect(store, batch) -> tuple[set, list[dict], bool]:
    seen = {("user_id", e.user_id) for e in batch if e.user_id} | \
        {("anonymous_id", e.anonymous_id) for e in batch if e.anonymous_id}
    profiles = {}
    for kind, value in sorted(seen):  # by kind: one value may be a userId and an anonymousId
        pid = store.resolve(value, None) if kind == "user_id" else store.resolve(None, value)
        found = store.profile(pid)
        profiles[found["profile_id"]] = found
    owners: dict[tuple, str] = {}
    for pid, found in profiles.items():
        for ident in found["identifiers"]:
            key = (ident["type"], ident["value"])
            assert key not in owners, f"{key} is in {owners[key]} and {pid}"  # property 3
            owners[key] = pid
    assert seen <= owners.keys()  # property 3: nobody is left out
    refused = any(m["kind"] == "refused" for pid in profiles for m in store.merges(pid))
    partition = {frozenset((i["type"], i["value"]) for i in p["identifiers"])
                 for p in profiles.values()}
    return partition, list(profiles.values()), refused


@settings(max_examples=80, deadline=None)
@given(st.lists(event, min_size=1, max_size=25), st.randoms(use_true_random=False))
def test_partition_is_order_independent_when_nothing_is_refused(events, rnd):
    cuts = sorted(rnd.sample(range(1, len(events)), min(2, len(events) - 1)))
    shuffled = list(events)
    rnd.shuffle(shuffled)
    first, _, refused_first = run(events, [])
    # reversed: every two events (an alias and its previousId's first event) swap places
    for other, other_cuts in ((shuffled, cuts), (events[::-1], cuts[:1])):
        second, _, refused_second = run(other, other_cuts)
        if not (refused_first or refused_second):
            assert first == second  # property 1


@settings(max_examples=80, deadline=None)
@given(st.lists(event, min_size=1, max_size=30))
def test_user_ids_share_a_profile_only_through_aliases(events):
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "identity.db", SETTINGS)
        try:
            batch = entries(events)
            store.apply(batch[:len(batch) // 2])
            store.apply(batch[len(batch) // 2:])
            _, profiles, _ = inspect(store, batch)
            for found in profiles:
                aliases = sum(1 for m in store.merges(found["profile_id"])
                              if m["kind"] == "merge" and m["edge"] == "alias")
                assert len(found["user_ids"]) <= 1 + aliases  # property 2
                if not any(e[0] == "alias" for e in events):
                    assert len(found["user_ids"]) <= 1
                for ident in found["identifiers"]:  # property 4 (no value is of two kinds)
                    assert store.profile(ident["value"]) == found
        finally:
            store.close()


# Nested traits over two keys, with the values that replace an object (null, a number) and
# the empty object, which merges into one.
trait_value = st.recursive(st.sampled_from([None, 1, "x", {}]),
                           lambda inner: st.dictionaries(st.sampled_from("ab"), inner, max_size=2),
                           max_leaves=4)
trait_calls = st.lists(st.dictionaries(st.sampled_from("ab"), trait_value, min_size=1, max_size=2),
                       min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(trait_calls, st.randoms(use_true_random=False))
def test_traits_are_the_calls_deep_merged_in_timestamp_order(calls, rnd):
    stamped = [(f"2024-05-01T10:00:{i:02d}.000Z", traits) for i, traits in enumerate(calls)]
    arrival = list(stamped)
    rnd.shuffle(arrival)
    expected: dict = {}
    for _, traits in stamped:
        expected = deep_merge(expected, traits)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "identity.db", SETTINGS)
        try:
            batch = [Entry(i, f"m{i}", 0, "identify", None, "u0", None, "s", msgspec.json.encode(
                {"type": "identify", "userId": "u0", "timestamp": ts, "traits": traits}))
                for i, (ts, traits) in enumerate(arrival, start=1)]
            cut = rnd.randint(0, len(batch))
            store.apply(batch[:cut])
            store.apply(batch[cut:])
            assert store.profile("u0")["traits"] == expected  # property 5
        finally:
            store.close()
