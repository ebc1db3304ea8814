"""Crash, restart and deduplication reliability (reliability-and-security.md R1, R6, R7, R16).

Each test runs its own real `trackpipe serve` process (fresh data dir), drives
it with concurrent asyncio httpx clients that record every outcome in a
Ledger (ledger.py), and checks the §3.2 invariants against what the admin API
returns after a restart: every acknowledged messageId stored exactly once,
nothing stored that was never sent.

Note: SIGKILL leaves the OS page cache intact, so these tests prove crash
safety of the process (ack only after commit, dedup index rebuilt from the
log), not power-loss durability (that needs LazyFS, R3).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
import uuid

from reliability.ledger import Ledger, close_log, client_for, hard_restart, run_load

RETRY_AFTER = re.compile(r"^\d+$")


def _run_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


async def _load_with_kills(proc, ledger: Ledger, kills: int, *, first_after: float,
                           between: float, tail: float) -> list[int]:
    """Run the load; SIGKILL + restart `kills` times while requests are in flight."""
    stop = asyncio.Event()
    inflight = [0]
    at_kill: list[int] = []

    async def killer() -> None:
        await asyncio.sleep(first_after)
        for i in range(kills):
            if i:
                await asyncio.sleep(between)
            deadline = time.monotonic() + 2
            while inflight[0] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            at_kill.append(inflight[0])
            await hard_restart(proc)
        await asyncio.sleep(tail)
        stop.set()

    await asyncio.gather(run_load(ledger, proc, stop, workers=8, inflight=inflight), killer())
    return at_kill


def _check_after_recovery(proc, ledger: Ledger) -> None:
    asyncio.run(ledger.retry_unacked(proc.url, proc.write_key, deadline_s=20))
    ledger.check(proc.events())
    # And once more after a clean restart: the answer does not depend on the process.
    proc.restart()
    counts = ledger.check(proc.events())
    assert len(counts) == len(ledger.sent_ids)
    retried = [b for b in ledger.batches if len(b.statuses) > 1]
    deduped = sum(1 for b in retried
                  if proc.status(b.ids[0]).json().get("status") == "deduplicated")
    print(f"\n{ledger.run}: {len(ledger.batches)} batches, {len(counts)} events stored, "
          f"attempts {dict(ledger.status_counts())}, {len(retried)} batches retried, "
          f"{deduped} of them had been committed before their ack was lost")


def test_sigkill_during_concurrent_batches(fresh_server):
    proc = fresh_server()
    proc.start()
    ledger = Ledger(_run_id("kill1"))
    at_kill = asyncio.run(_load_with_kills(proc, ledger, 1, first_after=1.2, between=0,
                                           tail=1.0))
    assert at_kill[0] > 0, "the kill should land while requests are in flight"
    statuses = ledger.status_counts()
    assert statuses[200] > 0
    failed_attempts = sum(n for s, n in statuses.items() if s != 200)
    assert failed_attempts > 0, f"the kill interrupted no request: {statuses}"
    assert set(s for s in statuses if isinstance(s, int)) <= {200, 503}, statuses
    _check_after_recovery(proc, ledger)


def test_sigkill_three_times_during_one_load(fresh_server):
    proc = fresh_server()
    proc.start()
    ledger = Ledger(_run_id("kill3"))
    started = time.monotonic()
    at_kill = asyncio.run(_load_with_kills(proc, ledger, 3, first_after=0.8, between=0.8,
                                           tail=0.8))
    assert len(at_kill) == 3 and all(n > 0 for n in at_kill), at_kill
    assert time.monotonic() - started < 30
    statuses = ledger.status_counts()
    assert set(s for s in statuses if isinstance(s, int)) <= {200, 503}, statuses
    _check_after_recovery(proc, ledger)


def test_duplicate_storm(fresh_server):
    """R6: 32 concurrent requests with one messageId, plus a batch holding it twice."""
    proc = fresh_server()
    proc.start()
    mid = _run_id("storm")
    pair = _run_id("pair")
    event = {"type": "track", "event": "Storm", "userId": "u-storm", "messageId": mid,
             "properties": {"seq": 0}}

    async def storm() -> list[int]:
        async with client_for(proc.write_key, 40) as client:
            singles = [client.post(f"{proc.url}/v1/track", json=event) for _ in range(32)]
            batch = client.post(f"{proc.url}/v1/batch",
                                json={"batch": [{**event, "properties": {"seq": i}}
                                                for i in (1, 2)]})
            own_pair = client.post(f"{proc.url}/v1/batch",
                                   json={"batch": [{**event, "messageId": pair}] * 2})
            answers = await asyncio.gather(*singles, batch, own_pair)
            return [r.status_code for r in answers]

    assert asyncio.run(storm()) == [200] * 34
    metrics = proc.metrics_text()
    assert re.search(r"^trackpipe_events_deduplicated_total 34\.0$", metrics, re.M), (
        [line for line in metrics.splitlines() if "dedup" in line])  # 33 for mid, 1 for pair

    for restart in (False, True):
        if restart:
            proc.restart()
        stored = proc.events()
        assert [e["messageId"] for e in stored].count(mid) == 1
        assert [e["messageId"] for e in stored].count(pair) == 1
        assert len(stored) == 2
        status = proc.status(mid).json()
        assert status["status"] == "deduplicated", status
        assert status["stored"]["copies"] == 1
        assert status["deduplicated"]["repeats"] == 33, status  # 32 + 2 submissions - 1 stored
        pair_status = proc.status(pair).json()
        assert pair_status["deduplicated"]["repeats"] == 1, pair_status


def test_dedup_survives_restart_and_window(fresh_server):
    """R7: window = 6 s. A repeat inside the window is dropped even across a SIGKILL
    (the index is rebuilt from the log); a repeat after the window is a new event."""
    window = 6.0  # room for a restart on a loaded machine (it once took 2.7 s)
    proc = fresh_server(env={"TRACKPIPE_DEDUP_WINDOW_SECONDS": str(int(window))})
    proc.start()
    mid = _run_id("window")
    ev = {"type": "track", "event": "Window", "userId": "u-window", "messageId": mid,
          "properties": {"seq": 1}}

    before_first = time.time()
    assert proc.post("/v1/track", ev).status_code == 200
    after_first = time.time()
    proc.kill()
    close_log(proc)
    proc.start()

    # Inside the window (measured pessimistically from before the first send).
    r = proc.post("/v1/track", {**ev, "properties": {"seq": 2}})
    inside = time.time() - before_first
    assert r.status_code == 200
    assert inside < window - 0.3, f"restart took too long to test inside the window ({inside:.2f} s)"
    stored = proc.events(message_id=mid)
    assert len(stored) == 1 and stored[0]["properties"]["seq"] == 1, stored
    assert proc.status(mid).json()["deduplicated"]["repeats"] == 1

    # After the window (measured from after the first answer): accepted as a new event.
    time.sleep(max(0.0, after_first + window + 0.3 - time.time()))
    assert proc.post("/v1/track", {**ev, "properties": {"seq": 3}}).status_code == 200
    # ... and that new copy opens a new window: an immediate repeat is dropped again.
    assert proc.post("/v1/track", {**ev, "properties": {"seq": 4}}).status_code == 200

    for restart in (False, True):
        if restart:
            proc.restart()
        stored = proc.events(message_id=mid)
        assert sorted(e["properties"]["seq"] for e in stored) == [1, 3], stored
        status = proc.status(mid).json()
        assert status["stored"]["copies"] == 2, status


def test_graceful_shutdown(fresh_server):
    """R16: SIGTERM during light load. In-flight requests end with 200 (or 503 + Retry-After),
    every acknowledged event is stored after a restart, and the process exits 0 within 15 s."""
    proc = fresh_server()
    proc.start()
    ledger = Ledger(_run_id("term"))
    exit_info: dict = {}

    async def scenario() -> None:
        stop = asyncio.Event()
        inflight = [0]
        load = asyncio.create_task(run_load(ledger, proc, stop, workers=3, sizes=(10, 20),
                                            inflight=inflight))
        await asyncio.sleep(1.0)
        deadline = time.monotonic() + 2
        while inflight[0] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        exit_info["inflight"] = inflight[0]
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        try:
            exit_info["rc"] = await loop.run_in_executor(None, proc.proc.wait, 15)
        except subprocess.TimeoutExpired:
            exit_info["rc"] = "timeout"
        exit_info["seconds"] = time.monotonic() - t0
        stop.set()
        await load

    asyncio.run(scenario())
    if exit_info["rc"] == "timeout":
        proc.kill()
    close_log(proc)

    for r in ledger.responses:
        assert r.status_code == 503, (r.status_code, r.text)
        assert RETRY_AFTER.match(r.headers.get("retry-after", "")), dict(r.headers)
        body = json.loads(r.content)
        assert body.get("code") and body.get("message"), body

    proc.start()
    asyncio.run(ledger.retry_unacked(proc.url, proc.write_key, deadline_s=15))
    ledger.check(proc.events())
    assert ledger.status_counts()[200] > 0

    assert exit_info["rc"] != "timeout", "trackpipe did not exit within 15 s of SIGTERM"
    assert exit_info["rc"] == 0, (
        f"trackpipe exited with {exit_info['rc']} after SIGTERM (expected 0); "
        f"log tail:\n{proc.log_path.read_text(errors='replace')[-1500:]}")
