"""Identity's cost per event for people it already knows: the /v1/batch benchmark's 100
(userId, anonymousId) pairs again and again, applied in batches to a SQLite store.

    python bench/identity_known.py --callgrind   # instructions per event (valgrind)
    python bench/identity_known.py --batches 12 [--batch 1000] [--no-read]

Fills a log with the same number of events whatever --batches says (so a short and a
long run differ only by the batches applied), applies 2 batches to learn the people,
then --batches more: `log.read` then `store.apply` (with --no-read, every read is done
before that). --callgrind runs it under valgrind with 2 and with 12 batches and prints
(long - short) / events; add --no-read for the apply alone. The identity-checkpoint
thread is left out (it runs on a timer; its work is mostly the kernel's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import ingest  # noqa: E402  (bench/ingest.py: the events the batch load sends)

import trackpipe.identity.sqlite_store as sqlite_store  # noqa: E402
from trackpipe.config import Identity  # noqa: E402
from trackpipe.gc_tuning import tune_gc  # noqa: E402
from trackpipe.log.base import Record  # noqa: E402
from trackpipe.log.sqlite import SQLiteLog  # noqa: E402

WARM, MOST = 2, 20
TS = 1_796_601_600_000


def run(batches: int, batch: int, read: bool) -> None:
    sqlite_store.CHECKPOINT_EVERY_S = 1e9  # no timer thread: the count stays exact
    now = datetime(2026, 12, 7, tzinfo=timezone.utc)
    events = [ingest.track_event(i, now) for i in range(ingest.BATCH_SIZE)]
    bodies = [json.dumps(e).encode() for e in events]
    data = Path(tempfile.mkdtemp(prefix="trackpipe-identity-known-"))
    try:
        log = SQLiteLog(data / "log.db")
        total = (WARM + MOST) * batch
        for start in range(0, total, 1000):
            log.append([Record(f"m{i}", TS, "track", events[i % 100]["event"],
                               events[i % 100]["userId"], events[i % 100]["anonymousId"],
                               "src", bodies[i % 100], TS)
                        for i in range(start, min(start + 1000, total))])
        tune_gc()  # as the consumers process does
        store = sqlite_store.SQLiteStore(data / "identity.db", Identity())
        position = 0
        for _ in range(WARM):
            entries = log.read(position, batch, store.lean_types)
            store.apply(entries)
            position = entries[-1].position
        ahead, after = [], position
        if not read:
            for _ in range(MOST):
                ahead.append(log.read(after, batch, store.lean_types))
                after = ahead[-1][-1].position
        for k in range(batches):
            entries = ahead[k] if not read else log.read(position, batch, store.lean_types)
            store.apply(entries)
            position = entries[-1].position
        store.close()
        log.close()
    finally:
        shutil.rmtree(data, ignore_errors=True)


def callgrind(batch: int, read: bool) -> int:
    if not shutil.which("valgrind"):
        raise SystemExit("--callgrind needs valgrind (apt-get install valgrind)")
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (WARM, MOST - 8):
            args = [sys.executable, __file__, "--batches", str(n), "--batch", str(batch)]
            out = subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out", *args,
                 *([] if read else ["--no-read"])],
                capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
            found = re.search(r"Collected : (\d+)", out.stderr)
            if out.returncode != 0 or not found:
                raise SystemExit(f"valgrind run failed ({out.returncode}):\n{out.stderr[-2000:]}")
            totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) // ((MOST - 8 - WARM) * batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=12, help=f"at most {MOST}")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--no-read", action="store_true", help="the apply alone")
    p.add_argument("--callgrind", action="store_true")
    args = p.parse_args()
    if args.callgrind:
        per = callgrind(args.batch, not args.no_read)
        what = "apply" if args.no_read else "read + apply"
        print(f"{what}: {per:,} instructions per event")
        print(json.dumps({"what": what, "instructions_per_event": per}))
        return
    run(min(args.batches, MOST), args.batch, not args.no_read)


if __name__ == "__main__":
    main()
