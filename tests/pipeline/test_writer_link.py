"""The event loop's link to the log writer process: groups out, replies in, over a socket
pair that the writer reads and writes with multiprocessing.Connection's blocking calls."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import socket
import struct
import threading
import time

import msgspec
import pytest
import uvloop

from trackpipe.errors import StoreUnavailable
from trackpipe.log.base import Record
from trackpipe.pipeline.store import Submission
from trackpipe.pipeline.writer_process import WriterProcess, _Link

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
def pipe():
    """(the loop's end, the writer's end) of a socket pair, as WriterProcess makes it."""
    ours, writers = multiprocessing.Pipe()
    yield ours, writers
    ours.close()
    writers.close()


def run(loop_name: str, coro):
    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_group_larger_than_the_socket_buffer_arrives_whole_and_replies_split_anywhere_are_read(
        loop_name, pipe):
    ours, writers = pipe
    group = os.urandom(4 << 20)  # far more than a socket pair buffers
    replies = [("ok", [[i, 0, False]], 0.001) for i in range(4)]
    frames = b"".join(struct.pack("!i", len(b)) + b for b in map(msgspec.msgpack.encode, replies))
    received: list[bytes] = []

    def writer():
        received.append(writers.recv_bytes())  # Connection's own framing
        raw = socket.socket(fileno=os.dup(writers.fileno()))
        # The first two replies in one write, the rest cut inside a length and a body.
        cuts = [0, len(frames) // 2, len(frames) // 2 + 2, len(frames) - 5, len(frames)]
        for lo, hi in itertools.pairwise(cuts):
            raw.sendall(frames[lo:hi])
            threading.Event().wait(0.02)
        raw.close()

    async def main():
        got = []
        done = asyncio.Event()

        def on_reply(reply):
            got.append(reply)
            if len(got) == len(replies):
                done.set()

        link = _Link(asyncio.get_running_loop(), ours.fileno(), on_reply)
        thread = threading.Thread(target=writer)
        thread.start()
        link.send(group)
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.to_thread(thread.join)
        link.close()
        return got

    got = run(loop_name, main())
    assert received == [group]
    assert [tuple(r) for r in got] == [(k, [list(o) for o in out], t) for k, out, t in replies]


@pytest.mark.parametrize("noticed_by", ["the loop", "a send"])
@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_writer_going_away_ends_the_link(loop_name, pipe, noticed_by):
    ours, writers = pipe

    async def main():
        link = _Link(asyncio.get_running_loop(), ours.fileno(), lambda reply: None)
        writers.close()  # and no await yet: the loop has not seen it
        assert not link.closing()
        if noticed_by == "a send":
            with pytest.raises(OSError):  # EPIPE from the live socket
                link.send(b"a group")
            assert link.closing()
        with pytest.raises(OSError):  # ConnectionError (EOF) or BrokenPipeError
            await asyncio.wait_for(link.lost, 5)
        assert link.closing()
        link.poll()  # after the end: nothing to read, nothing raised
        link.close()

    run(loop_name, main())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_reply_the_loop_has_not_polled_for_yet_is_read_by_poll(loop_name, pipe):
    """What submit() relies on: poll() answers a commit in the middle of a loop iteration."""
    ours, writers = pipe

    async def main():
        got = []
        link = _Link(asyncio.get_running_loop(), ours.fileno(), got.append)
        link.send(b"group")
        assert writers.recv_bytes() == b"group"
        writers.send_bytes(msgspec.msgpack.encode(("ok", [], 0.0)))
        # No await in between: the loop never polled its sockets.
        for _ in range(1000):
            link.poll()
            if got:
                break
            threading.Event().wait(0.001)
        link.close()
        return got

    assert run(loop_name, main()) == [["ok", [], 0.0]]


def test_a_request_handed_over_once_the_commit_is_done_reads_its_reply_and_goes_at_once(tmp_path):
    """submit() itself reads the reply of the group in flight (the loop has not polled its
    sockets since), settles that group and sends the writer its own group straight away."""
    writer = WriterProcess(tmp_path, 3_600_000)

    def records(message_id):
        return [Record(message_id, 1_000_000, "track", "E", "u", None, "s", b'{"type":"track"}')]

    def in_flight():
        return [sub.records[0].message_id for group in writer._in_flight for sub in group]

    async def main():
        assert (await writer.submit(records("m0"), [])).stored == 1  # the link is up
        first = asyncio.ensure_future(writer.submit(records("m1"), []))
        await asyncio.sleep(0)  # `first` hands its group over
        assert in_flight() == ["m1"]
        time.sleep(1.0)  # the writer commits it; the loop does not poll meanwhile
        second = writer.submit(records("m2"), [])
        waiting_on = second.send(None)  # runs submit() up to its wait for the commit
        assert in_flight() == ["m2"]  # m1's reply was read and settled, m2 went at once
        assert (await first).stored == 1
        for _ in range(500):  # (not `await waiting_on`: submit() is awaiting it already)
            if waiting_on.done():
                break
            await asyncio.sleep(0.01)
        try:
            second.send(None)
        except StopIteration as stop:
            return stop.value
        finally:
            await writer.drain()  # as the server does on its way out

    try:
        outcome = asyncio.run(main())
    finally:
        writer.close()
    assert outcome.stored == 1


def test_a_reply_that_does_not_fit_its_group_still_answers_every_request_of_it(tmp_path):
    """A reply with fewer outcomes than its group must not leave a request hanging."""
    writer = WriterProcess(tmp_path, 3_600_000)

    async def main():
        loop = asyncio.get_running_loop()
        group = [Submission([], [], loop.create_future(), 0) for _ in range(3)]
        writer._in_flight.append(group)
        with pytest.raises(IndexError):
            writer._on_reply(("ok", [[1, 0, False]], 0.001))  # one outcome for three
        assert not writer._in_flight
        return [sub.future for sub in group]

    try:
        futures = asyncio.run(main())
    finally:
        writer.close()
    assert futures[0].result().stored == 1
    assert all(isinstance(f.exception(), StoreUnavailable) for f in futures[1:])
