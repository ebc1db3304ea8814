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

APPEND_BYTES_PER_S = 20 * 2**20  # ~1 MB between two checkpoints 50 ms apart
BODY = b'{"type":"track","event":"Steady","properties":{"pad":"' + b"x" * 2000 + b'"}}'


def test_wal_is_reused_while_appends_never_pause(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_log, "CHECKPOINT_EVERY_S", 0.05)
    log = SQLiteLog(tmp_path / "log.db")
    n = 0

    def append(total: int) -> int:
        """Back to back, as under load, until `total` bytes are in (by size, not time: a
        loaded machine appends slower, and the test must still see enough of them), at
        most APPEND_BYTES_PER_S: the WAL's working size is what is appended between two
        checkpoints, and on a machine with fast fsyncs that outgrew the warm-up."""
        nonlocal n
        appended, started = 0, time.monotonic()
        while appended < total:
            batch = [Record(f"m{n}-{i}", 1, "track", "Steady", "u", None, "src", BODY)
                     for i in range(20)]
            log.append(batch)
            n += 1
            appended += sum(len(r.body) for r in batch)
            ahead = appended / APPEND_BYTES_PER_S - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        return appended

    try:
        append(4 * 2**20)  # the WAL reaches its working size (it is not truncated below it)
        before = os.path.getsize(tmp_path / "log.db-wal")
        appended = append(12 * 2**20)
        grown = os.path.getsize(tmp_path / "log.db-wal") - before
        # A WAL that is never started over grows by all that is appended (frame headers
        # included); one that is reused stays at its working size.
        assert grown < appended / 4, f"WAL grew {grown:,} bytes while {appended:,} were appended"
        assert log.head() == n * 20
    finally:
        log.close()
    assert [e.position for e in SQLiteLog(tmp_path / "log.db", writable=False).read(0, 5)] == [
        1, 2, 3, 4, 5]
