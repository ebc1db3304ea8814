"""The event loop's link to the log writer process: groups out, replies in, over a socket
pair that the writer reads and writes with multiprocessing.Connection's blocking calls."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import struct
import threading

import msgspec
import pytest
import uvloop

from trackpipe.pipeline.writer_process import _Link

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop_name: str, coro):
    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_group_larger_than_the_socket_buffer_arrives_whole_and_replies_split_anywhere_are_read(
        loop_name):
    ours, writers = multiprocessing.Pipe()
    group = os.urandom(4 << 20)  # far more than a socket pair buffers
    replies = [("ok", [[i, 0, False]], 0.001) for i in range(4)]
    frames = b"".join(struct.pack("!i", len(b)) + b for b in map(msgspec.msgpack.encode, replies))
    received: list[bytes] = []

    def writer():
        received.append(writers.recv_bytes())  # Connection's own framing
        raw = socket.socket(fileno=os.dup(writers.fileno()))
        # The first two replies in one write, the rest cut inside a length and a body.
        cuts = [0, len(frames) // 2, len(frames) // 2 + 2, len(frames) - 5, len(frames)]
        for lo, hi in zip(cuts, cuts[1:]):
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

    try:
        got = run(loop_name, main())
    finally:
        ours.close()
        writers.close()
    assert received == [group]
    assert [tuple(r) for r in got] == [(k, [list(o) for o in out], t) for k, out, t in replies]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_writer_going_away_ends_the_link_and_a_later_send_raises(loop_name):
    ours, writers = multiprocessing.Pipe()

    async def main():
        link = _Link(asyncio.get_running_loop(), ours.fileno(), lambda reply: None)
        writers.close()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(link.lost, 5)
        assert link.closing()
        link.poll()  # after the end: nothing to read, nothing raised
        with pytest.raises(OSError):
            link.send(b"a group")
        link.close()

    try:
        run(loop_name, main())
    finally:
        ours.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_reply_the_loop_has_not_polled_for_yet_is_read_by_poll(loop_name):
    """What submit() relies on: poll() answers a commit in the middle of a loop iteration."""
    ours, writers = multiprocessing.Pipe()

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

    try:
        assert run(loop_name, main()) == [["ok", [], 0.0]]
    finally:
        ours.close()
        writers.close()
