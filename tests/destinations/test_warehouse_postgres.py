"""The postgres warehouse destination against a real PostgreSQL.

Each test loads into a schema of its own and drops it afterwards. Without a
reachable PostgreSQL the tests skip, or fail when TRACKPIPE_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import uuid
from decimal import Decimal

import msgspec
import psycopg
import pytest

from destinations.test_warehouse_schema import joined
from trackpipe.destinations.base import DestinationError, Event
from trackpipe.destinations.warehouse.postgres import PostgresWarehouse

DSN = os.environ.get("TRACKPIPE_TEST_POSTGRES_DSN",
                     "host=127.0.0.1 port=5432 user=postgres dbname=test")


def unavailable(reason: str):
    if os.environ.get("TRACKPIPE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (TRACKPIPE_REQUIRE_SERVICES=1, so this fails instead of skipping)")
    pytest.skip(reason)


@pytest.fixture
def admin():
    try:
        conn = psycopg.connect(DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL is not reachable at {DSN!r}: {exc}")
    yield conn
    conn.close()


@pytest.fixture
def schema(admin):
    name = f"tp_test_{uuid.uuid4().hex[:10]}"
    yield name
    admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def role(admin):
    """A login role with no privileges at all."""
    name = f"tp_test_role_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE ROLE "{name}" LOGIN')
    yield name
    admin.execute(f'DROP OWNED BY "{name}"')
    admin.execute(f'DROP ROLE "{name}"')


def warehouse(schema: str, dsn: str = DSN) -> PostgresWarehouse:
    return PostgresWarehouse("wh", PostgresWarehouse.Settings(dsn=dsn, schema=schema))


def run(dest: PostgresWarehouse, *steps):
    """Run async steps (callables taking the destination) in one loop, then close it."""
    async def go():
        try:
            return [await step(dest) for step in steps]
        finally:
            await dest.close()
    return asyncio.run(go())


def send(*events):
    return lambda d: d.send(list(events))


def event(n: int, type_: str = "track", profile: str | None = None, **fields) -> Event:
    message = {"type": type_, "messageId": f"m{n}", "userId": f"u{n}", "anonymousId": f"a{n}",
               "receivedAt": f"2024-05-01T10:00:{n % 60:02d}.000Z",
               "timestamp": "2024-05-01T09:59:59.500Z", "sentAt": "2024-05-01T10:00:00.000Z",
               "context": {"ip": "203.0.113.7", "library": {"name": "analytics-python"}}, **fields}
    if type_ == "track":
        message.setdefault("event", "Order Completed")
    return Event(n, message["messageId"], message, profile, None, None,
                 identities=joined(message, profile))


def table(admin, schema, name, columns="*", order="id"):
    cur = admin.execute(f'SELECT {columns} FROM "{schema}"."{name}" ORDER BY {order}')
    names = [d.name for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def column_types(admin, schema, name) -> dict[str, str]:
    return dict(admin.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = %s", (schema, name)).fetchall())


def states(outcomes) -> list[str]:
    return [o.state for o in outcomes]


def test_each_message_type_lands_in_its_table(admin, schema):
    outcomes, = run(warehouse(schema), send(
        event(1, properties={"revenue": 9.5, "currency": "EUR"}),
        event(2, "identify", traits={"email": "a@b.c", "address": {"city": "Oslo"}}),
        event(3, "page", name="Home", properties={"path": "/", "title": "Shop"}),
        event(4, "screen", name="Cart", properties={"items": 2}),
        event(5, "group", groupId="g1", traits={"plan": "pro"}),
        event(6, "alias", previousId="old-6")))
    assert states(outcomes) == ["delivered"] * 6
    track = table(admin, schema, "tracks")[0]
    assert (track["id"], track["event"], track["event_text"]) == ("m1", "order_completed",
                                                                 "Order Completed")
    assert track["context_ip"] == "203.0.113.7"
    assert track["context_library_name"] == "analytics-python"
    assert str(track["timestamp"]) == "2024-05-01 09:59:59.500000+00:00" and track["uuid_ts"]
    order = table(admin, schema, "order_completed")[0]
    assert (order["revenue"], order["currency"], order["user_id"]) == (9.5, "EUR", "u1")
    identify = table(admin, schema, "identifies")[0]
    assert (identify["email"], identify["address_city"]) == ("a@b.c", "Oslo")
    assert table(admin, schema, "users", "id, email")[0] == {"id": "u2", "email": "a@b.c"}
    assert table(admin, schema, "pages", "name, path, title")[0] == {
        "name": "Home", "path": "/", "title": "Shop"}
    assert table(admin, schema, "screens", "name, items")[0] == {"name": "Cart", "items": 2}
    assert table(admin, schema, "groups", "group_id, plan")[0] == {"group_id": "g1", "plan": "pro"}
    assert table(admin, schema, "aliases", "previous_id, user_id")[0] == {
        "previous_id": "old-6", "user_id": "u6"}
    assert column_types(admin, schema, "tracks")["received_at"] == "timestamp with time zone"


def test_new_properties_add_columns_logged_and_recorded(admin, schema, caplog):
    caplog.set_level(logging.INFO, "trackpipe.warehouse")
    run(warehouse(schema), send(event(1, properties={"a": 1})),
        send(event(2, properties={"a": 2, "nested": {"deep": {"key": True}}, "tags": ["x", 1]})))
    types = column_types(admin, schema, "order_completed")
    assert (types["a"], types["nested_deep_key"], types["tags"]) == ("bigint", "boolean", "text")
    assert table(admin, schema, "order_completed", "id, tags")[1]["tags"] == '["x",1]'
    changes = table(admin, schema, "schema_changes", "table_name, column_name, old_type, new_type,"
                    " message_id", order="at, table_name, column_name")
    assert {"table_name": "order_completed", "column_name": "nested_deep_key", "old_type": None,
            "new_type": "boolean", "message_id": "m2"} in changes
    assert {"table_name": "tracks", "column_name": None, "old_type": None, "new_type": "table",
            "message_id": "m1"} in changes
    assert "column order_completed.nested_deep_key added as boolean" in caplog.text


@pytest.mark.parametrize("first, later, new_type, stored", [
    (1, 2.5, "double precision", [1.0, 2.5]),
    (2.5, "many", "text", ["2.5", "many"]),
    (7, "seven", "text", ["7", "seven"]),
    (True, 3, "text", ["true", "3"]),
    ("2024-05-01T10:00:00Z", "soon", "text", ["2024-05-01T10:00:00.000000Z", "soon"]),
    # 1 BC in UTC: the text keeps the era, so it is still the same instant
    ("0001-01-01T00:00:00+01:00", "soon", "text", ["0001-12-31T23:00:00.000000Z BC", "soon"]),
])
def test_each_widening_path_keeps_every_value(admin, schema, first, later, new_type, stored):
    run(warehouse(schema), send(event(1, properties={"v": first})),
        send(event(2, properties={"v": later})))
    assert column_types(admin, schema, "order_completed")["v"] == new_type
    assert [r["v"] for r in table(admin, schema, "order_completed", "id, v")] == stored
    change = table(admin, schema, "schema_changes", "old_type, new_type, message_id",
                   order="at")[-1]
    assert change["new_type"] == new_type and change["message_id"] == "m2"


def test_widened_timestamps_cast_back_to_the_same_instants(admin, schema):
    when = ["0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00Z", "2024-05-01T10:00:00+05:30"]
    run(warehouse(schema), send(*(event(n, properties={"v": v}) for n, v in enumerate(when))),
        send(event(9, properties={"v": "soon"})))
    # (compared as epochs: Python's datetime stops at year 1)
    before = admin.execute("SELECT extract(epoch FROM unnest(%s::timestamptz[]))",
                           (when,)).fetchall()
    after = admin.execute(f'SELECT extract(epoch FROM v::timestamptz) FROM "{schema}"'
                          ".order_completed WHERE id <> 'm9' ORDER BY id").fetchall()
    assert after == before


def stale_writers(schema, *steps):
    """Run (writer index, events) steps with two warehouses on one schema, each keeping
    its own cached schema (two destinations, or two nodes); the last step's outcomes."""
    async def go():
        writers = [warehouse(schema), warehouse(schema)]
        try:
            return [await writers[i].send(list(events)) for i, events in steps][-1]
        finally:
            for w in writers:
                await w.close()
    return asyncio.run(go())


