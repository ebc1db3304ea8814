"""The delivery framework end to end: a real server, the fault-injecting destination.

Each test ends with the ledger check: every stored event routed to the
destination is delivered or in the failed store — none lost.
"""

from __future__ import annotations

import time

import pytest

from delivery.faulty_rig import Faulty, api, cli, new_ids, send, start
from support import wait_for, write_config


def ledger(server, faulty: Faulty, ids, failed=()) -> None:
    delivered = set(faulty.delivered())
    failed_now = {row["message_id"] for row in
                  api(server, f"/api/v1/destinations/{faulty.name}/failed?limit=1000").json()["failed"]}
    assert set(ids) <= delivered | failed_now, "an event was neither delivered nor failed"
    assert failed_now == set(failed)


def test_delivers_every_event_in_batches_without_metadata(fresh_server, tmp_path):
    f = Faulty(tmp_path / "f", "faulty")
    srv = start(fresh_server, tmp_path, [f.table(batch_size=40)])
    ids = send(srv, 150, _metadata={"bundled": ["x"]})
    f.wait_delivered(ids)
    attempts = f.attempts()
    assert sorted(a["id"] for a in attempts) == sorted(ids)  # each exactly once
    message = attempts[0]["message"]
    assert "_metadata" not in message and "writeKey" not in message
    assert message["sourceId"] and message["type"] == "track"
    summary = api(srv, "/api/v1/destinations/faulty").json()
    assert summary["delivered"] == 150 and summary["pending"] == 0 and summary["failed"] == 0
    ledger(srv, f, ids)


def test_retryable_failures_back_off_with_growing_gaps(fresh_server, tmp_path):
    f = Faulty(tmp_path / "f", "faulty")
    f.control(fail_status=500, fail_times=4)
    srv = start(fresh_server, tmp_path, [f.table(retry_initial_seconds=0.2)])
    [mid] = send(srv, 1)
    f.wait_delivered([mid])
    times = [a["at"] for a in f.attempts() if a["id"] == mid]
    assert len(times) == 5
    gaps = [b - a for a, b in zip(times, times[1:])]
    # 0.2 s doubled each time, times a jitter in [1, 1.5), counted from each send. The
    # sink sees a request a little after it was sent, later on a busy machine: one late
    # arrival shortens the next gap by its lateness, so the bounds have slack both ways.
    for k, gap in enumerate(gaps):
        base = 0.2 * 2 ** k
        assert base - 0.15 <= gap < base * 1.5 + 1.0, gaps
    deliveries = api(srv, f"/api/v1/events/{mid}/deliveries").json()["deliveries"][0]
    assert deliveries["state"] == "delivered"
    assert [t["status"] for t in deliveries["attempts"]] == [500, 500, 500, 500, 200]
    assert all(t["duration_ms"] is not None for t in deliveries["attempts"])
    ledger(srv, f, [mid])


def test_retry_after_is_honoured(fresh_server, tmp_path):
    f = Faulty(tmp_path / "f", "faulty")
    f.control(fail_status=429, fail_times=1, retry_after=1.5)
    srv = start(fresh_server, tmp_path, [f.table(retry_initial_seconds=0.05)])
    [mid] = send(srv, 1)
    f.wait_delivered([mid])
    first, second = [a["at"] for a in f.attempts() if a["id"] == mid]
    assert second - first >= 1.45


def test_terminal_failures_fail_only_those_events(fresh_server, tmp_path):
    f = Faulty(tmp_path / "f", "faulty")
    srv = start(fresh_server, tmp_path, [f.table(batch_size=10)])
    ids = new_ids(30)
    bad = ids[3:6]
    f.control(fail_ids=bad)
    send(srv, 30, ids=ids)
    good = [i for i in ids if i not in bad]
    f.wait_delivered(good)
    wait_for(lambda: api(srv, "/api/v1/destinations/faulty").json()["failed"] == 3,
             what="three failed events")
    failed = api(srv, "/api/v1/destinations/faulty/failed").json()["failed"]
    assert {r["message_id"] for r in failed} == set(bad)
    assert {r["status"] for r in failed} == {400} and {r["reason"] for r in failed} == {"terminal"}
    d = api(srv, f"/api/v1/events/{bad[0]}/deliveries").json()["deliveries"][0]
    assert d["state"] == "failed" and d["attempts"][-1]["detail"] == "injected terminal failure"
    ledger(srv, f, ids, failed=bad)


