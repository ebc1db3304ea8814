"""The PostgreSQL identity store as several nodes use it: each node's own log position,
events PostgreSQL cannot keep passed over (not retried forever), lookups of values it
cannot hold answered "not found", and a lost connection replaced.

Each test gets a schema of its own on this machine's PostgreSQL, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import closing

import msgspec
import psycopg
import pytest

from trackpipe.config import Identity
from trackpipe.delivery.process import IdentityConsumer, environmental
from trackpipe.errors import ConfigError
from trackpipe.identity.postgres_store import PostgresStore
from trackpipe.identity.sqlite_store import SQLiteStore
from trackpipe.identity.store import node_id, open_store
from trackpipe.log.base import Entry

PG_DSN = os.environ.get("TRACKPIPE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def admin():
    try:
        conn = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("TRACKPIPE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"PostgreSQL is not reachable at {PG_DSN}: {exc}")
        pytest.skip(f"PostgreSQL is not reachable at {PG_DSN}: {exc}")
    yield conn
    conn.close()


@pytest.fixture
def schema(admin):
    name = f"identity_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {name}")
    yield name
    admin.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture
def opened():
    stores = []
    yield stores
    for store in stores:
        store.close()


def settings(schema: str) -> Identity:
    """[identity] as a node's config has it: the schema goes in the DSN."""
    sep = "&" if "?" in PG_DSN else "?"
    return Identity(store="postgres", trait_identifiers=["email"],
                    postgres_dsn=f"{PG_DSN}{sep}options=-csearch_path%3D{schema}")


class Log:
    """One node's log: entries at increasing positions, from 1."""

    def __init__(self):
        self.position = 0

    def __call__(self, type_: str, user: str | None = None, anon: str | None = None,
                 **fields) -> Entry:
        self.position += 1
        body = {"type": type_, "userId": user, "anonymousId": anon,
                "timestamp": f"2024-05-01T10:{self.position // 60:02d}:{self.position % 60:02d}"
                             ".000Z", "messageId": f"msg-{self.position}", **fields}
        return Entry(self.position, f"msg-{self.position}", 1_714_557_600_000, type_,
                     fields.get("event"), user, anon, "src_1", msgspec.json.encode(body))


class FakeLog:
    def __init__(self, entries):
        self.entries = entries

    def read(self, position, n, lean_types=()):
        return [e for e in self.entries if e.position > position][:n]


def consume(store, entries, until: int, timeout: float = 20.0) -> IdentityConsumer:
    """Run an IdentityConsumer over `entries` until it has applied up to `until`."""
    consumer = IdentityConsumer(store, FakeLog(entries))

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))
        deadline = asyncio.get_running_loop().time() + timeout
        while consumer.position() < until and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await task
    asyncio.run(main())
    consumer.pool.shutdown(wait=True)
    return consumer


# -- 1. nodes sharing the store each keep their own position ---------------------------

def test_node_id_is_made_once_and_kept(tmp_path):
    made = node_id(tmp_path)
    assert len(made) == 32 and (tmp_path / "node_id").read_text().strip() == made
    assert node_id(tmp_path) == made
    other = tmp_path / "b"
    other.mkdir()
    assert node_id(other) != made
    (other / "node_id").write_text("eu-west-1.a\n")  # an operator's own name
    assert node_id(other) == "eu-west-1.a"
    (other / "node_id").write_text("two words")
    with pytest.raises(ConfigError, match="not a node id"):
        node_id(other)


