"""A real log and deliveries.db (the `files` fixture) and track events appended to the
log, for the delivery tests."""

from __future__ import annotations

import msgspec
import pytest

from trackpipe.delivery.state import DeliveryState
from trackpipe.log.base import Record
from trackpipe.log.sqlite import SQLiteLog


@pytest.fixture
def files(tmp_path):
    event_log = SQLiteLog(tmp_path / "log.db")
    state = DeliveryState(tmp_path / "deliveries.db")
    yield tmp_path, event_log, state
    state.close()
    event_log.close()


def append(event_log: SQLiteLog, users: list[str]) -> list[str]:
    """One track event per entry of `users`; returns their messageIds."""
    records, ids = [], []
    for user in users:
        message_id = f"m{event_log.head() + len(records) + 1}"
        body = msgspec.json.encode({"type": "track", "event": "Tested", "userId": user,
                                    "messageId": message_id})
        records.append(Record(message_id, 1_700_000_000_000, "track", "Tested", user, None,
                              "src", body))
        ids.append(message_id)
    event_log.append(records)
    return ids
