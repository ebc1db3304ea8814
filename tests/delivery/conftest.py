"""Fixtures shared by the delivery tests."""

from __future__ import annotations

import pytest

from trackpipe.delivery.state import DeliveryState
from trackpipe.log.sqlite import SQLiteLog


@pytest.fixture
def files(tmp_path):
    event_log = SQLiteLog(tmp_path / "log.db")
    state = DeliveryState(tmp_path / "deliveries.db")
    yield tmp_path, event_log, state
    state.close()
    event_log.close()
