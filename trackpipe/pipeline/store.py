"""The last ingest step: deduplicate and append to the log in group commits.

One writer takes every request waiting at that moment and commits them
together, so one fsync serves many requests (a commit costs ~0.2-1 ms here;
requests keep arriving while it runs). Deduplication happens in that same
writer, so check-then-append cannot race. A request's future resolves only
after its events are durable; if the commit fails every request in the group
gets StoreUnavailable and the client is told to retry (503).

LogWriter is that writer. `trackpipe serve` runs it in a process of its own
(writer_process.py); GroupCommitter runs it on a thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from trackpipe.errors import StoreUnavailable
from trackpipe.log.base import Discard, EventLog, Record, Repeat
from trackpipe.pipeline.clock import ClockSteps
from trackpipe.pipeline.decode import too_deep
from trackpipe.pipeline.dedupe import MessageIndex, message_hash
from trackpipe import metrics

log = logging.getLogger("trackpipe.store")

GROUP_MAX_EVENTS = 5000


class Committer(Protocol):
    """What the tracking API needs of a committer (GroupCommitter, WriterProcess)."""

    healthy: bool
    last_failed_bytes: int

    async def submit(self, records: list[Record], discards: list[Discard]) -> "Outcome": ...


@dataclass(slots=True)
class Outcome:
    stored: int = 0
    deduplicated: int = 0
    too_deep: bool = False  # refused whole: one of its events nests too deep; nothing stored


@dataclass(slots=True)
class Submission:
    records: list[Record]
    discards: list[Discard]
    future: asyncio.Future
    size: int  # the records' bodies in bytes


class LogWriter:
    """The single writer: deduplicates a group of requests and appends them in one commit.

    Runs in the writer process (pipeline/writer_process.py) in production, or in
    a thread (GroupCommitter) where one process is enough.
    """

    def __init__(self, log_: EventLog, index: MessageIndex, window_ms: int,
                 steps: ClockSteps | None = None):
        self.log = log_
        self.index = index
        self.window_ms = window_ms
        self.steps = steps or ClockSteps()

    def commit(self, group: list[tuple[list[Record], list[Discard]]]) -> list[Outcome]:
        """One Outcome per request, after the commit; raises sqlite3.Error / OSError if it fails.

        The messageIds are hashed and the events' depth checked here, not on the
        event loop: in `trackpipe serve` this runs in the writer process, which has
        CPU to spare while the loop has none. A request with an event nested too
        deep stores nothing (its outcome says too_deep; the API answers 400).
        """
        if not self.index.accepting():
            raise OSError("the dedup index cannot be written and its memory table is full")
        refused = [any(too_deep(rec.body) for rec in records) for records, _ in group]
        hashed = [[] if no else [(message_hash(rec.message_id), rec) for rec in records]
                  for no, (records, _) in zip(refused, group)]
        stored = self._stored_versions({h for records in hashed for h, _ in records})
        next_position = self.log.head() + 1
        self.steps.observe(next_position)
        appended: list[Record] = []
        new: list[tuple[int, int]] = []
        repeats: list[Repeat] = []
        discards: list[Discard] = []
        outcomes: list[Outcome] = []
        for records, (_, request_discards), no in zip(hashed, group, refused):
            outcome = Outcome(too_deep=no)
            outcomes.append(outcome)
            if no:
                continue
            discards.extend(request_discards)
            for h, rec in records:
                prior = stored.get(rec.message_id)
                if prior is not None and (rec.received_at - prior[1]
                                          - self.steps.since(prior[0])) < self.window_ms:
                    repeats.append(Repeat(rec.message_id, prior[0], rec.received_at))
                    outcome.deduplicated += 1
                    continue
                position = next_position + len(appended)
                stored[rec.message_id] = (position, rec.received_at)
                appended.append(rec)
                new.append((h, position))
                outcome.stored += 1
        try:
            positions = self.log.append(appended, discards, repeats)
        except Exception:
            self._index_landed(next_position - 1)
            raise
        if positions and positions[0] != next_position:
            raise RuntimeError("log positions moved under the writer")
        self.index.add(new)
        return outcomes

    def _index_landed(self, old_head: int) -> None:
        """A commit reported as failed can still have landed; its ids must be deduplicated."""
        if self.log.head() > old_head:
            landed = self.log.read(old_head, self.log.head() - old_head)
            self.index.add([(message_hash(e.message_id), e.position) for e in landed])

    def _stored_versions(self, hashes: set[int]) -> dict[str, tuple[int, int]]:
        """messageId -> (position, received_at) of its newest stored copy, for these hashes."""
        candidates = self.index.candidates(hashes)
        if not candidates:
            return {}
        positions = [p for ps in candidates.values() for p in ps]
        newest: dict[str, tuple[int, int]] = {}
        for position, message_id, received_at in self.log.receipts(positions):
            newest[message_id] = (position, received_at)  # ascending: the last copy wins
        return newest


class GroupCommitter:
    """Group commit with the LogWriter on a thread of this process."""

    def __init__(self, log_: EventLog, index: MessageIndex, window_ms: int):
        self.writer = LogWriter(log_, index, window_ms)
        self.healthy = True
        self.last_error: str | None = None
        self.last_failed_bytes = 0
        self._queue: queue.SimpleQueue[Submission | None] = queue.SimpleQueue()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    async def submit(self, records: list[Record], discards: list[Discard]) -> Outcome:
        if self._closing:
            raise StoreUnavailable("trackpipe is shutting down")
        future = asyncio.get_running_loop().create_future()
        self._queue.put(Submission(records, discards, future, sum([len(r.body) for r in records])))
        return await future

    def close(self) -> None:
        self._closing = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (group := next_group(self._queue)) is not None:
            started = time.perf_counter()
            try:
                outcomes = self.writer.commit([(s.records, s.discards) for s in group])
            except (sqlite3.Error, OSError) as exc:
                self.record_failure(group, exc)
                resolve(group, None, StoreUnavailable(f"the event log could not commit: {exc}"))
                continue
            self.healthy = True
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
            resolve(group, outcomes, None)

    def record_failure(self, group: list[Submission], exc: Exception | str, kind: str = "") -> None:
        self.healthy = False
        self.last_error = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.last_failed_bytes = sum(sub.size for sub in group)
        metrics.STORE_ERRORS.labels(kind=kind or error_kind(str(exc))).inc()
        log.error("log commit failed, answering 503: %s", self.last_error)


def next_group(q: queue.SimpleQueue) -> list[Submission] | None:
    """Block for one submission, then take every one already waiting (up to a size cap)."""
    first = q.get()
    if first is None:
        return None
    group, size = [first], len(first.records)
    while size < GROUP_MAX_EVENTS:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            q.put(None)  # seen again on the next call, after this group commits
            break
        group.append(nxt)
        size += len(nxt.records)
    return group


def resolve(group: list[Submission], outcomes: list[Outcome] | None,
            error: Exception | None) -> None:
    """settle() from another thread, on each request's own event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, tuple[list, list]] = {}
    for i, sub in enumerate(group):
        subs, outs = by_loop.setdefault(sub.future.get_loop(), ([], []))
        subs.append(sub)
        outs.append(outcomes[i] if outcomes else None)
    for loop, (subs, outs) in by_loop.items():
        try:
            loop.call_soon_threadsafe(settle, subs, outs, error)
        except RuntimeError:
            pass  # that loop is closed: its requests are gone


def settle(group: list[Submission], outcomes: list[Outcome] | None,
           error: Exception | None) -> None:
    """Wake each request with its outcome, or with the error (on the loop's own thread)."""
    for i, sub in enumerate(group):
        if sub.future.done():
            continue
        if error is None:
            sub.future.set_result(outcomes[i])
        else:
            sub.future.set_exception(error)


def error_kind(text: str) -> str:
    text = text.lower()
    if "full" in text:
        return "full"
    if "locked" in text or "busy" in text:
        return "locked"
    if "malformed" in text or "corrupt" in text:
        return "corrupt"
    return "io"
