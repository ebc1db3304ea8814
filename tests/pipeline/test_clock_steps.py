"""A step of the wall clock neither stores an SDK's retry twice nor keeps a dedup entry
past its window (reliability-and-security.md R7, R22): the window counts the time
that passed, while receivedAt follows the clock."""

from __future__ import annotations

import json

import pytest
from support import MachineClocks

from trackpipe.log.base import Record
from trackpipe.log.sqlite import SQLiteLog
from trackpipe.pipeline.clock import ClockSteps
from trackpipe.pipeline.dedupe import MessageIndex
from trackpipe.pipeline.store import LogWriter

HOUR = 3600.0
WINDOW_MS = 12 * 3600_000


@pytest.fixture
def rig(tmp_path):
    clock = MachineClocks()
    log = SQLiteLog(tmp_path / "log.db")
    index = MessageIndex(tmp_path / "ids.db", log)
    steps = ClockSteps(tmp_path / "clock_steps.json", wall=clock.wall,
                       monotonic=clock.monotonic)
    writer = LogWriter(log, index, WINDOW_MS, steps)

    def send(message_id: str) -> str:
        """One event received now, as the API stamps it: 'stored' or 'deduplicated'."""
        body = json.dumps({"type": "track", "messageId": message_id}).encode()
        rec = Record(message_id, int(clock.wall() * 1000), "track", "E", "u", None, "s", body)
        [outcome] = writer.commit([([rec], [])])
        return "stored" if outcome.stored else "deduplicated"

    yield clock, send, tmp_path
    index.close()
    log.close()


def test_a_retry_after_the_clock_stepped_forward_is_still_a_repeat(rig):
    clock, send, _ = rig
    assert send("a") == "stored"
    clock.step(13 * HOUR)  # an NTP correction after boot
    clock.wait(2)
    assert send("a") == "deduplicated", "the SDK's retry 2 s later was stored again"
    clock.wait(12 * HOUR)
    assert send("a") == "stored", "past the window, counted in time that passed"


def test_an_entry_does_not_outlive_its_window_after_the_clock_stepped_back(rig):
    clock, send, _ = rig
    assert send("b") == "stored"
    clock.step(-HOUR)
    clock.wait(12 * HOUR - 60)
    assert send("b") == "deduplicated"
    clock.wait(61)
    assert send("b") == "stored", "kept an hour past its window"


def test_drift_and_slew_are_not_steps(rig):
    clock, send, tmp_path = rig
    assert send("c") == "stored"
    for _ in range(10):  # 30 s in all, a few seconds at a time
        clock.step(3)
        clock.wait(HOUR)
        send("other")
    assert not (tmp_path / "clock_steps.json").exists()


def test_steps_are_remembered_across_a_restart(rig):
    clock, send, tmp_path = rig
    assert send("d") == "stored"
    clock.step(13 * HOUR)
    send("after")  # the commit that notices the step
    again = ClockSteps(tmp_path / "clock_steps.json", wall=clock.wall,
                       monotonic=clock.monotonic)
    assert again.since(1) == 13 * 3600_000 and again.since(2) == 0