def test_nodes_sharing_a_store_each_apply_their_whole_log(tmp_path, schema, opened):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = open_store(settings(schema), tmp_path / "a")
    b = open_store(settings(schema), tmp_path / "b")
    opened += [a, b]
    log_a, log_b = Log(), Log()
    entries_a = [log_a("identify", f"alice{i}", f"anon-a{i}") for i in range(50)]
    entries_b = [log_b("identify", f"bob{i}", f"anon-b{i}") for i in range(30)]
    consume(a, entries_a, 50)   # node A is ahead ...
    consume(b, entries_b, 30)   # ... and node B's positions 1-30 are still its own to apply
    assert [i for i in range(30) if b.profile(f"bob{i}") is None] == []
    assert [i for i in range(50) if a.profile(f"alice{i}") is None] == []
    assert (a.position(), b.position()) == (50, 30)
    assert a.consumer == f"identity:{node_id(tmp_path / 'a')}" != b.consumer
    again = open_store(settings(schema), tmp_path / "b")  # a restart keeps its name
    opened.append(again)
    assert (again.consumer, again.position()) == (b.consumer, 30)


def test_the_first_upgraded_node_adopts_the_old_shared_position(tmp_path, schema, opened,
                                                                  caplog):
    old = PostgresStore(PG_DSN, settings(schema), "identity", schema=schema)  # before node ids
    opened.append(old)
    log = Log()
    old.apply([log("identify", f"u{i}", f"a{i}") for i in range(5)])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with caplog.at_level(logging.INFO, "trackpipe.identity"):
        a = open_store(settings(schema), tmp_path / "a")
    opened.append(a)
    assert a.position() == 5  # resumes; does not apply its whole log again
    b = open_store(settings(schema), tmp_path / "b")
    opened.append(b)
    assert b.position() == 0  # the row went to the first node only
    assert "takes over the log position 5" in caplog.text
    with psycopg.connect(PG_DSN, options=f"-c search_path={schema}") as conn:
        rows = dict(conn.execute("SELECT consumer, position FROM positions").fetchall())
    assert rows == {a.consumer: 5}
    # A node that has a position of its own leaves an "identity" row alone.
    old.apply([log("identify", "u9", "a9")])
    restarted = open_store(settings(schema), tmp_path / "a")
    opened.append(restarted)
    assert restarted.position() == 5 and old.position() == 6


def test_the_sqlite_store_keeps_its_name(tmp_path):
    store = open_store(Identity(), tmp_path)
    try:
        assert isinstance(store, SQLiteStore) and store.consumer == "identity"
    finally:
        store.close()


# -- 2. events PostgreSQL cannot keep are passed over; lookups of them find nothing ----

