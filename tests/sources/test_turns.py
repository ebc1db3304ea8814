"""Large requests take turns at parsing, so the loop polls its sockets between two parses."""

import asyncio
import base64
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from trackpipe.config import load as load_config
from trackpipe.log.base import Discard, Record
from trackpipe.pipeline.store import Outcome
from trackpipe.sources.auth import SourceRegistry
from trackpipe.sources.catalog import Source
from trackpipe.sources.http import TAKES_TURNS_BYTES, TrackingAPI
from trackpipe.sources.turns import Turns

WRITE_KEY = "turns-key"


def test_steps_ready_together_run_one_per_loop_iteration():
    """Each step's call_soon (standing for I/O the loop would poll) runs before the next step."""
    seen = []

    async def step(turns, i):
        await turns.take()
        try:
            seen.append(f"step {i}")
            asyncio.get_running_loop().call_soon(seen.append, f"io {i}")
        finally:
            turns.done()

    async def main():
        turns = Turns()
        await asyncio.gather(*(step(turns, i) for i in range(4)))

    asyncio.run(main())
    assert seen == ["step 0", "io 0", "step 1", "io 1", "step 2", "io 2", "step 3", "io 3"]


def test_a_step_that_raises_still_hands_the_turn_on():
    async def failing(turns):
        await turns.take()
        try:
            raise ValueError("a bad request")
        finally:
            turns.done()

    async def fine(turns):
        await turns.take()
        turns.done()
        return "parsed"

    async def main():
        turns = Turns()
        return await asyncio.wait_for(asyncio.gather(failing(turns), fine(turns),
                                                     return_exceptions=True), 2)

    bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError) and good == "parsed"


def test_a_waiter_cancelled_after_it_was_handed_the_turn_passes_it_on():
    async def wants_turn(turns, name, seen):
        await turns.take()
        seen.append(name)
        turns.done()

    async def main():
        turns, seen = Turns(), []
        await turns.take()  # this coroutine holds the turn
        b = asyncio.create_task(wants_turn(turns, "b", seen))
        c = asyncio.create_task(wants_turn(turns, "c", seen))
        await asyncio.sleep(0)  # both queue
        turns._hand_on()  # b is handed the turn...
        b.cancel()  # ...and cancelled before it could use it
        await asyncio.wait_for(asyncio.gather(b, c, return_exceptions=True), 2)
        return seen, b.cancelled()

    seen, b_cancelled = asyncio.run(main())
    assert b_cancelled and seen == ["c"]


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.booleans(), min_size=1, max_size=20),
       st.lists(st.integers(0, 19), max_size=8), st.integers(0, 6))
def test_any_mix_of_failures_and_cancellations_never_stalls_the_others(raises, cancel, after):
    """Whichever steps raise and whichever callers are cancelled (waiting, just handed the
    turn, or done), every other caller gets its turn, in arrival order, one per iteration."""
    async def caller(turns, i, fails, seen):
        await turns.take()
        try:
            seen.append(i)
            asyncio.get_running_loop().call_soon(seen.append, f"io {i}")
            if fails:
                raise ValueError(i)
        finally:
            turns.done()

    async def main():
        turns, seen = Turns(), []
        tasks = [asyncio.create_task(caller(turns, i, fails, seen))
                 for i, fails in enumerate(raises)]
        for _ in range(after):
            await asyncio.sleep(0)
        for i in cancel:
            if i < len(tasks):
                tasks[i].cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        return tasks, seen

    tasks, seen = asyncio.run(main())
    steps = [x for x in seen if type(x) is int]
    finished = [i for i, t in enumerate(tasks) if not t.cancelled()]
    assert steps == sorted(steps) and set(finished) <= set(steps)
    for i in steps[:-1]:  # the loop got round to each step's I/O before the next step
        assert seen.index(f"io {i}") < seen.index(steps[steps.index(i) + 1])


def test_one_turns_object_serves_a_second_event_loop():
    """A loop that ended while a turn was held must not leave the next loop waiting."""
    turns = Turns()

    async def hold_and_leave():
        await turns.take()  # held, and never handed on: the loop ends first

    async def step():
        await turns.take()
        turns.done()
        return "parsed"

    asyncio.run(hold_and_leave())
    assert asyncio.run(asyncio.wait_for(step(), 2)) == "parsed"


class RecordingCommitter:
    """Answers at once, and stands for the log writer's reply with a callback."""

    healthy = True
    last_failed_bytes = 0

    def __init__(self, seen):
        self.seen = seen

    async def submit(self, records: list[Record], discards: list[Discard]) -> Outcome:
        self.seen.append(f"submit {len(records)}")
        asyncio.get_running_loop().call_soon(self.seen.append, "writer replied")
        return Outcome(stored=len(records))


def batch_body(tag: str, events: int) -> bytes:
    return json.dumps({"batch": [{"type": "track", "event": "E", "userId": "u",
                                  "messageId": f"{tag}-{i}", "properties": {"pad": "x" * 300}}
                                 for i in range(events)]}).encode()


def drive(bodies: list[bytes]) -> list[str]:
    seen: list[str] = []
    api = TrackingAPI(load_config(None, {}), SourceRegistry([
        Source("src", "turns", WRITE_KEY, True, False, 0)]), RecordingCommitter(seen))
    auth = b"Basic " + base64.b64encode(f"{WRITE_KEY}:".encode())

    async def one(body: bytes) -> None:
        scope = {"type": "http", "path": "/v1/batch", "method": "POST",
                 "client": ("127.0.0.1", 5555), "headers": [(b"authorization", auth)]}

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                assert message["status"] == 200

        await api(scope, receive, send)

    async def main():
        await asyncio.gather(*(one(b) for b in bodies))

    asyncio.run(main())
    return seen


def test_large_requests_ready_together_let_the_writer_reply_between_their_parses():
    bodies = [batch_body(f"r{i}", 100) for i in range(3)]
    assert all(len(b) >= TAKES_TURNS_BYTES for b in bodies)
    assert drive(bodies) == ["submit 100", "writer replied"] * 3


def test_small_requests_do_not_wait_for_a_turn():
    bodies = [batch_body(f"s{i}", 1) for i in range(3)]
    assert all(len(b) < TAKES_TURNS_BYTES for b in bodies)
    assert drive(bodies) == ["submit 1"] * 3 + ["writer replied"] * 3
