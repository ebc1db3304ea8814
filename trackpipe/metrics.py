"""Prometheus metrics. Label values come from closed sets (paths we serve, reason codes).

The per-request counts are plain integers bumped on the event loop and turned
into counters only when /metrics is scraped: a prometheus_client Counter takes
a lock on every increment, a measurable share of a one-event request.
"""

import time
from collections import Counter as _Counts

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import PROCESS_COLLECTOR, Counter
from prometheus_client.core import CounterMetricFamily

REGISTRY = CollectorRegistry()
REGISTRY.register(PROCESS_COLLECTOR)


class Tally:
    """Counts by label values, as plain ints; exported as one Prometheus counter."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()):
        self.name, self.doc, self.labels = name, doc, labels
        self.counts: _Counts = _Counts()

    def add(self, key: tuple = (), n: int = 1) -> None:
        self.counts[key] += n

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=list(self.labels))
        for key, value in list(self.counts.items()):
            family.add_metric(list(key), value)
        if not self.labels and not self.counts:
            family.add_metric([], 0)
        return family


HTTP_REQUESTS = Tally("trackpipe_http_requests", "HTTP requests by endpoint and status",
                      ("endpoint", "status"))
EVENTS_RECEIVED = Tally("trackpipe_events_received", "Events received in well-formed requests")
EVENTS_ACCEPTED = Tally("trackpipe_events_accepted", "Events stored in the log")
EVENTS_DISCARDED = Tally("trackpipe_events_discarded",
                         "Events answered 200 but not stored, by reason", ("reason",))
EVENTS_REJECTED = Tally("trackpipe_requests_rejected", "Whole requests refused with a 4xx, by code",
                        ("code",))
EVENTS_SUPPRESSED = Tally("trackpipe_events_suppressed",
                          "Events answered 200 and dropped: their person is suppressed")
EVENTS_DEDUPLICATED = Tally("trackpipe_events_deduplicated",
                            "Events whose messageId was already stored within the window")
CONSUMERS_RESTARTS = Tally("trackpipe_consumers_restarts",
                           "Times the identity and delivery process died and was started again")


class _Tallies:
    def describe(self):
        return []

    def collect(self):
        for tally in (HTTP_REQUESTS, EVENTS_RECEIVED, EVENTS_ACCEPTED, EVENTS_DISCARDED,
                      EVENTS_REJECTED, EVENTS_DEDUPLICATED, EVENTS_SUPPRESSED,
                      CONSUMERS_RESTARTS):
            yield tally.family()


REGISTRY.register(_Tallies())

COMMIT_SECONDS = Histogram("trackpipe_store_commit_seconds",
                           "Time to dedupe and durably commit one group of requests",
                           buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, 1, 5),
                           registry=REGISTRY)
STORE_ERRORS = Counter("trackpipe_store_errors", "Failed log commits by kind", ["kind"],
                       registry=REGISTRY)


def count_request(endpoint: str, status: int) -> None:
    HTTP_REQUESTS.counts[(endpoint, str(status))] += 1


class _LogExtent:
    """How far the log reaches, read at scrape time. With a retention the oldest event's
    age stays near log.retention_seconds; growing past it, something holds the log back
    (a destination behind or failing, identity catching up)."""

    def __init__(self):
        self.log = None  # the server's log reader, once it has one

    def describe(self):
        return []

    def collect(self):
        if self.log is None:
            return
        from prometheus_client.core import GaugeMetricFamily

        oldest = self.log.oldest_received_at()
        yield GaugeMetricFamily("trackpipe_log_head_position",
                                "Position of the newest event stored", value=self.log.head())
        yield GaugeMetricFamily(
            "trackpipe_log_oldest_event_age_seconds",
            "Age of the oldest event the log still holds (0 when it holds none)",
            value=0 if oldest is None else max(0.0, time.time() - oldest / 1000))


LOG_EXTENT = _LogExtent()
REGISTRY.register(LOG_EXTENT)


class _Readiness:
    """trackpipe_ready, worked out at scrape time (what /ready answers), so it is right
    whether or not anything polls /ready."""

    def __init__(self):
        self.check = None  # () -> (ready, detail): the server's readiness, once it has one

    def describe(self):
        return []

    def collect(self):
        if self.check is None:
            return
        from prometheus_client.core import GaugeMetricFamily

        ready, _ = self.check()
        yield GaugeMetricFamily("trackpipe_ready", "1 when the log accepts writes",
                                value=1 if ready else 0)


READINESS = _Readiness()
REGISTRY.register(READINESS)


def exposition() -> bytes:
    return generate_latest(REGISTRY)


class DeliveryCollector:
    """Delivery metrics, read from deliveries.db at scrape time: the consumers process
    that delivers keeps its counts there, so no numbers have to cross processes."""

    def __init__(self, summaries):
        self.summaries = summaries  # () -> list of destination summaries (admin/destinations.py)

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        delivered = CounterMetricFamily("trackpipe_delivery_delivered", "Events delivered",
                                        labels=["destination"])
        failed = CounterMetricFamily("trackpipe_delivery_failed",
                                     "Events given up on, by reason", labels=["destination", "reason"])
        skipped = CounterMetricFamily("trackpipe_delivery_skipped",
                                      "Events not sent here: routed away, suppressed or deleted",
                                      labels=["destination", "reason"])
        retries = CounterMetricFamily("trackpipe_delivery_retries",
                                      "Failed attempts that were scheduled for a retry",
                                      labels=["destination"])
        pending = GaugeMetricFamily("trackpipe_delivery_pending",
                                    "Events not yet delivered (backlog + retrying)", labels=["destination"])
        oldest = GaugeMetricFamily("trackpipe_delivery_oldest_pending_age_seconds",
                                   "Age of the oldest undelivered event", labels=["destination"])
        stopped = GaugeMetricFamily("trackpipe_delivery_stopped",
                                    "1 while a destination is stopped (it answered 410 Gone)",
                                    labels=["destination"])
        for s in self.summaries():
            name = s["name"]
            delivered.add_metric([name], s["delivered"])
            for reason, n in _by_reason(FAILED_REASONS, s["failed_total"]):
                failed.add_metric([name, reason], n)
            for reason, n in _by_reason(SKIPPED_REASONS, s["skipped"]):
                skipped.add_metric([name, reason], n)
            retries.add_metric([name], s["retries"])
            pending.add_metric([name], s["pending"])
            oldest.add_metric([name], s["oldest_pending_age_seconds"] or 0)
            stopped.add_metric([name], 1 if s["stopped"] else 0)
        yield from (delivered, failed, skipped, retries, pending, oldest, stopped)


# Each event stored since a destination was added is, for it, delivered, failed, skipped
# or pending (README.md, GET /metrics): a reason left out would break that sum.
FAILED_REASONS = ("terminal", "retries_exhausted")
SKIPPED_REASONS = ("integrations", "filter", "no_action", "suppressed", "deleted")


def _by_reason(known: tuple[str, ...], counts: dict) -> list[tuple[str, int]]:
    """Each known reason (0 when none yet) and any other counted: none may go unshown."""
    return [*((r, counts.get(r, 0)) for r in known),
            *((r, n) for r, n in counts.items() if r not in known)]


def register_delivery(summaries) -> DeliveryCollector:
    collector = DeliveryCollector(summaries)
    REGISTRY.register(collector)
    return collector
