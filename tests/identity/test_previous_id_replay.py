"""A previousId that no event named yet becomes the userId of its value when an event names
it so, as if it had always been one (graph.py `_as_user`, `Contested`): where its profile
gained a userId meanwhile through an edge rule 1 refuses between userIds, the profile is
rebuilt from its recorded edges, those edges are refused, and the profile may split.

Each case runs against both stores (test_contract's `stores`), in every arrival order that
must give the same result, in one batch, cut between events, and reopened between events.
"""

from __future__ import annotations

import itertools

import pytest

from trackpipe.log.base import Entry

from identity import test_contract
from identity.test_contract import Log

stores = test_contract.stores  # the fixture: each case on the SQLite and PostgreSQL stores

# As in test_properties: u0, u1 and a1 are named on their own first (in the first batch).
SEED = [("identify", "u0", None, {}), ("identify", "u1", None, {}),
        ("track", None, "a1", {"event": "E"})]
# "alias(a1 <- u8)": an alias with anonymousId a1, no userId, previousId u8.
ALIAS_ANON = ("alias", None, "a1", {"previousId": "u8"})
IDENTIFY = ("identify", "u0", "a1", {})
TO_U0 = ("alias", "u8", None, {"previousId": "u0"})  # case 1
TO_U1 = ("alias", "u8", None, {"previousId": "u1"})  # case 2

# How the events reach the store: the batches (sizes), and whether a new store object
# (what it knows comes from the rows) applies each batch.
# (Each alone holds every cut; the property tests cut batches at random.)
SPLITS = {"one batch": ((3,), False), "each alone": ((1, 1, 1), False),
          "reopened between": ((1, 1, 1), True)}


def apply(stores, events, split):
    """Apply `events` ((type, userId, anonymousId, fields)) split as SPLITS[split] says (or
    `split` itself: (batch sizes, reopen)), SEED's first; returns the store that applied
    the last batch and the entries of `events`."""
    log = Log()
    entries = [log(type_, user, anon, **fields) for type_, user, anon, fields in SEED + events]
    sizes, reopen = SPLITS[split] if isinstance(split, str) else split
    sizes = (len(SEED) + sizes[0], *sizes[1:])
    store, start = stores(), 0
    for size in sizes:
        if reopen and start:
            store = stores()
        store.apply(entries[start:start + size])
        start += size
    return store, entries[len(SEED):]


def partition(store, *values) -> set[frozenset]:
    """The profiles holding these values (as userIds or anonymousIds), as (type, value) sets."""
    found = set()
    for value in values:
        for pid in {store.resolve(value, None), store.resolve(None, value)} - {None}:
            found.add(frozenset((i["type"], i["value"])
                                for i in store.profile(pid)["identifiers"]))
    return found


def refusals(store, *values) -> list[tuple]:
    records = {m["id"]: m for v in values for m in store.merges(v)}
    return sorted((m["rule"], m["edge"], m["message_id"],
                   tuple(sorted(i["value"] for i in m["identifiers"])))
                  for m in records.values() if m["kind"] == "refused")


def timeline(store, ident) -> list[int]:
    return store.timeline(ident, None, 100)[0]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_previous_id_named_as_a_user_id_is_one_identifier_in_every_order(stores, split,
                                                                          order):
    # Case 1: in the first order, u8 was an anonymousId of a1's profile when u0 joined it
    # through a1; the alias from u0 to u8 then left two u8s (one of each type).
    events = [(ALIAS_ANON, IDENTIFY, TO_U0)[i] for i in order]
    store, entries = apply(stores, events, split)
    people = {("anonymous_id", "a1"), ("user_id", "u8"), ("user_id", "u0")}
    assert partition(store, "a1", "u8", "u0") == {frozenset(people)}
    profile = store.profile("u8")
    assert sorted(profile["user_ids"]) == ["u0", "u8"] and profile["anonymous_ids"] == ["a1"]
    assert store.resolve(None, "u8") is None
    assert store.resolve("u8", None) == store.resolve(None, "a1") == store.resolve("u0", None)
    assert sorted(timeline(store, "u8")) == [1, 3] + [e.position for e in entries]
    if order == (0, 1, 2):  # the identify joined a1 to u0 while a1 held u8
        identify = entries[1].message_id
        assert refusals(store, "u8") == [("distinct_user_ids", "user_anonymous", identify,
                                          ("a1", "u0"))]
        assert store.stats()["refused"] == 1


