"""The log writer's own checks: what it refuses, it refuses per request, in one group commit."""

from __future__ import annotations

import json

from trackpipe.log.base import Discard, Record
from trackpipe.log.sqlite import SQLiteLog
from trackpipe.pipeline.decode import MAX_DEPTH
from trackpipe.pipeline.dedupe import MessageIndex
from trackpipe.pipeline.store import LogWriter


def record(message_id: str, body: dict) -> Record:
    return Record(message_id, 1_000_000, "track", "E", "u", None, "s", json.dumps(body).encode())


def nested(levels: int) -> dict:
    """A message `levels` deep: the message itself is level 1."""
    value: object = 1
    for _ in range(levels - 2):
        value = [value]
    return {"type": "track", "properties": {"a": value}}


def test_a_request_with_a_message_too_deep_stores_nothing_and_its_group_mates_commit(tmp_path):
    log = SQLiteLog(tmp_path / "log.db")
    index = MessageIndex(tmp_path / "ids.db", log)
    try:
        writer = LogWriter(log, index, window_ms=60_000)
        discard = Discard(1_000_000, "s", None, "no_user_anon_id", "no ids", "{}")
        deep = [record("ok-in-deep", nested(3)), record("deep", nested(MAX_DEPTH + 1))]
        fine = [record("a", nested(MAX_DEPTH)), record("b", {"type": "track"})]
        outcomes = writer.commit([(deep, [discard]), (fine, [])])
        assert [(o.stored, o.too_deep) for o in outcomes] == [(0, True), (2, False)]
        assert [e.message_id for e in log.read(0)] == ["a", "b"]
        assert log.discards() == []  # the refused request's discards went with it
        # Its ids were never indexed: the same events, sent again fixed, are new.
        again = writer.commit([([record("ok-in-deep", nested(3))], [])])
        assert (again[0].stored, again[0].deduplicated) == (1, 0)
    finally:
        index.close()
        log.close()
