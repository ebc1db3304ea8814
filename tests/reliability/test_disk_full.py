"""Disk full (reliability-and-security.md R2, R4): 503 + Retry-After, never a false 200.

"Disk full" without root: the server starts with a soft RLIMIT_FSIZE (set in
preexec_fn). The limit caps every file the process writes, so log.db and its
WAL each stop growing at the limit; CPython ignores SIGXFSZ, so SQLite raises
"disk I/O error" (SQLITE_IOERR). A fixed 2 MiB is far above what startup and a
warm-up write (~0.1 MB per file, checked below) and is reached after ~10k
events. Space "returns" when the test raises the running process's limit with
`prlimit --pid` (or resource.prlimit).

The dedup index (ids.db) is flushed by a background thread into its own file;
a failed flush must keep its entries in memory (the log is its journal), so
every acknowledged batch resent after recovery, and again after a restart,
must be deduplicated rather than stored twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid

import httpx

from reliability.ledger import Ledger, client_for, run_load

SOFT_LIMIT = 2 * 1024 * 1024
FILL_TIMEOUT_S = 20.0
HOLD_S = 2.0
RECOVER_TIMEOUT_S = 10.0


def _limit_file_size() -> None:  # runs in the child, between fork and exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (SOFT_LIMIT, resource.RLIM_INFINITY))


def _lift_limit(pid: int) -> None:
    """Space returns for the server and its log writer process alike, as on a real disk."""
    for target in [pid, *_children(pid)]:
        if shutil.which("prlimit"):
            subprocess.run(["prlimit", "--pid", str(target), "--fsize=unlimited"], check=True,
                           timeout=10)
        else:
            resource.prlimit(target, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:  # the thread ended while we looked
            continue
    return found


def _file_sizes(data_dir) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(data_dir.iterdir()) if p.is_file()}


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_disk_full_answers_503_and_recovers(fresh_server):
    proc = fresh_server(preexec_fn=_limit_file_size)
    proc.start()
    pid = proc.proc.pid
    with open(f"/proc/{pid}/limits") as f:
        assert re.search(rf"Max file size\s+{SOFT_LIMIT}\s", f.read()), "the soft limit is not set"

    ledger = Ledger(f"full-{uuid.uuid4().hex[:8]}")
    warm = ledger.new_batch(20)
    r = httpx.post(f"{proc.url}/v1/batch", content=warm.body, timeout=5,
                   auth=(proc.write_key, ""))
    assert r.status_code == 200, r.text
    warm.acked = True
    warm.statuses.append(200)
    after_warmup = _file_sizes(proc.data_dir)
    assert max(after_warmup.values()) < SOFT_LIMIT // 8, after_warmup

    obs: dict = {"ready_full": [], "health_full": [], "ready_after": None}

    async def scenario() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(ledger, proc, stop, workers=4, sizes=(50, 50)))
        async with httpx.AsyncClient(timeout=5) as probe:
            try:
                # 1. Fill: until requests have been refused for 1 s without a single 200.
                deadline = time.monotonic() + FILL_TIMEOUT_S
                while True:
                    await asyncio.sleep(0.1)
                    now = time.monotonic()
                    assert now < deadline, (
                        f"storage never filled up: {ledger.status_counts()}, "
                        f"{_file_sizes(proc.data_dir)}")
                    refused = [t for t, s in ledger.timeline if s != 200]
                    last_ok = max((t for t, s in ledger.timeline if s == 200), default=0.0)
                    if refused and now - max(refused[0], last_ok) > 1.0:
                        break
                obs["sizes_full"] = _file_sizes(proc.data_dir)
                # 2. Hold: the process stays up, /health 200, /ready should say 503.
                hold_end = time.monotonic() + HOLD_S
                while time.monotonic() < hold_end:
                    obs["ready_full"].append((await probe.get(f"{proc.url}/ready")).status_code)
                    obs["health_full"].append((await probe.get(f"{proc.url}/health")).status_code)
                    assert proc.proc.poll() is None, "trackpipe died while the disk was full"
                    await asyncio.sleep(0.2)
                obs["ready_body_full"] = (await probe.get(f"{proc.url}/ready")).text
                obs["errors_metric"] = _metric((await probe.get(f"{proc.url}/metrics")).text,
                                               'trackpipe_store_errors_total{kind="io"}')
                acked_before_lift = len([s for _, s in ledger.timeline if s == 200])
                lifted_at = time.monotonic()
                # 3. Space returns: the same running process accepts again.
                _lift_limit(pid)
                deadline = lifted_at + RECOVER_TIMEOUT_S
                while True:
                    await asyncio.sleep(0.1)
                    assert time.monotonic() < deadline, (
                        f"no recovery within {RECOVER_TIMEOUT_S} s of lifting the limit: "
                        f"{ledger.status_counts()}")
                    oks = [t for t, s in ledger.timeline if s == 200 and t > lifted_at]
                    if len(oks) >= 20:
                        break
                obs["acked_before_lift"] = acked_before_lift
                ready = await probe.get(f"{proc.url}/ready")
                obs["ready_after"] = (ready.status_code, ready.text)
            finally:
                stop.set()
                await load
        # 4. Resend what failed (same messageIds) and every acknowledged batch:
        #    the first must be stored, the second deduplicated.
        await ledger.retry_unacked(proc.url, proc.write_key, deadline_s=15)
        await _resend_acked(ledger, proc)

    asyncio.run(scenario())
    assert proc.proc.poll() is None, "trackpipe exited"

    # Every answer was 200 or a well-formed 503; there were 503s, and 200s after the refusal.
    statuses = ledger.status_counts()
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0 and statuses[200] > obs["acked_before_lift"], statuses
    for r in ledger.responses:
        assert r.status_code == 503
        assert re.fullmatch(r"\d+", r.headers.get("retry-after", "")), dict(r.headers)
        body = json.loads(r.content)
        assert isinstance(body.get("code"), str) and isinstance(body.get("message"), str), body
    assert all(s == 200 for s in obs["health_full"]), obs["health_full"]
    assert obs["errors_metric"] > 0, "trackpipe_store_errors_total{kind=\"io\"} did not rise"
    assert obs["ready_after"][0] == 200, obs["ready_after"]

    # Invariants 1-3, on the running process and after a clean restart without the limit.
    ledger.check(proc.events())
    proc.preexec_fn = None
    proc.stop()
    for name in ("log.db", "ids.db"):
        with sqlite3.connect(proc.data_dir / name) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], name
        db.close()
    proc.start()
    ledger.check(proc.events())
    asyncio.run(_resend_acked(ledger, proc))
    counts = ledger.check(proc.events())
    assert len(counts) == len(ledger.sent_ids)

    # Readiness must not claim the store works while every ingest commit fails.
    assert all(s == 503 for s in obs["ready_full"]), (
        f"/ready answered {obs['ready_full']} while every batch got 503 "
        f"(last body {obs['ready_body_full']}; files {obs['sizes_full']})")


async def _resend_acked(ledger: Ledger, proc) -> None:
    """Resend every acknowledged batch once: each must get 200 and store nothing new."""
    acked = [b for b in ledger.batches if b.acked]
    sem = asyncio.Semaphore(4)
    async with client_for(proc.write_key, 4) as client:
        async def one(b) -> int:
            async with sem:
                r = await client.post(f"{proc.url}/v1/batch", content=b.body)
                return r.status_code
        answers = await asyncio.gather(*(one(b) for b in acked))
    assert answers == [200] * len(acked), [a for a in answers if a != 200][:5]


def test_dedup_index_wal_stays_bounded(tmp_path):
    """Disk usage: ids.db's WAL must be checkpointed while the server runs.

    log.db has a checkpointer thread; ids.db is opened by the same connect()
    (wal_autocheckpoint=0) but nothing checkpoints it, so every flush appends
    the B-tree pages it dirtied (≈ the whole table, the keys being random
    hashes) to a WAL that never rewinds: growth is quadratic in the number of
    ids in the window, and ends in a full disk. Component-level (MessageIndex
    on a real SQLiteLog) so that 200k ids take a second, not minutes of load.
    """
    import random

    from trackpipe.log.sqlite import SQLiteLog
    from trackpipe.pipeline.dedupe import MessageIndex

    log = SQLiteLog(tmp_path / "log.db")
    index = MessageIndex(tmp_path / "ids.db", log, flush_at=20_000)
    rng = random.Random(7)
    try:
        position = 0
        for _ in range(10):  # 10 flushes of 20k ids, as the flusher does every 2 s under load
            index.add([(rng.getrandbits(63), position + i + 1) for i in range(20_000)])
            position += 20_000
            index.flush()
        time.sleep(1.5)  # a checkpointer on a 1 s timer, like the log's, gets a turn
        db = (tmp_path / "ids.db").stat().st_size
        wal = (tmp_path / "ids.db-wal").stat().st_size
    finally:
        index.close()
        log.close()
    # 200k (hash, position) rows are ~5 MB of B-tree; one flush may dirty all of it.
    assert wal <= 2 * db + 4 * 1024 * 1024, (
        f"ids.db-wal is {wal / 1e6:.1f} MB while ids.db is {db / 1e6:.2f} MB after 200k ids: "
        "the dedup index's WAL is never checkpointed")



# Runs in a child process: the file-size limit must not apply to pytest itself.
_INDEX_UNWRITABLE = r"""
import asyncio, json, os, random, resource, sys, time
from pathlib import Path
from trackpipe.errors import StoreUnavailable
from trackpipe.log.base import Record
from trackpipe.log.sqlite import SQLiteLog
from trackpipe.pipeline.dedupe import MessageIndex
from trackpipe.pipeline.store import GroupCommitter

