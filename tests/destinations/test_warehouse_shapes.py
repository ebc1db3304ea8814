"""Compiled shapes (warehouse/shapes.py) plan exactly what the slow path plans.

Track events are drawn from a few templates whose values vary in kind from event to
event (text, text that looks like a date-time, NUL, integers past 64 bits or past
2**53, floats, booleans, nulls, lists, empty and non-empty objects, missing and extra
keys, keys naming a PostgreSQL system column, messageIds too long for the id column),
so some events fit a learned shape and others must take the slow path. Each
batch is planned twice against the same known schema, with shapes and without: the
plans must be the same, row for row and value for value (types included).
"""

from __future__ import annotations

import datetime as dt

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import examples

from destinations.test_warehouse_schema import joined
from trackpipe.destinations.base import Event
from trackpipe.destinations.warehouse import layout
from trackpipe.destinations.warehouse.plan import plan
from trackpipe.destinations.warehouse.shapes import ShapeBook

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
WHEN = "2024-05-01T10:00:00.123Z"

value = st.one_of(
    st.sampled_from(["web", "", "2024-05-01T10:00:00Z", "2024-05-01 10:00", "2024-13-45T99:99",
                     "2024-05-01T10:00:00.123456789Z", "2024-05-01T10:00:00.123456000Z",
                     "abcd-efghijklmnopq", "a\x00b", "é" * 3, 0, 1, -1, 2**53 + 1, 2**63, 2**70,
                     1.5, -0.0, 1e300, True, False, None, [], [1, "a"], {}, {"x": 1},
                     {"x": {"y": None}}]),
    st.integers(-2**64, 2**64), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20))
# The usual value of each key, of one kind, so that most events fit a learned shape.
USUAL = {"plan": st.sampled_from(["web", "ios", "", "é"]),
         "total": st.floats(-1e6, 1e6, allow_nan=False),
         "count": st.integers(-2**40, 2**40), "flag": st.booleans(),
         "items": st.lists(st.integers(0, 9), max_size=3).map(lambda x: x or [0]),
         "at": st.sampled_from(["2024-05-01T10:00:00.000Z", "2024-05-02 11:00:00+02:00"])}


@st.composite
def usual_or_odd(draw, key: str):
    return draw(value) if draw(st.integers(0, 9)) == 0 else draw(USUAL[key])


@st.composite
def track(draw, n: int):
    name = draw(st.sampled_from(["Order Completed"] * 4 + ["Product Viewed", "users"]))
    props = {key: draw(usual_or_odd(key)) for key in USUAL}
    props["nested"] = {"a": draw(usual_or_odd("count")), "b": 1}
    if draw(st.integers(0, 9)) == 0:  # a PostgreSQL system column's name among them
        props[draw(st.sampled_from(["extra", "xmin", "ctid"]))] = draw(value)
    if draw(st.integers(0, 9)) == 0:
        del props["total"]
    # now and then an id longer than SHORT_ID_CHARS, or than the id column holds
    message_id = f"m{n}" + draw(st.sampled_from([""] * 18 + ["x" * 600, "é" * 1100]))
    message = {"type": "track", "event": name, "messageId": message_id,
               "userId": draw(st.sampled_from(["u1", "u2", "u3"] * 6 + [None, "u\x00"])),
               "anonymousId": draw(st.sampled_from(["a1"] * 9 + ["a" * 2100])),
               "receivedAt": WHEN,
               "timestamp": draw(st.sampled_from([WHEN] * 18 + ["yesterday", None])),
               "context": {"library": {"name": "analytics-python"},
                           "ip": draw(st.sampled_from(["203.0.113.7", "::1"] * 9 + [None]))},
               "properties": props, "integrations": {}}
    if draw(st.integers(0, 9)) > 0:
        message["sentAt"] = WHEN
    return message


def events(messages, profiled=True) -> list[Event]:
    return [Event(i, m["messageId"], None, p, None, None, msgspec.json.encode(m),
                  identities=joined(m, p))
            for i, m in enumerate(messages) for p in [f"p{i % 3}" if profiled else None]]


def as_data(p):
    loads = {}
    for load in p.loads:
        names = [c for c, _ in load.columns]
        loads[load.table] = (dict(load.columns), [
            {c: (v, type(v)) for c, v in zip(names, row)} for row in load.rows])
    return (loads, sorted(p.changes, key=repr), sorted(p.rejected, key=repr),
            sorted(p.identities),
            {i: o.detail for i, o in p.failed.items()}, p.schema)


