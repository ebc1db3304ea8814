"""O2 metric conservation and O4 bounded labels, against a real `trackpipe serve`.

What trackpipe's counters promise once delivery has drained (README.md, "GET /metrics"):

    events_received = events_accepted + events_deduplicated
                      + sum(events_discarded{reason}) + events_suppressed

  `received` counts the events of requests answered 200 (an empty batch counts as one
  event, discarded as empty_batch) and of requests answered 503 (none here); a request
  refused whole (400, 401, 415, 429) is one `requests_rejected{code}` and none of its
  events is received, suppressed or discarded.

    for every destination d:  log_head_position = delivery_delivered{d}
        + sum(delivery_failed{d, reason}) + delivery_pending{d} + sum(delivery_skipped{d, reason})

  for a destination there since the log began (and no replays); here, one process
  lifetime, log_head_position = events_accepted. Every stored event meets every
  destination once; the reference's `accepted x routes` is closed by the skipped counts.

O4: every `reason`, `code` and `kind` label value comes from a closed set trackpipe
defines, and no label value carries a userId, messageId, write key or URL.

The load mixes every event type, invalid events (several reasons), duplicates in one
batch and across requests, whole-request refusals (strict mode, too large, too deep,
bad JSON, unknown key, rate limit), a suppressed person, and two destinations: `hook`
delivers all it gets but filters screens out; `flaky` fails some events for good, some
until its retries run out, some once and then delivers, and is turned off for some
events by `integrations`.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter

import httpx
from prometheus_client.parser import text_string_to_metric_families

from delivery.faulty_rig import Faulty, start
from destinations.sink_webhook import Sink
from support import basic, wait_for
from trackpipe.delivery.routing import FILTER, INTEGRATIONS, NO_ACTION
from trackpipe.sources.browser import SETTINGS_ROUTES
from trackpipe.sources.http import KNOWN
from trackpipe.sources.responses import STATUS

# The discard reasons: pipeline/validate.py's codes and the two of pipeline/ingest.py.
DISCARD_REASONS = {
    "type_not_defined", "type_invalid", "id_not_string", "properties_not_object",
    "traits_not_object", "context_not_object", "integrations_not_object",
    "previous_id_not_defined", "no_user_anon_id", "event_not_defined", "event_not_string",
    "name_not_string", "category_not_string", "group_id_not_defined", "event_not_object",
    "empty_batch"}
STORE_ERROR_KINDS = {"full", "locked", "corrupt", "io"}  # pipeline/store.py error_kind
FAILED_REASONS = {"terminal", "retries_exhausted"}  # delivery/state.py _Rows.of
# Routing's, and the worker's for a suppressed person's event or one erased from the log.
SKIPPED_REASONS = {INTEGRATIONS.reason, FILTER.reason, NO_ACTION.reason, "suppressed", "deleted"}
CLOSED_LABELS = {
    ("trackpipe_events_discarded", "reason"): DISCARD_REASONS,
    ("trackpipe_requests_rejected", "code"): set(STATUS),
    ("trackpipe_store_errors", "kind"): STORE_ERROR_KINDS,
    ("trackpipe_delivery_failed", "reason"): FAILED_REASONS,
    ("trackpipe_delivery_skipped", "reason"): SKIPPED_REASONS,
    ("trackpipe_http_requests", "endpoint"): {*KNOWN.values(), "other",
                                              *(r.endpoint for r in SETTINGS_ROUTES)},
}
LABEL_NAMES = {"reason", "code", "kind", "endpoint", "status", "destination",
               "le"}  # le: the commit-time histogram's buckets
RATE = 300  # events/s a source may send; `burst` overdraws it, `default` stays well under
SUPPRESSED = "u-gone"


class Ledger:
    """What the test sent and what each request was answered, to compare with /metrics."""

    def __init__(self, server):
        self.server = server
        self.received = self.suppressed = self.deduplicated = 0
        self.rejected: Counter = Counter()
        self.discarded: Counter = Counter()
        self.routed: Counter = Counter()  # events each destination is to skip, by why
        self.flaky: dict = {}  # the failures `flaky` is to count, by reason
        self.flaky_retries = 0
        self.ids: list[str] = []  # every messageId the test made up
        self.users = {SUPPRESSED}

    def event(self, type_: str, user: str | None = None, **fields) -> dict:
        mid = f"m-{uuid.uuid4().hex}"
        self.ids.append(mid)
        ev = {"type": type_, "messageId": mid, **fields}
        if user is not None:
            self.users.add(user)
            ev["userId"] = user
        return ev

    def post(self, path: str, body, *, status: int = 200, code: str | None = None,
             key: str | None = None, headers: dict | None = None, events: int = 0,
             content: bytes | None = None) -> httpx.Response:
        h = {"authorization": basic(key or self.server.write_key), **(headers or {})}
        r = self.server.post(path, body, content=content, auth=False, headers=h)
        assert r.status_code == status, r.text
        if status == 200:
            self.received += events
        else:
            assert r.json()["code"] == code
            self.rejected[code] += 1
        return r


def valid_events(ledger: Ledger) -> tuple[list[dict], dict]:
    """Every type, from ten users; what each destination should make of them."""
    events, routed = [], Counter()
    for k in range(60):
        user = f"u-{k % 10}"
        kind = ("identify", "track", "page", "screen", "group", "alias")[k % 6]
        extra = {"identify": {"traits": {"plan": "pro"}},
                 "track": {"event": "Clicked", "properties": {"k": k}},
                 "page": {"name": "Home"}, "screen": {"name": "Main"},
                 "group": {"groupId": f"g-{k}"}, "alias": {"previousId": f"anon-{k}"}}[kind]
        if k % 7 == 0:
            extra["integrations"] = {"flaky": False}
            routed["flaky_off"] += 1
        routed["screens"] += kind == "screen"
        events.append(ledger.event(kind, user, **extra))
    return events, routed


def invalid_events(ledger: Ledger) -> list:
    ev = ledger.event
    bad = [(ev("track", "u-1"), "event_not_defined"),
           (ev("track", None, event="E"), "no_user_anon_id"),
           (ev("track", "u-2", event="E", properties=[1]), "properties_not_object"),
           (ev("group", "u-3"), "group_id_not_defined"),
           (ev("launch", "u-4"), "type_invalid"),
           (ev("page", "u-5", name=7), "name_not_string"),
           (ev("identify", None, userId={"id": 1}), "id_not_string"),
           ("not an event", "event_not_object")]
    for _, reason in bad:
        ledger.discarded[reason] += 1
    return [e for e, _ in bad]


def scrape(server) -> dict:
    """{(sample name, frozenset of labels): value} from GET /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include these."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def by_label(samples: dict, name: str, label: str, **labels) -> dict:
    want = set(labels.items())
    return {dict(ls)[label]: v for (n, ls), v in samples.items()
            if n == name and want <= ls and v}