def test_a_column_another_writer_widened_gets_values_of_its_new_type(admin, schema, caplog):
    caplog.set_level(logging.INFO, "trackpipe.warehouse")
    outcomes = stale_writers(
        schema,
        (0, [event(1, properties={"ok": True, "n": 5})]),
        (1, [event(2, properties={"ok": True, "n": 6})]),  # caches boolean and bigint
        (0, [event(3, properties={"ok": "maybe", "n": "x"})]),  # widens both to text
        # a boolean and bigints as the stale cache has them, and a double that would
        # have "widened" the (text) column to double precision
        (1, [event(4, properties={"ok": True, "n": 7}),
             event(5, properties={"ok": False, "n": 2.5})]))
    assert states(outcomes) == ["delivered"] * 2
    rows = table(admin, schema, "order_completed", "id, ok, n")
    assert [(r["ok"], r["n"]) for r in rows] == [
        ("true", "5"), ("true", "6"), ("maybe", "x"), ("true", "7"), ("false", "2.5")]
    assert column_types(admin, schema, "order_completed")["n"] == "text"
    assert "column order_completed.n is text, not bigint; planning the batch again" \
        in caplog.text


def test_a_column_another_writer_added_is_not_added_again_in_another_type(admin, schema):
    outcomes = stale_writers(
        schema,
        (0, [event(1)]), (1, [event(2)]),
        (0, [event(3, properties={"flag": True})]),
        (1, [event(4, properties={"flag": "t"})]))  # would have been written as a boolean
    assert states(outcomes) == ["delivered"]
    rows = table(admin, schema, "order_completed", "id, flag")
    assert [r["flag"] for r in rows] == [None, None, "true", "t"]


def test_tables_changing_under_every_attempt_are_retried_later(admin, schema, monkeypatch):
    run(warehouse(schema), send(event(1)))
    seen = []
    monkeypatch.setattr(PostgresWarehouse, "_stale",
                        lambda self, todo, found: seen.append(1) or "column x moved")
    outcomes, = run(warehouse(schema), send(event(2), event(3)))
    assert states(outcomes) == ["retry", "retry"] and "column x moved" in outcomes[0].detail
    assert len(seen) == 2  # planned again once, not split, not looped
    assert [r["id"] for r in table(admin, schema, "order_completed", "id")] == ["m1"]


