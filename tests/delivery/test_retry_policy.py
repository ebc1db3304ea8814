"""RetryPolicy: the backoff between attempts, and what a Retry-After does to it."""

from __future__ import annotations

from trackpipe.delivery.retry import RetryPolicy

POLICY = RetryPolicy(window_ms=4 * 3600_000, max_attempts=10, initial_ms=1000,
                     max_delay_ms=300_000)


def test_the_backoff_doubles_with_jitter_and_is_capped():
    for attempt, low in ((1, 1000), (2, 2000), (5, 16_000)):
        assert all(low <= POLICY.delay_ms(attempt) < low * 1.5 for _ in range(50))
    assert POLICY.delay_ms(30) == 300_000


def test_retry_after_is_a_floor_the_backoff_still_applies_under():
    assert POLICY.delay_ms(1, retry_after=20) == 20_000       # no attempt before it expires
    assert POLICY.delay_ms(1, retry_after=10_000) == 300_000  # capped like any wait
    # 0, or an HTTP date in the past (parsed as 0), used to mean "at once", attempt after
    # attempt: ~22 tries a second for the whole retry window.
    assert 16_000 <= POLICY.delay_ms(5, retry_after=0.0) < 24_000
    assert 4_000 <= POLICY.delay_ms(3, retry_after=1.0) < 6_000
