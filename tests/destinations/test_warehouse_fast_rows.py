"""Rows laid out by compiled shapes as tuples in each shape's own column order
(plan._Table.add_laid), and the identities of a batch merged as they are
(plan._identity_rows): what they come out as when tables mix layouts, when a later
event widens a laid row's column, when an identifier needs a stand-in."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import msgspec
import pytest

from destinations.test_warehouse_postgres import admin, schema, warehouse  # noqa: F401
from destinations.test_warehouse_shapes import NOW, WHEN, as_data, events
from trackpipe.destinations.base import Event
from trackpipe.destinations.warehouse import layout
from trackpipe.destinations.warehouse.plan import plan
from trackpipe.destinations.warehouse.shapes import ShapeBook


@pytest.fixture
def walked(monkeypatch):
    """The messages the slow path laid out."""
    seen = []
    real = layout.rows_for
    monkeypatch.setattr(layout, "rows_for", lambda m, *a: seen.append(m) or real(m, *a))
    return seen


def track(n: int, name: str, context: dict, properties: dict, **fields) -> dict:
    return {"type": "track", "event": name, "messageId": f"m{n}", "userId": "u1",
            "anonymousId": "a1", "receivedAt": WHEN, "sentAt": WHEN, "context": context,
            "properties": properties, **fields}


def rows(p, table: str) -> list[dict]:
    load = next(load for load in p.loads if load.table == table)
    names = [c for c, _ in load.columns]
    return [dict(zip(names, row)) for row in load.rows]


def learned(warm: list[dict]):
    book = ShapeBook()
    return book, plan(events(warm), {}, NOW, shapes=book).schema


def test_tracks_rows_of_shapes_with_other_context_keys_load_in_their_columns(walked):
    # Two names, each its own context keys: their `tracks` rows have two layouts, and an
    # event of a shape not learned adds a row as the slow path lays it out.
    web = {"page": {"path": "/a"}, "ip": "203.0.113.7"}
    server = {"library": {"name": "analytics-python"}}
    viewed = track(0, "Viewed", web, {"n": 1})
    bought = track(1, "Bought", server, {"total": 1.5}, userId=None)
    del bought["sentAt"]
    book, known = learned([viewed, bought])
    odd = track(9, "Bought", server, {"total": 3.5, "new": True})
    batch = [{**viewed, "messageId": "m2"}, {**bought, "messageId": "m3"}, odd,
             {**viewed, "messageId": "m4", "properties": {"n": 4}},
             {**viewed, "messageId": "m2"}]  # a messageId sent twice: loads once
    walked.clear()
    fast = plan(events(batch), known, NOW, shapes=book)
    assert [m["messageId"] for m in walked] == ["m9"]
    assert as_data(fast) == as_data(plan(events(batch), known, NOW))
    tracks = {r["id"]: r for r in rows(fast, "tracks")}
    assert list(tracks) == ["m2", "m3", "m9", "m4"]
    assert (tracks["m2"]["context_page_path"], tracks["m2"]["context_library_name"]) == (
        "/a", None)
    assert (tracks["m3"]["context_page_path"], tracks["m3"]["context_library_name"],
            tracks["m3"]["user_id"], tracks["m3"]["sent_at"]) == (
        None, "analytics-python", None, None)
    assert tracks["m4"]["received_at"] == dt.datetime(2024, 5, 1, 10, 0, 0, 123000,
                                                      tzinfo=dt.timezone.utc)
    assert (tracks["m9"]["context_library_name"], tracks["m9"]["context_page_path"]) == (
        "analytics-python", None)
    assert [(r["id"], r["n"]) for r in rows(fast, "viewed")] == [("m2", 1), ("m4", 4)]


def test_tracks_rows_of_one_layout_load_as_they_are(walked):
    # Two names with the same context keys: one layout (interned), so the `tracks` rows
    # load in it as laid out.
    context = {"ip": "203.0.113.7", "library": {"name": "analytics-python"}}
    warm = [track(0, "Viewed", context, {"n": 1}), track(1, "Bought", context, {"t": 2.5})]
    book, known = learned(warm)
    batch = [{**m, "messageId": f"m{n}"} for n, m in enumerate(warm * 2, 2)]
    walked.clear()
    fast = plan(events(batch), known, NOW, shapes=book)
    assert walked == []
    assert as_data(fast) == as_data(plan(events(batch), known, NOW))
    assert [(r["id"], r["event"], r["context_ip"]) for r in rows(fast, "tracks")] == [
        ("m2", "viewed", "203.0.113.7"), ("m3", "bought", "203.0.113.7"),
        ("m4", "viewed", "203.0.113.7"), ("m5", "bought", "203.0.113.7")]


def test_date_times_and_arrays_in_context_are_in_the_tracks_row(walked):
    context = {"localTime": "2024-05-01T12:00:00+02:00", "tags": ["a", "b"], "empty": {},
               "ip": "::1"}
    first = track(0, "Viewed", context, {"at": "2024-05-02T00:00:00Z", "list": [1]})
    book, known = learned([first])
    batch = [{**first, "messageId": "m1"}]
    walked.clear()
    fast = plan(events(batch), known, NOW, shapes=book)
    assert walked == []
    assert as_data(fast) == as_data(plan(events(batch), known, NOW))
    row = rows(fast, "tracks")[0]
    assert (row["context_local_time"], row["context_tags"], row["context_empty"]) == (
        dt.datetime(2024, 5, 1, 10, tzinfo=dt.timezone.utc), '["a","b"]', "{}")
    assert "at" not in row and "list" not in row
    assert rows(fast, "viewed")[0]["list"] == "[1]"


def test_laid_rows_convert_when_a_later_event_widens_their_column(walked):
    # The laid rows hold a date-time and an integer; a later event (the slow path's)
    # makes the columns text and double: the laid rows' values convert as the slow
    # path's would, the date-time to the text it was sent as.
    sent = "2024-05-02 11:00:00+02:00"
    first = track(0, "Viewed", {"ip": "::1"}, {"at": sent, "n": 1})
    book, known = learned([first])
    batch = [{**first, "messageId": "m1"}, {**first, "messageId": "m2"},
             track(3, "Viewed", {"ip": "::1"}, {"at": "soon", "n": 2.5})]
    walked.clear()
    fast = plan(events(batch), known, NOW, shapes=book)
    assert [m["messageId"] for m in walked] == ["m3"]
    assert as_data(fast) == as_data(plan(events(batch), known, NOW))
    assert [(r["at"], r["n"]) for r in rows(fast, "viewed")] == [
        (sent, 1.0), (sent, 1.0), ("soon", 2.5)]


def identified(n: int, message: dict, identities: dict) -> Event:
    return Event(n, message["messageId"], None, "p", None, None, msgspec.json.encode(message),
                 identities=identities)


@pytest.mark.parametrize("shapes", [True, False])
def test_identities_later_events_win_failed_ones_add_none_and_long_ones_get_stand_ins(shapes):
    first = track(0, "Viewed", {"ip": "::1"}, {"n": 1})
    book, known = learned([first]) if shapes else (None, {})
    long_anon = "é" * 1001  # 2,002 bytes
    batch = [identified(1, {**first, "messageId": "m1"}, {("user_id", "u1"): "p1"}),
             identified(2, {"type": "bogus", "messageId": "m2"}, {("user_id", "u2"): "p2"}),
             identified(3, {**first, "messageId": "m3"}, {("user_id", "u1"): "p3"})]
    p = plan(batch, known, NOW, shapes=book)
    assert list(p.failed) == [1]
    assert p.identities == [("user_id", "u1", "p3")]
    assert p.rejected == []
    batch.insert(1, identified(4, {**first, "messageId": "m4"},
                               {("anonymous_id", long_anon): "p4", ("user_id", "u1"): "p4"}))
    p = plan(batch, known, NOW, shapes=book)
    assert p.identities == [("user_id", "u1", "p3"),
                            ("anonymous_id", layout.row_id(long_anon), "p4")]
    assert [(r.table, r.column, r.message_id, r.value) for r in p.rejected] == [
        ("identities", "anonymous_id", layout.row_id(long_anon), long_anon)]


def test_a_copy_longer_than_a_block_loads_every_row(admin, schema, caplog):  # noqa: F811
    # psycopg sends a COPY's rows in blocks (32 KiB): rows on both sides of a block's end
    # all load, at once (a COPY the database refused would be loaded again in halves,
    # small enough to pass).
    dest = warehouse(schema)
    base = track(0, "Viewed", {"ip": "::1"}, {"text": "x" * 500, "n": 0})
    batch = [Event(n, f"m{n}", None, None, None, None, msgspec.json.encode(
        {**base, "messageId": f"m{n}", "properties": {"text": "x" * 500, "n": n}}))
        for n in range(300)]

    async def go():
        try:
            for part in (batch[:2], batch[2:]):  # the first learns the shape
                assert {o.state for o in await dest.send(part)} == {"delivered"}
        finally:
            await dest.close()
    with caplog.at_level(logging.INFO, logger="trackpipe.warehouse"):
        asyncio.run(go())
    assert "halves" not in caplog.text
    got = admin.execute(f'SELECT n, length(text) FROM "{schema}".viewed ORDER BY n').fetchall()
    assert got == [(n, 500) for n in range(300)]
    assert admin.execute(f'SELECT count(*) FROM "{schema}".tracks').fetchone() == (300,)


def test_a_nul_anywhere_takes_the_slow_path_and_other_escapes_do_not(walked):
    first = track(0, "Viewed", {"ip": "::1"}, {"text": "plain", "n": 1})
    book, known = learned([first])
    batch = [track(1, "Viewed", {"ip": "::1"}, {"text": 'a "quoted" back\\slash é', "n": 2}),
             track(2, "Viewed", {"ip": "::1"}, {"text": "a\x00b", "n": 3}),
             track(3, "Viewed", {"ip": "a\x00"}, {"text": "c", "n": 4})]
    walked.clear()
    fast = plan(events(batch), known, NOW, shapes=book)
    assert [m["messageId"] for m in walked] == ["m2", "m3"]
    assert as_data(fast) == as_data(plan(events(batch), known, NOW))
    assert [r["text"] for r in rows(fast, "viewed")] == ['a "quoted" back\\slash é', None, "c"]
    assert sorted((r.column, r.message_id) for r in fast.rejected) == [
        ("context_ip", "m3"), ("context_ip", "m3"), ("text", "m2")]
