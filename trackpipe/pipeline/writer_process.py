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
from trackpipe.errors import StoreUnavailable
from trackpipe.log.base import Discard, Record
from trackpipe.pipeline.store import GROUP_MAX_EVENTS, Outcome, Submission, error_kind

log = logging.getLogger("trackpipe.writer")

PR_SET_PDEATHSIG = 1
IN_FLIGHT = 2  # groups sent to the writer before its first reply: it never waits for the next


class WriterProcess:
    """The committer `trackpipe serve` uses: same submit() as GroupCommitter."""

    def __init__(self, data_dir: Path, window_ms: int):
        self.data_dir = Path(data_dir)
        self.window_ms = window_ms
        self.healthy = True
        self.last_error: str | None = None
        self.last_failed_bytes = 0
        self._closing = False
        self._pending: list[Submission] = []
        self._in_flight: collections.deque[list[Submission]] = collections.deque()
        self._stream: asyncio.StreamWriter | None = None
        self._replies_task: asyncio.Task | None = None
        self._connecting: asyncio.Future | None = None
        self._start_child()

    def _start_child(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()  # duplex: a Unix socket pair
        self._proc = ctx.Process(target=serve_writer, name="trackpipe-writer", daemon=True,
                                 args=(child_conn, str(self.data_dir), self.window_ms))
        self._proc.start()
        child_conn.close()
        if not self._conn.poll(60):
            raise RuntimeError("the log writer process did not start")
        status, detail = self._conn.recv()
        if status != "ready":
            raise RuntimeError(f"the log writer process failed to open the log: {detail}")

    async def submit(self, records: list[tuple[int, Record]], discards: list[Discard]) -> Outcome:
        if self._closing:
            raise StoreUnavailable("trackpipe is shutting down")
        if self._stream is None:
            if self._connecting is None:  # the first request opens the stream; others wait
                self._connecting = asyncio.ensure_future(self._connect())
            await asyncio.shield(self._connecting)
        future = asyncio.get_running_loop().create_future()
        self._pending.append(Submission(records, discards, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        """Send what is waiting at once while fewer than IN_FLIGHT groups are committing.

        Sending from submit() (not from a task woken later) starts the writer as
        soon as a request is parsed; while it is busy, requests gather into the
        next, larger group.
        """
        while self._pending and len(self._in_flight) < IN_FLIGHT and self._stream is not None:
            group = self._take_group()
            self._in_flight.append(group)
            data = _pack([(s.records, s.discards) for s in group])
            self._stream.write(struct.pack("!i", len(data)))
            self._stream.write(data)

    async def _connect(self) -> None:
        sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        reader, self._stream = await asyncio.open_unix_connection(sock=sock, limit=2**20)
        self._replies_task = asyncio.get_running_loop().create_task(self._replies(reader))

    async def _replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                reply = await _recv(reader)
                group = self._in_flight.popleft()
                if reply[0] == "ok":
                    self.healthy = True
                    metrics.COMMIT_SECONDS.observe(reply[2])
                    _settle(group, [Outcome(*o) for o in reply[1]], None)
                else:
                    _, kind, message = reply
                    self._record_failure(group, message, kind)
                    _settle(group, None,
                            StoreUnavailable(f"the event log could not commit: {message}"))
                self._dispatch()
        except (EOFError, OSError, asyncio.IncompleteReadError) as exc:
            lost = [sub for group in self._in_flight for sub in group]
            self._in_flight.clear()
            self._record_failure(lost, f"the log writer process stopped ({exc})", "io")
            _settle(lost, None, StoreUnavailable("the event log writer stopped"))
            self._stream.close()
            self._stream = None
            if self._closing:
                return
            await asyncio.get_running_loop().run_in_executor(None, self._restart)
            self._connecting = asyncio.ensure_future(self._connect())
            await self._connecting
            self._dispatch()

    def _take_group(self) -> list[Submission]:
        """Everything waiting, up to GROUP_MAX_EVENTS events (at least one request)."""
        size, cut = 0, 0
        for cut, sub in enumerate(self._pending, 1):
            size += len(sub.records)
            if size >= GROUP_MAX_EVENTS:
                break
        group, self._pending = self._pending[:cut], self._pending[cut:]
        return group

    def close(self) -> None:
        self._closing = True
        if self._replies_task is not None:
            self._replies_task.cancel()
        try:
            self._conn.send_bytes(_pack(None))  # the writer flushes its index and closes the log
            self._conn.poll(30)
        except OSError:
            pass
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()

    def _record_failure(self, group: list[Submission], message: str, kind: str) -> None:
        self.healthy = False
        self.last_error = message
        self.last_failed_bytes = sum(len(r.body) for sub in group for _, r in sub.records)
        metrics.STORE_ERRORS.labels(kind=kind).inc()
        log.error("log commit failed, answering 503: %s", message)

    def _restart(self) -> None:
        try:
            self._proc.join(timeout=5)
            self._start_child()
            log.warning("log writer process restarted")
        except (RuntimeError, OSError) as exc:
            log.error("could not restart the log writer process: %s", exc)
            time.sleep(1)


# multiprocessing.Connection's framing (a signed 32-bit big-endian length), carrying
# msgpack: records are NamedTuples, which msgspec writes as arrays at C speed.
_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode


async def _recv(reader: asyncio.StreamReader):
    (size,) = struct.unpack("!i", await reader.readexactly(4))
    if size == -1:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    return _unpack(await reader.readexactly(size))


def _settle(group: list[Submission], outcomes, error: Exception | None) -> None:
    for i, sub in enumerate(group):
        if sub.future.done():
            continue
        if error is None:
            sub.future.set_result(outcomes[i])
        else:
            sub.future.set_exception(error)


def serve_writer(conn, data_dir: str, window_ms: int) -> None:
    """The writer process: open the log and the dedup index, then commit groups until told to stop."""
    _die_with_parent()
    # Ctrl-C reaches the whole process group; the server decides when the writer stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from trackpipe.log.sqlite import SQLiteLog
    from trackpipe.pipeline.dedupe import MessageIndex
    from trackpipe.pipeline.store import LogWriter

    try:
        event_log = SQLiteLog(Path(data_dir) / "log.db")
        index = MessageIndex(Path(data_dir) / "ids.db", event_log)
    except (sqlite3.Error, OSError) as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    writer = LogWriter(event_log, index, window_ms)
    conn.send(("ready", event_log.head()))  # the handshake is pickled; the groups are msgpack
    try:
        while True:
            try:
                message = conn.recv_bytes()
            except EOFError:
                return  # the server is gone
            group = _unpack(message)
            if group is None:
                return
            started = time.perf_counter()
            try:
                outcomes = writer.commit(
                    [([(h, Record(*r)) for h, r in records], [Discard(*d) for d in discards])
                     for records, discards in group])
            except (sqlite3.Error, OSError) as exc:
                conn.send_bytes(_pack(("error", error_kind(str(exc)), f"{type(exc).__name__}: {exc}")))
                continue
            conn.send_bytes(_pack(("ok", [(o.stored, o.deduplicated) for o in outcomes],
                                   time.perf_counter() - started)))
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