ALIAS_FIRST = [order for order in itertools.permutations(range(3))
               if order.index(0) < order.index(1)]  # alias(a1 <- u8) before the identify


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("order", ALIAS_FIRST)
def test_a_previous_id_named_as_a_user_id_splits_off_what_rule_1_refuses(stores, split, order):
    # Case 2: had u8 been a userId from the start, the identify joining a1 (u8's) to u0
    # would have been refused; in the first order the partition split with no refusal.
    events = [(ALIAS_ANON, IDENTIFY, TO_U1)[i] for i in order]
    store, entries = apply(stores, events, split)
    assert partition(store, "a1", "u8", "u0", "u1") == {
        frozenset({("anonymous_id", "a1"), ("user_id", "u8"), ("user_id", "u1")}),
        frozenset({("user_id", "u0")})}
    identify = entries[order.index(1)].message_id
    assert refusals(store, "u8", "u0") == [("distinct_user_ids", "user_anonymous", identify,
                                            ("a1", "u0"))]
    assert timeline(store, "u0") == [1, entries[order.index(1)].position]
    assert sorted(timeline(store, "u8")) == [2, 3] + sorted(
        e.position for i, e in enumerate(entries) if order[i] != 1)
    # Later events of the same ids go where the rules now put them, whether their pair was
    # known before the rebuild (the identify's u0 with a1) or not.
    log = Log()
    log.position = entries[-1].position
    later = [log("track", "u0", "a1", event="E"), log("track", "u8", "a1", event="E"),
             log("track", anon="a1", event="E")]
    store.apply(later)
    assert timeline(store, "u0")[-1] == later[0].position
    assert timeline(store, "u8")[-2:] == [later[1].position, later[2].position]
    assert len(partition(store, "a1", "u8", "u0", "u1")) == 2
    assert store.stats()["refused"] == 1


# n and m, previousIds of x and y, share a profile through an email before a userId joins it
# (by an alias). m made a userId refuses nothing then; n made one after m would have been
# kept apart from m by that email, as when both were userIds first.
JOINED = [("alias", None, "x", {"previousId": "n"}), ("alias", None, "y", {"previousId": "m"}),
          ("identify", None, "x", {"traits": {"email": "e@x.io"}}),
          ("identify", None, "y", {"traits": {"email": "e@x.io"}}),
          ("alias", "u5", None, {"previousId": "x"})]
NAMED = [("track", "m", None, {"event": "E"}), ("track", "n", None, {"event": "E"})]


@pytest.mark.parametrize("split", [(7,), (5, 1, 1), (1,) * 7])
@pytest.mark.parametrize("reopen", [False, True])
@pytest.mark.parametrize("names_first", [False, True])
def test_a_rebuild_follows_a_previous_id_made_a_user_id_in_place_before_it(
        stores, split, reopen, names_first):
    events = NAMED + JOINED if names_first else JOINED + NAMED
    store, entries = apply(stores, events, (split, reopen))
    assert partition(store, "x", "y", "n", "m", "u5") == {
        frozenset({("anonymous_id", "x"), ("user_id", "n"), ("email", "e@x.io"),
                   ("user_id", "u5")}),
        frozenset({("anonymous_id", "y"), ("user_id", "m")})}
    [refused] = refusals(store, "n", "m")
    assert refused[:2] == ("distinct_user_ids", "trait")


@pytest.mark.parametrize("reopen", [False, True])
def test_a_previous_id_whose_replay_refuses_nothing_is_made_a_user_id(stores, reopen):
    # p1's identify makes it a userId of u2's profile; p0, awaiting there too, is then
    # replayed (it might have been kept apart from p1), and nothing is refused.
    events = [("alias", "u2", None, {"previousId": "p1"}),
              ("alias", "u2", None, {"previousId": "p0"}),
              ("identify", "p1", None, {}), ("identify", "p0", None, {})]
    store, entries = apply(stores, events, ((1, 1, 1, 1), reopen))
    assert partition(store, "u2", "p0", "p1") == {
        frozenset({("user_id", "u2"), ("user_id", "p0"), ("user_id", "p1")})}
    assert refusals(store, "u2") == []
    assert sorted(timeline(store, "p0")) == [e.position for e in entries]


def test_a_forget_after_a_rebuild_removes_the_person_it_left(stores):
    store, _ = apply(stores, [ALIAS_ANON, IDENTIFY, TO_U1], "one batch")
    gone = store.forget("u8")
    assert sorted(v for _, v in gone.identifiers) == ["a1", "u1", "u8"]
    assert store.profile("u8") is None and store.profile("a1") is None
    assert store.profile("u0")["user_ids"] == ["u0"]


@pytest.mark.parametrize("reopen", [False, True])
def test_events_of_pairs_known_before_a_rebuild_go_where_it_left_them(stores, reopen):
    # (u0, a1) and a1 alone are known pairs (graph.py `_settled`) when the alias rebuilds
    # a1's profile; bodiless events of theirs in the same batch keep their own owners.
    store, entries = apply(stores, [ALIAS_ANON, IDENTIFY, ("track", "u0", "a1", {"event": "E"}),
                                    ("track", None, "a1", {"event": "E"})], ((4,), False))
    if reopen:
        store = stores()
    log = Log()
    log.position = entries[-1].position
    alias = log("alias", "u8", None, previousId="u1")
    lean = [Entry(p, f"lean-{p}", 1_714_557_600_000, "track", "E", user, "a1", "src_1", b"",
                  1_714_557_600_000) for p, user in ((alias.position + 1, "u0"),
                                                     (alias.position + 2, None))]
    store.apply([alias, *lean])
    assert partition(store, "a1", "u8", "u0") == {
        frozenset({("anonymous_id", "a1"), ("user_id", "u8"), ("user_id", "u1")}),
        frozenset({("user_id", "u0")})}
    assert lean[0].position in timeline(store, "u0")
    assert lean[1].position in timeline(store, "u8")
    assert store.profile("u8")["event_counts"] == {"E": 3}  # the seed's, one before, one now


