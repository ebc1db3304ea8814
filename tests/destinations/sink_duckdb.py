"""Conformance sink for the `duckdb` warehouse: a database file in tmp_path.

received() reads the real file with a read-only connection. That works while
the server runs because the destination opens the file only for the length of
a batch load; received() waits (up to READ_WAIT seconds) for a gap between loads.
  break_()               a helper process holds the file read-write, so loads
                         find it locked (retryable); nothing can arrive meanwhile,
                         so received() answers what it read just before;
  break_(terminal=True)  the file is swapped for one that is not a DuckDB
                         database (failed for good); heal() swaps it back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import duckdb

EVENT_TABLES = ("tracks", "identifies", "pages", "screens", "groups", "aliases")
READ_WAIT = 10.0


class Sink:
    def __init__(self, tmp_path):
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.path = tmp_path / "warehouse.duckdb"
        self.saved = tmp_path / "warehouse.duckdb.saved"
        self._holder: subprocess.Popen | None = None
        self._before_break: list[str] = []
        self._swapped = False
        self._lock = threading.Lock()

    def config(self, name: str) -> dict:
        return {"name": name, "type": "duckdb", "settings": {"path": str(self.path)}}

    def received(self) -> list[str]:
        with self._lock:
            if self._holder is not None:
                return list(self._before_break)
            return self._read()

    def _read(self) -> list[str]:
        path = self.saved if self._swapped else self.path
        if not path.exists():
            return []
        con = _connect(path, read_only=True)
        try:
            return _ids(con)
        finally:
            con.close()

    def break_(self, terminal: bool = False) -> None:
        with self._lock:
            if not terminal:
                self._before_break = self._read()
                self._holder = _hold(self.path)
                return
            # Hold the lock while swapping, so no load is half way through the file.
            held = _connect(self.path, read_only=False) if self.path.exists() else None
            if held is not None:
                os.replace(self.path, self.saved)
            self.path.write_text("not a DuckDB database\n" * 500)
            if held is not None:
                held.close()
            self._swapped = True

    def heal(self) -> None:
        with self._lock:
            if self._holder is not None:
                self._holder.communicate("\n", timeout=READ_WAIT)
                self._holder = None
            if self._swapped:
                if self.saved.exists():
                    os.replace(self.saved, self.path)
                else:
                    self.path.unlink()
                self._swapped = False

    def close(self) -> None:
        self.heal()


def _hold(path) -> subprocess.Popen:
    """A process holding the file read-write (another process, since DuckDB shares one
    open database between the connections of a process)."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, duckdb
        deadline = time.monotonic() + {READ_WAIT}
        while True:
            try:
                con = duckdb.connect({str(path)!r})
                break
            except duckdb.IOException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        print("held", flush=True)
        sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "held":
        holder.communicate(timeout=READ_WAIT)
        raise RuntimeError(f"could not take the lock on {path}")
    return holder


def _connect(path, read_only: bool) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + READ_WAIT
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            # held by a load, or just created by the destination and not written yet
            # (seen once under load: "exists, but it is not a valid DuckDB database file")
            if not any(s in str(exc) for s in ("Could not set lock", "not a valid DuckDB")) \
                    or time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _ids(con: duckdb.DuckDBPyConnection) -> list[str]:
    present = {r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
    selects = [f'SELECT id, uuid_ts FROM "{t}"' for t in EVENT_TABLES if t in present]
    if not selects:
        return []
    sql = " UNION ALL ".join(selects) + " ORDER BY uuid_ts, id"
    return [r[0] for r in con.execute(sql).fetchall()]