def test_a_column_altered_by_hand_gets_its_values_cast_by_the_database(admin, schema):
    def alter(d):
        admin.execute(f'ALTER TABLE "{schema}".order_completed'
                      ' ALTER COLUMN price TYPE numeric(12,2),'
                      ' ALTER COLUMN "at" TYPE timestamp without time zone')
        return asyncio.sleep(0)

    def restart(d):
        d.forget()
        return asyncio.sleep(0)

    def bought(n, price, day):
        return event(n, properties={"price": price, "at": f"2024-05-0{day}T10:00:00Z"})

    outcomes = run(warehouse(schema), send(bought(1, 5, 1)), alter,
                   send(bought(2, 6, 2)),  # planned with the cached bigint and timestamptz
                   restart,
                   send(bought(3, 7.25, 3), bought(4, "lots", 4), bought(5, 10**12, 5)))
    assert states(outcomes[2]) == ["delivered"]
    assert states(outcomes[4]) == ["delivered"] * 3
    rows = table(admin, schema, "order_completed", "id, price, at")
    assert [(r["price"], r["at"].day) for r in rows] == [
        (Decimal("5.00"), 1), (Decimal("6.00"), 2), (Decimal("7.25"), 3), (None, 4), (None, 5)]
    assert rows[0]["at"] == dt.datetime(2024, 5, 1, 10)
    rejected = table(admin, schema, "rejected_values", "column_name, message_id, value, reason",
                     order="message_id")
    assert [(r["column_name"], r["message_id"], r["value"]) for r in rejected] == [
        ("price", "m4", "lots"), ("price", "m5", str(10**12))]
    assert "numeric(12,2)" in rejected[0]["reason"]
    types = column_types(admin, schema, "order_completed")
    assert (types["price"], types["at"]) == ("numeric", "timestamp without time zone")


def altered(admin, schema, sql: str):
    """A step: a person alters the tables (`{s}` is the schema); then a restart, so the
    destination reads them afresh."""
    def step(d):
        admin.execute(sql.format(s=schema))
        d.forget()
        return asyncio.sleep(0)
    return step


def test_a_value_the_database_refuses_shares_the_row_of_the_others_rejected_there(
        admin, schema):
    # "Price" names the column too: the plan rejects it, and the database refuses "lots"
    outcomes = run(warehouse(schema), send(event(1, properties={"price": 1})),
                   altered(admin, schema, 'ALTER TABLE "{s}".order_completed'
                                          ' ALTER COLUMN price TYPE numeric(12,2)'),
                   send(event(2, properties={"price": "lots", "Price": 7})),
                   send(event(2, properties={"price": "lots", "Price": 7})))  # a replay
    assert states(outcomes[2]) == states(outcomes[3]) == ["delivered"]
    rejected = table(admin, schema, "rejected_values", "column_name, message_id, value",
                     order="message_id")
    assert [(r["column_name"], r["message_id"]) for r in rejected] == [("price", "m2")]
    assert [v["value"] for v in json.loads(rejected[0]["value"])] == ["lots", "7"]


def test_a_value_too_long_for_a_varchar_column_is_rejected_not_cut(admin, schema):
    outcomes = run(warehouse(schema), send(event(1, properties={"code": "ab"})),
                   altered(admin, schema, 'ALTER TABLE "{s}".order_completed'
                                          ' ALTER COLUMN code TYPE varchar(5)'),
                   send(event(2, properties={"code": "abcdefgh"}),
                        event(3, properties={"code": "abc  "})))
    assert states(outcomes[2]) == ["delivered"] * 2
    rows = table(admin, schema, "order_completed", "id, code")
    assert [r["code"] for r in rows] == ["ab", None, "abc  "]
    rejected = table(admin, schema, "rejected_values", "message_id, value", order="message_id")
    assert rejected == [{"message_id": "m2", "value": "abcdefgh"}]


@pytest.mark.parametrize("alter", [
    'ALTER TABLE "{s}".order_completed ALTER COLUMN "at" TYPE timestamptz(3)',
    'CREATE DOMAIN "{s}".moment AS timestamptz(3) CHECK (VALUE > \'2000-01-01\');'
    ' ALTER TABLE "{s}".order_completed ALTER COLUMN "at" TYPE "{s}".moment'])
def test_a_column_altered_to_a_precision_or_a_domain_loads(admin, schema, alter):
    # information_schema spells such a type as trackpipe's own (timestamp with time zone),
    # the catalog as what it is: the batch was planned again, and retried, forever
    def bought(n, at):
        return event(n, properties={"at": at})
    outcomes = run(warehouse(schema), send(bought(1, "2024-05-01T10:00:00.123456Z")),
                   altered(admin, schema, alter),
                   send(bought(2, "2024-05-02T10:00:00.123456Z"), bought(3, "soon")))
    assert states(outcomes[2]) == ["delivered"] * 2
    rows = table(admin, schema, "order_completed", "id, at")
    assert rows[1]["at"] == dt.datetime(2024, 5, 2, 10, 0, 0, 123000, dt.timezone.utc)
    assert rows[2]["at"] is None
    rejected = table(admin, schema, "rejected_values", order="message_id")
    assert [r["message_id"] for r in rejected] == ["m3"]