@settings(max_examples=examples(80), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_shapes_plan_what_the_slow_path_plans(data):
    warm = [data.draw(track(n)) for n in range(4)]
    batch = [data.draw(track(n)) for n in range(10, 30)]
    book = ShapeBook()
    known = plan(events(warm), {}, NOW, shapes=book).schema
    with_shapes = plan(events(batch), known, NOW, shapes=book)
    without = plan(events(batch), known, NOW)
    fast, slow = as_data(with_shapes), as_data(without)
    for table in set(fast[0]) | set(slow[0]):  # the first difference, readably
        f, w = fast[0].get(table), slow[0].get(table)
        assert (f and f[0]) == (w and w[0]), table
        for a, b in zip(f[1], w[1]):
            assert a == b, (table, {k: (a.get(k), b.get(k)) for k in a if a.get(k) != b.get(k)})
    assert fast == slow


def test_events_of_a_learned_shape_skip_the_walk(monkeypatch):
    walked = []
    real = layout.rows_for
    monkeypatch.setattr(layout, "rows_for", lambda m, *a: walked.append(m) or real(m, *a))
    base = {"type": "track", "event": "Order Completed", "userId": "u1", "receivedAt": WHEN,
            "context": {"library": {"name": "analytics-python"}},
            "properties": {"revenue": 9.5, "products": [{"sku": "a"}], "coupon": "MAY"}}
    book = ShapeBook()
    first = plan(events([{**base, "messageId": "m0"}]), {}, NOW, shapes=book)
    assert len(walked) == 1
    batch = [{**base, "messageId": f"m{n}", "properties": {**base["properties"],
                                                          "revenue": 1.5 * n}}
             for n in range(1, 6)]
    fast = plan(events(batch), first.schema, NOW, shapes=book)
    assert len(walked) == 1, "every event of the learned shape was laid out without a walk"
    assert as_data(fast) == as_data(plan(events(batch), first.schema, NOW))
    table = next(load for load in fast.loads if load.table == "order_completed")
    row = dict(zip([c for c, _ in table.columns], table.rows[2]))
    assert (row["revenue"], row["products"], row["coupon"]) == (4.5, '[{"sku":"a"}]', "MAY")
    # A value of another kind takes the slow path: that event, and (the column now being
    # text in this batch) the events after it, whose numbers then load as text.
    odd = [{**base, "messageId": "m9", "properties": {**base["properties"], "revenue": "n/a"}}]
    walked.clear()
    odd_plan = plan(events(batch + odd), first.schema, NOW, shapes=book)
    assert [m["messageId"] for m in walked] == ["m9"]
    assert as_data(odd_plan) == as_data(plan(events(batch + odd), first.schema, NOW))


def test_system_column_names_and_over_long_ids_come_out_as_the_slow_path_lays_them(
        monkeypatch):
    walked = []
    real = layout.rows_for
    monkeypatch.setattr(layout, "rows_for", lambda m, *a: walked.append(m) or real(m, *a))
    base = {"type": "track", "event": "Order Completed", "userId": "u1", "receivedAt": WHEN,
            "context": {"library": {"name": "analytics-python"}, "xmin": "c"},
            "properties": {"xmin": 1, "ctid": "a", "tableoid": 2.5, "cmax": True}}
    book = ShapeBook()
    first = plan(events([{**base, "messageId": "m0"}]), {}, NOW, shapes=book)
    batch = [{**base, "messageId": m} for m in ("m1", "m2", "m" * 3000, "é" * 1001, "m3")]
    walked.clear()
    fast = plan(events(batch), first.schema, NOW, shapes=book)
    assert [len(m["messageId"]) for m in walked] == [3000, 1001]  # the rest: no walk
    assert as_data(fast) == as_data(plan(events(batch), first.schema, NOW))
    table = next(load for load in fast.loads if load.table == "order_completed")
    columns = {c for c, _ in table.columns}
    assert {"properties_xmin", "properties_ctid", "properties_tableoid", "properties_cmax",
            "context_xmin"} <= columns and not {"xmin", "ctid", "tableoid", "cmax"} & columns
    assert [row[0] for row in table.rows] == [layout.row_id(m["messageId"]) for m in batch]


def test_an_over_long_anonymous_id_on_the_fast_path_maps_its_identity_under_a_stand_in(
        monkeypatch):
    # identities is keyed on the identifier: the whole id failed the load in PostgreSQL
    walked = []
    real = layout.rows_for
    monkeypatch.setattr(layout, "rows_for", lambda m, *a: walked.append(m) or real(m, *a))
    base = {"type": "track", "event": "Viewed", "userId": "u1", "anonymousId": "a1",
            "receivedAt": WHEN, "properties": {"n": 1}}
    book = ShapeBook()
    first = plan(events([{**base, "messageId": "m0"}]), {}, NOW, shapes=book)
    long_anon = "é" * 1001  # 2,002 bytes
    walked.clear()
    fast = plan(events([{**base, "messageId": "m1", "anonymousId": long_anon}]), first.schema,
                NOW, shapes=book)
    assert walked == []
    assert sorted(fast.identities) == [("anonymous_id", layout.row_id(long_anon), "p0"),
                                       ("user_id", "u1", "p0")]
    assert [(r.table, r.column, r.message_id, r.value) for r in fast.rejected] == [
        ("identities", "anonymous_id", layout.row_id(long_anon), long_anon)]
    assert "2,002 bytes" in fast.rejected[0].reason


def test_keys_msgspec_cannot_name_leave_the_event_to_the_slow_path():
    # A quote, a backslash or a control character in a key cannot be a Struct field's
    # name; learning such a shape once raised out of plan() and failed the batch.
    book = ShapeBook()
    for key in ('"', "\\", "\x1f", "a\nb"):
        batch = [{"type": "track", "event": "Odd", "messageId": f"m{n}", "userId": "u",
                  "properties": {key: n, "ok": 1}} for n in range(3)]
        first = plan(events(batch), {}, NOW, shapes=book)
        assert not first.failed
        again = plan(events(batch), first.schema, NOW, shapes=book)
        assert as_data(again) == as_data(plan(events(batch), first.schema, NOW))


def test_no_shape_is_learned_for_an_event_whose_table_max_tables_refused():
    book = ShapeBook()
    batch = [{"type": "track", "event": f"Viewed {n % 2}", "messageId": f"m{n}", "userId": "u",
              "receivedAt": WHEN, "properties": {"n": n}} for n in range(4)]
    first = plan(events(batch), {}, NOW, shapes=book, max_tables=1)
    assert {r.table for r in first.rejected} == {"viewed_1"}
    assert list(book._by_name) == ["Viewed 0"]  # the names kept to MAX_NAMES are not spent
    again = plan(events(batch), first.schema, NOW, shapes=book, max_tables=1)
    assert as_data(again) == as_data(plan(events(batch), first.schema, NOW, max_tables=1))