def test_retry_window_expiry_then_replay(fresh_server, tmp_path):
    f = Faulty(tmp_path / "f", "faulty")
    f.control(fail_status=503)
    srv = start(fresh_server, tmp_path, [f.table(retry_window_seconds=1, max_attempts=2,
                                                 retry_initial_seconds=0.2)])
    ids = send(srv, 5)
    wait_for(lambda: api(srv, "/api/v1/destinations/faulty").json()["failed"] == 5,
             what="events given up on")
    summary = api(srv, "/api/v1/destinations/faulty").json()
    assert summary["failed_total"] == {"retries_exhausted": 5}
    assert summary["last_error"]["status"] == 503
    for mid in ids:
        tries = [a for a in f.attempts() if a["id"] == mid]
        assert len(tries) >= 2 and tries[-1]["at"] - tries[0]["at"] >= 0.9
    f.control()  # the destination is back
    r = api(srv, "/api/v1/destinations/faulty/replay", "POST", json={"failed_only": True})
    assert r.status_code == 200 and r.json()["queued"] == 5
    f.wait_delivered(ids)
    assert api(srv, "/api/v1/destinations/faulty").json()["failed"] == 0
    ledger(srv, f, ids)


def test_replay_a_time_range_from_the_cli(fresh_server, tmp_path):
    f = Faulty(tmp_path / "f", "faulty")
    srv = start(fresh_server, tmp_path, [f.table()])
    early = send(srv, 3)
    f.wait_delivered(early)
    time.sleep(0.05)
    since = int(time.time() * 1000)
    late = send(srv, 4)
    f.wait_delivered(late)
    r = cli(srv, "replay", "--destination", "faulty", "--since", str(since))
    assert r.returncode == 0, r.stderr
    assert "queued 4 events" in r.stdout
    wait_for(lambda: sorted(f.delivered()).count(late[0]) == 2, what="replayed events")
    counts = {i: f.delivered().count(i) for i in early + late}
    assert all(counts[i] == 1 for i in early) and all(counts[i] == 2 for i in late)


def test_restart_resumes_exactly_where_it_was(fresh_server, tmp_path):
    f = Faulty(tmp_path / "f", "faulty")
    srv = start(fresh_server, tmp_path, [f.table()])
    first = send(srv, 60)
    f.wait_delivered(first)
    srv.stop()
    srv.start()
    second = send(srv, 60)
    f.wait_delivered(second)
    delivered = f.delivered()
    assert len(delivered) == len(set(delivered)) == 120


def test_a_hanging_destination_does_not_hold_back_another(fresh_server, tmp_path):
    slow, fast = Faulty(tmp_path / "slow", "slow"), Faulty(tmp_path / "fast", "fast")
    slow.control(delay=30)
    srv = start(fresh_server, tmp_path, [slow.table(), fast.table()])
    started = time.monotonic()
    ids = send(srv, 100)
    fast.wait_delivered(ids, timeout=15)
    assert time.monotonic() - started < 15
    assert api(srv, "/api/v1/destinations/slow").json()["pending"] == 100


def test_integrations_and_filters_route_events(fresh_server, tmp_path):
    a, b = Faulty(tmp_path / "a", "A Hook"), Faulty(tmp_path / "b", "b")
    srv = start(fresh_server, tmp_path, [
        a.table(), b.table(filter={"mode": "deny", "events": ["Noise"]})])
    to_all = send(srv, 2)
    not_a = send(srv, 2, integrations={"A Hook": False})
    only_b = send(srv, 2, integrations={"All": False, "b": {"flavour": "x"}})
    noise = send(srv, 1, event="Noise")
    b.wait_delivered(to_all + not_a + only_b)
    a.wait_delivered(to_all + noise)
    time.sleep(0.5)
    assert set(a.delivered()) == set(to_all + noise)
    assert set(b.delivered()) == set(to_all + not_a + only_b)
    options = {x["id"]: x["options"] for x in b.attempts()}
    assert options[only_b[0]] == {"flavour": "x"}
    d = {x["destination"]: x for x in
         api(srv, f"/api/v1/events/{not_a[0]}/deliveries").json()["deliveries"]}
    assert d["A Hook"]["state"] == "skipped (integrations)" and d["b"]["state"] == "delivered"


