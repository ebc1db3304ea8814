"""Conformance case 41: over the rate limit -> 429 with Retry-After and X-RateLimit-Reset."""

import uuid

import pytest
from support import basic

from trackpipe.errors import RequestRejected
from trackpipe.sources.ratelimit import RateLimiter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_bucket_refills_with_monotonic_time():
    clock = Clock()
    limiter = RateLimiter(10, burst_seconds=1, clock=clock)
    limiter.take("s", 10)
    with pytest.raises(RequestRejected) as exc:
        limiter.take("s", 5)
    assert exc.value.code == "rate_limited"
    assert dict(exc.value.headers)[b"retry-after"] == b"1"
    clock.now += 0.5
    limiter.take("s", 5)  # half a second refilled 5 tokens
    with pytest.raises(RequestRejected):
        limiter.take("s", 1)


def test_sources_have_their_own_buckets_and_big_batches_can_pass():
    clock = Clock()
    limiter = RateLimiter(10, burst_seconds=1, clock=clock)
    limiter.take("a", 100)  # larger than the bucket: passes when it is full, leaving a debt
    limiter.take("b", 10)
    with pytest.raises(RequestRejected) as exc:
        limiter.take("a", 100)
    assert dict(exc.value.headers)[b"retry-after"] == b"10", "the debt of 90, then 10 more"


def test_batches_larger_than_the_bucket_keep_to_the_rate_over_time():
    clock, passed = Clock(), 0
    limiter = RateLimiter(10, burst_seconds=1, clock=clock)
    for _ in range(60):  # a 2,500-event batch every 1.05 s for a minute
        try:
            limiter.take("s", 2500)
            passed += 2500
        except RequestRejected:
            pass
        clock.now += 1.05
    assert passed <= 10 * 63 + 2500, f"{passed / 63:.0f} events/s through a limit of 10"


def test_off_by_default():
    RateLimiter(0).take("s", 10**9)


def test_c41_over_the_rate_limit_is_429_with_retry_after(fresh_server):
    # 1 event/s with a 5-second bucket: the first five requests spend the
    # bucket, and a token takes a whole second to come back, so the refusals
    # do not depend on how fast this machine answers.
    proc = fresh_server(env={"TRACKPIPE_LIMITS_RATE_LIMIT_EVENTS_PER_SECOND": "1",
                             "TRACKPIPE_LIMITS_RATE_LIMIT_BURST_SECONDS": "5"}).start()
    other = proc.add_source("quiet-neighbour")
    run = uuid.uuid4().hex[:8]
    statuses = []
    for i in range(8):
        r = proc.post("/v1/track", {"userId": "u", "event": "E", "messageId": f"{run}-{i}"})
        statuses.append(r.status_code)
        if r.status_code == 429:
            limited = r
    assert statuses[:5] == [200] * 5 and 429 in statuses[5:], statuses
    assert int(limited.headers["retry-after"]) >= 1
    assert int(limited.headers["x-ratelimit-reset"]) >= 1
    assert limited.json()["code"] == "rate_limited" and limited.json()["message"]
    refused = [f"{run}-{i}" for i, s in enumerate(statuses) if s == 429]
    stored = {e["messageId"] for e in proc.events() if e["messageId"].startswith(run)}
    assert stored == {f"{run}-{i}" for i, s in enumerate(statuses) if s == 200}
    assert not stored & set(refused)
    # Another source is not slowed by the noisy one.
    r = proc.post("/v1/track", {"userId": "u", "event": "E"},
                  headers={"authorization": basic(other)})
    assert r.status_code == 200
