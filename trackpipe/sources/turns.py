"""Requests take turns at parsing: one per event-loop iteration.

When a group commit finishes, its requests are answered together and their
clients send the next ones together, so tens of requests become ready in the
same loop iteration. asyncio (and uvloop) runs every callback that is ready
before it polls its sockets again; left alone, those requests parse back to
back (~2.5 ms for a 100-event batch, 100+ ms for a wave), and meanwhile the log
writer's reply waits unread and the writer idles with nothing to commit. Taking
turns puts a poll between two parses, so the writer's reply is read, and the
next group handed over, within one parse.
"""

from __future__ import annotations

import asyncio
import collections


class Turns:
    """`await take()` before a synchronous step, `done()` after it (also when it raises).

    The first caller in an iteration goes at once; later ones queue in arrival
    order, and each `done()` hands the turn to the next caller in a later
    iteration, after the loop has polled its sockets.
    """

    def __init__(self) -> None:
        self._held = False  # a step has run in this iteration, or the turn was handed on
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def take(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # turns belong to one loop (tests run several in turn)
            self._loop, self._held = loop, False
            self._waiting.clear()
        if not self._held:
            self._held = True
            return
        turn = loop.create_future()
        self._waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.done()  # handed the turn, then cancelled before using it: pass it on
            raise

    def done(self) -> None:
        self._loop.call_soon(self._hand_on)

    def _hand_on(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # _held stays True: the turn is that caller's
                return
        self._held = False
