"""The log writer in a process of its own.

Every call into SQLite releases the GIL, and taking it back from a busy event
loop costs up to the interpreter's switch interval: measured here, a writer
thread appended 274k rows/s alone but 34k rows/s beside a busy Python thread.
In its own process the writer never waits for the event loop. The event loop
itself talks to it over a socket pair: while one group of requests is being
committed the next one gathers, and the reply resolves each request's future
directly, with no thread hand-offs (the framing is multiprocessing's, so the
writer side keeps the blocking Connection API).

The writer process dies with the server (PR_SET_PDEATHSIG), so a restarted
server never shares the log with a writer left over from a killed one.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sqlite3
import struct
import time
from pathlib import Path

import msgspec

from trackpipe import metrics
from trackpipe.errors import StartFailed, StoreUnavailable
from trackpipe.log.base import Discard, Record
from trackpipe.pipeline.store import GROUP_MAX_EVENTS, Outcome, Submission, error_kind, settle

log = logging.getLogger("trackpipe.writer")

PR_SET_PDEATHSIG = 1
IN_FLIGHT = 1  # one group commits while the next gathers (a second in flight only added fsyncs)
# A request handed over while a group commits looks for that group's reply once the group
# is as old as 80% of a recent commit (at least 0.1 ms): sooner, the reply is rarely there.
POLL_AFTER_COMMIT = 0.8
POLL_AFTER_MIN_S = 0.0001


GROUP_MAX_BYTES = 16 << 20  # event bodies per group: bounds the message and the commit
MAX_PENDING_BYTES = 128 << 20  # waiting for the writer beyond this: 503 overloaded
# A commit takes milliseconds. One held longer means a stuck disk or a stopped writer:
# /ready turns 503 after STALLED_AFTER_S, and after COMMIT_DEADLINE_S the writer is killed,
# so its requests get 503 (their retries go to a new writer, deduplicated) instead of
# hanging; before the SDKs' own timeouts (10-15 s) and uvicorn's 10 s graceful shutdown,
# whose cancel would answer a request still waiting 500.
STALLED_AFTER_S = 2.0
COMMIT_DEADLINE_S = 8.0
STABLE_SECONDS = 60.0  # a writer up this long died of something new: restart it at once


class WriterProcess:
    """The committer `trackpipe serve` uses: same submit() as GroupCommitter.

    One supervisor task owns the writer's life: it connects, reads replies in
    order, and when the writer stops for any reason answers everything in
    flight or waiting with 503 and starts a new writer (with backoff). While
    no writer is up, requests get 503 at once instead of queueing.
    """

    def __init__(self, data_dir: Path, window_ms: int):
        self.data_dir = Path(data_dir)
        self.window_ms = window_ms
        self.healthy = True
        self.last_error: str | None = None
        self.last_failed_bytes = 0
        self._closing = False
        self._pending: list[Submission] = []
        self._pending_bytes = 0
        self._in_flight: collections.deque[list[Submission]] = collections.deque()
        self._sent_at = 0.0  # perf_counter() when the group in flight was sent
        self._commit_s = 0.0  # the writer's recent commit time (a moving average)
        self._poll_after = POLL_AFTER_MIN_S
        self._link: _Link | None = None
        self._supervisor: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._up: asyncio.Event | None = None
        self._ever_up = False
        self._spawn()
        self._await_ready()

    # -- the writer process's life ---------------------------------------------

    def _spawn(self) -> None:
        """Start a writer. Call it on the main thread: PR_SET_PDEATHSIG fires when the
        *thread* that forked the child exits, and pool threads come and go."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()  # duplex: a Unix socket pair
        self._proc = ctx.Process(target=serve_writer, name="trackpipe-writer", daemon=True,
                                 args=(child_conn, str(self.data_dir), self.window_ms))
        self._proc.start()
        child_conn.close()

    def _await_ready(self) -> None:
        """Block until the writer has opened the log (it may replay the dedup index first)."""
        try:
            if not self._conn.poll(120):
                raise StartFailed("the log writer process did not start within 120 s")
            status, detail = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise StartFailed(f"the log writer process exited while starting ({exc})") from None
        if status != "ready":
            raise StartFailed(f"the log writer process failed to open the log: {detail}")

    def alive(self) -> bool:
        """For /ready: a writer process is running and connected (or about to be)."""
        up = self._up.is_set() if self._up is not None else True
        return self._proc.is_alive() and up and not (
            self._supervisor is not None and self._supervisor.done())

    def stalled_for(self) -> float:
        """For /ready: how long the group in flight has been committing, when that is
        longer than any commit should take (else 0)."""
        held = time.perf_counter() - self._sent_at if self._in_flight else 0.0
        return held if held > STALLED_AFTER_S else 0.0

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        backoff, first = 0.1, True
        while not self._closing:
            up_since = time.monotonic()
            try:
                if not first:
                    self._spawn()
                    await loop.run_in_executor(None, self._await_ready)
                first = False
                self._link = _Link(loop, self._conn.fileno(), self._on_reply)
                self._up.set()
                self._ever_up = True
                up_since = time.monotonic()
                self._dispatch()
                await self._watch(self._link)  # raises why the writer went away
                raise ConnectionError("the link to the log writer was closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any way the writer can stop: answer 503, start another
                self.last_error = f"the log writer process stopped: {exc!r}"
                log.error("%s", self.last_error)
            self._writer_down()
            await loop.run_in_executor(None, self._reap)
            if self._closing:
                return
            if time.monotonic() - up_since >= STABLE_SECONDS:
                backoff = 0.1  # not the crash before it again: no reason to wait longer
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            if self._proc.exitcode is not None:
                log.warning("restarting the log writer process")

    async def _watch(self, link: "_Link") -> None:
        """Wait for the link to end (re-raising why); kill a writer that holds one group
        past COMMIT_DEADLINE_S (see there)."""
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(link.lost), 1.0)
            except asyncio.TimeoutError:
                held = time.perf_counter() - self._sent_at
                if self._in_flight and held > COMMIT_DEADLINE_S:
                    self._proc.kill()
                    raise TimeoutError(f"no commit within {held:.0f} s: the writer was hung"
                                       " (a stuck disk, or a stopped process) and was killed")

    def _on_reply(self, reply) -> None:
        """The writer's answer for the group in flight; sends the next group at once."""
        if reply[0] not in ("ok", "error"):
            raise RuntimeError(f"the writer said {reply[0]!r}")
        group = self._in_flight.popleft()
        try:
            if reply[0] == "ok":
                self.healthy = True
                metrics.COMMIT_SECONDS.observe(reply[2])
                self._commit_s = 0.8 * self._commit_s + 0.2 * reply[2]
                self._poll_after = max(POLL_AFTER_MIN_S, POLL_AFTER_COMMIT * self._commit_s)
                settle(group, [Outcome(*o) for o in reply[1]], None)
            else:
                _, kind, message = reply
                self._record_failure(group, message, kind)
                settle(group, None, StoreUnavailable(f"the event log could not commit: {message}"))
        except Exception:  # a reply that does not fit its group: no request may hang on it
            settle(group, None, StoreUnavailable("the event log writer answered out of turn"))
            raise
        self._dispatch()

    def _writer_down(self) -> None:
        self._up.clear()
        if self._link is not None:
            self._link.close()
            self._link = None
        lost = [sub for group in self._in_flight for sub in group] + self._pending
        self._in_flight.clear()
        self._pending, self._pending_bytes = [], 0
        if lost:
            self._record_failure(lost, self.last_error or "the log writer process stopped", "io")
        settle(lost, None, StoreUnavailable("the event log writer stopped"))

    def _reap(self) -> None:
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._conn.close()

    # -- requests ---------------------------------------------------------------

    async def submit(self, records: list[Record], discards: list[Discard]) -> Outcome:
        if self._closing:
            raise StoreUnavailable("trackpipe is shutting down")
        if self._supervisor is None:
            # Kept: Python 3.11's get_running_loop() makes a getpid() system call each time.
            self._loop = asyncio.get_running_loop()
            self._up = asyncio.Event()
            self._supervisor = self._loop.create_task(self._supervise())
        if not self._up.is_set():
            if self._ever_up:
                raise StoreUnavailable("the event log writer is restarting")
            await self._up.wait()  # the first request waits for the first connection
        size = sum([len(r.body) for r in records])
        if self._pending_bytes + size > MAX_PENDING_BYTES:
            raise StoreUnavailable("trackpipe is overloaded: too many events wait for the log")
        future = self._loop.create_future()
        self._pending.append(Submission(records, discards, future, size))
        self._pending_bytes += size
        self._dispatch()
        if self._in_flight and time.perf_counter() - self._sent_at >= self._poll_after:
            # The commit in flight may be done while the loop is still busy with the
            # requests that arrived together with this one: its reply read now sends
            # the writer this group at once, instead of after the loop's whole batch of
            # callbacks (the writer idled meanwhile). Each look costs a recv() system
            # call, hence the wait for most of a commit's time first.
            self._link.poll()
        return await future

    def _dispatch(self) -> None:
        """Send what is waiting at once while fewer than IN_FLIGHT groups are committing.

        Sending from submit() (not from a task woken later) starts the writer as
        soon as a request is parsed; while it is busy, requests gather into the
        next, larger group.
        """
        while self._pending and len(self._in_flight) < IN_FLIGHT:
            link = self._link
            if link is None or link.closing():
                return  # the supervisor answers what is waiting
            group = self._take_group()
            try:
                link.send(_pack([(s.records, s.discards) for s in group]))
            except OSError as exc:  # the writer went away
                settle(group, None, StoreUnavailable(f"the event log writer stopped ({exc})"))
                return
            except Exception as exc:  # whatever it was, the group's requests are answered
                log.exception("could not hand a group to the log writer")
                settle(group, None, StoreUnavailable(f"the event log writer was not reached ({exc!r})"))
                continue
            self._in_flight.append(group)
            self._sent_at = time.perf_counter()

    def _take_group(self) -> list[Submission]:
        """Everything waiting, up to GROUP_MAX_EVENTS events or GROUP_MAX_BYTES (at least one)."""
        events = size = cut = 0
        for cut, sub in enumerate(self._pending, 1):
            events += len(sub.records)
            size += sub.size
            if events >= GROUP_MAX_EVENTS or size >= GROUP_MAX_BYTES:
                break
        group, self._pending = self._pending[:cut], self._pending[cut:]
        self._pending_bytes = max(self._pending_bytes - size, 0)
        return group

    # -- shutdown ---------------------------------------------------------------

    async def drain(self, timeout: float = 10.0) -> None:
        """Refuse new requests and let the groups already handed over finish (on the loop)."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while (self._pending or self._in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._link is not None:
            self._link.close()
            self._link = None

    def close(self) -> None:
        """Tell the writer to flush its index and close the log, then wait for it."""
        self._closing = True
        try:
            self._conn.send_bytes(_pack(None))
            self._conn.poll(30)
        except (OSError, ValueError):
            pass  # already gone
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()

    def _record_failure(self, group: list[Submission], message: str, kind: str) -> None:
        self.healthy = False
        self.last_error = message
        self.last_failed_bytes = sum(sub.size for sub in group)
        metrics.STORE_ERRORS.labels(kind=kind).inc()
        log.error("log commit failed, answering 503: %s", message)


# multiprocessing.Connection's framing (a signed 32-bit big-endian length), carrying
# msgpack: records are NamedTuples, which msgspec writes as arrays at C speed.
_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode
# The writer's side: each group straight into Records and Discards (~2 µs a record
# instead of ~4.5 µs for plain lists wrapped in Python).
_unpack_group = msgspec.msgpack.Decoder(list[tuple[list[Record], list[Discard]]] | None).decode


class _Link:
    """The event loop's end of the socket pair to the writer, non-blocking both ways.

    Besides the loop's own polling of the socket, `poll()` reads replies in the
    middle of a loop iteration: submit() calls it once the commit in flight may
    be done, so the writer gets its next group without waiting for the loop to
    finish the callbacks of its current iteration. The framing is
    multiprocessing.Connection's: the writer keeps its blocking recv_bytes().
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, on_reply):
        self._loop, self._on_reply = loop, on_reply
        self._sock = socket.socket(fileno=os.dup(fd))
        self._sock.setblocking(False)
        self._fd = self._sock.fileno()
        self._received = bytearray()
        self._chunk = bytearray(1 << 16)  # recv_into() it: a recv() that finds nothing allocates none
        self._unsent: collections.deque[memoryview] = collections.deque()
        self.lost = loop.create_future()  # the reason the link ended; the supervisor awaits it
        loop.add_reader(self._fd, self.poll)

    def closing(self) -> bool:
        return self.lost.done()

    # -- groups out -------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue a group and write what the socket takes now (one sendmsg); the rest goes
        out as the writer reads. Raises OSError when the writer is gone."""
        was_idle = not self._unsent
        self._unsent.extend((memoryview(struct.pack("!i", len(data))), memoryview(data)))
        if was_idle:
            try:
                self._flush()
            except OSError as exc:
                self._end(exc)
                raise

    def _flush(self) -> None:
        unsent = self._unsent
        while unsent:
            try:
                sent = self._sock.sendmsg(list(unsent))
            except (BlockingIOError, InterruptedError):
                break
            while sent:
                head = unsent[0]
                if sent >= len(head):
                    sent -= len(head)
                    unsent.popleft()
                else:
                    unsent[0], sent = head[sent:], 0
        if unsent:
            self._loop.add_writer(self._fd, self._writable)
        else:
            self._loop.remove_writer(self._fd)

    def _writable(self) -> None:
        try:
            self._flush()
        except OSError as exc:
            self._end(exc)

    # -- replies in ---------------------------------------------------------------

    def poll(self) -> None:
        """Read what the writer has sent and handle each whole reply; never blocks."""
        if self.lost.done():
            return
        try:
            chunk = self._chunk
            while True:
                try:
                    n = self._sock.recv_into(chunk)
                except (BlockingIOError, InterruptedError):
                    return
                if not n:
                    raise ConnectionError("the log writer closed its end")
                self._received += memoryview(chunk)[:n]
                self._replies()
                if n < len(chunk):
                    return  # drained: spare the recv that would only say so
        except Exception as exc:  # the writer is gone, or said something unexpected
            self._end(exc)

    def _replies(self) -> None:
        buffer, at = self._received, 0
        while len(buffer) - at >= 4:
            (size,) = struct.unpack_from("!i", buffer, at)
            head = 4
            if size == -1:  # (the framing of a message over 2 GiB)
                if len(buffer) - at < 12:
                    break
                (size,) = struct.unpack_from("!Q", buffer, at + 4)
                head = 12
            if len(buffer) - at - head < size:
                break
            reply = _unpack(buffer[at + head:at + head + size])
            at += head + size
            self._on_reply(reply)
        del buffer[:at]

    # -- the end ----------------------------------------------------------------

    def _end(self, exc: BaseException) -> None:
        if not self.lost.done():
            self.lost.set_exception(exc)
        self.close()

    def close(self) -> None:
        if self._fd == -1:
            return
        if not self.lost.done():
            self.lost.set_result(None)
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._sock.close()
        self._fd = -1
        self._unsent.clear()


def serve_writer(conn, data_dir: str, window_ms: int) -> None:
    """The writer process: open the log and the dedup index, then commit groups until told to stop."""
    _die_with_parent()
    # Ctrl-C reaches the whole process group; the server decides when the writer stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from trackpipe.gc_tuning import tune_gc
    from trackpipe.log.sqlite import SQLiteLog
    from trackpipe.pipeline.clock import ClockSteps
    from trackpipe.pipeline.dedupe import MessageIndex
    from trackpipe.pipeline.store import LogWriter

    tune_gc()  # each group unpacks thousands of records
    try:
        event_log = SQLiteLog(Path(data_dir) / "log.db")
        index = MessageIndex(Path(data_dir) / "ids.db", event_log)
    except (sqlite3.Error, OSError) as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    writer = LogWriter(event_log, index, window_ms, ClockSteps(Path(data_dir) / "clock_steps.json"))
    conn.send(("ready", event_log.head()))  # the handshake is pickled; the groups are msgpack
    try:
        while True:
            try:
                message = conn.recv_bytes()
            except EOFError:
                return  # the server is gone
            group = _unpack_group(message)
            if group is None:
                return
            started = time.perf_counter()
            try:
                outcomes = writer.commit(group)
            except (sqlite3.Error, OSError) as exc:
                conn.send_bytes(_pack(("error", error_kind(str(exc)), f"{type(exc).__name__}: {exc}")))
                continue
            except Exception as exc:  # state unknown: answer 503 and let a fresh writer take over
                conn.send_bytes(_pack(("error", "internal", f"{type(exc).__name__}: {exc}")))
                return
            replies = [(o.stored, o.deduplicated, o.too_deep) for o in outcomes]
            conn.send_bytes(_pack(("ok", replies, time.perf_counter() - started)))
    finally:
        index.close()
        event_log.close()
        try:
            conn.send_bytes(_pack(("closed", None)))
        except OSError:
            pass


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the EOF on the pipe still stops the writer