def test_counters_conserve_events_and_labels_stay_closed(fresh_server, tmp_path):
    sink = Sink(tmp_path / "sink")
    flaky = Faulty(tmp_path / "flaky", "flaky")
    try:
        hook = {**sink.config("hook"), "filter": {"mode": "deny", "types": ["screen"]}}
        server = start(fresh_server, tmp_path,
                       [hook, flaky.table(max_attempts=3, retry_window_seconds=0)],
                       limits={"rate_limit_events_per_second": RATE})
        ledger = Ledger(server)
        drive(server, ledger, flaky)
        samples = wait_for(lambda: drained(server), timeout=20, what="delivery drained")
        check_ingest_counters(samples, ledger)
        check_delivery_counters(samples, ledger)
        check_labels(samples, ledger, server, sink.url)
    finally:
        sink.close()


def drive(server, ledger: Ledger, flaky: Faulty) -> None:
    valid, ledger.routed = valid_events(ledger)
    for_flaky = [e["messageId"] for e in valid if "integrations" not in e]
    terminal, exhausted, once = for_flaky[:4], for_flaky[4:7], for_flaky[7:12]
    flaky.control(fail_ids=terminal, retry_ids={**dict.fromkeys(exhausted, 99),
                                                **dict.fromkeys(once, 1)})
    ledger.flaky = {"terminal": len(terminal), "retries_exhausted": len(exhausted)}
    ledger.flaky_retries = 2 * len(exhausted) + len(once)  # max_attempts = 3

    # Valid events in batches and one by one, with invalid ones and repeats.
    invalid = invalid_events(ledger)
    batch = valid[:30] + invalid[:4] + [valid[0]]
    ledger.post("/v1/batch", {"batch": batch}, events=len(batch))
    batch = valid[30:50] + invalid[4:]
    ledger.post("/v1/batch", {"batch": batch}, events=len(batch))
    for ev in valid[50:]:
        ledger.post(f"/v1/{ev['type']}", ev, events=1)
    ledger.post("/v1/batch", {"batch": valid[:10]}, events=10)  # sent again: deduplicated
    ledger.deduplicated = 1 + 10
    ledger.post("/v1/batch", {"batch": []}, events=1)
    ledger.discarded["empty_batch"] += 1

    # Refused whole: none of these events is received.
    ev = ledger.event
    ledger.post("/v1/batch", {"batch": [ev("track", "u-1", event="E"), ev("track", "u-1")]},
                headers={"x-strict-mode": "1"}, status=400, code="validation_failed")
    ledger.post("/v1/track", ev("track", "u-1", event="E", properties={"x": "y" * 40_000}),
                status=400, code="payload_too_large")
    ledger.post("/v1/track", ev("track", "u-1", event="E"), key="no-such-key", status=401,
                code="invalid_write_key")
    ledger.post("/v1/track", None, content=b'{"event": "E", "userId": ', status=400,
                code="invalid_json")
    ledger.post("/v1/track", None, content=b"{}", headers={"content-encoding": "br"},
                status=415, code="unsupported_encoding")

    # A suppressed person: valid and invalid events answered 200, none kept.
    with server.admin() as admin:
        assert admin.post("/api/v1/privacy/suppress", json={"id": SUPPRESSED}).status_code == 200
    mine = [ev("track", SUPPRESSED, event="E"), ev("page", SUPPRESSED, name=3),
            ev("identify", SUPPRESSED)]
    ledger.post("/v1/batch", {"batch": mine + [ev("track", "u-1", event="E")]}, events=4)
    ledger.suppressed += len(mine)
    ledger.post("/v1/track", ev("track", SUPPRESSED, event="E"), events=1)
    ledger.suppressed += 1
    # ... and one in a request the log writer finds too deep: refused whole, not suppressed.
    deep = json.loads("[" * 63 + "]" * 63)
    ledger.post("/v1/batch", {"batch": [ev("track", SUPPRESSED, event="E"),
                                        ev("track", "u-1", event="E", properties={"a": deep})]},
                status=400, code="too_deep")

    # Over the rate limit: a full bucket lets one batch overdraw it; the next waits.
    burst = server.add_source("burst")
    events = [ev("track", "u-9", event="B", integrations={"All": False})
              for _ in range(2 * RATE)]  # a second in debt
    ledger.post("/v1/batch", {"batch": events}, key=burst, events=len(events))
    ledger.routed["all_off"] = len(events)
    ledger.post("/v1/track", ev("track", "u-9", event="B"), key=burst, status=429,
                code="rate_limited")