@pytest.mark.parametrize("exc, outage", [
    (psycopg.OperationalError("server closed the connection unexpectedly"), True),
    (psycopg.errors.AdminShutdown("terminating connection"), True),
    (psycopg.errors.DiskFull("could not extend file"), True),
    (psycopg.errors.DeadlockDetected("deadlock detected"), True),
    (psycopg.errors.ReadOnlySqlTransaction("read-only transaction"), True),
    (psycopg.InterfaceError("bad state"), True),
    (psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"), False),
    (psycopg.errors.ProgramLimitExceeded("index row size 3024 exceeds maximum 2704"), False),
    (psycopg.errors.UniqueViolation("duplicate key"), False),
    (psycopg.errors.NotNullViolation("null value"), False),
    (ValueError("a bug"), False),
])
def test_only_connection_and_server_failures_are_outages(exc, outage):
    assert environmental(exc) is outage


def long_id() -> str:
    """3000 characters that do not compress (a repeated one would fit the index)."""
    return os.urandom(1500).hex()


def test_an_event_postgres_cannot_keep_is_passed_over(schema, opened, caplog):
    store = PostgresStore(PG_DSN, settings(schema), "identity", schema=schema)
    opened.append(store)
    log = Log()
    entries = [log("identify", "u0", "a0"),
               log("identify", "u\x00x", "a1"),                       # NUL: DataError
               log("track", long_id(), None, event="E"),               # index row too big
               log("identify", "u0", None, traits={long_id(): 1}),     # traits_pkey too big
               log("group", "u0", None, groupId="g\x00"),
               log("identify", "u2", "a2")]
    with caplog.at_level(logging.ERROR, "trackpipe.consumers"):
        consumer = consume(store, entries, entries[-1].position)
    assert consumer.position() == store.position() == entries[-1].position
    assert store.profile("u2")["anonymous_ids"] == ["a2"]
    assert store.profile("u0")["anonymous_ids"] == ["a0"]
    for position in (2, 3, 4, 5):
        assert f"passing over position {position} " in caplog.text
    assert "longer than about 2700 bytes" in caplog.text


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_nul_in_a_lookup_is_not_found(kind, tmp_path, request, opened):
    if kind == "sqlite":
        store = SQLiteStore(tmp_path / "identity.db", Identity(), "identity")
    else:
        schema = request.getfixturevalue("schema")
        store = PostgresStore(PG_DSN, settings(schema), "identity", schema=schema)
    opened.append(store)
    store.apply([Log()("identify", "u1", "a1")])
    pid = store.profile("u1")["profile_id"]
    assert store.profile("a\x00b") is None
    assert store.merges("a\x00b") == []
    assert store.timeline("a\x00b") == ([], None)
    assert store.forget("a\x00b") is None
    assert store.resolve("a\x00b", None) is None
    assert store.resolve_many([("u\x001", "a1"), (None, "a\x00")]) == [pid, None]
    assert store.resolve_entries([Log()("track", "u\x001", "a1", event="E")]) == [
        (pid, {("anonymous_id", "a1"): pid})]
    with pytest.raises(LookupError):
        store.unmerge("prof_\x00", "m1")
    with pytest.raises(ValueError, match="not one a timeline page returned"):
        store.timeline("u1", "2024-05-01T10:00:00.000\x00~1")
    assert store.profile("u1")["profile_id"] == pid  # nothing was forgotten


# -- 3. a lost connection is replaced -----------------------------------------------

def terminate(admin, store) -> None:
    (pid,) = store.conn.execute("SELECT pg_backend_pid()").fetchone()
    assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def test_a_store_reconnects_after_losing_its_connection(admin, schema, opened):
    store = PostgresStore(PG_DSN, settings(schema), "identity", schema=schema)
    opened.append(store)
    log = Log()
    first = [log("identify", "u1", "a1"), log("track", "u1", None, event="E")]
    store.apply(first)
    terminate(admin, store)  # lost while idle: the next transaction starts on a new one
    store.apply([log("identify", "u2", "a2")])
    assert store.profile("u2")["anonymous_ids"] == ["a2"]
    terminate(admin, store)
    assert store.resolve("u1", None) == store.profile("a1")["profile_id"]
    # Lost during a transaction: that one fails as an outage and is tried again.
    batch = [log("identify", "u3", "a3"), log("track", "u3", None, event="E")]
    with pytest.raises(psycopg.OperationalError) as failed:
        with store.write_tx():
            terminate(admin, store)
            store.conn.execute("SELECT 1")
    assert environmental(failed.value)
    store.apply(first + batch)  # what had committed is not applied twice
    assert store.position() == batch[-1].position
    assert store.profile("u1")["event_counts"] == {"E": 1}
    assert store.profile("u3")["event_counts"] == {"E": 1}


def test_the_consumer_goes_on_after_the_connection_is_lost(admin, schema, opened):
    store = PostgresStore(PG_DSN, settings(schema), "identity", schema=schema)
    opened.append(store)
    log = Log()
    entries = [log("identify", "u1", "a1")]
    consume(store, entries, 1)
    terminate(admin, store)
    entries.append(log("identify", "u2", "a2"))
    consumer = consume(store, entries, 2, timeout=10)
    assert consumer.position() == 2 and store.profile("a2") is not None


class HoldingProxy:
    """A TCP proxy to PostgreSQL that can stop passing bytes while holding its connections
    open: a server that stops answering, as a partition or a hung host looks."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.holding = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", 5432))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                while self.holding.is_set():
                    time.sleep(0.05)
                b.sendall(data)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def test_a_store_whose_server_stops_answering_fails_in_bounded_time_and_recovers(
        schema, opened, monkeypatch):
    """R14 (blackhole): identity hung on a server that held the connection without
    answering; the warehouses, which wait for identity, with it."""
    from trackpipe.identity import postgres_store
    monkeypatch.setattr(postgres_store, "TRANSACTION_DEADLINE_S", 2.0)
    proxy = HoldingProxy()
    try:
        store = PostgresStore(f"postgresql://postgres@127.0.0.1:{proxy.port}/test",
                              settings(schema), "identity", schema=schema)
        opened.append(store)
        log = Log()
        store.apply([log("identify", "u1", "a1")])
        later = [log("identify", "u2", "a2")]
        proxy.holding.set()
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as failed:
            store.apply(later)
        assert time.monotonic() - started < 5, "failed by the deadline, not hung"
        assert environmental(failed.value), "an outage: retried, not passed over"
        proxy.holding.clear()
        store.apply(later)  # on a new connection
        assert store.profile("u2")["anonymous_ids"] == ["a2"]
    finally:
        proxy.close()


# -- 4. timeline rows say whose log their position is in ------------------------------

def two_nodes(tmp_path, schema, opened) -> tuple[PostgresStore, PostgresStore]:
    stores = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir(exist_ok=True)
        stores.append(open_store(settings(schema), tmp_path / name))
    opened += stores
    return stores[0], stores[1]


def reader(entries):
    """A log's get(): the entries at these positions."""
    return lambda positions: [e for e in entries if e.position in set(positions)]


def test_two_logs_events_at_one_time_and_position_are_two_events(tmp_path, schema, opened):
    a, b = two_nodes(tmp_path, schema, opened)
    a.apply([Log()("track", "u1", None, event="Buy")])  # position 1 of each log, same time
    b.apply([Log()("track", "u1", None, event="Buy")])
    assert a.profile("u1")["event_counts"] == {"Buy": 2}
    assert a.timeline("u1") == b.timeline("u1") == ([1], None)
    assert a.elsewhere("u1") == {b.consumer: 1} and b.elsewhere("u1") == {a.consumer: 1}


def test_a_node_lists_and_forgets_the_positions_of_its_own_log(tmp_path, schema, opened):
    a, b = two_nodes(tmp_path, schema, opened)
    log_a, log_b = Log(), Log()
    a.apply([log_a("identify", "alice", "aa"), log_a("track", "alice", None, event="A"),
             log_a("track", "carol", None, event="C")])
    b.apply([log_b("track", "bob", None, event="B"), log_b("track", "bob", None, event="B"),
             log_b("track", "alice", None, event="A")])
    assert a.timeline("alice")[0] == [1, 2]
    assert b.timeline("alice")[0] == [3]  # not bob's events at positions 1 and 2 of b's log
    assert b.elsewhere("alice") == {a.consumer: 2}

    gone = a.forget("alice")
    assert gone.positions == [1, 2]  # position 3 of a's log is carol's
    assert gone.asked == 1
    (asked,) = b.erasures()
    assert sorted(asked.identifiers) == [("anonymous_id", "aa"), ("user_id", "alice")]
    assert asked.positions == [3]
    assert a.erasures() == []
    b.erased(asked.id)
    assert b.erasures() == []
    with psycopg.connect(PG_DSN, options=f"-c search_path={schema}") as conn:
        assert conn.execute("SELECT count(*) FROM erasures").fetchone() == (0,)


def test_a_delete_on_one_node_erases_each_nodes_log_by_its_own_positions(tmp_path, schema,
                                                                          opened):
    from trackpipe.delivery.state import DeliveryState
    from trackpipe.identity.consumer import catch_up
    from trackpipe.log.base import Record
    from trackpipe.log.sqlite import SQLiteLog, connect
    from trackpipe.privacy import erase
    from trackpipe.privacy.suppress import id_hash
    from trackpipe.sources.catalog import Catalog

    def record(user, anon=None, type_="track", **body):
        return Record(uuid.uuid4().hex, 1_714_557_600_000, type_, "E", user, anon, "src",
                      msgspec.json.encode({"type": type_, "event": "E", "userId": user,
                                           "anonymousId": anon, **body}))

    def users(data_dir) -> list:
        with closing(SQLiteLog(data_dir / "log.db", writable=False)) as log_:
            return [e.user_id or e.anonymous_id for e in log_.read(0, 100)]

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    logs = {}
    for data_dir, records in (
            (a_dir, [record("alice", type_="identify", traits={"email": "alice@example.com"}),
                     record("alice"), record("carol")]),
            (b_dir, [record("bob"), record("bob"),
                     # Hers by her email only: the anonymousId is a blocked value.
                     record(None, "anonymous", context={"traits": {"email": "Alice@Example.com"}})
                     ])):
        data_dir.mkdir()
        logs[data_dir] = SQLiteLog(data_dir / "log.db")
        logs[data_dir].append(records)
        DeliveryState(data_dir / "deliveries.db").close()
    a, b = two_nodes(tmp_path, schema, opened)
    for store, data_dir in ((a, a_dir), (b, b_dir)):
        with closing(SQLiteLog(data_dir / "log.db", writable=False)) as log_:
            catch_up(store, log_)

    db = connect(a_dir / "deliveries.db")
    request = erase.queue(db, [("user_id", "alice")])
    assert erase.process_requests(a_dir, a, []) == 1
    assert users(a_dir) == ["carol"]             # a's own positions only
    assert users(b_dir) == ["bob", "bob", "anonymous"]  # b has not run yet
    assert erase.result(db, request)["other_nodes"] == 1
    db.close()
    assert erase.process_requests(b_dir, b, []) == 1  # b's consumers pick up its part
    assert users(b_dir) == ["bob", "bob"]
    assert b.erasures() == [] and erase.process_requests(b_dir, b, []) == 0
    with closing(connect(b_dir / "deliveries.db")) as db:
        (result,) = db.execute("SELECT result FROM privacy_requests").fetchall()
    assert msgspec.json.decode(result[0])["asked_by_another_node"] is True
    catalog = Catalog(b_dir)  # b drops her new events too
    try:
        assert id_hash(catalog.privacy_key(), "alice") in catalog.suppressed()
    finally:
        catalog.db.close()
    for log_ in logs.values():
        log_.close()


def old_timeline(conn) -> None:
    """Make the timeline as it was before rows named their log."""
    conn.execute("ALTER TABLE timeline DROP CONSTRAINT timeline_pkey")
    conn.execute("ALTER TABLE timeline DROP COLUMN log")
    conn.execute("ALTER TABLE timeline ADD PRIMARY KEY (node, ts, position)")


def test_an_old_timeline_gets_its_log_and_its_rows_count_where_they_are(tmp_path, schema,
                                                                         opened):
    old = PostgresStore(PG_DSN, settings(schema), "identity", schema=schema)  # before node ids
    opened.append(old)
    log_a, log_b = Log(), Log()
    entries_a = [log_a("identify", "alice", "aa"), log_a("track", "alice", None, event="A")]
    entries_b = [log_b("track", "bob", None, event="B"), log_b("track", "bob", None, event="B")]
    old.apply(entries_a)
    with psycopg.connect(PG_DSN, options=f"-c search_path={schema}", autocommit=True) as conn:
        old_timeline(conn)
    a, b = two_nodes(tmp_path, schema, opened)  # a adopts the old position
    with psycopg.connect(PG_DSN, options=f"-c search_path={schema}") as conn:
        key = conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE "
                           "conname = 'timeline_pkey'").fetchone()
        logs = conn.execute("SELECT DISTINCT log FROM timeline").fetchall()
    assert key == ("PRIMARY KEY (node, ts, \"position\", log)",) and logs == [("",)]
    b.apply(entries_b)
    # A row of no known log is a node's when its log holds the event that made it there.
    assert a.timeline("alice", read=reader(entries_a))[0] == [1, 2]
    assert a.timeline("alice")[0] == []  # it cannot tell without reading its log
    assert b.timeline("alice", read=reader(entries_b))[0] == []  # bob's, in b's log
    assert a.elsewhere("alice") == {}
    gone = b.forget("alice", read=reader(entries_b))
    assert gone.positions == [] and gone.asked == 1
    (asked,) = a.erasures()
    assert asked.positions == []  # ... and the rows of no known log, for a to check
    assert a.verify(asked.legacy, reader(entries_a)) == {1, 2}
    restarted = open_store(settings(schema), tmp_path / "a")  # done once
    opened.append(restarted)


