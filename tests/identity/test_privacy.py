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
from destinations.sink_webhook import Recorder, Sink, new_secret
from support import wait_for, write_config


@pytest.fixture
def hook(tmp_path):
    sink = Sink(tmp_path / "hook")
    yield sink
    sink.close()


def serve(fresh_server, tmp_path, tables, identity=None, **sections):
    config = write_config(tmp_path / f"t-{uuid.uuid4().hex[:6]}.toml", tables,
                          identity={"enabled": True, **(identity or {})}, **sections)
    return fresh_server(config=config, env={"PYTHONPATH": str(TESTS)}).start()


def track(server, event="Clicked", **ids) -> str:
    mid = f"p-{uuid.uuid4().hex}"
    r = server.post("/v1/track", {"event": event, "messageId": mid, **ids})
    assert r.status_code == 200 and r.json() == {"success": True}
    return mid


def profile(server, ident):
    return api(server, f"/api/v1/profiles/{ident}")


def delete(server, ident) -> dict:
    r = api(server, "/api/v1/privacy/delete", "POST", json={"id": ident})
    assert r.status_code == 200 and r.json()["state"] == "done", r.text
    return r.json()


def deliveries(server, sql: str, *args) -> list[tuple]:
    """Rows of the running server's deliveries.db, read as they are on disk."""
    db = sqlite3.connect(f"file:{server.data_dir / 'deliveries.db'}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


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


def test_delete_removes_the_person_from_every_api_file_and_destination(fresh_server, tmp_path,
                                                                        hook):
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


def test_suppress_covers_alias_previous_ids_and_trait_identifiers(fresh_server, tmp_path):
    """Every identifier of the profile is suppressed: an alias naming the person as its
    previousId, and an email trait (any case, padded) on a new anonymous visitor, used to be
    stored and joined to the suppressed profile."""
    server = serve(fresh_server, tmp_path, [], identity={"trait_identifiers": ["email"]})
    person, anon = uid("su"), uid("sa")
    email = f"{person}@Example.com"
    assert server.post("/v1/identify", {"userId": person, "anonymousId": anon,
                                        "traits": {"email": email}}).status_code == 200
    wait_for(lambda: {"type": "email", "value": email.lower()}
             in profile(server, person).json().get("identifiers", []), what="the profile")

    suppressed = api(server, "/api/v1/privacy/suppress", "POST", json={"id": person})
    assert suppressed.status_code == 200
    new_user, new_anon = uid("su9"), uid("sa5")
    sent = {"/v1/alias": {"previousId": person, "userId": new_user},
            "/v1/identify": {"anonymousId": new_anon, "traits": {"email": email.upper()}},
            "/v1/track": {"anonymousId": uid("sa6"), "event": "Viewed",
                          "context": {"traits": {"email": f"  {email.lower()} "}}}}
    dropped = []
    for path, body in sent.items():
        dropped.append(f"p-{uuid.uuid4().hex}")
        r = server.post(path, {**body, "messageId": dropped[-1]})
        assert r.status_code == 200 and r.json() == {"success": True}
    other = track(server, userId="someone-else")
    wait_for(lambda: profile(server, "someone-else").status_code == 200, what="identity caught up")

    stored = {e["messageId"] for e in server.events()}
    assert other in stored and not set(dropped) & stored
    assert "trackpipe_events_suppressed_total 3" in server.metrics_text()
    found = profile(server, person).json()
    assert (found["user_ids"], found["anonymous_ids"]) == ([person], [anon])
    assert profile(server, new_user).status_code == 404
    assert profile(server, new_anon).status_code == 404
    assert suppressed.json()["suppressed"] == 3  # the userId, the anonymousId, the email


def test_a_suppressed_persons_invalid_events_are_not_kept_as_discards(fresh_server, tmp_path):
    """An invalid event is stored as a discard, payload and all: a suppressed person's is
    dropped like their valid ones (and counted as suppressed, not as discarded)."""
    server = serve(fresh_server, tmp_path, [])
    person, secret = uid("sd"), uid("secret")
    track(server, userId=person)
    wait_for(lambda: profile(server, person).status_code == 200, what="the profile")
    assert api(server, "/api/v1/privacy/suppress", "POST", json={"id": person}).status_code == 200

    invalid = {"userId": person, "properties": {"secret": secret}}  # a track with no event
    assert server.post("/v1/track", invalid).status_code == 200
    r = server.post("/v1/batch", {"batch": [{"type": "track", **invalid},
                                            {"type": "track", "userId": "someone-else"}]})
    assert r.status_code == 200 and r.json() == {"success": True}

    payloads = [d["payload"] for d in server.discards()]
    assert len(payloads) == 1 and "someone-else" in payloads[0]
    assert secret not in str(payloads) and person not in str(payloads)
    assert "trackpipe_events_suppressed_total 2" in server.metrics_text()


def test_delete_erases_the_discards_naming_the_person_and_no_others(fresh_server, tmp_path):
    """The discards a delete removes are those whose userId, anonymousId or previousId is
    the person's: deleting "7" took "17"'s too (a substring match), and missed a userId
    holding a quote, which the payload stores escaped."""
    server = serve(fresh_server, tmp_path, [])
    quoted = 'zq"77'
    payloads = {  # invalid events (a track with no event), kept as discards
        "seven": {"userId": "7", "properties": {"n": 1}},
        "seven-numeric": {"anonymousId": 7, "properties": {"n": 2}},
        "seven-cut-short": {"userId": "7", "properties": {"blob": "x" * 3000}},  # over 2 KB
        "seventeen": {"userId": "17", "properties": {"n": 3}},
        "mentions-seven": {"anonymousId": "a-7x", "properties": {"note": "user 7"}},
        "quoted": {"userId": quoted, "properties": {"n": 4}},
    }
    for name, payload in payloads.items():
        # "case" first: the cut-short payload keeps it
        r = server.post("/v1/track", {**payload, "properties": {"case": name,
                                                                **payload["properties"]}})
        assert r.status_code == 200

    def left() -> set[str]:
        return {name for name in payloads
                if any(f'"case":"{name}"' in d["payload"] for d in server.discards())}
    assert left() == set(payloads)

    delete(server, "7")
    assert left() == {"seventeen", "mentions-seven", "quoted"}
    delete(server, quoted)
    assert left() == {"seventeen", "mentions-seven"}


def test_delete_notices_name_each_id_by_its_kind(fresh_server, tmp_path, hook):
    """A destination hears the userIds as userId and the anonymousIds as anonymousId; it
    used to get every id as both, and the email trait as an anonymousId. An id trackpipe
    has no profile for may be either: it goes as both."""
    server = serve(fresh_server, tmp_path, [hook.config("hook")],
                   identity={"trait_identifiers": ["email"]})
    person, anon = uid("kind-user"), uid("kind-anon")
    track(server, anonymousId=anon)
    assert server.post("/v1/identify", {"userId": person, "anonymousId": anon,
                                        "traits": {"email": f"{person}@example.com"}}
                       ).status_code == 200
    wait_for(lambda: len(profile(server, person).json().get("identifiers", [])) == 3,
             what="the profile with its three identifiers")

    def named() -> set[tuple[str, str]]:
        return {(k, v) for d in hook.deletes() for k, v in d.items()
                if k in ("userId", "anonymousId")}
    assert delete(server, person)["identifiers"] == 3
    wait_for(named, what="the delete notice")
    assert named() == {("userId", person), ("anonymousId", anon)}

    ghost = uid("ghost")
    delete(server, ghost)
    wait_for(lambda: len(named()) > 2, what="the second delete notice")
    assert named() - {("userId", person), ("anonymousId", anon)} == {
        ("userId", ghost), ("anonymousId", ghost)}


@pytest.mark.parametrize("terminal", [False, True], ids=["retryable", "terminal"])
def test_an_outcome_recorded_after_the_delete_leaves_no_row(fresh_server, tmp_path, hook,
                                                            terminal):
    """A delivery in flight when the delete runs records its outcome after it: that used to
    put the erased event back in the retry queue (with its userId) or, refused for good,
    among the failed deliveries for ever."""
    server = serve(fresh_server, tmp_path, [{**hook.config("hook"), "retry_initial_seconds": 60}])
    hook.break_(terminal=terminal)
    hook.delay = 5.0  # the receiver answers 5 s after it took the request
    person = uid("in-flight")
    mid = track(server, userId=person)
    wait_for(lambda: any(mid in ids for _, ids, _ in hook.requests()), what="the send")
    sent_at = time.monotonic()
    delete(server, person)
    assert time.monotonic() - sent_at < hook.delay - 1, "the delete must run mid-send"

    def recorded():
        s = api(server, "/api/v1/destinations/hook").json()
        return s if s["retries"] or s["failed_total"] or s["skipped"] else None
    summary = wait_for(recorded, what="the send's outcome recorded")
    assert (summary["retrying"], summary["failed"], summary["skipped"]) == (0, 0, {"deleted": 1})
    assert deliveries(server, "SELECT * FROM pending") == []
    assert deliveries(server, "SELECT * FROM failed") == []
    assert person not in str(deliveries(server, "SELECT detail FROM batches"))


class Echo(Recorder):
    """A receiver that refuses everything (400), quoting the request body back."""

    def next_answer(self, request: dict):
        with self._lock:
            self.requests.append(request)
        return 400, {"content-type": "application/json"}, request["body"]


def test_delete_scrubs_stored_error_details_that_quote_the_person(fresh_server, tmp_path):
    """A receiver's error body may quote the whole batch: the details kept for the batch,
    the destination's last error and every failed event of it (a bystander's too) named
    the deleted person, and so did a refused delete notice's."""
    echo = Echo()
    try:
        server = serve(fresh_server, tmp_path, [
            {"name": "echo", "type": "webhook", "settings": {
                "url": echo.url(), "secret": new_secret(), "allow_private_targets": True}}])
        person, bystander = uid("quoted"), uid("bystander")
        r = server.post("/v1/batch", {"batch": [
            {"type": "track", "event": "E", "userId": person},
            {"type": "track", "event": "E", "userId": bystander}]})
        assert r.status_code == 200
        wait_for(lambda: api(server, "/api/v1/destinations/echo").json()["failed"] == 2,
                 what="both events failed")
        details = "SELECT detail FROM batches UNION ALL SELECT detail FROM last_errors" \
                  " UNION ALL SELECT detail FROM failed"
        assert person in str(deliveries(server, details))  # the receiver quoted them

        delete(server, person)
        wait_for(lambda: deliveries(server, "SELECT 1 FROM delete_notices WHERE state = 'failed'"),
                 what="the refused delete notice recorded")
        left = deliveries(server, details + " UNION ALL SELECT detail FROM delete_notices")
        assert person not in str(left)
        assert len([d for (d,) in left if "privacy delete" in d]) == 4, left  # batch, last
        # error, the bystander's failure, the notice's answer
        failed = api(server, "/api/v1/destinations/echo/failed").json()
        assert len(failed["failed"]) == 1 and "privacy delete" in failed["failed"][0]["detail"]
    finally:
        echo.close()
