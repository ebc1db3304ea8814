"""The server restarts a consumers process that dies, waiting longer after each crash."""

from __future__ import annotations

import asyncio
import time

from trackpipe import metrics
from trackpipe.config import load
from trackpipe.delivery import supervisor
from trackpipe.delivery.supervisor import ConsumersProcess


class ShortLived:
    """Alive through the first poll after its start (starting Python takes a while), dead
    by the next: a crash at start-up."""

    returncode = 1

    def __init__(self):
        self.polls = 0  # the supervisor's 0.5 s sleeps since the start

    def poll(self):
        return None if self.polls <= 1 else 1


def test_a_process_dying_at_every_start_is_restarted_ever_more_slowly(monkeypatch):
    consumers = ConsumersProcess(load(None, {}))
    waits: list[float] = []

    def start():
        consumers.started_at, consumers.proc = time.monotonic(), ShortLived()
        if consumers.restarts == 7:
            consumers._closing = True

    async def sleep(seconds):
        waits.append(seconds)
        consumers.proc.polls += 1

    monkeypatch.setattr(consumers, "start", start)
    monkeypatch.setattr(supervisor.asyncio, "sleep", sleep)
    start()
    before = sum(metrics.CONSUMERS_RESTARTS.counts.values())
    asyncio.run(consumers.supervise())
    # each round: a poll finding it alive, one finding it dead, then the wait before a start
    assert waits[2::3] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0], waits
    assert sum(metrics.CONSUMERS_RESTARTS.counts.values()) - before == 7