def drained(server) -> dict | None:
    samples = scrape(server)
    pending = by_label(samples, "trackpipe_delivery_pending", "destination")
    head = total(samples, "trackpipe_log_head_position")
    delivered = total(samples, "trackpipe_delivery_delivered_total")
    return samples if head and not pending and delivered else None


def check_ingest_counters(samples: dict, ledger: Ledger) -> None:
    received = total(samples, "trackpipe_events_received_total")
    accepted = total(samples, "trackpipe_events_accepted_total")
    deduplicated = total(samples, "trackpipe_events_deduplicated_total")
    discarded = by_label(samples, "trackpipe_events_discarded_total", "reason")
    suppressed = total(samples, "trackpipe_events_suppressed_total")
    rejected = by_label(samples, "trackpipe_requests_rejected_total", "code")

    assert received == accepted + deduplicated + sum(discarded.values()) + suppressed, \
        (received, accepted, deduplicated, discarded, suppressed)
    assert received == ledger.received
    assert deduplicated == ledger.deduplicated
    assert discarded == dict(ledger.discarded)
    assert suppressed == ledger.suppressed
    assert rejected == dict(ledger.rejected)
    assert accepted == total(samples, "trackpipe_log_head_position")


def check_delivery_counters(samples: dict, ledger: Ledger) -> None:
    stored = total(samples, "trackpipe_log_head_position")
    for name in ("hook", "flaky"):
        delivered = total(samples, "trackpipe_delivery_delivered_total", destination=name)
        failed = by_label(samples, "trackpipe_delivery_failed_total", "reason", destination=name)
        skipped = by_label(samples, "trackpipe_delivery_skipped_total", "reason",
                           destination=name)
        pending = total(samples, "trackpipe_delivery_pending", destination=name)
        assert pending == 0
        assert stored == delivered + sum(failed.values()) + pending + sum(skipped.values()), \
            (name, delivered, failed, skipped)
    hook_skipped = by_label(samples, "trackpipe_delivery_skipped_total", "reason",
                            destination="hook")
    assert hook_skipped == {FILTER.reason: ledger.routed["screens"],
                            INTEGRATIONS.reason: ledger.routed["all_off"]}
    assert not by_label(samples, "trackpipe_delivery_failed_total", "reason", destination="hook")
    flaky_skipped = by_label(samples, "trackpipe_delivery_skipped_total", "reason",
                             destination="flaky")
    assert flaky_skipped == {INTEGRATIONS.reason: ledger.routed["all_off"]
                             + ledger.routed["flaky_off"]}
    assert by_label(samples, "trackpipe_delivery_failed_total", "reason",
                    destination="flaky") == ledger.flaky
    assert total(samples, "trackpipe_delivery_retries_total",
                 destination="flaky") == ledger.flaky_retries


def check_labels(samples: dict, ledger: Ledger, server, url: str) -> None:
    private = {*ledger.ids, *ledger.users, server.write_key}
    for (name, labels), _ in samples.items():
        family = name.removesuffix("_total")
        for label, value in labels:
            assert label in LABEL_NAMES, (name, label, value)  # none per user, event or URL
            allowed = CLOSED_LABELS.get((family, label))
            if allowed is not None:
                assert value in allowed, (name, label, value)
            elif label in ("status", "le"):
                assert float(value) > 0, (name, value)  # a number: "+Inf" reads as one too
            elif label == "destination":
                assert value in ("hook", "flaky"), (name, value)
            assert value not in private and "://" not in value and url not in value, \
                (name, label, value)