d = Path(sys.argv[1])
log = SQLiteLog(d / "log.db")
index = MessageIndex(d / "ids.db", log, flush_at=1000)
rng = random.Random(3)
for _ in range(10):  # ~5 MB of index B-tree (position 0: no log entry behind them)
    index.add([(rng.getrandbits(63), 0) for _ in range(20000)])
    index.flush()
# flush() returns at once while the background flusher holds a batch of its own; that
# batch must land before the limit, or it fails under it and fills the memory table.
while index._active or index._frozen:
    index.flush()
    time.sleep(0.01)
index._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
out = {"ids_db": os.path.getsize(d / "ids.db")}
# ids.db is now larger than the limit; the log is tiny, so only the index cannot grow.
resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, resource.RLIM_INFINITY))

def batch(n):
    recs = []
    for i in range(100):
        mid = f"m{n}-{i}"
        recs.append(Record(mid, int(time.time() * 1000), "track", "e", "u", None, "src",
                           b'{"type":"track"}'))
    return recs

async def submit_all(committer, ns):
    res = []
    for n in ns:
        try:
            o = await asyncio.wait_for(asyncio.shield(committer.submit(batch(n), [])), 3)
            res.append([o.stored, o.deduplicated])
        except StoreUnavailable:
            res.append("503")
        except asyncio.TimeoutError:
            res.append("hang")
            break
    return res

