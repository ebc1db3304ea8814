"""What the log writer process costs per commit and per event, and a log read per entry.

    python bench/writer_cost.py                    # instructions (valgrind) for the default loads
    python bench/writer_cost.py --cpu              # process_time instead (includes the fsyncs)
    python bench/writer_cost.py --commits 500 --requests 13 --events 1   # one run, no figures

Writer: K groups as the writer process gets them (a msgpack message of --requests
requests of --events ~1 KB track events each, every messageId new) go through what
serve_writer does with each: unpack, LogWriter.commit (dedup lookup, depth check,
append with its fsync, index add), reply. The log's checkpoint and the dedup index's
flush, which run on timers in a server, run here every CHECKPOINT_EVENTS and
FLUSH_EVENTS events, so that a run is the same each time. With valgrind, the cost
is (a long run - a short run) minus the same for building the messages alone, over
the commits between them: startup cancels. Kernel time (the fsync) is not counted.

Read: SQLiteLog.read of 2000-entry batches from a reader, every body (as the
destinations read) and lean (as identity does), per entry.

The last line of stdout is one JSON object.
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
import time
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import ingest  # noqa: E402  (bench/ingest.py: the event the ingest benchmark sends)

from trackpipe.log import sqlite as sqlite_log  # noqa: E402
from trackpipe.log.base import Record  # noqa: E402
from trackpipe.pipeline import dedupe  # noqa: E402

CHECKPOINT_EVENTS = 13_000  # about a second of /v1/track load (the checkpointer's period)
FLUSH_EVENTS = 50_000  # the dedup index's flush size
READ_BATCH = 2000  # the consumers' read
LOADS = {"track": (13, 1, 300, 1300), "batch": (3, 100, 40, 200)}  # requests, events, short, long
READS = (2, 12)  # short and long: full passes over READ_EVENTS entries
READ_EVENTS = 10_000


def messages(commits: int, requests: int, events: int) -> Iterator[bytes]:
    """The groups as serve_writer receives them, every messageId new."""
    from trackpipe.pipeline.writer_process import _pack
    body = ingest.body_template("track").encode()
    n = 0
    for _ in range(commits):
        group = []
        for _ in range(requests):
            records = []
            for _ in range(events):
                n += 1
                mid = f"m{n:09d}"
                records.append(Record(mid, 1_714_557_600_000, "track", "Order Completed",
                                      "user-1", "anon-1", "src",
                                      body.replace(ingest.MARK.encode(), mid.encode()),
                                      1_714_557_600_000))
            group.append((records, []))
        yield _pack(group)


def run_writer(commits: int, requests: int, events: int, build_only: bool) -> float:
    """serve_writer's loop over `commits` groups (or only their messages' building);
    returns the CPU seconds of the loop."""
    from trackpipe.pipeline.store import LogWriter
    from trackpipe.pipeline.writer_process import _pack, _unpack_group
    sqlite_log.CHECKPOINT_EVERY_S = 1e9  # checkpointed below, at fixed points
    dedupe.FLUSH_EVERY_S = 1e9  # flushed below, at fixed points
    group_bytes = messages(commits, requests, events)
    if build_only:
        started = time.process_time()
        for _ in group_bytes:
            pass
        return time.process_time() - started
    data = Path(tempfile.mkdtemp(prefix="trackpipe-writer-cost-"))
    try:
        log = sqlite_log.SQLiteLog(data / "log.db")
        index = dedupe.MessageIndex(data / "ids.db", log, flush_at=10**9)
        writer = LogWriter(log, index, 3600_000)
        checkpointer = sqlite_log.connect(log.path)
        per_commit = requests * events
        started = time.process_time()
        for i, message in enumerate(group_bytes, 1):
            outcomes = writer.commit(_unpack_group(message))
            _pack(("ok", [(o.stored, o.deduplicated, o.too_deep) for o in outcomes], 0.001))
            if i * per_commit % CHECKPOINT_EVENTS < per_commit:
                sqlite_log.checkpoint_all(checkpointer, log._commit_lock,
                                          sqlite_log.UNHELD_PASSES)
            if i * per_commit % FLUSH_EVENTS < per_commit:
                index.flush()
        cpu = time.process_time() - started
        checkpointer.close()
        index.close()
        log.close()
        return cpu
    finally:
        shutil.rmtree(data, ignore_errors=True)


def run_reads(passes: int, fill_only: bool) -> float:
    """`passes` full and lean reads of READ_EVENTS entries; returns their CPU seconds."""
    body = ingest.body_template("track").replace(ingest.MARK, "read").encode()
    data = Path(tempfile.mkdtemp(prefix="trackpipe-read-cost-"))
    try:
        writer = sqlite_log.SQLiteLog(data / "log.db")
        writer.append([Record(f"m{i}", 1_714_557_600_000, "track", "Order Completed",
                              f"user-{i % 500}", f"anon-{i % 700}", "src", body,
                              1_714_557_600_000 + i) for i in range(READ_EVENTS)])
        log = sqlite_log.SQLiteLog(data / "log.db", writable=False)
        log.read(0, 1)
        started = time.process_time()
        for _ in range(0 if fill_only else passes):
            for lean in ((), ("track", "page", "screen")):
                after = 0
                while entries := log.read(after, READ_BATCH, lean):
                    after = entries[-1].position
        cpu = time.process_time() - started
        log.close()
        writer.close()
        return cpu
    finally:
        shutil.rmtree(data, ignore_errors=True)


def callgrind(args: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
             sys.executable, __file__, *args],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or not found:
        raise SystemExit(f"valgrind run failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return int(found.group(1))


def writer_instructions(load: str) -> tuple[int, int]:
    """Instructions per commit and per event of the writer under `load`."""
    requests, events, short, long = LOADS[load]
    shape = ["--requests", str(requests), "--events", str(events)]
    total = {}
    for mode in ("commit", "build"):
        extra = ["--build-only"] if mode == "build" else []
        total[mode] = [callgrind(["--commits", str(n), *shape, *extra]) for n in (short, long)]
    per_commit = ((total["commit"][1] - total["commit"][0])
                  - (total["build"][1] - total["build"][0])) // (long - short)
    return per_commit, per_commit // (requests * events)


def read_instructions() -> int:
    """Instructions per entry read (the mean of a full and a lean read)."""
    total = {mode: [callgrind(["--reads", str(n), *extra]) for n in READS]
             for mode, extra in (("read", []), ("fill", ["--build-only"]))}
    diff = (total["read"][1] - total["read"][0]) - (total["fill"][1] - total["fill"][0])
    return diff // ((READS[1] - READS[0]) * 2 * READ_EVENTS)


def cpu_figures(rounds: int) -> dict:
    figures = {}
    for load, (requests, events, _, long) in LOADS.items():
        build = min(run_writer(long, requests, events, True) for _ in range(rounds))
        runs = [run_writer(long, requests, events, False) - build for _ in range(rounds)]
        figures[f"{load}_cpu_us_per_commit"] = round(min(runs) / long * 1e6, 1)
        print(f"{load:5}: {figures[f'{load}_cpu_us_per_commit']:8.1f} us CPU per commit"
              f" ({requests} x {events} events), best of {rounds}")
    fill = min(run_reads(READS[1], True) for _ in range(rounds))
    runs = [run_reads(READS[1], False) - fill for _ in range(rounds)]
    figures["read_cpu_us_per_entry"] = round(min(runs) / (READS[1] * 2 * READ_EVENTS) * 1e6, 3)
    print(f"read : {figures['read_cpu_us_per_entry']:8.3f} us CPU per entry, best of {rounds}")
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="process_time, not valgrind")
    p.add_argument("--rounds", type=int, default=3, help="--cpu runs of each (best taken)")
    p.add_argument("--only", choices=[*LOADS, "read"], help="one figure only")
    p.add_argument("--commits", type=int, help="one writer run of this many commits")
    p.add_argument("--requests", type=int, default=13)
    p.add_argument("--events", type=int, default=1, help="events per request")
    p.add_argument("--reads", type=int, help="one read run of this many passes")
    p.add_argument("--build-only", action="store_true", help="(a run) only build its input")
    args = p.parse_args()
    if args.commits is not None:
        run_writer(args.commits, args.requests, args.events, args.build_only)
        return
    if args.reads is not None:
        run_reads(args.reads, args.build_only)
        return
    if args.cpu:
        print(json.dumps(cpu_figures(args.rounds)))
        return
    if not shutil.which("valgrind"):
        raise SystemExit("needs valgrind (apt-get install valgrind), or use --cpu")
    figures = {}
    for load in LOADS:
        if args.only in (None, load):
            per_commit, per_event = writer_instructions(load)
            figures[f"{load}_instructions_per_commit"] = per_commit
            figures[f"{load}_instructions_per_event"] = per_event
            print(f"{load:5}: {per_commit:>12,} instructions per commit,"
                  f" {per_event:>10,} per event")
    if args.only in (None, "read"):
        figures["read_instructions_per_entry"] = read_instructions()
        print(f"read : {figures['read_instructions_per_entry']:>12,} instructions per entry")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
