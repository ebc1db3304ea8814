"""Conformance sink for the `postgres` warehouse: a fresh schema and role per Sink.

The destination connects as a dedicated login role through a small TCP proxy
owned by the Sink, so the Sink can break it both ways:
  break_()               the proxy drops every connection and refuses new ones
                         (connection errors: retryable);
  break_(terminal=True)  the role loses its privileges on the schema
                         (SQLSTATE 42501 permission denied: failed for good).
"""

from __future__ import annotations

import os
import socket
import threading
import uuid

import psycopg
import pytest

DSN = os.environ.get("TRACKPIPE_TEST_POSTGRES_DSN",
                     "host=127.0.0.1 port=5432 user=postgres dbname=test")
EVENT_TABLES = ("tracks", "identifies", "pages", "screens", "groups", "aliases")


class Sink:
    def __init__(self, tmp_path):
        try:
            self.admin = psycopg.connect(DSN, autocommit=True, connect_timeout=3)
        except psycopg.OperationalError as exc:
            reason = f"PostgreSQL is not reachable at {DSN!r}: {exc}"
            if os.environ.get("TRACKPIPE_REQUIRE_SERVICES") == "1":
                pytest.fail(f"{reason} (TRACKPIPE_REQUIRE_SERVICES=1)")
            pytest.skip(reason)
        self._lock = threading.Lock()
        suffix = uuid.uuid4().hex[:10]
        self.schema, self.role = f"tp_sink_{suffix}", f"tp_sink_role_{suffix}"
        info = self.admin.info
        self.proxy = Proxy((info.host, info.port))
        self._sql(f'CREATE ROLE "{self.role}" LOGIN', f'CREATE SCHEMA "{self.schema}"')
        self.heal()

    def config(self, name: str) -> dict:
        dsn = (f"host=127.0.0.1 port={self.proxy.port} user={self.role}"
               f" dbname={self.admin.info.dbname} connect_timeout=3")
        return {"name": name, "type": "postgres", "settings": {"dsn": dsn, "schema": self.schema}}

    def received(self) -> list[str]:
        with self._lock:
            present = {r[0] for r in self.admin.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (self.schema,))}
            selects = [f'SELECT id, uuid_ts FROM "{self.schema}"."{t}"'
                       for t in EVENT_TABLES if t in present]
            if not selects:
                return []
            sql = " UNION ALL ".join(selects) + " ORDER BY uuid_ts, id"
            return [r[0] for r in self.admin.execute(sql)]

    def break_(self, terminal: bool = False) -> None:
        if terminal:
            self._sql(f'REVOKE ALL ON SCHEMA "{self.schema}" FROM "{self.role}"')
        else:
            self.proxy.refuse()

    def heal(self) -> None:
        self._sql(f'GRANT USAGE, CREATE ON SCHEMA "{self.schema}" TO "{self.role}"')
        self.proxy.accept()

    def close(self) -> None:
        self.proxy.stop()
        self._sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                  f" WHERE usename = '{self.role}'",
                  f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE',
                  f'DROP OWNED BY "{self.role}"', f'DROP ROLE IF EXISTS "{self.role}"')
        self.admin.close()

    def _sql(self, *statements: str) -> None:
        with self._lock:
            for sql in statements:
                self.admin.execute(sql)


class Proxy:
    """A TCP relay to PostgreSQL that can drop and refuse connections on demand."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._refusing = False
        self._stopped = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def refuse(self) -> None:
        with self._lock:
            self._refusing = True
            self._drop_all()

    def accept(self) -> None:
        with self._lock:
            self._refusing = False

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._drop_all()
        self.listener.close()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._relay(client)

    def _relay(self, client: socket.socket) -> None:
        with self._lock:
            if self._refusing or self._stopped:
                client.close()  # the client sees the server hang up: a connection error
                return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        client.settimeout(None)
        with self._lock:
            self._open |= {client, upstream}
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            for s in (src, dst):
                self._close(s)

    def _drop_all(self) -> None:
        for s in list(self._open):
            self._close(s)

    def _close(self, s: socket.socket) -> None:
        if s in self._open:
            self._open.discard(s)
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv
            except OSError:
                pass
            s.close()
