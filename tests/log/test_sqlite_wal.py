"""The log's WAL stays bounded under steady appends (see SQLiteLog._checkpoint_loop).

SQLite starts the WAL over only when a commit finds every frame in it
checkpointed; a checkpoint that runs beside the commits never gets there, and
the WAL then grows by everything appended.
"""

from __future__ import annotations

import os
import time

from trackpipe.log import sqlite as sqlite_log
from trackpipe.log.base import Record
from trackpipe.log.sqlite import SQLiteLog

BODY = b'{"type":"track","event":"Steady","properties":{"pad":"' + b"x" * 2000 + b'"}}'


def test_wal_is_reused_while_appends_never_pause(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_log, "CHECKPOINT_EVERY_S", 0.05)
    log = SQLiteLog(tmp_path / "log.db")
    try:
        appended = 0
        deadline = time.monotonic() + 2.0
        n = 0
        while time.monotonic() < deadline:  # back to back, as under load
            batch = [Record(f"m{n}-{i}", 1, "track", "Steady", "u", None, "src", BODY)
                     for i in range(20)]
            log.append(batch)
            n += 1
            appended += sum(len(r.body) for r in batch)
        wal = os.path.getsize(tmp_path / "log.db-wal")
        assert appended > 8 * 2**20, "too few appends to tell (a slow machine?)"
        # Checkpointed every 50 ms, the WAL holds a few intervals' worth, not all of it.
        assert wal < appended / 4, f"WAL {wal:,} bytes after {appended:,} bytes appended"
        assert log.head() == n * 20
    finally:
        log.close()
    assert [e.position for e in SQLiteLog(tmp_path / "log.db", writable=False).read(0, 5)] == [
        1, 2, 3, 4, 5]
