"""Privacy operations end to end: suppress, unsuppress, delete, and IP truncation.

A real server with identity on, a webhook receiver (which takes delete notices)
and the fault-injecting destination (which holds events in retry, so a delete
has queued deliveries to cancel).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from delivery.faulty_rig import TESTS, Faulty, api
from destinations.sink_webhook import Sink
from support import wait_for, write_config


@pytest.fixture
def hook(tmp_path):
    sink = Sink(tmp_path / "hook")
    yield sink
    sink.close()


def serve(fresh_server, tmp_path, tables, **sections):
    config = write_config(tmp_path / f"t-{uuid.uuid4().hex[:6]}.toml", tables,
                          identity={"enabled": True}, **sections)
    return fresh_server(config=config, env={"PYTHONPATH": str(TESTS)}).start()


def track(server, event="Clicked", **ids) -> str:
    mid = f"p-{uuid.uuid4().hex}"
    r = server.post("/v1/track", {"event": event, "messageId": mid, **ids})
    assert r.status_code == 200 and r.json() == {"success": True}
    return mid


def profile(server, ident):
    return api(server, f"/api/v1/profiles/{ident}")


def test_suppress_drops_new_events_with_200_and_counts_them(fresh_server, tmp_path, hook):
    server = serve(fresh_server, tmp_path, [hook.config("hook")])
    person, anon = f"user-{uuid.uuid4().hex[:8]}", f"anon-{uuid.uuid4().hex[:8]}"
    before = track(server, userId=person, anonymousId=anon)
    wait_for(lambda: profile(server, person).status_code == 200, what="the profile")

    r = api(server, "/api/v1/privacy/suppress", "POST", json={"id": person})
    assert r.status_code == 200 and r.json()["suppressed"] == 2  # the userId and its anonymousId
    dropped = [track(server, userId=person), track(server, anonymousId=anon)]
    other = track(server, userId="someone-else")
    wait_for(lambda: other in hook.received(), what="the other person's event delivered")

    stored = {e["messageId"] for e in server.events()}
    assert before in stored and other in stored and not set(dropped) & stored
    assert not set(dropped) & set(hook.received())
    assert "trackpipe_events_suppressed_total 2" in server.metrics_text()

    r = api(server, "/api/v1/privacy/unsuppress", "POST", json={"id": person})
    assert r.status_code == 200 and r.json()["unsuppressed"] == 2
    after = track(server, userId=person)
    wait_for(lambda: after in hook.received(), what="events flow again after unsuppress")

    audit = api(server, "/api/v1/privacy/audit").json()["audit"]
    assert [a["action"] for a in audit][:2] == ["unsuppress", "suppress"]
    assert person not in str(audit)  # the audit names a keyed hash, never the id


def test_delete_removes_the_person_from_every_api_file_and_destination(fresh_server, tmp_path, hook):
    held = Faulty(tmp_path / "held", "held")
    server = serve(fresh_server, tmp_path, [hook.config("hook"),
                                            held.table(retry_initial_seconds=0.5)])
    person, anon = f"user-{uuid.uuid4().hex[:10]}", f"anon-{uuid.uuid4().hex[:10]}"
    theirs = [track(server, "Viewed", anonymousId=anon), track(server, "Added", anonymousId=anon)]
    r = server.post("/v1/identify", {"userId": person, "anonymousId": anon,
                                     "traits": {"email": "x@example.com"}})
    assert r.status_code == 200
    theirs.append(track(server, "Bought", userId=person))
    bystander = track(server, userId="bystander")
    wait_for(lambda: set(theirs) <= set(hook.received()), what="their events delivered")
    wait_for(lambda: len(profile(server, person).json().get("anonymous_ids", [])) == 1,
             what="the anonymous id merged into the profile")
    # One more of theirs is stuck retrying at `held` when the delete arrives.
    stuck = f"p-{uuid.uuid4().hex}"
    held.control(retry_ids={stuck: 1000})
    assert server.post("/v1/track", {"event": "Late", "userId": person,
                                     "messageId": stuck}).status_code == 200
    theirs.append(stuck)
    wait_for(lambda: any(a["id"] == stuck for a in held.attempts()), what="a failed attempt")

    r = api(server, "/api/v1/privacy/delete", "POST", json={"id": person})
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["state"] == "done" and done["events"] >= 5 and done["deliveries_cancelled"] >= 1
    deleted_at = time.time()
    held.control()  # the destination recovers; nothing of theirs may reach it now

    # No API finds them any more.
    for ident in (person, anon):
        assert profile(server, ident).status_code == 404
        assert api(server, f"/api/v1/profiles/{ident}/events").status_code == 404
    assert server.events(user_id=person) == [] and server.events(anonymous_id=anon) == []
    for mid in theirs:
        assert api(server, f"/api/v1/events/{mid}").status_code == 404
        assert api(server, f"/api/v1/events/{mid}/deliveries").status_code == 404
    everything = str(server.events())
    assert person not in everything and anon not in everything and bystander in everything

    # New events for them are dropped (delete implies suppress), and destinations hear of it.
    late = track(server, userId=person)
    wait_for(lambda: {d.get("userId") for d in hook.deletes()} >= {person}, what="a delete notice")
    assert {d.get("anonymousId") for d in hook.deletes()} >= {anon}
    time.sleep(1.5)  # past the held destination's retry delay
    assert not [a for a in held.attempts() if a["at"] > deleted_at and a["id"] in theirs]
    assert late not in hook.received()

    # The files themselves: after VACUUM, no byte of their ids is left anywhere.
    server.stop()
    for db_path in server.data_dir.glob("*.db"):
        db = sqlite3.connect(db_path)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("VACUUM")
        db.close()
    for path in server.data_dir.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert person.encode() not in raw and anon.encode() not in raw, path.name


def test_truncate_ip_keeps_only_the_network_part(fresh_server, tmp_path):
    server = serve(fresh_server, tmp_path, [], privacy={"truncate_ip": True})
    mid4, mid6 = f"p-{uuid.uuid4().hex}", f"p-{uuid.uuid4().hex}"
    for mid, ip in ((mid4, "203.0.113.77"), (mid6, "2001:db8:abcd:12:34:56:78:9a")):
        r = server.post("/v1/track", {"event": "E", "userId": "u", "messageId": mid,
                                      "context": {"ip": ip}})
        assert r.status_code == 200
    # and the peer address of a browser event
    browser = f"p-{uuid.uuid4().hex}"
    server.post("/v1/t", {"event": "E", "anonymousId": "a", "messageId": browser,
                          "context": {"library": {"name": "analytics.js"}}})
    ips = {e["messageId"]: e["context"]["ip"] for e in server.events()}
    assert ips[mid4] == "203.0.113.0"
    assert ips[mid6] == "2001:db8:abcd::"
    assert ips[browser] == "127.0.0.0"
    raw = b"".join(p.read_bytes() for p in server.data_dir.glob("log.db*"))
    assert b"203.0.113.77" not in raw and b"127.0.0.1" not in raw


def test_concurrent_deletes_each_report_what_they_erased(fresh_server, tmp_path):
    """With no consumers process, each delete request's own thread carries out the queue;
    two of them used to take the same requests, and the later one recorded zeros over the
    counts of the first."""
    config = write_config(tmp_path / "t.toml", [], identity={"enabled": False})
    server = fresh_server(config=config).start()
    people = [f"e{i}-{uuid.uuid4().hex[:6]}" for i in range(5)]
    for person in people:
        for _ in range(4):
            track(server, userId=person)
    with ThreadPoolExecutor(7) as pool:
        answers = list(pool.map(
            lambda person: api(server, "/api/v1/privacy/delete", "POST", json={"id": person}),
            [*people, people[0], people[1]]))
    assert all(r.status_code == 200 and r.json()["state"] == "done" for r in answers), \
        [r.text for r in answers]
    assert sum(r.json()["events"] for r in answers) == 20, [r.json() for r in answers]
    assert server.events() == []
