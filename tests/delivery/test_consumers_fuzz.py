"""Whatever a stored message holds, the consumers keep going.

The collector checks the envelope (a type, an id, an event name for track,
objects where objects belong) but not what is inside `traits`, `properties`
and `context`, nor the types of fields it does not look at. Identity and the
warehouse layout read all of those. One message they choke on would stop them
for good: identity retries the same batch forever, and the warehouses, which
wait for identity, with it. So, for arbitrary messages of every type:
- identity applies them (no exception), and every id they name that is not a
  blocked value (" ", "null", ...) has a profile;
- the warehouse plan places each event or fails that one event alone, and each
  row it would load has one value per column, of a type that column can take.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import examples

from trackpipe.config import Identity
from trackpipe.destinations.base import Event
from trackpipe.destinations.warehouse import layout
from trackpipe.destinations.warehouse import schema as s
from trackpipe.destinations.warehouse.plan import plan
from trackpipe.destinations.warehouse.shapes import ShapeBook
from trackpipe.identity.sqlite_store import SQLiteStore
from trackpipe.log.base import Entry

FUZZ = settings(max_examples=examples(100), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
TYPES = ["identify", "track", "page", "screen", "group", "alias"]
KEYS = ["email", "id", "userId", "name", "traits", "context", "properties", "timestamp",
        "a b", "A.B", "", "É", "_metadata", "products", "x" * 70, "\u0000k"]

scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False,
                                                                    allow_infinity=False),
    st.text(max_size=30), st.sampled_from(["2024-05-01T10:00:00.000Z", "2024-13-45T99:99",
                                           "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999+14:00",
                                           "a@b.co", " MiXeD@Case.Io ", "", "\u0000"]))
value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5)),
    max_leaves=20)
obj = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), value, max_size=6)
ident = st.one_of(st.none(), st.sampled_from(["u1", "u2", "a1", "a2", "x" * 300, " ", "é"]))


@st.composite
def message(draw):
    type_ = draw(st.sampled_from(TYPES))
    msg = {"type": type_, "userId": draw(ident), "anonymousId": draw(ident),
           "timestamp": draw(st.one_of(st.none(), scalar)),
           "receivedAt": "2024-05-01T10:00:00.000Z", "context": draw(obj)}
    if msg["userId"] is None and msg["anonymousId"] is None:
        msg["anonymousId"] = "a0"
    if type_ in ("identify", "group"):
        msg["traits"] = draw(obj)
    if type_ in ("track", "page", "screen"):
        msg["properties"] = draw(obj)
    if type_ == "track":
        msg["event"] = draw(st.one_of(st.sampled_from(["Order Completed", "users", "tracks",
                                                       "É!", "x" * 200]), st.text(min_size=1)))
    if type_ in ("page", "screen"):
        msg["name"] = draw(st.one_of(st.none(), scalar))
    if type_ == "group":
        msg["groupId"] = draw(st.one_of(ident, scalar))
    if type_ == "alias":
        msg["previousId"] = draw(st.one_of(ident, scalar))
    for key, extra in draw(st.dictionaries(st.sampled_from(KEYS), value, max_size=3)).items():
        msg.setdefault(key, extra)
    return msg


def entries(messages: list[dict]) -> list[Entry]:
    out = []
    for i, m in enumerate(messages, start=1):
        event = m.get("event") if m["type"] == "track" else None
        out.append(Entry(i, f"m{i}", 1_714_557_600_000, m["type"],
                         event if isinstance(event, str) else None,
                         m["userId"], m["anonymousId"], "src", msgspec.json.encode(m)))
    return out


@FUZZ
@given(st.lists(message(), min_size=1, max_size=12))
def test_identity_applies_any_message_and_places_every_id(messages):
    with tempfile.TemporaryDirectory() as d:
        store = SQLiteStore(Path(d) / "identity.db",
                            Identity(trait_identifiers=["email"], cache_identifiers=1000))
        try:
            store.apply(entries(messages))
            assert store.position() == len(messages)
            blocked = set(Identity().blocked_values)  # " ", "null"...: never a person
            for m in messages:
                [profile] = store.resolve_many([(m["userId"], m["anonymousId"])])
                if any(v and v.strip().lower() not in blocked
                       for v in (m["userId"], m["anonymousId"])):
                    assert profile, m
        finally:
            store.close()


LOADABLE = {s.BOOLEAN: bool, s.BIGINT: int, s.DOUBLE: float, s.TIMESTAMP: dt.datetime,
            s.TEXT: str}


@FUZZ
@given(st.lists(message(), min_size=1, max_size=12), st.integers(20, 40), st.integers(1, 3))
def test_the_warehouse_plan_places_any_message_or_fails_it_alone(messages, max_columns,
                                                                max_tables):
    batch = [Event(i, f"m{i}", m, None, None, None) for i, m in enumerate(messages)]
    check_plan(plan(batch, {}, NOW, max_columns), messages, max_columns)
    few = plan(batch, {}, NOW, max_columns, max_tables=max_tables)  # rows kept whole instead
    check_plan(few, messages, max_columns)
    assert len([t for t in few.schema if t not in layout.RESERVED_TABLES]) <= max_tables
    # As the framework hands them over (stored JSON), twice: compiled shapes learn from
    # the first pass and lay out what they can of the second.
    shapes = ShapeBook()
    stored = [msgspec.json.encode(m) for m in messages]
    first = plan([Event(i, f"m{i}", None, "p", None, None, raw) for i, raw in enumerate(stored)],
                 {}, NOW, max_columns, shapes)
    check_plan(first, messages, max_columns)
    again = [Event(i, f"n{i}", None, "p", None, None, raw) for i, raw in enumerate(stored)]
    check_plan(plan(again, first.schema, NOW, max_columns, shapes), messages, max_columns)


def check_plan(todo, messages, max_columns) -> None:
    assert len(todo.outcomes(None)) == len(messages)
    for load in todo.loads:
        assert len(load.columns) <= max_columns
        assert len({c for c, _ in load.columns}) == len(load.columns), load.columns
        for row in load.rows:
            assert len(row) == len(load.columns)
            for (column, kind), cell in zip(load.columns, row):
                assert cell is None or isinstance(cell, LOADABLE[kind]), (column, kind, cell)
                if isinstance(cell, str):
                    assert "\x00" not in cell, (column, cell)
                if kind == s.BIGINT and cell is not None:
                    assert -2**63 <= cell < 2**63


@FUZZ
@given(st.lists(message(), min_size=1, max_size=8))
def test_vendor_translations_take_any_message(messages):
    """What the mixpanel, amplitude and forwarding destinations make of a message before
    any request: a request body that encodes, or an outcome for that event alone."""
    from trackpipe.destinations import amplitude, forward, mixpanel

    records, updates = [], []
    for i, m in enumerate(messages):
        event = Event(i, f"m{i}", m, "p1", None, None, stored_time=1714557600000)
        skipped = mixpanel.plan(i, event, "token", records, updates)
        assert skipped is None or skipped.state in ("delivered", "failed")
        made = amplitude.amplitude_events(event, "company")
        if isinstance(made, list):
            msgspec.json.encode(made)
        msgspec.json.encode(forward.outgoing(m))
    msgspec.json.encode([u for _, u in updates])
