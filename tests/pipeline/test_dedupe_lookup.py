"""The dedup index's lookup across the memory table and ids.db: each hash asked for once,
found in memory, in a flush under way and in the file."""

from __future__ import annotations

import sqlite3

from trackpipe.log.sqlite import SQLiteLog
from trackpipe.pipeline.dedupe import MessageIndex


def test_a_flush_keeps_every_position_of_a_hash(tmp_path):
    log = SQLiteLog(tmp_path / "log.db")
    index = MessageIndex(tmp_path / "ids.db", log)
    try:
        pairs = [(h, p) for p, h in enumerate([7, -3, 7, 2**62, -(2**63), 7, 5, -3], 1)]
        index.add(pairs)
        index.flush()
        db = sqlite3.connect(tmp_path / "ids.db")
        try:
            assert sorted(db.execute("SELECT h, position FROM ids")) == sorted(pairs)
            assert db.execute("SELECT value FROM state").fetchone() == (8,)
        finally:
            db.close()
        # Read from the file: each hash once (an id asked for twice too), the extremes too.
        found = index.candidates([7, 5, 11, 7, -(2**63), 2**62])
        assert {h: sorted(ps) for h, ps in found.items()} == {
            7: [1, 3, 6], 5: [7], -(2**63): [5], 2**62: [4]}
    finally:
        index.close()
        log.close()


def test_a_lookup_joins_the_memory_table_and_the_file(tmp_path):
    log = SQLiteLog(tmp_path / "log.db")
    index = MessageIndex(tmp_path / "ids.db", log)
    try:
        index.add([(7, 1), (8, 2)])
        index.flush()
        index.add([(7, 3), (9, 4)])
        found = index.candidates([7, 8, 9, 10])
        assert {h: sorted(ps) for h, ps in found.items()} == {7: [1, 3], 8: [2], 9: [4]}
        index._frozen = {8: [5]}  # as while a flush is writing these
        assert sorted(index.candidates([8])[8]) == [2, 5]
        index._frozen = {}
    finally:
        index.close()
        log.close()