def test_many_rebuilds_in_one_batch_each_split_off_what_rule_1_refuses(stores):
    # Case 2 thirty times over, the userIds named in one batch among other people's events:
    # after a rebuild the rest of the batch goes in slices (sql_store AFTER_REBUILD_STEP).
    log, n = Log(), 30

    def at(type_, user=None, anon=None, **fields):
        return log(type_, user, anon, ts=f"2024-05-01T10:{log.position // 60:02d}:"
                                         f"{log.position % 60:02d}.000Z", **fields)
    setup = [at("identify", f"w{i}") for i in range(n)]
    setup += [at("alias", None, f"x{i}", previousId=f"p{i}") for i in range(n)]
    setup += [at("identify", f"w{i}", f"x{i}") for i in range(n)]
    named = []
    for i in range(n):
        named += [at("track", f"p{i}", event="E")] + [
            at("track", f"v{i}-{k}", f"y{i}-{k}", event="E") for k in range(i % 4)]
    store = stores()
    store.apply(setup)
    store.apply(named)
    for i in range(n):
        assert partition(store, f"p{i}", f"w{i}") == {
            frozenset({("anonymous_id", f"x{i}"), ("user_id", f"p{i}")}),
            frozenset({("user_id", f"w{i}")})}
        assert timeline(store, f"p{i}")[-1] == named[[e.user_id for e in named].index(
            f"p{i}")].position
    assert store.stats()["refused"] == n
    assert all(store.profile(f"v{i}-{k}")["identifiers"] for i in range(n) for k in range(i % 4))


def name_u8_after_lowering_caps(stores, events, **caps):
    """Apply `events` (SEED's first) under the default caps, then reopen the store with
    lower `caps` and apply an event naming u8 as a userId. Returns the reopened store, the
    entries of `events` and the naming entry."""
    _, entries = apply(stores, events, ((len(events),), False))
    store = stores(**caps)  # what it knows of u8 comes from the rows: `_may_be_user` decides
    log = Log()
    log.position = entries[-1].position
    named = log("track", "u8", None, event="E")
    store.apply([named])
    return store, entries, named


def test_a_previous_id_whose_replay_refuses_other_edges_than_as_it_is_is_rebuilt(stores):
    # Under max_identifiers 3 the replay as things are refuses a2's edge (u0's profile would
    # hold 4); with u8 a userId it refuses the identify instead (rule 1), and a2 then fits:
    # one refusal each, but not the same one. The profile must split as the second says.
    events = [ALIAS_ANON, IDENTIFY, ("track", "u0", "a2", {"event": "E"})]
    store, entries, named = name_u8_after_lowering_caps(stores, events,
                                                        max_identifiers_per_profile=3)
    assert partition(store, "a1", "u8", "u0", "a2") == {
        frozenset({("anonymous_id", "a1"), ("user_id", "u8")}),
        frozenset({("user_id", "u0"), ("anonymous_id", "a2")})}
    assert refusals(store, "u8", "u0") == [("distinct_user_ids", "user_anonymous",
                                            entries[1].message_id, ("a1", "u0"))]
    assert store.stats()["refused"] == 1
    assert timeline(store, "u8") == [3, entries[0].position, named.position]
    assert timeline(store, "u0") == [1, entries[1].position, entries[2].position]


def test_a_previous_id_whose_replay_refuses_an_edge_for_another_rule_is_rebuilt(stores):
    # Under max_identifiers 2 both replays refuse the identify, as things are for the cap
    # and with u8 a userId for rule 1, which no cap explains: kept whole, the profile would
    # join the userIds u0 and u8 through the anonymousId a1.
    store, entries, named = name_u8_after_lowering_caps(stores, [ALIAS_ANON, IDENTIFY],
                                                        max_identifiers_per_profile=2)
    assert partition(store, "a1", "u8", "u0") == {
        frozenset({("anonymous_id", "a1"), ("user_id", "u8")}),
        frozenset({("user_id", "u0")})}
    assert refusals(store, "u8", "u0") == [("distinct_user_ids", "user_anonymous",
                                            entries[1].message_id, ("a1", "u0"))]
    assert timeline(store, "u8") == [3, entries[0].position, named.position]
    assert timeline(store, "u0") == [1, entries[1].position]
