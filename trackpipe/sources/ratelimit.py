"""Per-source rate limits: a token bucket of events per second on the monotonic clock.

Off unless `limits.rate_limit_events_per_second` is set. Over the limit the
request is refused whole with 429 and Retry-After, which every SDK retries
(wire-protocol.md §3.4); a wall-clock jump neither refills nor drains a bucket.
"""

from __future__ import annotations

import math
import time

from trackpipe.errors import RequestRejected


class RateLimiter:
    def __init__(self, events_per_second: float, burst_seconds: float = 1.0, clock=time.monotonic):
        self.rate = events_per_second
        self.capacity = events_per_second * burst_seconds
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # source id -> (tokens, at)

    def take(self, source_id: str, events: int) -> None:
        if self.rate <= 0:
            return
        now = self.clock()
        tokens, at = self._buckets.get(source_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        # A batch larger than the bucket passes when the bucket is full, and leaves it in
        # debt by the rest: the requests after it wait until the debt is paid, so batching
        # cannot beat the rate (2,500 events a second got through a limit of 10).
        need = min(events, self.capacity)
        if need > tokens:
            self._buckets[source_id] = (tokens, now)
            wait = max(1, math.ceil((need - tokens) / self.rate))
            raise RequestRejected(
                "rate_limited", f"This source is over its limit of {self.rate:g} events/s; "
                f"retry in {wait} s.", headers=((b"retry-after", str(wait).encode()),
                                                 (b"x-ratelimit-reset", str(wait).encode())))
        self._buckets[source_id] = (tokens - events, now)