def test_a_fixed_date_time_column_altered_by_hand_gets_utc_whatever_the_time_zone(
        admin, schema):
    # cast from the session's text form, it got the server's local time (here Tokyo's)
    dsn = DSN + " options='-c TimeZone=Asia/Tokyo'"
    run(warehouse(schema, dsn), send(event(1)),
        altered(admin, schema, 'ALTER TABLE "{s}".tracks ALTER COLUMN received_at'
                               " TYPE timestamp without time zone USING received_at"
                               " AT TIME ZONE 'UTC', ALTER COLUMN sent_at TYPE varchar(40)"),
        send(event(2)))
    rows = table(admin, schema, "tracks", "id, received_at, sent_at")
    assert [r["received_at"] for r in rows] == [dt.datetime(2024, 5, 1, 10, 0, 1),
                                                dt.datetime(2024, 5, 1, 10, 0, 2)]
    assert rows[1]["sent_at"] == "2024-05-01T10:00:00.000000Z"


def test_timestamps_are_detected_and_strings_stay_text(admin, schema):
    run(warehouse(schema), send(event(1, properties={
        "shipped_at": "2024-05-02T08:30:00+02:00", "day": "2024-05-02", "note": "hello"})))
    types = column_types(admin, schema, "order_completed")
    assert (types["shipped_at"], types["day"], types["note"]) == (
        "timestamp with time zone", "text", "text")
    row = table(admin, schema, "order_completed", "id, shipped_at")[0]
    assert row["shipped_at"].isoformat() == "2024-05-02T06:30:00+00:00"


def test_values_that_do_not_fit_go_to_rejected_values_and_the_row_loads(admin, schema):
    outcomes = run(warehouse(schema), send(event(1, properties={"n": 1.5})),
                   send(event(2, properties={"n": 2**60, "big": 2**64, "bad": "a\x00b", "ok": 1})))
    assert states(outcomes[1]) == ["delivered"]
    row = table(admin, schema, "order_completed", "id, n, ok")[1]
    assert row == {"id": "m2", "n": None, "ok": 1}
    rejected = table(admin, schema, "rejected_values", "column_name, message_id, value, reason",
                     order="column_name")
    assert [(r["column_name"], r["message_id"], r["value"]) for r in rejected] == [
        ("bad", "m2", "a\\u0000b"), ("big", "m2", str(2**64)), ("n", "m2", str(2**60))]
    assert all(r["reason"] for r in rejected)
    assert "big" not in column_types(admin, schema, "order_completed")


def test_a_table_stops_growing_at_max_columns_and_the_values_it_cannot_take_are_kept(
        admin, schema):
    dest = PostgresWarehouse("wh", PostgresWarehouse.Settings(dsn=DSN, schema=schema,
                                                              max_columns=30))
    many = {f"p{j:02d}": j for j in range(40)}
    outcomes = run(dest, send(event(1, properties={"early": "x"}),
                              event(2, properties=many), event(3, properties={"p00": 7})))
    assert states(outcomes[0]) == ["delivered"] * 3
    columns = column_types(admin, schema, "order_completed")
    assert len(columns) == 30 and "early" in columns
    loaded = [c for c in many if c in columns]
    rows = {r["id"]: r for r in table(admin, schema, "order_completed")}
    assert rows["m3"]["p00"] == 7 and all(rows["m2"][c] == many[c] for c in loaded)
    rejected = table(admin, schema, "rejected_values", "column_name, message_id, value, reason",
                     order="column_name")
    assert [(r["column_name"], r["message_id"], r["value"]) for r in rejected] == [
        (c, "m2", str(v)) for c, v in many.items() if c not in columns]
    assert "max_columns" in rejected[0]["reason"]
    # Past PostgreSQL's own limit of 1,600, every value of such an event failed its batch.
    wide = {f"k{j:04d}": j for j in range(1700)}
    outcomes = run(warehouse(schema), send(event(4, event="Wide", properties=wide), event(5)))
    assert states(outcomes[0]) == ["delivered"] * 2, [o.detail for o in outcomes[0]]
    assert len(column_types(admin, schema, "wide")) == 1000


def test_event_tables_stop_at_max_tables_and_every_event_still_reaches_tracks(admin, schema):
    dest = PostgresWarehouse("wh", PostgresWarehouse.Settings(dsn=DSN, schema=schema,
                                                              max_tables=3))
    names = [f"Viewed /product/{n}" for n in range(5)]
    outcomes = run(dest, send(*[event(n, event=names[n], properties={"price": n * 1.5})
                                for n in range(5)]))
    assert states(outcomes[0]) == ["delivered"] * 5
    assert [r["id"] for r in table(admin, schema, "tracks")] == [f"m{n}" for n in range(5)]
    made = [t for (t,) in admin.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s"
        " AND table_name LIKE 'viewed_product_%%' ORDER BY 1", (schema,))]
    assert made == ["viewed_product_0", "viewed_product_1", "viewed_product_2"]
    rejected = table(admin, schema, "rejected_values",
                     "table_name, column_name, message_id, value, reason", order="message_id")
    assert [(r["table_name"], r["column_name"], r["message_id"]) for r in rejected] == [
        ("viewed_product_3", "*", "m3"), ("viewed_product_4", "*", "m4")]
    assert json.loads(rejected[1]["value"])["price"] == 6.0
    assert "3 event tables, as many as max_tables allows" in rejected[0]["reason"]
    changes = table(admin, schema, "schema_changes", "table_name", order="table_name")
    assert "viewed_product_3" not in {c["table_name"] for c in changes}
    # With a higher limit, replaying them fills their tables; tracks is not doubled.
    roomier = PostgresWarehouse("wh", PostgresWarehouse.Settings(dsn=DSN, schema=schema))
    replay = [event(n, event=names[n], properties={"price": n * 1.5}) for n in (3, 4)]
    assert states(run(roomier, send(*replay))[0]) == ["delivered"] * 2
    assert [r["price"] for r in table(admin, schema, "viewed_product_4")] == [6.0]
    assert len(table(admin, schema, "tracks")) == 5


