"""Hostile and awkward event names and keys, loaded into PostgreSQL and DuckDB.

Names are the sender's choice: quotes, SQL fragments, NULs, emoji, names longer than
PostgreSQL's 63 bytes, names of fixed columns and tables. Each must land where the
README's naming rules say, every value once, a collision in one message rejected
with its reason, and nothing able to run SQL or fail the other events of a batch.
Each test runs against both warehouses, the slow path and (replayed) the fast one.
"""

from __future__ import annotations

from destinations import test_warehouse_keys as keys
from destinations.test_warehouse_keys import event, load, rejected
from destinations.test_warehouse_postgres import admin, schema  # noqa: F401 (fixtures)
from trackpipe.destinations.warehouse.schema import identifier

wh = keys.wh  # the fixture: each test against PostgreSQL and DuckDB

LONG = "x" * 70
KEYS = {  # property key -> the column the naming rules give it
    'a"; DROP TABLE tracks; --': "a_drop_table_tracks", "back\\slash": "back_slash",
    "semi;colon": "semi_colon", "it's": "it_s", "nul\x00key": "nul_key",
    "ctl\x01\n\tkey": "ctl_key", "select": "select", "user": "user", "order": "order",
    "id": "properties_id", "received_at": "properties_received_at",
    "event": "properties_event", "uuid_ts": "properties_uuid_ts",
    "context_ip": "properties_context_ip", "xmin": "properties_xmin", "123": "_123",
    "rowid": "rowid", "f1": "f1", "f0": "f0",  # (the fast path's struct fields are f0...)
    LONG + "_one": identifier(LONG + "_one"), LONG + "_two": identifier(LONG + "_two"),
    "": identifier(""), "!!!": identifier("!!!"), "???": identifier("???"),
    "🎉": identifier("🎉"), "🎈": identifier("🎈"), "שלום": identifier("שלום"),
}


def test_hostile_property_keys_each_land_once_in_their_predicted_column(wh):
    # 1: the slow path; 2, 3: the shape it learned (the fast path where it can)
    sent = {key: i for i, key in enumerate(KEYS)}  # each key's value tells it apart
    batch = [event(n, properties={**sent, "Aa": -1, "aa": -2}) for n in (1, 2, 3)]
    assert load(wh, batch) == [["delivered"] * 3]
    columns = list(KEYS.values())
    assert len(set(columns)) == len(columns)
    assert columns[-8].startswith("x" * 54) and len(columns[-8]) == 63
    rows = wh.rows("viewed", ", ".join(f'"{c}"' for c in [*columns, "aa"]), order="id")
    assert rows == [{**dict(zip(columns, sent.values())), "aa": -1}] * 3
    assert rejected(wh, "viewed") == [("aa", f"m{n}", "-2") for n in (1, 2, 3)]
    assert [r["id"] for r in wh.rows("tracks", "id", order="id")] == ["m1", "m2", "m3"]


def named(wh, table: str) -> str:
    """A table name for wh.rows, which quotes it in PostgreSQL only (`select`, `user`)."""
    return f'"{table}"' if wh.make().kind == "duckdb" else table


NAMES = {  # event name -> its table
    'a"; DROP TABLE tracks; --': "a_drop_table_tracks", "tracks": "_tracks",
    "Identifies": "_identifies", "users": "_users", "rejected_values": "_rejected_values",
    "identities": "_identities", "select": "select", "user": "user", "x_pkey": "x_pkey_table",
    "pg_class": "pg_class", "ev\x00x": "ev_x", "🎉": identifier("🎉"),
    "y" * 70 + "1": identifier("y" * 70 + "1"), "y" * 70 + "2": identifier("y" * 70 + "2"),
}


def test_hostile_event_names_each_get_their_own_table_and_fixed_tables_stay_apart(wh):
    batches = [[event(n, event=name, properties={"k": n}) for n, name in enumerate(NAMES, s)]
               for s in (1, 101)]  # the second batch: the shapes the first taught
    assert load(wh, *batches) == [["delivered"] * len(NAMES)] * 2
    assert len(set(NAMES.values())) == len(NAMES)
    for n, table in enumerate(NAMES.values(), 1):
        assert wh.rows(named(wh, table), "id, k", order="k") == [{"id": f"m{n}", "k": n},
                                                      {"id": f"m{n + 100}", "k": n + 100}]
    tracks = wh.rows("tracks", "event, event_text", order="id")
    assert len(tracks) == 2 * len(NAMES)
    assert {r["event"] for r in tracks} == set(NAMES.values())
    assert {r["event_text"] for r in tracks} == {*NAMES} - {"ev\x00x"} | {None}
    assert rejected(wh, "tracks") == [("event_text", f"m{n}", "ev\\u0000x")
                                      for n in sorted([11, 111], key=str)]


def test_traits_named_like_fixed_columns_are_prefixed_in_identifies_and_users(wh):
    traits = {"id": 1, "received_at": "r", "uuid_ts": 2, "profile_id": "p", "xmin": 3,
              'x"; DROP TABLE users; --': 4}
    assert load(wh, [event(1, type="identify", userId="u9", traits=traits)]) == [["delivered"]]
    values = {"traits_id": 1, "traits_received_at": "r", "traits_uuid_ts": 2,
              "traits_profile_id": "p", "traits_xmin": 3, "x_drop_table_users": 4}
    columns = ", ".join(values)
    assert wh.rows("identifies", "id, user_id, " + columns) == [
        {"id": "m1", "user_id": "u9", **values}]
    assert wh.rows("users", "id, " + columns) == [{"id": "u9", **values}]


def test_a_context_key_with_nothing_ascii_does_not_share_a_property_named_context(wh):
    # context {"": ...} was named `context`, the column of a property named "context":
    # the two mixed in one column, and in one message the second was rejected
    batch = [event(1, context={"": "ctx"}), event(2, properties={"context": "prop"}),
             event(3, context={"🎉": "ctx3"}, properties={"context": "prop3"})]
    assert load(wh, batch) == [["delivered"] * 3]
    empty, emoji = "context" + identifier(""), "context" + identifier("🎉")
    assert empty.startswith("context_") and emoji.startswith("context_")
    assert wh.rows("viewed", f'id, "context", "{empty}", "{emoji}"', order="id") == [
        {"id": "m1", "context": None, empty: "ctx", emoji: None},
        {"id": "m2", "context": "prop", empty: None, emoji: None},
        {"id": "m3", "context": "prop3", empty: None, emoji: "ctx3"}]
    assert rejected(wh, "viewed") == []
