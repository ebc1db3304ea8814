"""The duckdb warehouse destination: same layout and policy, one embedded file."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
import uuid

import duckdb
import msgspec
import pytest

from delivery.faulty_rig import api
from destinations.sink_webhook import Sink as WebhookSink
from destinations.test_warehouse_schema import joined
from support import wait_for, write_config
from trackpipe.destinations.base import DestinationError, Event
from trackpipe.destinations.warehouse import duckdb as module
from trackpipe.destinations.warehouse.duckdb import DuckDBWarehouse


def warehouse(path) -> DuckDBWarehouse:
    return DuckDBWarehouse("wh", DuckDBWarehouse.Settings(path=str(path)))


def run(dest, *steps):
    async def go():
        return [await step(dest) for step in steps]
    return asyncio.run(go())


def send(*events):
    return lambda d: d.send(list(events))


def event(n: int, type_: str = "track", profile: str | None = None, **fields) -> Event:
    message = {"type": type_, "messageId": f"m{n}", "userId": f"u{n}", "anonymousId": f"a{n}",
               "receivedAt": f"2024-05-01T10:00:{n % 60:02d}.000Z",
               "context": {"ip": "203.0.113.7", "page": {"path": "/x"}}, **fields}
    if type_ == "track":
        message.setdefault("event", "Order Completed")
    return Event(n, message["messageId"], message, profile, None, None,
                 identities=joined(message, profile))


def query(path, sql):
    with duckdb.connect(str(path), read_only=True) as con:  # works only if the file is free
        cur = con.execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def types(path, table):
    return {r["column_name"]: r["data_type"] for r in query(
        path, f"SELECT column_name, data_type FROM information_schema.columns"
              f" WHERE table_name = '{table}'")}


def states(outcomes):
    return [o.state for o in outcomes]


@pytest.fixture
def db(tmp_path):
    return tmp_path / "nested" / "warehouse.duckdb"


def test_layout_for_each_message_type_and_the_file_is_free_after_each_load(db):
    outcomes, = run(warehouse(db), send(
        event(1, properties={"revenue": 9.5, "shipped": "2024-05-02T08:30:00Z"}),
        event(2, "identify", traits={"email": "a@b.c", "address": {"city": "Oslo"}}),
        event(3, "page", name="Home", properties={"title": "Shop"}),
        event(4, "screen", name="Cart"), event(5, "group", groupId="g1", traits={"plan": "pro"}),
        event(6, "alias", previousId="old")))
    assert states(outcomes) == ["delivered"] * 6
    assert query(db, "SELECT id, event, event_text, context_page_path FROM tracks") == [
        {"id": "m1", "event": "order_completed", "event_text": "Order Completed",
         "context_page_path": "/x"}]
    assert query(db, "SELECT revenue FROM order_completed") == [{"revenue": 9.5}]
    assert types(db, "order_completed")["shipped"] == "TIMESTAMP WITH TIME ZONE"
    assert query(db, "SELECT email, address_city FROM identifies") == [
        {"email": "a@b.c", "address_city": "Oslo"}]
    assert query(db, "SELECT id, email FROM users") == [{"id": "u2", "email": "a@b.c"}]
    assert query(db, "SELECT name, title FROM pages") == [{"name": "Home", "title": "Shop"}]
    assert query(db, "SELECT name FROM screens") == [{"name": "Cart"}]
    assert query(db, "SELECT group_id, plan FROM groups") == [{"group_id": "g1", "plan": "pro"}]
    assert query(db, "SELECT previous_id FROM aliases") == [{"previous_id": "old"}]


@pytest.mark.parametrize("first, later, new_type, stored", [
    (1, 2.5, "DOUBLE", [1.0, 2.5]),
    (True, 3, "VARCHAR", ["true", "3"]),
    ("2024-05-01T10:00:00Z", "soon", "VARCHAR", ["2024-05-01T10:00:00.000000Z", "soon"]),
])
def test_widening_keeps_every_value_and_is_recorded(db, first, later, new_type, stored):
    run(warehouse(db), send(event(1, properties={"v": first})),
        send(event(2, properties={"v": later})))
    assert types(db, "order_completed")["v"] == new_type
    assert [r["v"] for r in query(db, "SELECT v FROM order_completed ORDER BY id")] == stored
    change = query(db, 'SELECT old_type, new_type, message_id FROM schema_changes'
                       " WHERE column_name = 'v' ORDER BY \"at\"")
    assert change[-1]["new_type"] == new_type and change[-1]["message_id"] == "m2"


def test_rejected_values_and_the_rest_of_the_row(db):
    run(warehouse(db), send(event(1, properties={"n": 2**64, "ok": "yes"})))
    assert query(db, "SELECT ok FROM order_completed") == [{"ok": "yes"}]
    assert query(db, "SELECT column_name, message_id, value FROM rejected_values") == [
        {"column_name": "n", "message_id": "m1", "value": str(2**64)}]


def test_a_table_stops_growing_at_max_columns(db):
    dest = DuckDBWarehouse("wh", DuckDBWarehouse.Settings(path=str(db), max_columns=20))
    many = {f"p{j:02d}": j for j in range(30)}
    assert states(run(dest, send(event(1, properties=many)))[0]) == ["delivered"]
    columns = types(db, "order_completed")
    assert len(columns) == 20
    rejected = query(db, "SELECT column_name, reason FROM rejected_values ORDER BY 1")
    assert [r["column_name"] for r in rejected] == [c for c in many if c not in columns]
    assert all("max_columns" in r["reason"] for r in rejected)


def test_event_tables_stop_at_max_tables_and_the_rows_they_would_hold_are_kept(db):
    dest = DuckDBWarehouse("wh", DuckDBWarehouse.Settings(path=str(db), max_tables=2))
    batch = [event(n, event=f"Viewed /product/{n % 3}", properties={"n": n}) for n in range(6)]
    assert states(run(dest, send(*batch))[0]) == ["delivered"] * 6
    tables = {r["table_name"]
              for r in query(db, "SELECT table_name FROM information_schema.tables")}
    assert {"viewed_product_0", "viewed_product_1"} <= tables and "viewed_product_2" not in tables
    assert [r["id"] for r in query(db, "SELECT id FROM tracks ORDER BY id")] == [
        f"m{n}" for n in range(6)]  # every event is in tracks
    rejected = query(db, "SELECT table_name, column_name, message_id, value, reason"
                         " FROM rejected_values ORDER BY message_id")
    assert [(r["table_name"], r["column_name"], r["message_id"]) for r in rejected] == [
        ("viewed_product_2", "*", "m2"), ("viewed_product_2", "*", "m5")]
    assert json.loads(rejected[0]["value"])["n"] == 2
    assert "max_tables" in rejected[0]["reason"] and "Viewed /product/2" in rejected[0]["reason"]
    # A known event's table still takes rows, and a later batch still cannot add one.
    more = [event(7, event="Viewed /product/1"), event(8, event="Signed Up")]
    assert states(run(dest, send(*more))[0]) == ["delivered"] * 2
    assert [r["id"] for r in query(db, "SELECT id FROM viewed_product_1 ORDER BY id")] == [
        "m1", "m4", "m7"]
    assert query(db, "SELECT count(*) AS n FROM rejected_values WHERE table_name = 'signed_up'"
                 ) == [{"n": 1}]


def test_an_event_the_database_refuses_fails_alone(db, monkeypatch, caplog):
    real = DuckDBWarehouse._apply

    async def refuse_m3(self, todo):
        if any(row[0] == "m3" for load in todo.loads for row in load.rows):
            raise duckdb.ConversionException("Conversion Error: m3 will not load")
        return await real(self, todo)
    monkeypatch.setattr(DuckDBWarehouse, "_apply", refuse_m3)
    with caplog.at_level(logging.INFO, logger="trackpipe.warehouse"):
        outcomes = run(warehouse(db), send(*[event(n) for n in range(1, 7)]))[0]
    assert states(outcomes) == ["delivered"] * 2 + ["failed"] + ["delivered"] * 3
    assert "m3 will not load" in outcomes[2].detail
    assert [r["id"] for r in query(db, "SELECT id FROM tracks ORDER BY id")] == [
        "m1", "m2", "m4", "m5", "m6"]
    assert "loading the batch of 6 in halves" in caplog.text


def test_idempotent_on_message_id_and_identities_upserted(db):
    batch = [event(1, profile="p1"), event(2, profile="p1"), event(1, profile="p1")]
    outcomes = run(warehouse(db), send(*batch), send(*batch),
                   send(event(3, profile="p2", anonymousId="a1", userId=None)))
    assert states(outcomes[1]) == ["delivered"] * 3
    assert query(db, "SELECT id FROM tracks ORDER BY id") == [
        {"id": "m1"}, {"id": "m2"}, {"id": "m3"}]
    rows = query(db, "SELECT identifier, profile_id FROM identities ORDER BY identifier")
    assert rows == [
        {"identifier": "a1", "profile_id": "p2"}, {"identifier": "a2", "profile_id": "p1"},
        {"identifier": "u1", "profile_id": "p1"}, {"identifier": "u2", "profile_id": "p1"}]


def test_a_file_held_by_another_process_is_retried(db, monkeypatch):
    run(warehouse(db), send(event(1)))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({str(db)!r})
        print("held", flush=True)
        sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(module, "LOCK_WAIT_SECONDS", 0.3)
        outcomes, = run(warehouse(db), send(event(2)))
    finally:
        holder.communicate("\n", timeout=10)
    assert states(outcomes) == ["retry"] and "another process" in outcomes[0].detail
    outcomes, = run(warehouse(db), send(event(2)))
    assert states(outcomes) == ["delivered"]


def query_between_loads(path, sql):
    """`query`, as a person does while trackpipe runs: an open that meets a load (the
    file is locked for its length) is tried again."""
    def attempt():
        try:
            return [query(path, sql)]
        except duckdb.IOException as exc:
            assert "Could not set lock" in str(exc)
            return None
    return wait_for(attempt, what="a gap between loads")[0]


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "read-write"])
def test_a_person_holding_the_file_open_delays_loads_and_nothing_else(
        fresh_server, tmp_path, read_only):
    db, hook = tmp_path / "analytics.duckdb", WebhookSink(tmp_path / "hook")
    fast = {"retry_initial_seconds": 0.2, "retry_max_delay_seconds": 0.5}
    config = write_config(tmp_path / "trackpipe.toml", [
        {"name": "wh", "type": "duckdb", **fast, "settings": {"path": str(db)}},
        {**hook.config("hook"), **fast}])
    server = fresh_server(config=config).start()

    def send(n):
        ids = [f"e-{uuid.uuid4().hex}" for _ in range(n)]
        batch = [{"type": "track", "event": "Order Completed", "userId": f"user-{i}",
                  "messageId": i} for i in ids]
        assert server.post("/v1/batch", {"batch": batch}).status_code == 200
        return ids

    def loaded():
        return [r["id"] for r in query_between_loads(db, "SELECT id FROM tracks")]

    def wh():
        return api(server, "/api/v1/destinations/wh").json()
    try:
        before = send(5)
        wait_for(lambda: wh()["delivered"] == 5, what="the first events loaded")
        assert sorted(loaded()) == sorted(before)
        held = duckdb.connect(str(db), read_only=read_only)  # a person's session
        try:
            during = send(10)
            wait_for(lambda: set(during) <= set(hook.received()),
                     what="the webhook delivering while the file is held")
            wait_for(lambda: api(server, f"/api/v1/profiles/user-{during[-1]}").status_code
                     == 200, what="identity resolving while the file is held")
            wait_for(lambda: wh()["retries"] >= len(during), what="loads retried")
            assert wh()["failed"] == 0 and wh()["pending"] == len(during)
            assert sorted(r[0] for r in held.execute("SELECT id FROM tracks").fetchall()
                          ) == sorted(before)  # the session queries all along
        finally:
            held.close()
        wait_for(lambda: wh()["pending"] == 0, what="the held-back events loaded")
        assert sorted(loaded()) == sorted(before + during)  # each once
        assert wh()["failed"] == 0
        assert sorted(hook.received()) == sorted(before + during)
    finally:
        hook.close()


def test_a_file_that_is_not_a_database_fails_for_good(tmp_path):
    path = tmp_path / "notes.duckdb"
    path.write_text("these are my notes, not a database\n" * 200)
    outcomes, = run(warehouse(path), send(event(1)))
    assert states(outcomes) == ["failed"] and "path setting" in outcomes[0].detail
    with pytest.raises(DestinationError, match="path setting"):
        asyncio.run(warehouse(path).check())


def test_check_and_delete_user(db):
    assert "can create and alter" in asyncio.run(warehouse(db).check())
    outcomes = run(warehouse(db), send(event(1, profile="p"), event(2, "identify", profile="p"),
                                       event(3, properties={"n": 2**64}), event(4, "alias",
                                                                                previousId="u1")),
                   lambda d: d.delete_user(["u1", "u2"], ["a1", "a2", "a3"]))
    assert outcomes[1].state == "delivered"
    assert query(db, "SELECT id FROM tracks") == [] and query(db, "SELECT id FROM users") == []
    assert query(db, "SELECT id FROM aliases") == [] and query(db, "SELECT * FROM identities") == []
    assert query(db, "SELECT * FROM rejected_values") == []


def test_settings():
    with pytest.raises(msgspec.ValidationError, match="database file"):
        msgspec.convert({"path": ":memory:"}, DuckDBWarehouse.Settings)
    with pytest.raises(msgspec.ValidationError, match="at least 20"):
        msgspec.convert({"path": "a.duckdb", "max_columns": 5}, DuckDBWarehouse.Settings)
    with pytest.raises(msgspec.ValidationError, match="max_tables must be at least 1"):
        msgspec.convert({"path": "a.duckdb", "max_tables": 0}, DuckDBWarehouse.Settings)
    assert DuckDBWarehouse.supports_delete and DuckDBWarehouse.default_batch_size == 2000


def test_the_conformance_sink_breaks_and_heals_as_promised(tmp_path, monkeypatch):
    from destinations.sink_duckdb import Sink  # tests/ is on sys.path (conftest)
    monkeypatch.setattr(module, "LOCK_WAIT_SECONDS", 0.3)
    sink = Sink(tmp_path / "sink")
    cfg = sink.config("dest")
    dest = DuckDBWarehouse(cfg["name"], msgspec.convert(cfg["settings"], DuckDBWarehouse.Settings))

    def sink_step(action):
        async def step(d):
            action()
        return step
    try:
        outcomes = run(dest, send(event(1)), sink_step(sink.break_), send(event(2)),
                       sink_step(sink.heal), send(event(2)),
                       sink_step(lambda: sink.break_(terminal=True)), send(event(3)),
                       sink_step(sink.heal), send(event(3), event(4, "identify")))
        assert [states(o) for o in outcomes[::2]] == [
            ["delivered"], ["retry"], ["delivered"], ["failed"], ["delivered", "delivered"]]
        assert sink.received() == ["m1", "m2", "m3", "m4"]
    finally:
        sink.close()


def test_keys_named_like_postgres_system_columns_get_the_columns_postgres_gets(db):
    # DuckDB takes a column named xmin, PostgreSQL does not; one layout serves both.
    run(warehouse(db), send(event(1, properties={"xmin": 1, "ctid": "c", "tableoid": 2.5})))
    columns = types(db, "order_completed")
    assert {"properties_xmin", "properties_ctid", "properties_tableoid"} <= set(columns)
    assert not {"xmin", "ctid", "tableoid"} & set(columns)
    assert query(db, "SELECT properties_xmin, properties_ctid FROM order_completed") == [
        {"properties_xmin": 1, "properties_ctid": "c"}]


def test_a_date_time_finer_than_a_microsecond_loads_whole_as_text(db):
    nanos = "2024-05-01T10:00:00.123456789Z"
    run(warehouse(db), send(event(1, properties={"at": nanos})))
    assert types(db, "order_completed")["at"] == "VARCHAR"
    assert query(db, "SELECT \"at\" FROM order_completed") == [{"at": nanos}]


def test_widening_to_double_keeps_the_exact_integers_it_rounds(db):
    first = [event(1, properties={"n": 2**53 + 1}), event(2, properties={"n": -2**63}),
             event(3, properties={"n": 2**53}),
             event(4, "identify", userId="big", traits={"n": 2**60 + 1}),
             event(5, properties={"firstName": 2**60 + 3, "first_name": 7})]
    later = [event(6, properties={"n": 1.5, "first_name": 0.5}),
             event(7, "identify", userId="other", traits={"n": 0.5})]
    outcomes = run(warehouse(db), send(*first), send(*later))
    assert states(outcomes[1]) == ["delivered"] * 2
    assert types(db, "users")["n"] == "DOUBLE"
    rejected = query(db, "SELECT * FROM rejected_values"
                         " ORDER BY table_name, column_name, message_id")
    assert [(r["table_name"], r["column_name"], r["message_id"], r["value"])
            for r in rejected] == [
        ("identifies", "n", "m4", str(2**60 + 1)),
        ("order_completed", "first_name", "m5", str(2**60 + 3)),
        ("order_completed", "n", "m1", str(2**53 + 1)),
        ("order_completed", "n", "m2", str(-2**63)),
        ("users", "n", "big", str(2**60 + 1))]
    assert all("rounded" in r["reason"] and r["rejected_at"] for r in rejected)
    assert "value 7 was rejected" in rejected[1]["reason"]
    run(warehouse(db), lambda d: d.delete_user(["big"], []))
    assert {r["message_id"] for r in query(db, "SELECT message_id FROM rejected_values")} == {
        "m1", "m2", "m5"}


def test_delete_user_finds_an_id_with_a_nul_kept_whole_in_identities_before(db):
    # before stand-ins keyed identities, DuckDB kept such an id whole there; a delete
    # looking only for the stand-in left that row, which names the person
    run(warehouse(db), send(event(1, profile="p1", anonymousId="a\x00z")))
    with duckdb.connect(str(db)) as con:
        con.execute("INSERT INTO identities VALUES ('anonymous_id', 'a' || chr(0) || 'z',"
                    " 'p1', now())")
    assert len(query(db, "SELECT * FROM identities WHERE identifier_type = 'anonymous_id'"
                     )) == 2  # under its stand-in, and whole
    outcome, = run(warehouse(db), lambda d: d.delete_user([], ["a\x00z"]))
    assert outcome.state == "delivered"
    assert query(db, "SELECT identifier FROM identities WHERE identifier_type = 'anonymous_id'"
                 ) == []


def test_an_over_long_message_id_loads_under_the_stand_in_postgres_needs(db):
    long_id = "x" * 3000
    outcomes = run(warehouse(db), send(event(1, messageId=long_id), event(2)),
                   send(event(1, messageId=long_id)))
    assert [states(o) for o in outcomes] == [["delivered"] * 2, ["delivered"]]
    ids = [r["id"] for r in query(db, "SELECT id FROM tracks ORDER BY length(id)")]
    assert ids[0] == "m2" and ids[1].startswith("x" * 64 + "...sha256:") and len(ids) == 2
    assert query(db, "SELECT table_name, column_name, message_id, value FROM rejected_values"
                 ) == [{"table_name": "tracks", "column_name": "id", "message_id": ids[1],
                        "value": long_id}]