def test_per_user_ordering_holds_a_users_later_events_only(fresh_server, tmp_path):
    f = Faulty(tmp_path / "f", "faulty")
    srv = start(fresh_server, tmp_path, [f.table(ordered=True, retry_initial_seconds=0.5)])
    [a1] = send(srv, 1, user="alice")
    f.wait_delivered([a1])
    # alice's next event fails twice; her later ones must wait for it, bob's must not
    ids = {"a2": new_ids(1)[0]}
    f.control(retry_ids={ids["a2"]: 2})
    send(srv, 1, user="alice", ids=[ids["a2"]])
    time.sleep(0.05)
    ids["a3"], ids["a4"] = send(srv, 2, user="alice")
    ids["b1"], ids["b2"] = send(srv, 2, user="bob")
    f.wait_delivered(ids.values())
    order = f.delivered()
    pos = {k: order.index(v) for k, v in ids.items()}
    assert pos["a2"] < pos["a3"] < pos["a4"]
    assert pos["b1"] < pos["a2"] and pos["b2"] < pos["a2"]


def test_destination_api_masks_secrets_and_metrics_show_counts(fresh_server, tmp_path):
    f = Faulty(tmp_path / "f", "faulty")
    srv = start(fresh_server, tmp_path, [f.table()])
    ids = send(srv, 7)
    f.wait_delivered(ids)
    listed = api(srv, "/api/v1/destinations").json()["destinations"]
    assert listed[0]["settings"]["token"] == "********"
    assert "s3cret-token" not in api(srv, "/api/v1/destinations").text
    text = wait_for(lambda: (t := srv.metrics_text()) and
                    'trackpipe_delivery_delivered_total{destination="faulty"} 7.0' in t and t,
                    what="delivery metrics")
    assert 'trackpipe_delivery_pending{destination="faulty"} 0.0' in text
    assert "s3cret-token" not in srv.log_path.read_text()
    assert api(srv, "/api/v1/destinations/nope").status_code == 404
    assert api(srv, "/api/v1/events/nope/deliveries").json()["code"] == "not_found"


def test_check_and_destinations_commands(tmp_path, fresh_server):
    f = Faulty(tmp_path / "f", "faulty")
    srv = start(fresh_server, tmp_path, [f.table()])
    send(srv, 2)
    run = lambda *a, cfg=None: cli(srv, *a, config=cfg)  # noqa: E731
    r = run("check")
    assert r.returncode == 0 and "ok    faulty" in r.stdout, r.stdout + r.stderr
    r = run("destinations")
    assert r.returncode == 0 and "faulty" in r.stdout and "s3cret" not in r.stdout
    bad = write_config(tmp_path / "bad.toml", [{"name": "x", "type": "nosuch"}])
    r = run("check", cfg=bad)
    assert r.returncode == 2 and "unknown destination type 'nosuch'" in r.stderr
    bad = write_config(tmp_path / "bad2.toml", [f.table(), f.table()])
    r = run("check", cfg=bad)
    assert r.returncode == 2 and "Two destinations are named 'faulty'" in r.stderr


@pytest.mark.parametrize("body, code", [
    (b"not json", "invalid_json"), (b'{"bogus": 1}', "invalid_parameter"),
    (b'{"since": "yesterday"}', "invalid_parameter"), (b'{"failed_only": "yes"}', "invalid_parameter"),
    # a bound that is not a time used to mean "no bound": everything was replayed
    (b'{"until": false}', "invalid_parameter"), (b'{"until": []}', "invalid_parameter"),
    (b'{"until": {}}', "invalid_parameter"), (b'{"since": true}', "invalid_parameter"),
    (b'{"since": 1.5}', "invalid_parameter"), (b'{"until": ""}', "invalid_parameter"),
])
def test_replay_api_rejects_bad_bodies(fresh_server, tmp_path, body, code):
    f = Faulty(tmp_path / "f", "faulty")
    srv = start(fresh_server, tmp_path, [f.table()])
    r = api(srv, "/api/v1/destinations/faulty/replay", "POST", content=body)
    assert r.status_code == 400 and r.json()["code"] == code


