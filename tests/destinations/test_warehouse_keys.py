"""Ids that cannot be a key as they are, and every rejected value kept, in both warehouses.

A userId or anonymousId too long for an index (PostgreSQL: ~2.7 KB) or holding a NUL
(no text column can) failed its whole event; a second value rejected for the same
column of one message vanished. Each test runs against PostgreSQL and DuckDB.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Callable, NamedTuple

import msgspec
import pytest

from destinations import test_warehouse_duckdb as dk
from destinations import test_warehouse_postgres as pg
from destinations.test_warehouse_postgres import admin, schema  # noqa: F401 (fixtures)
from destinations.test_warehouse_schema import joined
from trackpipe.destinations.base import Event
from trackpipe.destinations.warehouse.layout import row_id


class Warehouse(NamedTuple):
    make: Callable[[], object]           # a new destination on the same database
    rows: Callable[..., list[dict]]      # (table, columns, order) -> rows as dicts


@pytest.fixture(params=["postgres", "duckdb"])
def wh(request, tmp_path) -> Warehouse:
    if request.param == "postgres":
        conn, name = request.getfixturevalue("admin"), request.getfixturevalue("schema")
        return Warehouse(lambda: pg.warehouse(name),
                         lambda table, columns="*", order="1": pg.table(conn, name, table,
                                                                         columns, order))
    path = tmp_path / "w.duckdb"
    return Warehouse(lambda: dk.warehouse(path),
                     lambda table, columns="*", order="1": dk.query(
                         path, f"SELECT {columns} FROM {table} ORDER BY {order}"))


def load(wh: Warehouse, *batches: list[Event]) -> list[list[str]]:
    """Each batch sent in turn; the states of their events."""
    async def go():
        dest = wh.make()
        try:
            return [[o.state for o in await dest.send(batch)] for batch in batches]
        finally:
            await dest.close()
    return asyncio.run(go())


def delete_user(wh: Warehouse, user_ids: list[str], anonymous_ids: list[str],
                traits: list[tuple[str, str]] = ()) -> str:
    async def go():
        dest = wh.make()
        try:
            return (await dest.delete_user(user_ids, anonymous_ids, traits)).state
        finally:
            await dest.close()
    return asyncio.run(go())


def event(n: int, profile: str | None = None, **fields) -> Event:
    """As the log hands it over (JSON), so track events of one shape take the fast path."""
    message = {"type": "track", "event": "Viewed", "messageId": f"m{n}", "userId": "u1",
               "anonymousId": "a1", "receivedAt": "2024-05-01T10:00:00.000Z",
               "properties": {"n": n}, **fields}
    return Event(n, message["messageId"], None, profile, None, None, msgspec.json.encode(message),
                 identities=joined(message, profile))


def unique_text(seed: str, size: int) -> str:
    """Text PostgreSQL cannot compress below its index limit."""
    digests = (hashlib.sha256(f"{seed}{k}".encode()).hexdigest() for k in range(size // 64 + 1))
    return "".join(digests)[:size]


def rejected(wh: Warehouse, table: str) -> list[tuple]:
    """(column, message id, value) of a table's rejected values (sorted here: the two
    databases collate differently)."""
    return sorted((r["column_name"], r["message_id"], r["value"]) for r in wh.rows(
        "rejected_values", "table_name, column_name, message_id, value")
        if r["table_name"] == table)


def identities(wh: Warehouse) -> list[tuple]:
    return sorted((r["identifier_type"], r["identifier"], r["profile_id"]) for r in wh.rows(
        "identities", "identifier_type, identifier, profile_id"))


def test_an_over_long_user_or_anonymous_id_maps_its_identity_under_a_stand_in(wh):
    # The whole id in identities (keyed on it) made PostgreSQL refuse the event: 54000.
    long_anon, long_user = unique_text("a", 6000), unique_text("u", 6000)
    batch = [event(1, "p1"), event(2, "p1", anonymousId=long_anon),  # m2: the fast path
             event(3, "p2", type="identify", userId=long_user, anonymousId="a3",
                   traits={"plan": "pro"})]
    assert load(wh, batch, batch) == [["delivered"] * 3] * 2
    assert [r["id"] for r in wh.rows("tracks", "id", order="id")] == ["m1", "m2"]
    assert identities(wh) == sorted([
        ("anonymous_id", "a1", "p1"), ("anonymous_id", row_id(long_anon), "p1"),
        ("user_id", "u1", "p1"), ("anonymous_id", "a3", "p2"),
        ("user_id", row_id(long_user), "p2")])
    assert row_id(long_user).startswith(long_user[:64] + "...sha256:")
    # the whole ids, once each after the replay, under the stand-in that keys their row
    assert rejected(wh, "identities") == sorted([
        ("anonymous_id", row_id(long_anon), long_anon),
        ("user_id", row_id(long_user), long_user)])
    assert wh.rows("users", "id, plan") == [{"id": row_id(long_user), "plan": "pro"}]


def test_a_nul_in_a_user_or_anonymous_id_is_rejected_and_the_event_loads(wh):
    # identities refused the NUL (PostgreSQL 22021) and users took a NULL key (23502,
    # DuckDB's ConstraintException): the whole event failed.
    batch = [event(1, "p1", userId="u\x00z"), event(2, "p2", anonymousId="a\x00z", userId="u2"),
             event(3, "p3", type="identify", userId="u\x00q", anonymousId="a3",
                   traits={"email": "e"})]
    assert load(wh, batch, batch) == [["delivered"] * 3] * 2
    assert wh.rows("tracks", "id, user_id, anonymous_id", order="id") == [
        {"id": "m1", "user_id": None, "anonymous_id": "a1"},
        {"id": "m2", "user_id": "u2", "anonymous_id": None}]
    assert wh.rows("identifies", "id, user_id, email") == [
        {"id": "m3", "user_id": None, "email": "e"}]
    assert wh.rows("users", "id, email") == [{"id": row_id("u\x00q"), "email": "e"}]
    assert row_id("u\x00q").startswith("u\\u0000q...sha256:")
    assert identities(wh) == sorted([
        ("anonymous_id", "a1", "p1"), ("user_id", row_id("u\x00z"), "p1"),
        ("anonymous_id", row_id("a\x00z"), "p2"), ("user_id", "u2", "p2"),
        ("anonymous_id", "a3", "p3"), ("user_id", row_id("u\x00q"), "p3")])
    assert rejected(wh, "identities") == sorted([
        ("anonymous_id", row_id("a\x00z"), "a\\u0000z"),
        ("user_id", row_id("u\x00z"), "u\\u0000z"), ("user_id", row_id("u\x00q"), "u\\u0000q")])
    assert rejected(wh, "users") == [("id", "m3", "u\\u0000q")]
    assert rejected(wh, "identifies") == [("user_id", "m3", "u\\u0000q")]
    assert rejected(wh, "tracks") == [("anonymous_id", "m2", "a\\u0000z"),
                                      ("user_id", "m1", "u\\u0000z")]


def test_every_value_rejected_for_one_column_of_a_message_is_kept_in_its_row(wh):
    # rejected_values has one row per (table, column, message): the values after the
    # first rejected one used to vanish.
    names = {"firstName": "A", "first_name": "B", "First Name": "C", "FIRST-NAME": "D"}
    batch = [event(1, event="Order Completed", properties=names),
             event(2, event="Dup", properties={"s": "a\x00", "S": "b\x00"}),
             event(3, event="Dup", properties={"s": "c\x00"})]
    assert load(wh, batch) == [["delivered"] * 3]
    before = wh.rows("rejected_values", "table_name, column_name, message_id, value, reason",
                     order="message_id")
    assert load(wh, batch, batch[:1]) == [["delivered"] * 3, ["delivered"]]
    after = wh.rows("rejected_values", "table_name, column_name, message_id, value, reason",
                    order="message_id")
    assert after == before  # a replay neither adds a row nor grows one
    assert wh.rows("order_completed", "first_name") == [{"first_name": "A"}]
    two_keys = "two keys of the message map to column 'first_name'; the first one was loaded"
    first, dup, single = before
    assert (first["table_name"], first["column_name"], first["message_id"]) == (
        "order_completed", "first_name", "m1")
    assert json.loads(first["value"]) == [{"value": v, "reason": two_keys} for v in "BCD"]
    assert first["reason"].startswith("3 values of this message were rejected")
    assert (dup["column_name"], dup["message_id"]) == ("s", "m2")
    assert [v["value"] for v in json.loads(dup["value"])] == ["a\\u0000", "b\\u0000"]
    # one value rejected: the row is as it always was
    assert (single["message_id"], single["value"]) == ("m3", "c\\u0000")
    assert "NUL" in single["reason"]


def test_delete_user_finds_the_ids_stored_under_a_stand_in(wh):
    # users and identities key such an id by its stand-in, and rejected_values keeps it
    # whole under that stand-in: a delete looking for the id itself left all three
    long_user, nul_anon = unique_text("u", 3000), "a\x00z"
    batch = [event(1, "p", type="identify", userId=long_user, anonymousId=nul_anon,
                   traits={"plan": "pro"}),
             event(2, "q", type="identify", userId="u2", anonymousId="a2")]
    assert load(wh, batch) == [["delivered"] * 2]
    assert delete_user(wh, [long_user], [nul_anon]) == "delivered"
    assert wh.rows("users", "id") == [{"id": "u2"}]
    assert identities(wh) == [("anonymous_id", "a2", "q"), ("user_id", "u2", "q")]
    assert wh.rows("rejected_values") == []
    assert wh.rows("identifies", "id") == [{"id": "m2"}]


def test_delete_user_removes_the_persons_trait_identifiers_too(wh):
    # A delete notice named userIds and anonymousIds only: the person's email rows (one
    # long enough to be kept whole under its stand-in) stayed behind. Then they were
    # taken by profile id, which is the one each row was loaded with: one of the person's
    # under a profile merged away since stayed, and another person's under the person's
    # profile id (loaded before an unmerge) went. The notice now names them.
    long_email = unique_text("e", 3000) + "@example.com"
    mine = {("user_id", "u1"): "p", ("anonymous_id", "a1"): "p", ("email", "x@y.z"): "p",
            ("email", long_email): "p", ("email", "old@y.z"): "p-merged-away",
            ("email", "b@y.z"): "p"}
    batch = [Event(1, "m1", {"type": "identify", "messageId": "m1", "userId": "u1",
                             "anonymousId": "a1", "receivedAt": "2024-05-01T10:00:00.000Z"},
                   "p", None, None, identities=mine),
             Event(2, "m2", {"type": "identify", "messageId": "m2", "userId": "u2",
                             "receivedAt": "2024-05-01T10:00:00.000Z"},
                   "q", None, None, identities={("user_id", "u2"): "q", ("email", "q@y.z"): "q",
                                                ("email", "x@y.z"): "p"})]
    assert load(wh, batch) == [["delivered"] * 2]
    assert rejected(wh, "identities") == [("email", row_id(long_email), long_email)]
    traits = [("email", "x@y.z"), ("email", long_email), ("email", "old@y.z")]
    assert delete_user(wh, ["u1"], ["a1"], traits) == "delivered"
    assert identities(wh) == [("email", "b@y.z", "p"), ("email", "q@y.z", "q"),
                              ("user_id", "u2", "q")]
    assert wh.rows("rejected_values") == []
