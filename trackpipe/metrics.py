"""Prometheus metrics. Label values come from closed sets (paths we serve, reason codes)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import PROCESS_COLLECTOR

REGISTRY = CollectorRegistry()
REGISTRY.register(PROCESS_COLLECTOR)

HTTP_REQUESTS = Counter("trackpipe_http_requests", "HTTP requests by endpoint and status",
                        ["endpoint", "status"], registry=REGISTRY)
EVENTS_RECEIVED = Counter("trackpipe_events_received", "Events received in well-formed requests",
                          registry=REGISTRY)
EVENTS_ACCEPTED = Counter("trackpipe_events_accepted", "Events stored in the log",
                          registry=REGISTRY)
EVENTS_DISCARDED = Counter("trackpipe_events_discarded",
                           "Events answered 200 but not stored, by reason", ["reason"],
                           registry=REGISTRY)
EVENTS_REJECTED = Counter("trackpipe_requests_rejected",
                          "Whole requests refused with a 4xx, by code", ["code"],
                          registry=REGISTRY)
EVENTS_DEDUPLICATED = Counter("trackpipe_events_deduplicated",
                              "Events whose messageId was already stored within the window",
                              registry=REGISTRY)
COMMIT_SECONDS = Histogram("trackpipe_store_commit_seconds",
                           "Time to dedupe and durably commit one group of requests",
                           buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, 1, 5),
                           registry=REGISTRY)
STORE_ERRORS = Counter("trackpipe_store_errors", "Failed log commits by kind", ["kind"],
                       registry=REGISTRY)
READY = Gauge("trackpipe_ready", "1 when the log accepts writes", registry=REGISTRY)


_http_children: dict[tuple[str, int], object] = {}


def count_request(endpoint: str, status: int) -> None:
    """HTTP_REQUESTS.labels(...).inc() without building the label key on every request."""
    child = _http_children.get((endpoint, status))
    if child is None:
        child = _http_children[(endpoint, status)] = HTTP_REQUESTS.labels(endpoint, str(status))
    child.inc()


def exposition() -> bytes:
    return generate_latest(REGISTRY)