def test_an_event_the_database_refuses_fails_alone_and_its_batch_loads(admin, schema):
    # 900 short values make a row wider than PostgreSQL's 8 KB page (SQLSTATE 54000).
    tall = {f"k{j:04d}": f"value-{j:06d}" for j in range(900)}
    batch = [event(n) for n in range(1, 4)] + [event(4, properties=tall)] + [event(5)]
    outcomes = run(warehouse(schema), send(*batch))
    assert states(outcomes[0]) == ["delivered"] * 3 + ["failed", "delivered"]
    assert "54000" in outcomes[0][3].detail and "row is too big" in outcomes[0][3].detail
    assert [r["id"] for r in table(admin, schema, "order_completed", "id")] == [
        "m1", "m2", "m3", "m5"]
    assert [r["id"] for r in table(admin, schema, "tracks", "id")] == ["m1", "m2", "m3", "m5"]
    # The halves did not each add (and roll back) the wide event's 900 columns: they were
    # committed once, before the halving, and recorded once.
    changes = table(admin, schema, "schema_changes", "table_name, column_name",
                    order="table_name, column_name")
    assert len(changes) == len({(r["table_name"], r["column_name"]) for r in changes}) > 900


def test_a_failure_of_the_whole_load_is_not_split(admin, schema, role, caplog):
    # Permission denied is the destination's problem, not an event's: no halving.
    dest = warehouse(schema, f"host=127.0.0.1 port=5432 user={role} dbname=test")
    with caplog.at_level(logging.INFO, logger="trackpipe.warehouse"):
        outcomes = run(dest, send(*[event(n) for n in range(8)]))
    assert states(outcomes[0]) == ["failed"] * 8
    assert "halves" not in caplog.text


def test_sending_a_batch_twice_leaves_one_row_per_message(admin, schema):
    batch = [event(1), event(2), event(2), event(3, "identify", traits={"x": 1})]
    outcomes = run(warehouse(schema), send(*batch), send(*batch))
    assert states(outcomes[1]) == ["delivered"] * 4
    assert [r["id"] for r in table(admin, schema, "tracks", "id")] == ["m1", "m2"]
    assert [r["id"] for r in table(admin, schema, "order_completed", "id")] == ["m1", "m2"]
    assert len(table(admin, schema, "identifies")) == 1 and len(table(admin, schema, "users")) == 1


def test_a_batch_mixing_loaded_and_new_messages_loads_only_the_new_ones(admin, schema):
    # the new-ids-only COPY fails on m2 and must leave nothing behind for the staged load
    first = [event(1, properties={"v": "first"}), event(2, properties={"v": "first"})]
    again = [event(2, properties={"v": "again"}), event(3, properties={"v": "new"})]
    outcomes = run(warehouse(schema), send(*first), send(*again))
    assert states(outcomes[1]) == ["delivered"] * 2
    assert table(admin, schema, "order_completed", "id, v") == [
        {"id": "m1", "v": "first"}, {"id": "m2", "v": "first"}, {"id": "m3", "v": "new"}]
    assert [r["id"] for r in table(admin, schema, "tracks", "id")] == ["m1", "m2", "m3"]


def test_every_kind_of_value_arrives_unchanged(admin, schema):
    text = "tab\there\nnew line\r\\N \\back 'q\" \u00e9\u6ce8\U0001F600"
    props = {"t": True, "f": False, "i": -2**63, "x": 1.5e-300, "neg": -0.0, "s": text,
             "empty": "", "ts": "2024-05-02T08:30:00.123456+02:00", "arr": [1, None, "\t"]}
    run(warehouse(schema), send(event(1, properties=props),
                                event(2, properties={"s": "only", "none": None})))
    columns = "t, f, i, x, neg, s, empty, ts, arr"
    first, second = table(admin, schema, "order_completed", columns)
    assert {k: v for k, v in first.items() if k != "ts"} == {
        "t": True, "f": False, "i": -2**63, "x": 1.5e-300, "neg": -0.0, "s": text, "empty": "",
        "arr": '[1,null,"\\t"]'}
    assert first["ts"].isoformat() == "2024-05-02T06:30:00.123456+00:00"
    assert second == {**dict.fromkeys(columns.split(", ")), "s": "only"}
    assert "none" not in column_types(admin, schema, "order_completed")


def test_users_keep_the_latest_traits_and_older_identifies_do_not_overwrite(admin, schema):
    newer = event(2, "identify", userId="u", traits={"plan": "pro", "email": "a@b.c"})
    older = event(1, "identify", userId="u", traits={"plan": "free", "name": "Ann"})
    later = event(3, "identify", userId="u", traits={"name": "Bo"})
    run(warehouse(schema), send(newer), send(older), send(later))
    assert table(admin, schema, "users", "id, plan, email, name") == [
        {"id": "u", "plan": "pro", "email": "a@b.c", "name": "Bo"}]


def test_identities_map_each_identifier_to_its_current_person(admin, schema):
    run(warehouse(schema), send(event(1, profile="p1", userId="u", anonymousId="a"),
                                event(2, profile=None, userId="v")),
        send(event(3, profile="p2", anonymousId="a", userId=None)))
    rows = table(admin, schema, "identities", "identifier_type, identifier, profile_id",
                 order="identifier")
    assert rows == [{"identifier_type": "anonymous_id", "identifier": "a", "profile_id": "p2"},
                    {"identifier_type": "user_id", "identifier": "u", "profile_id": "p1"}]


