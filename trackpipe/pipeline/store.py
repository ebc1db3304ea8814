"""The last ingest step: deduplicate and append to the log in group commits.

One writer thread drains every request waiting at that moment and commits
them together, so one fsync serves many requests (a commit costs ~0.2-1 ms
here; requests keep arriving while it runs). Deduplication happens in the
same thread, so check-then-append cannot race. A request's future resolves
only after its events are durable; if the commit fails every request in the
group gets StoreUnavailable and the client is told to retry (503).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from trackpipe.errors import StoreUnavailable
from trackpipe.log.base import Discard, EventLog, Record, Repeat
from trackpipe.pipeline.dedupe import MessageIndex
from trackpipe import metrics

log = logging.getLogger("trackpipe.store")

GROUP_MAX_EVENTS = 5000


@dataclass(slots=True)
class Outcome:
    stored: int = 0
    deduplicated: int = 0


@dataclass(slots=True)
class _Submission:
    records: list[tuple[int, Record]]  # (messageId hash, record)
    discards: list[Discard]
    future: asyncio.Future
    outcome: Outcome = field(default_factory=Outcome)


class GroupCommitter:
    def __init__(self, log_: EventLog, index: MessageIndex, window_ms: int):
        self.log = log_
        self.index = index
        self.window_ms = window_ms
        self.healthy = True
        self.last_error: str | None = None
        self.last_failed_bytes = 0
        self._queue: queue.SimpleQueue[_Submission | None] = queue.SimpleQueue()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    async def submit(self, records: list[tuple[int, Record]], discards: list[Discard]) -> Outcome:
        if self._closing:
            raise StoreUnavailable("trackpipe is shutting down")
        future = asyncio.get_running_loop().create_future()
        self._queue.put(_Submission(records, discards, future))
        return await future

    def close(self) -> None:
        self._closing = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- the writer thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group, size = [first], len(first.records)
            stop = False
            while size < GROUP_MAX_EVENTS:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
                size += len(nxt.records)
            self._commit(group)
            if stop:
                return

    def _commit(self, group: list[_Submission]) -> None:
        started = time.perf_counter()
        try:
            if not self.index.accepting():
                raise OSError("the dedup index cannot be written and its memory table is full")
            new = self._dedupe_and_append(group)
        except (sqlite3.Error, OSError) as exc:
            self.healthy = False
            self.last_failed_bytes = sum(len(r.body) for sub in group for _, r in sub.records)
            self.last_error = f"{type(exc).__name__}: {exc}"
            metrics.STORE_ERRORS.labels(kind=_error_kind(exc)).inc()
            log.error("log commit failed, answering 503: %s", self.last_error)
            self._resolve(group, StoreUnavailable(f"the event log could not commit: {exc}"))
            return
        self.healthy = True
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        self.index.add(new)
        self._resolve(group, None)

    def _dedupe_and_append(self, group: list[_Submission]) -> list[tuple[int, int]]:
        hashes = {h for sub in group for h, _ in sub.records}
        stored = self._stored_versions(hashes)
        next_position = self.log.head() + 1
        records: list[Record] = []
        new: list[tuple[int, int]] = []
        repeats: list[Repeat] = []
        discards: list[Discard] = []
        for sub in group:
            discards.extend(sub.discards)
            for h, rec in sub.records:
                prior = stored.get(rec.message_id)
                if prior is not None and rec.received_at - prior[1] < self.window_ms:
                    repeats.append(Repeat(rec.message_id, prior[0], rec.received_at))
                    sub.outcome.deduplicated += 1
                    continue
                position = next_position + len(records)
                stored[rec.message_id] = (position, rec.received_at)
                records.append(rec)
                new.append((h, position))
                sub.outcome.stored += 1
        positions = self.log.append(records, discards, repeats)
        assert not positions or positions[0] == next_position, "log positions moved under the writer"
        return new

    def _stored_versions(self, hashes: set[int]) -> dict[str, tuple[int, int]]:
        """messageId -> (position, received_at) of its newest stored copy, for these hashes."""
        candidates = self.index.candidates(hashes)
        if not candidates:
            return {}
        positions = [p for ps in candidates.values() for p in ps]
        newest: dict[str, tuple[int, int]] = {}
        for entry in self.log.get(positions):
            newest[entry.message_id] = (entry.position, entry.received_at)  # ascending: last wins
        return newest

    def _resolve(self, group: list[_Submission], error: Exception | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Submission]] = {}
        for sub in group:
            by_loop.setdefault(sub.future.get_loop(), []).append(sub)
        for loop, subs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, subs, error)
            except RuntimeError:
                pass  # that loop is closed: its requests are gone


def _settle(subs: list[_Submission], error: Exception | None) -> None:
    for sub in subs:
        if sub.future.done():
            continue
        if error is None:
            sub.future.set_result(sub.outcome)
        else:
            sub.future.set_exception(error)


def _error_kind(exc: Exception) -> str:
    text = str(exc).lower()
    if "full" in text:
        return "full"
    if "locked" in text or "busy" in text:
        return "locked"
    if "malformed" in text or "corrupt" in text:
        return "corrupt"
    return "io"
