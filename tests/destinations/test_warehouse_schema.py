"""Names, flattening, the type policy and the layout, without a database."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from trackpipe.destinations.base import DELIVERED, Event
from trackpipe.destinations.warehouse import layout
from trackpipe.destinations.warehouse import schema as s
from trackpipe.destinations.warehouse.plan import TABLE, plan, rejected_rows

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def joined(message: dict, profile: str | None) -> dict[tuple[str, str], str]:
    """Identity's answer for an event whose userId and anonymousId are both in `profile`
    (Event.identities); nothing without a profile."""
    ids = [("user_id", message.get("userId")), ("anonymous_id", message.get("anonymousId"))]
    return {(kind, value): profile for kind, value in ids
            if profile and isinstance(value, str) and value}


def event(message: dict, profile: str | None = None, n: int = 1) -> Event:
    message = {"messageId": f"m{n}", "receivedAt": "2024-05-01T10:00:00.000Z", **message}
    return Event(n, message["messageId"], message, profile, None, None,
                 identities=joined(message, profile))


@pytest.mark.parametrize("raw, name", [
    ("Order Completed", "order_completed"), ("firstName", "first_name"),
    ("HTTPServer", "http_server"), ("userID", "user_id"),
    ("context_page_path", "context_page_path"),
    ("Crème brûlée", "creme_brulee"), ("3d view", "_3d_view"), ("a--b  c", "a_b_c"),
    ('drop"table', "drop_table"),
])
def test_identifiers_are_snake_case_and_safe(raw, name):
    assert s.identifier(raw) == name


def test_long_and_non_ascii_names_stay_distinct_and_fit_postgres():
    a, b = s.identifier("x" * 80 + "a"), s.identifier("x" * 80 + "b")
    assert a != b and len(a.encode()) == len(b.encode()) == 63
    assert s.identifier("注文") != s.identifier("顧客") and s.identifier("注文").startswith("_")


def test_flattening_joins_nested_keys_keeps_arrays_as_json_and_skips_nulls():
    p = plan([event({"type": "track", "event": "x",
                     "properties": {"a": {"b": {"c": 1}, "d": [1, 2]}, "e": {}, "f": None}})],
             {}, NOW)
    x = p.loads[1]
    dynamic = [(c, t) for c, t in x.columns if c not in dict(p.loads[0].columns)]
    assert dynamic == [("a_b_c", s.BIGINT), ("a_d", s.TEXT), ("e", s.TEXT)]
    assert x.rows[0][-3:] == (1, "[1,2]", "{}")


@pytest.mark.parametrize("value, kind", [
    (True, s.BOOLEAN), (3, s.BIGINT), (2.5, s.DOUBLE), ("hi", s.TEXT), ([1], s.JSON),
    ({"a": 1}, s.JSON), ("2024-05-01T10:00:00Z", s.TIMESTAMP),
    ("2024-05-01T10:00:00.123456000+02:00", s.TIMESTAMP), ("2024-05-01 10:00", s.TIMESTAMP),
    ("2024-05-01", s.TEXT), ("2024-13-01T10:00:00Z", s.TEXT), ("10:00 2024-05-01T", s.TEXT),
])
def test_value_kinds(value, kind):
    assert s.typed(value)[0] == kind


@pytest.mark.parametrize("value", [
    "2024-05-01T10:00:00.123456789Z", "2024-05-01T10:00:00.1234567+02:00",
    "2024-05-01 10:00:00.000000001"])
def test_a_date_time_finer_than_a_microsecond_is_text_kept_whole(value):
    # A timestamp column holds microseconds: the digits past them would be dropped.
    assert s.parse_timestamp(value) is None
    assert s.typed(value) == (s.TEXT, value, value)
    p = plan([event({"type": "track", "event": "x", "timestamp": value,
                     "properties": {"at": value}})], {}, NOW)
    x = p.loads[1]
    assert dict(x.columns)["at"] == s.TEXT and x.rows[0][-1] == value
    assert [(r.column, r.value, r.reason) for r in p.rejected] == [
        ("timestamp", value, "not an ISO-8601 date-time exact to the microsecond")]


def test_zeros_past_the_microsecond_still_make_a_timestamp():
    assert s.typed("2024-05-01T10:00:00.123456000Z")[1] == dt.datetime(
        2024, 5, 1, 10, 0, 0, 123456, tzinfo=dt.timezone.utc)


def test_timestamps_load_as_aware_utc_datetimes():
    assert s.typed("2024-05-01T12:00:00+02:00")[1] == dt.datetime(2024, 5, 1, 10,
                                                                   tzinfo=dt.timezone.utc)
    assert s.typed("2024-05-01T10:00:00")[1].tzinfo == dt.timezone.utc  # naive means UTC


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, float("nan"), float("inf"), "a\x00b"])
def test_values_no_column_can_hold_are_rejected_with_a_reason(value):
    got = s.typed(value)
    assert isinstance(got, s.Rejected) and got.reason and got.value is value


@pytest.mark.parametrize("current, kind, result", [
    (None, s.BIGINT, s.BIGINT), (s.BIGINT, s.DOUBLE, s.DOUBLE), (s.DOUBLE, s.BIGINT, s.DOUBLE),
    (s.DOUBLE, s.TEXT, s.TEXT), (s.BIGINT, s.TEXT, s.TEXT), (s.BOOLEAN, s.BIGINT, s.TEXT),
    (s.TIMESTAMP, s.TEXT, s.TEXT), (s.TIMESTAMP, s.BIGINT, s.TEXT), (s.TEXT, s.BOOLEAN, s.TEXT),
    (s.BIGINT, s.JSON, s.TEXT), (None, s.JSON, s.TEXT),
])
def test_widening_never_narrows(current, kind, result):
    assert s.widen(current, kind) == result


def test_conversions_into_wider_columns():
    assert s.convert(3, s.BIGINT, 3, s.DOUBLE) == 3.0
    assert s.convert(True, s.BOOLEAN, True, s.TEXT) == "true"
    assert s.convert(2.5, s.DOUBLE, 2.5, s.TEXT) == "2.5"
    assert s.convert({"a": [1]}, s.JSON, {"a": [1]}, s.TEXT) == '{"a":[1]}'
    stamp = "2024-05-01T10:00:00.5Z"
    assert s.convert(stamp, s.TIMESTAMP, s.typed(stamp)[1], s.TEXT) == stamp  # as sent
    assert isinstance(s.convert(2**53 + 1, s.BIGINT, 2**53 + 1, s.DOUBLE), s.Rejected)


def test_track_makes_a_tracks_row_and_an_event_table_row():
    p = plan([event({"type": "track", "event": "Order Completed", "userId": "u1",
                     "context": {"ip": "1.2.3.4", "page": {"path": "/x"}},
                     "properties": {"revenue": 9.5, "id": "p-1", "context_ip": "x",
                                    "timestamp": 5}})], {}, NOW)
    tables = {load.table: dict(zip([c for c, _ in load.columns], load.rows[0])) for load in p.loads}
    assert set(tables) == {"tracks", "order_completed"}
    row = tables["order_completed"]
    assert row["id"] == "m1" and row["event"] == "order_completed"
    assert row["event_text"] == "Order Completed" and row["context_page_path"] == "/x"
    assert row["revenue"] == 9.5 and "revenue" not in tables["tracks"]
    # properties that clash with common or context columns keep their own column
    assert row["properties_id"] == "p-1" and row["properties_context_ip"] == "x"
    assert row["properties_timestamp"] == 5 and row["context_ip"] == "1.2.3.4"
    assert [(c.table, c.new_type) for c in p.changes if c.column is None] == [
        ("tracks", TABLE), ("order_completed", TABLE)]


SYSTEM = ("xmin", "xmax", "cmin", "cmax", "ctid", "tableoid")


def test_keys_naming_a_postgres_system_column_are_prefixed_in_every_table():
    # PostgreSQL refuses to add a column of these names (42701), which was retried forever.
    p = plan([event({"type": "track", "event": "x", "properties": {k: 1 for k in SYSTEM},
                     "context": {"xmin": 2}}),
              event({"type": "identify", "userId": "u", "traits": {"XMIN": 3, "ymin": 4}}, n=2),
              event({"type": "page", "properties": {"ctid": "x"}}, n=3)], {}, NOW)
    columns = {load.table: {c for c, _ in load.columns} for load in p.loads}
    assert {f"properties_{k}" for k in SYSTEM} <= columns["x"]
    assert not set(SYSTEM) & set().union(*columns.values())
    assert "context_xmin" in columns["tracks"]
    assert {"traits_xmin", "ymin"} <= columns["identifies"]
    assert {"traits_xmin", "ymin"} <= columns["users"]
    assert "properties_ctid" in columns["pages"]
    assert not p.rejected


def test_a_message_id_too_long_to_index_gets_a_stand_in_and_is_kept_whole():
    long_ids = ["x" * 2001, "x" * 2000 + "y", "é" * 1001]  # bytes: 2001, 2001, 2002
    fits = ["x" * 2000, "é" * 1000]
    batch = [event({"type": "track", "event": "x", "messageId": m, "properties": {"a": 1}},
                   n=n) for n, m in enumerate(long_ids + fits)]
    p = plan(batch, {}, NOW)
    assert [o.state for o in p.outcomes(DELIVERED)] == ["delivered"] * 5
    ids = [row[0] for row in p.loads[1].rows]
    assert ids[3:] == fits  # up to the limit, the messageId itself
    for stand_in, whole in zip(ids, long_ids):
        assert stand_in == layout.row_id(whole) and stand_in.startswith(whole[:64] + "...sha256:")
        assert len(stand_in.encode()) <= layout.MAX_ID_BYTES
    assert len(set(ids)) == 5 and [row[0] for row in p.loads[0].rows] == ids
    rejected = sorted(p.rejected, key=lambda r: long_ids.index(r.value))
    assert [(r.table, r.column, r.message_id, r.value) for r in rejected] == [
        ("tracks", "id", i, m) for i, m in zip(ids, long_ids)]
    assert "2,001 bytes, more than the 2,000" in rejected[0].reason
    again = plan(batch, p.schema, NOW)  # a replay finds the same rows
    assert [row[0] for row in again.loads[1].rows] == ids


def test_event_names_that_clash_with_layout_tables_are_prefixed():
    p = plan([event({"type": "track", "event": "Users"})], {}, NOW)
    assert [load.table for load in p.loads] == ["tracks", "_users"]


@pytest.mark.parametrize("message, table, column, value", [
    ({"type": "page", "name": "Home", "properties": {"path": "/"}}, "pages", "path", "/"),
    ({"type": "screen", "name": "Home", "properties": {"x": 1}}, "screens", "name", "Home"),
    ({"type": "group", "groupId": "g1", "traits": {"plan": "pro"}}, "groups", "plan", "pro"),
    ({"type": "alias", "previousId": "old", "userId": "new"}, "aliases", "previous_id", "old"),
    ({"type": "identify", "userId": "u", "traits": {"email": "a@b.c"}}, "identifies", "email",
     "a@b.c"),
])
def test_each_message_type_has_its_table(message, table, column, value):
    p = plan([event(message)], {}, NOW)
    load = next(load for load in p.loads if load.table == table)
    assert dict(zip([c for c, _ in load.columns], load.rows[0]))[column] == value


def test_identifies_in_one_batch_merge_into_one_users_row_latest_wins():
    p = plan([event({"type": "identify", "userId": "u", "receivedAt": "2024-05-01T10:00:02Z",
                     "traits": {"plan": "pro"}}, n=2),
              event({"type": "identify", "userId": "u", "receivedAt": "2024-05-01T10:00:01Z",
                     "traits": {"plan": "free", "email": "a@b.c"}}, n=1)], {}, NOW)
    users = next(load for load in p.loads if load.table == "users")
    assert len(users.rows) == 1 and users.upsert
    row = dict(zip([c for c, _ in users.columns], users.rows[0]))
    assert row["plan"] == "pro" and row["email"] == "a@b.c"


def test_two_keys_for_one_column_keep_the_first_and_reject_the_second():
    p = plan([event({"type": "identify", "userId": "u",
                     "traits": {"firstName": "Ann", "first_name": "Bob"}})], {}, NOW)
    identifies = next(load for load in p.loads if load.table == "identifies")
    assert dict(zip([c for c, _ in identifies.columns], identifies.rows[0]))["first_name"] == "Ann"
    assert [(r.table, r.column, r.value) for r in p.rejected] == [
        ("identifies", "first_name", "Bob")]


def test_every_value_rejected_for_one_column_is_kept_and_a_repeat_adds_none():
    message = {"type": "track", "event": "x", "properties": {
        "firstName": "A", "first_name": "B", "First Name": "C", "s": "a\x00", "S": "b\x00"}}
    p = plan([event(message), event(message)], {}, NOW)  # the same message twice
    rows = {r.column: r for r in rejected_rows(p.rejected)}
    assert sorted(rows) == ["first_name", "s"] and len(rejected_rows(p.rejected)) == 2
    two_keys = "two keys of the message map to column 'first_name'; the first one was loaded"
    assert json.loads(rows["first_name"].value) == [
        {"value": "B", "reason": two_keys}, {"value": "C", "reason": two_keys}]
    assert rows["first_name"].reason.startswith("2 values of this message were rejected")
    assert [v["value"] for v in json.loads(rows["s"].value)] == ["a\\u0000", "b\\u0000"]


def test_a_nul_in_a_message_id_loads_under_a_stand_in_and_is_kept_whole():
    p = plan([event({"type": "track", "event": "x", "messageId": "m\x00x"})], {}, NOW)
    assert [o.state for o in p.outcomes(DELIVERED)] == ["delivered"]
    stand_in = layout.row_id("m\x00x")
    assert stand_in.startswith("m\\u0000x...sha256:") and "\x00" not in stand_in
    assert [row[0] for load in p.loads for row in load.rows] == [stand_in, stand_in]
    [kept] = p.rejected
    assert (kept.table, kept.column, kept.message_id, kept.value) == (
        "tracks", "id", stand_in, "m\\u0000x")
    assert "NUL" in kept.reason


def test_a_batch_widens_once_from_the_known_type_and_names_the_cause():
    known = {"tracks": {}, "x": {"n": s.BIGINT}}
    p = plan([event({"type": "track", "event": "x", "properties": {"n": 1}}, n=1),
              event({"type": "track", "event": "x", "properties": {"n": 1.5}}, n=2),
              event({"type": "track", "event": "x", "properties": {"n": "many"}}, n=3)], known, NOW)
    assert [(c.column, c.old_type, c.new_type, c.message_id) for c in p.changes] == [
        ("n", s.BIGINT, s.TEXT, "m2")]
    x = next(load for load in p.loads if load.table == "x")
    assert [r[-1] for r in x.rows] == ["1", "1.5", "many"]
    assert known["x"]["n"] == s.BIGINT  # the known schema is untouched until the load commits


def test_messages_the_layout_cannot_place_fail_alone():
    p = plan([event({"type": "track", "event": "ok"}, n=1), event({"type": "weird"}, n=2),
              event({"type": "track", "event": " "}, n=3)], {}, NOW)
    assert [o.state for o in p.outcomes(DELIVERED)] == ["delivered", "failed", "failed"]
    assert "weird" in p.failed[1].detail and "event" in p.failed[2].detail
    assert [load.table for load in p.loads] == ["tracks", "ok"]


def test_bad_fixed_values_are_rejected_not_loaded():
    p = plan([event({"type": "track", "event": "x", "sentAt": "yesterday", "userId": 42})], {}, NOW)
    tracks = dict(zip([c for c, _ in p.loads[0].columns], p.loads[0].rows[0]))
    assert tracks["sent_at"] is None and tracks["user_id"] == "42"
    assert [(r.column, r.value) for r in p.rejected] == [("sent_at", "yesterday")]


def test_identities_come_from_events_with_a_profile():
    p = plan([event({"type": "track", "event": "x", "userId": "u", "anonymousId": "a"}, "p1"),
              event({"type": "track", "event": "x", "userId": "v"}, None, n=2)], {}, NOW)
    assert sorted(p.identities) == [("anonymous_id", "a", "p1"), ("user_id", "u", "p1")]


def test_a_full_table_takes_no_new_column_and_a_known_column_still_loads():
    known = {"tracks": {}, "x": {**layout.fixed_columns("x"), "old": s.BIGINT}}
    cap = len(known["x"]) + 1
    p = plan([event({"type": "track", "event": "x", "properties": {"a": 1, "b": 2, "old": 3}})],
             known, NOW, max_columns=cap)
    x = next(load for load in p.loads if load.table == "x")
    row = dict(zip([c for c, _ in x.columns], x.rows[0]))
    assert (row["old"], row["a"], "b" in row) == (3, 1, False)
    assert [(r.table, r.column, r.value) for r in p.rejected] == [("x", "b", "2")]
    assert [(c.column, c.new_type) for c in p.changes] == [("a", s.BIGINT)]


def test_the_column_name_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(layout, "NAMES_MAX", 100)
    for n in range(1000):  # an id used as a property key: a new name in every event
        plan([event({"type": "track", "event": "x", "properties": {f"id_{n}": 1}}, n=n)], {}, NOW)
    assert len(layout._NAMES[("tracks", "properties")]) <= 100


def test_an_alias_with_an_empty_key_loads():
    # An alias has no payload object; a message may still carry a "" key (unknown fields
    # are kept), which was once taken for one and raised, failing its batch on every retry.
    p = plan([event({"type": "alias", "userId": "u", "previousId": "a", "": {"k": 1}})], {}, NOW)
    assert [o.state for o in p.outcomes(DELIVERED)] == ["delivered"]
    assert [load.table for load in p.loads] == ["aliases"]


def test_a_message_the_layout_trips_on_fails_alone(monkeypatch, caplog):
    real = layout.rows_for

    def trips_on_m2(message, *args):
        if message["messageId"] == "m2":
            raise KeyError("surprise")
        return real(message, *args)
    monkeypatch.setattr(layout, "rows_for", trips_on_m2)
    p = plan([event({"type": "track", "event": "x"}, n=n) for n in (1, 2, 3)], {}, NOW)
    assert [o.state for o in p.outcomes(DELIVERED)] == ["delivered", "failed", "delivered"]
    assert "bug" in p.failed[1].detail and "surprise" in caplog.text