def test_unreachable_database_is_worth_a_retry_and_fails_the_check():
    dsn = "host=127.0.0.1 port=1 user=postgres dbname=test connect_timeout=2"
    outcomes, = run(warehouse("x", dsn), send(event(1)))
    assert states(outcomes) == ["retry"] and "unreachable" in outcomes[0].detail
    with pytest.raises(DestinationError, match="dsn"):
        asyncio.run(warehouse("x", dsn).check())


def test_a_dropped_connection_retries_then_reconnects(admin, schema):
    # A name of its own: tests running beside it (other workers) connect as `trackpipe wh`.
    dest = PostgresWarehouse(schema, PostgresWarehouse.Settings(dsn=DSN, schema=schema))

    def kill(d):
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE application_name = %s AND pid <> pg_backend_pid()",
                      (f"trackpipe {schema}",))
        return asyncio.sleep(0.1)
    outcomes = run(dest, send(event(1)), kill, send(event(2)), send(event(2)))
    assert states(outcomes[2]) == ["retry"] and states(outcomes[3]) == ["delivered"]
    assert [r["id"] for r in table(admin, schema, "tracks", "id")] == ["m1", "m2"]


def test_permission_denied_fails_for_good_with_a_hint(admin, schema, role):
    admin.execute(f'CREATE SCHEMA "{schema}"')
    dsn = f"{DSN} user={role}"
    outcomes, = run(warehouse(schema, dsn), send(event(1)))
    assert states(outcomes) == ["failed"]
    assert "42501" in outcomes[0].detail and "grant" in outcomes[0].detail
    with pytest.raises(DestinationError, match="permission denied"):
        asyncio.run(warehouse(schema, dsn).check())


def test_a_table_dropped_behind_its_back_is_retried_then_recreated(admin, schema):
    def drop(d):
        admin.execute(f'DROP TABLE "{schema}"."order_completed"')
        return asyncio.sleep(0)
    outcomes = run(warehouse(schema), send(event(1)), drop, send(event(2)), send(event(2)))
    assert states(outcomes[2]) == ["retry"] and "42P01" in outcomes[2][0].detail
    assert states(outcomes[3]) == ["delivered"]
    assert [r["id"] for r in table(admin, schema, "order_completed", "id")] == ["m2"]


def test_check_creates_the_schema_and_proves_it_can_alter(admin, schema):
    result = asyncio.run(warehouse(schema).check())
    assert schema in result and "create and alter" in result
    assert admin.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    assert not admin.execute("SELECT 1 FROM information_schema.tables WHERE table_schema = %s",
                             (schema,)).fetchone()


def test_delete_user_removes_the_person_everywhere(admin, schema):
    def delete(d):
        return d.delete_user(["u1", "old-x"], ["a1", "a2"])
    outcomes = run(warehouse(schema), send(
        event(1, profile="p1", properties={"big": 2**64}),
        event(2, "identify", profile="p1", userId="u1", traits={"email": "x@y.z"}),
        event(3, "identify", profile="p3"),
        event(4, "alias", previousId="old-x"),
        event(5, "page", userId="u1")), delete, send(event(6)))
    assert outcomes[1].state == "delivered" and "deleted" in outcomes[1].detail
    assert [r["id"] for r in table(admin, schema, "tracks", "id")] == ["m6"]
    assert [r["id"] for r in table(admin, schema, "identifies", "id")] == ["m3"]
    assert [r["id"] for r in table(admin, schema, "users", "id")] == ["u3"]
    assert table(admin, schema, "aliases") == [] and table(admin, schema, "pages") == []
    assert table(admin, schema, "rejected_values", order="message_id") == []
    assert {r["identifier"] for r in table(admin, schema, "identities", "identifier",
                                           order="identifier")} == {"u3", "a3"}


def test_a_privacy_delete_locks_tables_in_the_order_loads_do(admin, schema):
    """A load locks the tables it writes in name order, ACCESS EXCLUSIVE those it alters.
    A delete that took them in its cached order (tables in the order it created them)
    held tracks while waiting for order_completed, which such a load held while waiting
    for tracks: a deadlock, one of the two failing."""
    async def go():
        dest = warehouse(schema)
        load = await psycopg.AsyncConnection.connect(DSN)  # a load altering both tables
        try:
            await dest.send([event(1)])  # creates tracks, then order_completed
            await load.execute(f'LOCK TABLE "{schema}".order_completed'
                               " IN ACCESS EXCLUSIVE MODE")
            delete = asyncio.create_task(dest.delete_user(["u1"], []))
            while not admin.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity"
                                    " WHERE pid = %s", (dest._conn.info.backend_pid,)
                                    ).fetchone()[0]:
                await asyncio.sleep(0.02)
            await load.execute(f'LOCK TABLE "{schema}".tracks IN ACCESS EXCLUSIVE MODE')
            await load.commit()
            return await delete
        finally:
            await load.close()
            await dest.close()
    outcome = asyncio.run(go())
    assert outcome.state == "delivered", outcome.detail
    assert table(admin, schema, "tracks") == table(admin, schema, "order_completed") == []