committer = GroupCommitter(log, index, 3600 * 1000)
out["first"] = asyncio.run(submit_all(committer, range(30)))
out["again"] = asyncio.run(submit_all(committer, range(10)))
out["through_while_limited"] = index._through
c0 = time.process_time(); time.sleep(2.0); out["idle_cpu_s"] = time.process_time() - c0
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
deadline = time.monotonic() + 8
while index._through < log.head() and time.monotonic() < deadline:
    time.sleep(0.1)
out["through_after"], out["head"] = index._through, log.head()
out["after_lift"] = asyncio.run(submit_all(committer, range(5)))
committer.close(); index.close(); log.close()
log = SQLiteLog(d / "log.db")  # a restart: the index comes back from ids.db + the log
index = MessageIndex(d / "ids.db", log)
committer = GroupCommitter(log, index, 3600 * 1000)
out["after_restart"] = asyncio.run(submit_all(committer, [0, 29]))
out["stored_rows"] = len(log.read(0, 100000))
committer.close(); index.close(); log.close()
print(json.dumps(out))
"""


def test_dedup_index_unwritable_keeps_dedup_and_does_not_spin(tmp_path):
    """The index flush fails (ids.db cannot grow) while the log still commits.

    Design (dedupe.py): the entries stay in memory, the log is the index's
    journal, and the flush is retried, slowly. Memory stays bounded: once the
    in-memory table holds 2 x flush_at entries the committer answers 503 (a
    retryable "store unavailable") instead of growing without limit or hanging.
    Repeats are still deduplicated, the index catches up once space returns,
    and a restart still knows every id. The retry must not busy-loop: on 2
    cores a spinning flusher takes the GIL from the event loop.
    """
    proc = subprocess.run([sys.executable, "-c", _INDEX_UNWRITABLE, str(tmp_path)],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ids_db"] > 1024 * 1024, out  # precondition: ids.db is over the limit
    first = out["first"]
    assert "hang" not in first, first
    accepted = [r for r in first if r != "503"]
    # flush_at=1000: up to 2,000 ids fit in memory (20 batches), then 503, never a hang.
    assert accepted == [[100, 0]] * len(accepted) and 20 <= len(accepted) < 30, first
    assert first[len(accepted):] == ["503"] * (30 - len(accepted)), first
    assert out["through_while_limited"] == 0, "the index flush did not fail: test is void"
    assert all(r == "503" for r in out["again"]), out["again"]  # bounded: still refusing
    stored = 100 * len(accepted)
    assert out["through_after"] == out["head"] == stored, out  # caught up after the lift
    assert out["after_lift"] == [[0, 100]] * 5, out["after_lift"]  # deduplicated again
    # Batch 0 was stored before; batch 29 was refused with 503, so now it is new.
    assert out["after_restart"] == [[0, 100], [100, 0]], out["after_restart"]
    assert out["stored_rows"] == stored + 100, out
    assert out["idle_cpu_s"] < 0.5, (
        f"with nothing to do, the process burnt {out['idle_cpu_s']:.2f} s of CPU in 2 s: the "
        "dedupe flusher retries a failing flush in a tight loop (no backoff)")
