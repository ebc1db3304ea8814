"""What the consumers' SQLite work costs next to a busy thread of the same process.

    python bench/gil_convoy.py [--events 40000]

The consumers process runs identity on a thread beside the destinations'
event loop. Python's sqlite3 hands the GIL back around every call into
SQLite (every row a cursor steps to, every statement executemany() runs), and
taking it back from a thread that is busy in Python can wait out the whole
switch interval (5 ms). This script measures, alone and next to a thread that
only computes:

  log read   SQLiteLog.read() of 2000-entry batches (~1.1 KB track events,
             bench/ingest.py's), in microseconds per entry;
  identity   the SQLite identity store applying those batches when every
             event is a new person (a new userId and anonymousId, so each
             batch creates, merges and relabels 2000 profiles), events/s;
  record     DeliveryState.record() of a batch of 5000 events that all failed
             retryably (each gets a retry row), in milliseconds: the
             destinations' event loop waits for it;
  retry read those 5000 retries coming due again: DeliveryState.due() and the
             log's get() of their entries, in milliseconds (the event loop
             waits for it too).

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from trackpipe.config import Identity
from trackpipe.delivery.retry import RetryPolicy
from trackpipe.delivery.state import DeliveryState, Sent
from trackpipe.destinations.base import DELIVERED, retry
from trackpipe.events import format_ts
from trackpipe.identity.sqlite_store import SQLiteStore
from trackpipe.log.base import Record
from trackpipe.log.sqlite import SQLiteLog

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402  (the event the ingest benchmark sends)

BATCH = 2000
RETRY_AT_ONCE = RetryPolicy(4 * 3600_000, 10, initial_ms=0.0)  # retries due at once


class Spinner:
    """A thread that keeps the interpreter busy, as a loaded event loop does."""

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        x = 0
        while not self._stop.is_set():
            for i in range(1000):
                x += i

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def fill(path: Path, events: int) -> SQLiteLog:
    log = SQLiteLog(path)
    now = datetime.now(timezone.utc)
    stamp = format_ts(int(now.timestamp() * 1000))
    records = []
    for i in range(events):
        m = ingest.track_event(i, now)
        m.update(messageId=f"m{i}", userId=f"user-{i}", anonymousId=f"anon-{i}",
                 receivedAt=stamp, timestamp=stamp)
        records.append(Record(m["messageId"], 1, "track", m["event"], m["userId"],
                              m["anonymousId"], "src_1", msgspec.json.encode(m)))
    for lo in range(0, events, 5000):
        log.append(records[lo:lo + 5000])
    return log


def read_us_per_entry(log: SQLiteLog, events: int) -> float:
    started = time.perf_counter()
    n = 0
    for after in range(0, events, BATCH):
        n += len(log.read(after, BATCH))
    return (time.perf_counter() - started) / n * 1e6


def identity_events_per_s(log: SQLiteLog, store: SQLiteStore, events: int) -> float:
    position = store.position()
    started, done = time.perf_counter(), 0
    while done < events:
        entries = log.read(position, BATCH)
        if not entries:
            break
        store.apply(entries)
        position, done = entries[-1].position, done + len(entries)
    return done / (time.perf_counter() - started)


def record_ms(state: DeliveryState, first: int, n: int = 5000) -> float:
    sent = [Sent(first + i, f"m{first + i}", 1, f"u:{i}", 1, 0, retry(500, "busy"))
            for i in range(n)]
    batch_id = state.begin_batch("hook", first, first + n - 1, n)
    started = time.perf_counter()
    state.record("hook", sent, duration_ms=1.0, policy=RETRY_AT_ONCE, batch_id=batch_id,
                 cursor=first + n - 1)
    return (time.perf_counter() - started) * 1000


def retry_read_ms(state: DeliveryState, log: SQLiteLog, n: int = 5000) -> float:
    started = time.perf_counter()
    due = state.due("hook", n)
    entries = log.get([r.position for r in due])
    elapsed = (time.perf_counter() - started) * 1000
    assert len(due) == len(entries) == n, (len(due), len(entries))
    state.record("hook", [Sent(e.position, e.message_id, 1, r.user_key, 2, 0, DELIVERED)
                          for e, r in zip(entries, due)], duration_ms=1.0, policy=RETRY_AT_ONCE)
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=40_000)
    args = p.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory() as tmp:
        fill(Path(tmp) / "log.db", 4 * n).close()
        log = SQLiteLog(Path(tmp) / "log.db", writable=False)
        store = SQLiteStore(Path(tmp) / "identity.db", Identity())
        state = DeliveryState(Path(tmp) / "deliveries.db")
        try:
            record_ms(state, 1)  # warm
            retry_read_ms(state, log)
            record_alone = record_ms(state, 10_001)
            retry_alone = retry_read_ms(state, log)
            with Spinner():
                record_busy = record_ms(state, 20_001)
                retry_busy = retry_read_ms(state, log)
            read_alone = read_us_per_entry(log, n)
            with Spinner():
                read_busy = read_us_per_entry(log, n)
            identity_events_per_s(log, store, BATCH)  # warm the store
            ident_alone = identity_events_per_s(log, store, n)
            with Spinner():
                ident_busy = identity_events_per_s(log, store, n // 4)
        finally:
            state.close()
            store.close()
            log.close()
    print(f"log read   alone {read_alone:8.2f} us/entry   beside a busy thread "
          f"{read_busy:8.2f} us/entry")
    print(f"identity   alone {ident_alone:8,.0f} events/s beside a busy thread "
          f"{ident_busy:8,.0f} events/s")
    print(f"record     alone {record_alone:8.1f} ms       beside a busy thread "
          f"{record_busy:8.1f} ms   (a failed batch of 5000)")
    print(f"retry read alone {retry_alone:8.1f} ms       beside a busy thread "
          f"{retry_busy:8.1f} ms   (5000 due retries and their entries)")
    print(json.dumps({"log_read_us_alone": round(read_alone, 2),
                      "log_read_us_busy": round(read_busy, 2),
                      "identity_events_per_s_alone": round(ident_alone),
                      "identity_events_per_s_busy": round(ident_busy),
                      "record_failed_batch_ms_alone": round(record_alone, 1),
                      "record_failed_batch_ms_busy": round(record_busy, 1),
                      "retry_read_ms_alone": round(retry_alone, 1),
                      "retry_read_ms_busy": round(retry_busy, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
