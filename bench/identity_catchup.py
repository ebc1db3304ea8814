"""How fast identity catches up on a stored backlog: read from the log, apply, repeat.

    python bench/identity_catchup.py [--events 30000] [--batch 2000] [--rounds 2]

Appends --events ~1 KB track events (bench/ingest.py's event; 500 users, 700
anonymous ids) to a fresh log, then drains them into a fresh SQLite identity
store the way the consumers process does (`log.read` then `store.apply`, in
batches of --batch), once reading every body and once with the store's lean
read (track, page and screen without their bodies; see EventLog.read).
Prints events/s for each; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import ingest  # noqa: E402  (bench/ingest.py: the event the ingest benchmark sends)

from trackpipe.config import Identity  # noqa: E402
from trackpipe.identity.sqlite_store import SQLiteStore  # noqa: E402
from trackpipe.log.base import Record  # noqa: E402
from trackpipe.log.sqlite import SQLiteLog  # noqa: E402


def fill(log: SQLiteLog, events: int) -> None:
    body = ingest.body_template("track").replace(ingest.MARK, "catchup").encode()
    for start in range(0, events, 1000):
        log.append([Record(f"m{i}", 1_714_557_600_000, "track", "Order Completed",
                           f"user-{i % 500}", f"anon-{i % 700}", "src", body,
                           1_714_557_600_000 + i)
                    for i in range(start, min(start + 1000, events))])


def drain(log: SQLiteLog, store: SQLiteStore, batch: int, lean: tuple[str, ...]) -> float:
    """Events/s through read + apply."""
    started, after, n = time.perf_counter(), 0, 0
    while entries := log.read(after, batch, lean):
        store.apply(entries)
        after, n = entries[-1].position, n + len(entries)
    return n / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=30_000)
    p.add_argument("--batch", type=int, default=2000, help="entries per read (the consumer's)")
    p.add_argument("--rounds", type=int, default=2, help="alternated full/lean drains")
    args = p.parse_args()
    data = Path(tempfile.mkdtemp(prefix="trackpipe-identity-catchup-"))
    try:
        writer = SQLiteLog(data / "log.db")
        fill(writer, args.events)
        log = SQLiteLog(data / "log.db", writable=False)
        figures: dict[str, list[float]] = {"full": [], "lean": []}
        for round_ in range(args.rounds):
            for kind in ("full", "lean"):
                store = SQLiteStore(data / f"identity-{kind}-{round_}.db", Identity(), "identity")
                lean = store.lean_types if kind == "lean" else ()
                figures[kind].append(drain(log, store, args.batch, lean))
                store.close()
                print(f"{kind:4}  {figures[kind][-1]:>9,.0f} events/s")
        log.close()
        writer.close()
        print(json.dumps({f"{k}_events_per_s": [round(v) for v in vs]
                          for k, vs in figures.items()}))
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