def test_settings_are_validated_and_the_dsn_is_secret():
    with pytest.raises(msgspec.ValidationError, match="schema must not be empty"):
        msgspec.convert({"dsn": "host=x", "schema": " "}, PostgresWarehouse.Settings)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"dsn": "host=x", "table": "t"}, PostgresWarehouse.Settings)
    with pytest.raises(msgspec.ValidationError, match="at most 1600"):
        msgspec.convert({"dsn": "host=x", "max_columns": 1601}, PostgresWarehouse.Settings)
    with pytest.raises(msgspec.ValidationError, match="at least 20"):
        msgspec.convert({"dsn": "host=x", "max_columns": 10}, PostgresWarehouse.Settings)
    with pytest.raises(msgspec.ValidationError, match="max_tables must be at least 1"):
        msgspec.convert({"dsn": "host=x", "max_tables": 0}, PostgresWarehouse.Settings)
    assert PostgresWarehouse.secret_fields == ("dsn",) and PostgresWarehouse.supports_delete


def test_the_conformance_sink_breaks_and_heals_as_promised(tmp_path, admin):
    from destinations.sink_postgres import Sink  # tests/ is on sys.path (conftest)
    sink = Sink(tmp_path)
    try:
        cfg = sink.config("dest")
        dest = PostgresWarehouse(cfg["name"], msgspec.convert(cfg["settings"],
                                                              PostgresWarehouse.Settings))

        def sink_step(action):
            async def step(d):
                action()
            return step
        outcomes = run(dest, send(event(1)), sink_step(sink.break_), send(event(2)),
                       sink_step(sink.heal), send(event(2)),
                       sink_step(lambda: sink.break_(terminal=True)), send(event(3)),
                       sink_step(sink.heal), send(event(3), event(4, "identify")))
        assert [states(o) for o in outcomes[::2]] == [
            ["delivered"], ["retry"], ["delivered"], ["failed"], ["delivered", "delivered"]]
        assert "42501" in outcomes[6][0].detail
        assert sink.received() == ["m1", "m2", "m3", "m4"]
    finally:
        sink.close()
    assert not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (sink.role,)).fetchone()


SYSTEM_COLUMNS = ("xmin", "xmax", "cmin", "cmax", "ctid", "tableoid")


def test_keys_named_like_system_columns_load_into_prefixed_columns(admin, schema):
    # ADD COLUMN "xmin" fails with 42701, once retried forever: the batch never loaded.
    outcomes = run(warehouse(schema), send(event(1)), send(
        event(2, properties={k: n for n, k in enumerate(SYSTEM_COLUMNS)}),
        event(3, "identify", userId="u3", traits={"ctid": "c", "XMIN": 1}), event(4)))
    assert states(outcomes[1]) == ["delivered"] * 3
    row = table(admin, schema, "order_completed", order="id")[1]
    assert [row[f"properties_{k}"] for k in SYSTEM_COLUMNS] == list(range(6))
    assert table(admin, schema, "users", "traits_ctid, traits_xmin") == [
        {"traits_ctid": "c", "traits_xmin": 1}]
    assert [r["id"] for r in table(admin, schema, "tracks", "id")] == ["m1", "m2", "m4"]


def test_an_event_named_like_a_primary_key_index_gets_a_table_of_its_own(admin, schema):
    # "Tracks Pkey" -> tracks_pkey, the name of tracks' primary key index: refused for good,
    # and with it every event of its batch.
    outcomes = run(warehouse(schema), send(event(1)), send(
        event(2, event="Tracks Pkey"), event(3), event(4, event="Order Completed Pkey")))
    assert states(outcomes[1]) == ["delivered"] * 3
    assert [r["id"] for r in table(admin, schema, "tracks_pkey_table", "id")] == ["m2"]
    assert [r["id"] for r in table(admin, schema, "order_completed_pkey_table", "id")] == ["m4"]


def test_a_column_name_postgresql_refuses_fails_its_event_alone(admin, schema, monkeypatch):
    # Were a name to slip past layout.py, a 42701 (duplicate column) is no race (columns
    # are added IF NOT EXISTS): retrying met it again forever and held up its batch.
    from trackpipe.destinations.warehouse import layout
    monkeypatch.setattr(layout, "SYSTEM_COLUMNS", frozenset())
    monkeypatch.setattr(layout, "_NAMES", {})
    outcomes, = run(warehouse(schema), send(event(1), event(2, properties={"xmin": 1}),
                                            event(3)))
    assert states(outcomes) == ["delivered", "failed", "delivered"]
    assert "42701" in outcomes[1].detail and "system column" in outcomes[1].detail
    assert [r["id"] for r in table(admin, schema, "tracks", "id")] == ["m1", "m3"]


def test_a_date_time_finer_than_a_microsecond_loads_whole_as_text(admin, schema):
    nanos, zeros = "2024-05-01T10:00:00.123456789Z", "2024-05-01T10:00:00.123456000Z"
    run(warehouse(schema), send(event(1, properties={"at": nanos, "ok_at": zeros})),
        send(event(2, properties={"ok_at": nanos})))
    types = column_types(admin, schema, "order_completed")
    assert (types["at"], types["ok_at"]) == ("text", "text")
    assert table(admin, schema, "order_completed", "id, at, ok_at") == [
        {"id": "m1", "at": nanos, "ok_at": "2024-05-01T10:00:00.123456Z"},
        {"id": "m2", "at": None, "ok_at": nanos}]
    assert table(admin, schema, "rejected_values", order="message_id") == []