def test_an_old_sqlite_timeline_gets_its_log(tmp_path):
    import sqlite3
    path = tmp_path / "identity.db"
    store = SQLiteStore(path, Identity(), "identity")
    log = Log()
    store.apply([log("identify", "u1", "a1")])
    store.close()
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE old (node INTEGER NOT NULL, ts TEXT NOT NULL, position INTEGER NOT NULL,
            kind TEXT, key TEXT, PRIMARY KEY (node, ts, position)) WITHOUT ROWID;
        INSERT INTO old SELECT node, ts, position, kind, key FROM timeline;
        DROP TABLE timeline; ALTER TABLE old RENAME TO timeline;""")
    conn.close()
    store = SQLiteStore(path, Identity(), "identity")
    try:
        store.apply([log("track", "u1", None, event="E")])
        assert store.timeline("u1") == ([1, 2], None)  # its one log's, old rows and new
        assert store.elsewhere("u1") == {} and store.erasures() == []
        assert store.forget("u1").positions == [1, 2]
    finally:
        store.close()


# -- 5. what the review of timeline logs found ----------------------------------------

def node_with_log(data_dir, records) -> None:
    """A data dir whose log holds `records`, with its deliveries file."""
    from trackpipe.delivery.state import DeliveryState
    from trackpipe.log.sqlite import SQLiteLog
    data_dir.mkdir()
    with closing(SQLiteLog(data_dir / "log.db")) as log_:
        log_.append(records)
    DeliveryState(data_dir / "deliveries.db").close()


def record(user, anon=None, type_="track", **body):
    from trackpipe.log.base import Record
    return Record(uuid.uuid4().hex, 1_714_557_600_000, type_, "E", user, anon, "src",
                  msgspec.json.encode({"type": type_, "event": "E", "userId": user,
                                       "anonymousId": anon, **body}))


def catch_up_from(store, data_dir) -> None:
    from trackpipe.identity.consumer import catch_up
    from trackpipe.log.sqlite import SQLiteLog
    with closing(SQLiteLog(data_dir / "log.db", writable=False)) as log_:
        catch_up(store, log_)


def log_users(data_dir) -> list:
    from trackpipe.log.sqlite import SQLiteLog
    with closing(SQLiteLog(data_dir / "log.db", writable=False)) as log_:
        return [(e.user_id, e.anonymous_id) for e in log_.read(0, 100)]


def test_a_delete_another_node_asked_for_forgets_only_those_exact_identifiers(
        tmp_path, schema, opened):
    from trackpipe.log.sqlite import connect
    from trackpipe.privacy import erase
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    node_with_log(a_dir, [record("alice", "42", type_="identify")])
    # Bob's userId is spelt like alice's anonymousId.
    node_with_log(b_dir, [record("42"), record("42", "b-anon")])
    a, b = two_nodes(tmp_path, schema, opened)
    catch_up_from(a, a_dir)
    catch_up_from(b, b_dir)
    with closing(connect(a_dir / "deliveries.db")) as db:
        erase.queue(db, [("user_id", "alice")])
    assert erase.process_requests(a_dir, a, []) == 1
    assert log_users(a_dir) == []
    assert erase.process_requests(b_dir, b, []) == 1
    assert log_users(b_dir) == [("42", None), ("42", "b-anon")]  # bob's events stay
    assert b.profile("b-anon")["user_ids"] == ["42"]
    assert a.erasures() == [] and b.erasures() == []  # and no one is asked to erase bob


def test_an_upgraded_node_applying_its_log_again_does_not_double_its_events(
        tmp_path, schema, opened):
    # Before node ids every node kept the one position "identity"; after the upgrade the
    # first node takes it over and the others apply their logs again from the start.
    old = PostgresStore(PG_DSN, settings(schema), "identity", schema=schema)
    opened.append(old)
    log_b = Log()
    entries_b = [log_b("track", "bob", None, event="Buy"), log_b("track", "bob", None,
                                                                 event="Buy")]
    old.apply(entries_b)
    with psycopg.connect(PG_DSN, options=f"-c search_path={schema}", autocommit=True) as conn:
        old_timeline(conn)
    a, b = two_nodes(tmp_path, schema, opened)  # a adopts "identity"; b starts from 0
    assert b.position() == 0
    b.apply(entries_b)
    b.apply(entries_b)  # applied again: still nothing new
    assert b.profile("bob")["event_counts"] == {"Buy": 2}
    assert b.timeline("bob", read=reader(entries_b)) == ([1, 2], None)
    assert a.timeline("bob", read=reader([])) == ([], None) and a.elsewhere("bob") == {
        b.consumer: 2}
    with psycopg.connect(PG_DSN, options=f"-c search_path={schema}") as conn:
        rows = conn.execute("SELECT position, log FROM timeline ORDER BY 1").fetchall()
    assert rows == [(1, b.consumer), (2, b.consumer)]


def test_a_node_start_does_not_wait_for_a_long_read_of_the_timeline(tmp_path, schema,
                                                                      opened):
    (tmp_path / "a").mkdir()
    opened.append(open_store(settings(schema), tmp_path / "a"))  # the schema is current
    with psycopg.connect(PG_DSN, options=f"-c search_path={schema}") as reader_:
        reader_.execute("SELECT count(*) FROM timeline").fetchone()  # a report, a pg_dump
        started = []
        (tmp_path / "b").mkdir()
        thread = threading.Thread(target=lambda: started.append(
            open_store(settings(schema), tmp_path / "b")), daemon=True)
        thread.start()
        thread.join(5)
        done = bool(started)
        reader_.rollback()
        thread.join(20)
    opened += started
    assert done


def test_a_start_that_must_alter_a_locked_timeline_fails_as_an_outage(tmp_path, schema, opened,
                                                                       monkeypatch):
    from trackpipe.identity import postgres_store
    (tmp_path / "a").mkdir()
    opened.append(open_store(settings(schema), tmp_path / "a"))
    with psycopg.connect(PG_DSN, options=f"-c search_path={schema}", autocommit=True) as conn:
        old_timeline(conn)
    monkeypatch.setattr(postgres_store, "SCHEMA_LOCK_TIMEOUT", "200ms", raising=False)
    monkeypatch.setattr(postgres_store, "SCHEMA_TRIES", 2, raising=False)
    with psycopg.connect(PG_DSN, options=f"-c search_path={schema}") as reader_:
        reader_.execute("SELECT count(*) FROM timeline").fetchone()  # a long read
        ends = threading.Timer(5, reader_.rollback)
        ends.start()
        with pytest.raises(psycopg.OperationalError) as failed:  # not a wait for the read
            PostgresStore(PG_DSN, settings(schema), "identity:late", schema=schema)
        ends.cancel()
        ends.join()
        reader_.rollback()
    assert environmental(failed.value)
    opened.append(PostgresStore(PG_DSN, settings(schema), "identity:late", schema=schema))


def test_a_request_no_node_waits_for_any_more_is_removed_with_the_ids(tmp_path, schema,
                                                                       opened):
    a, b = two_nodes(tmp_path, schema, opened)
    log_a = Log()
    a.apply([log_a("identify", "alice", "aa")])
    b.apply([Log()("track", "alice", None, event="A")])
    assert a.forget("alice").asked == 1
    with psycopg.connect(PG_DSN, options=f"-c search_path={schema}", autocommit=True) as conn:
        def count():
            return conn.execute("SELECT count(*) FROM erasures").fetchone()[0]
        # b will never run again: the operator removes its rows (README, Privacy) ...
        conn.execute("DELETE FROM positions WHERE consumer = %s", (b.consumer,))
        conn.execute("DELETE FROM erasure_logs WHERE log = %s", (b.consumer,))
        assert count() == 1
        assert a.erasures() == []  # ... and the next check of any node removes her ids
        assert count() == 0
        a.apply([log_a("identify", "dora", "dd")])
        (tmp_path / "c").mkdir()
        c = open_store(settings(schema), tmp_path / "c")
        opened.append(c)
        c.apply([Log()("track", "carol", None, event="C")])
        assert a.forget("dora").asked == 1
        conn.execute("DELETE FROM erasure_logs")
        opened.append(open_store(settings(schema), tmp_path / "a"))  # ... or its next start
        assert count() == 0


def test_the_sqlite_store_has_no_other_logs_to_count(tmp_path, monkeypatch):
    from trackpipe.identity import reads
    store = SQLiteStore(tmp_path / "identity.db", Identity(), "identity")
    try:
        store.apply([Log()("identify", "u1", "a1")])
        monkeypatch.setattr(reads, "elsewhere", lambda *a: pytest.fail("counted the timeline"))
        assert store.elsewhere("u1") == {}
    finally:
        store.close()


# -- end to end: two `trackpipe serve` nodes on one store -----------------------------

def test_two_nodes_share_a_store_end_to_end(tmp_path, schema, fresh_server):
    from support import wait_for, write_config
    config = write_config(tmp_path / "node.toml", identity={
        "enabled": True, "store": "postgres", "postgres_dsn": settings(schema).postgres_dsn})
    nodes = []
    for _ in range(2):
        node = fresh_server(config=config)
        node.url = f"http://127.0.0.1:{node.port}"
        nodes.append(node.start())
    one, two = nodes

    def identify(node, user, anon):
        r = node.post("/v1/identify", {"userId": user, "anonymousId": anon})
        assert r.status_code == 200, r.text

    def status(node, path, method="GET", **kw):
        with node.admin() as client:
            return client.request(method, f"/api/v1/profiles/{path}", **kw).status_code

    for i in range(10):
        identify(one, f"alice{i}", f"aa{i}")
    wait_for(lambda: status(one, "alice9") == 200, what="node one's profiles")
    identify(two, "bob0", "bb0")   # position 1 of node two's log
    identify(one, "evil\x00x", "ev1")
    identify(one, "carol", "cc1")
    wait_for(lambda: status(two, "bob0") == 200, what="node two's first event")
    wait_for(lambda: status(one, "carol") == 200, what="the event after one with a NUL")
    for path in ("a%00b", "a%00b/events", "a%00b/merges"):
        assert status(one, path) == 404
    assert status(one, "carol/events?cursor=2024-05-01T10%3A00%3A00.000%00~1") == 400
    assert status(one, "a%00b/unmerge", "POST", json={"merge_id": "m1"}) == 404
    with psycopg.connect(PG_DSN, options=f"-c search_path={schema}") as conn:
        consumers = {c for (c,) in conn.execute("SELECT consumer FROM positions")}
    assert consumers == {f"identity:{node_id(n.data_dir)}" for n in nodes}

    # Position 1 of node one's log is alice0's: node one shows none of bob0's events, only
    # that node two holds one; a delete sent to node one keeps alice0's and erases bob0's
    # from node two's log when node two's consumers run.
    def events(node, ident):
        with node.admin() as client:
            return client.get(f"/api/v1/profiles/{ident}/events").json()

    assert events(one, "bob0") == {"events": [], "next": None, "other_nodes": [
        {"node": node_id(two.data_dir), "events": 1}]}
    assert [e["userId"] for e in events(two, "bob0")["events"]] == ["bob0"]
    with one.admin() as client:
        done = client.post("/api/v1/privacy/delete", json={"id": "bob0"}).json()
    assert (done["state"], done["events"], done["other_nodes"]) == ("done", 0, 1)
    assert "alice0" in {e.get("userId") for e in one.events()}
    wait_for(lambda: not any(e.get("userId") == "bob0" for e in two.events()),
             what="node two erasing bob0's event")
