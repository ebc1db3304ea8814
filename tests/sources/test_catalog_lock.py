"""Ingest never waits on the catalog: a privacy request waiting for catalog.db's write
lock (another writer holds it: the CLI, a backup) leaves /v1/* answering at once."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HOLD_SECONDS = 3.0


def hold_catalog_lock(data_dir, held: threading.Event) -> None:
    db = sqlite3.connect(data_dir / "catalog.db", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(HOLD_SECONDS)
        db.execute("COMMIT")
    finally:
        db.close()


def test_tracking_is_answered_while_a_suppress_waits_for_the_catalog_lock(fresh_server):
    server = fresh_server().start()
    held = threading.Event()
    latencies = []
    with ThreadPoolExecutor(2) as pool, server.admin() as admin:
        holder = pool.submit(hold_catalog_lock, server.data_dir, held)
        assert held.wait(5)
        suppress = pool.submit(admin.post, "/api/v1/privacy/suppress", json={"id": "victim"},
                               timeout=60)
        deadline = time.monotonic() + HOLD_SECONDS
        while time.monotonic() < deadline:  # the event loop reloads the catalog every second
            start = time.monotonic()
            r = server.post("/v1/track", {"userId": "someone", "event": "Clicked"})
            latencies.append(time.monotonic() - start)
            assert r.status_code == 200, r.text
        holder.result()
        answer = suppress.result()
        assert answer.status_code == 200 and answer.json()["suppressed"] == 1, answer.text
        audit = admin.get("/api/v1/privacy/audit").json()["audit"]
    assert len(latencies) > 10 and max(latencies) < 0.5, max(latencies)
    assert [a["action"] for a in audit] == ["suppress"]
    # the suppression took effect at ingest once the lock was let go
    for user in ("victim", "someone"):
        r = server.post("/v1/track", {"userId": user, "event": "X", "messageId": f"m-{user}"})
        assert r.status_code == 200, r.text
    assert server.status("m-victim").status_code == 404  # dropped, never stored
    assert server.status("m-someone").json()["status"] == "stored"