def test_widening_to_double_keeps_the_exact_integers_it_rounds(admin, schema):
    big = {1: 2**53 + 1, 2: -2**63, 3: 2**53, 4: -2**53 - 1, 5: 7}
    first = [event(n, properties={"n": v}) for n, v in big.items()] + [
        event(6, "identify", userId="big", traits={"n": 2**60 + 1}),
        event(7, properties={"firstName": 2**60 + 3, "first_name": 7})]
    later = [event(8, properties={"n": 1.5, "first_name": 0.5}),
             event(9, "identify", userId="other", traits={"n": 0.5})]

    def delete_big(d):
        return d.delete_user(["big"], [])
    outcomes = run(warehouse(schema), send(*first), send(*later))
    assert states(outcomes[1]) == ["delivered"] * 2
    assert column_types(admin, schema, "users")["n"] == "double precision"
    assert table(admin, schema, "order_completed", "id, n")[0] == {"id": "m1", "n": 2.0**53}
    rejected = table(admin, schema, "rejected_values",
                     order="table_name, column_name, message_id")
    assert [(r["table_name"], r["column_name"], r["message_id"], r["value"])
            for r in rejected] == [
        ("identifies", "n", "m6", str(2**60 + 1)),
        ("order_completed", "first_name", "m7", str(2**60 + 3)),
        ("order_completed", "n", "m1", str(2**53 + 1)),
        ("order_completed", "n", "m2", str(-2**63)),
        ("order_completed", "n", "m4", str(-2**53 - 1)),
        ("users", "n", "big", str(2**60 + 1))]
    assert all("rounded" in r["reason"] and "widened from bigint to double" in r["reason"]
               and r["rejected_at"] for r in rejected)
    assert "its userId" in rejected[-1]["reason"]
    # m7's second key for first_name was rejected when it loaded: that value stays known
    assert "value 7 was rejected" in rejected[1]["reason"]
    assert "two keys" in rejected[1]["reason"]
    run(warehouse(schema), delete_big)
    assert {r["message_id"] for r in table(admin, schema, "rejected_values",
                                           order="message_id")} == {
        "m1", "m2", "m4", "m7"}


def test_an_over_long_message_id_loads_under_a_stand_in_and_is_kept_whole(admin, schema):
    # PostgreSQL cannot index a key past ~2.7 KB (54000): such an event never loaded.
    import hashlib
    long_id = "".join(hashlib.sha256(str(n).encode()).hexdigest() for n in range(50))
    batch = [event(1, messageId=long_id, properties={"a": 1}),
             event(2, "identify", messageId=long_id[::-1], traits={"t": 1}), event(3)]
    outcomes = run(warehouse(schema), send(*batch), send(*batch))
    assert [states(o) for o in outcomes] == [["delivered"] * 3] * 2
    tracks = [r["id"] for r in table(admin, schema, "tracks", "id", order="length(id)")]
    assert tracks[0] == "m3" and tracks[1].startswith(long_id[:64] + "...sha256:")
    assert len(tracks) == 2 and len(table(admin, schema, "order_completed")) == 2
    assert len(table(admin, schema, "identifies")) == 1
    rejected = table(admin, schema, "rejected_values", order="table_name")
    assert [(r["table_name"], r["column_name"], r["value"]) for r in rejected] == [
        ("identifies", "id", long_id[::-1]), ("tracks", "id", long_id)]
    assert rejected[1]["message_id"] == tracks[1] and "3,200 bytes" in rejected[1]["reason"]


def test_an_over_long_user_id_gets_a_stand_in_users_row_and_is_kept_whole(admin, schema):
    # users.id is a key: a userId past ~2.7 KB failed the identify (index row too large).
    long_user = "u" * 3000
    batch = [event(1, "identify", userId=long_user, traits={"plan": "pro"}), event(2)]
    outcomes = run(warehouse(schema), send(*batch), send(*batch))
    assert [states(o) for o in outcomes] == [["delivered"] * 2] * 2
    [user] = table(admin, schema, "users", "id, plan")
    assert user["id"].startswith("u" * 64 + "...sha256:") and user["plan"] == "pro"
    assert table(admin, schema, "identifies", "user_id") == [{"user_id": long_user}]
    [kept] = table(admin, schema, "rejected_values", order="table_name")
    assert (kept["table_name"], kept["column_name"], kept["message_id"], kept["value"]) == (
        "users", "id", "m1", long_user)
    assert "3,000 bytes" in kept["reason"]


def test_a_users_table_named_like_a_staging_table_is_left_alone(admin, schema):
    """The staging tables are temporary: their names are looked up in pg_temp only. An
    unqualified DROP TABLE IF EXISTS of one that this session had not made yet fell
    through the search path to a table of the user's of that name, and dropped it."""
    import hashlib
    name = "_trackpipe_stage_" + hashlib.sha1(b"identities (meta)").hexdigest()[:16]
    admin.execute(f'CREATE SCHEMA "{schema}"')
    admin.execute(f'CREATE TABLE "{schema}"."{name}" (keep text)')
    admin.execute(f"""INSERT INTO "{schema}"."{name}" VALUES ('mine')""")
    on_path = f"{DSN} options='-csearch_path={schema}'"
    outcomes, = run(warehouse(schema, on_path), send(event(1, profile="p1"),
                                                     event(2, profile="p2")))
    assert states(outcomes) == ["delivered", "delivered"]
    assert [r["keep"] for r in table(admin, schema, name, order="keep")] == ["mine"]
    assert [r["id"] for r in table(admin, schema, "tracks")] == ["m1", "m2"]
    assert len(table(admin, schema, "identities", order="identifier")) >= 2