def test_replay_until_epoch_zero_replays_nothing(fresh_server, tmp_path):
    """`until: 0` is a bound (before 1970), not a missing one; `null` is no bound."""
    f = Faulty(tmp_path / "f", "faulty")
    srv = start(fresh_server, tmp_path, [f.table()])
    f.wait_delivered(send(srv, 3))
    r = api(srv, "/api/v1/destinations/faulty/replay", "POST", json={"until": 0})
    assert r.status_code == 200 and r.json()["queued"] == 0, r.text
    r = api(srv, "/api/v1/destinations/faulty/replay", "POST", json={"until": None})
    assert r.status_code == 200 and r.json()["queued"] == 3, r.text


def test_events_carry_the_resolved_profile_id_at_delivery(fresh_server, tmp_path):
    f = Faulty(tmp_path / "f", "faulty")
    srv = start(fresh_server, tmp_path, [f.table()], identity=True)
    [anonymous] = send(srv, 1, user=None, anonymousId="visitor-1")
    f.wait_delivered([anonymous])
    r = srv.post("/v1/identify", {"userId": "person-1", "anonymousId": "visitor-1",
                                  "messageId": "identify-person-1"})
    assert r.status_code == 200
    [known] = send(srv, 1, user="person-1")
    f.wait_delivered([anonymous, "identify-person-1", known])
    profile_id = api(srv, "/api/v1/profiles/person-1").json()["profile_id"]
    carried = {a["id"]: a["profile"] for a in f.attempts()}
    # the oldest identifier's profile id survives the merge, so all three agree
    assert carried == {anonymous: profile_id, "identify-person-1": profile_id, known: profile_id}


def test_the_failed_store_is_listed_page_by_page(fresh_server, tmp_path):
    """It stopped at 1,000 rows, with no way on; now `next` is the `cursor` of the next page."""
    f = Faulty(tmp_path / "f", "faulty")
    f.control(fail_status=400)
    srv = start(fresh_server, tmp_path, [f.table(batch_size=25)])
    ids = send(srv, 25)
    wait_for(lambda: api(srv, "/api/v1/destinations/faulty").json()["failed"] == 25,
             what="25 failed events")
    seen, query = [], "limit=10"
    while True:
        page = api(srv, f"/api/v1/destinations/faulty/failed?{query}").json()
        seen.append([row["message_id"] for row in page["failed"]])
        if page["next"] is None:
            break
        query = f"limit=10&cursor={page['next']}"
    assert seen == [ids[:10], ids[10:20], ids[20:]]
    r = api(srv, "/api/v1/destinations/faulty/failed?after=10")  # not a parameter: said so
    assert r.status_code == 400 and r.json()["code"] == "invalid_parameter", r.text
    ledger(srv, f, ids, failed=ids)


def test_a_replay_that_could_send_nothing_is_refused_with_why(fresh_server, tmp_path):
    """Into a disabled destination it answered {"queued": n}, sent nothing, and the queued
    events held the log; a range whose `since` is past its `until` queued 0 silently."""
    f, g = Faulty(tmp_path / "f", "faulty"), Faulty(tmp_path / "g", "gee")
    srv = start(fresh_server, tmp_path, [f.table(), g.table(enabled=False)])
    f.wait_delivered(send(srv, 3))
    r = api(srv, "/api/v1/destinations/gee/replay", "POST", json={})
    assert r.status_code == 409 and r.json()["code"] == "destination_disabled", r.text
    assert "enabled = true" in r.json()["message"]
    c = cli(srv, "replay", "--destination", "gee")
    assert c.returncode == 2 and "'gee' is disabled" in c.stderr, c.stdout + c.stderr
    assert api(srv, "/api/v1/destinations/gee").json()["pending"] == 0

    r = api(srv, "/api/v1/destinations/faulty/replay", "POST", json={"since": 2000, "until": 1000})
    assert r.status_code == 400 and r.json()["code"] == "invalid_parameter", r.text
    r = api(srv, "/api/v1/destinations/faulty/replay", "POST",
            json={"since": "2026-12-08T00:00:00Z", "until": "2026-12-07T00:00:00Z"})
    assert r.status_code == 400 and ("`since` (2026-12-08T00:00:00Z) must be before `until`"
                                     " (2026-12-07T00:00:00Z, exclusive)") in r.json()["message"]
    c = cli(srv, "replay", "--destination", "faulty", "--since", "2000", "--until", "1000")
    assert c.returncode == 2 and "must be before `until`" in c.stderr, c.stdout + c.stderr
