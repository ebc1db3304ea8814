"""RetryPolicy: the backoff between attempts, and what a Retry-After does to it."""

from __future__ import annotations

from support import MachineClocks

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


def test_pending_retries_move_with_a_step_of_the_wall_clock(tmp_path, monkeypatch):
    """R22: a step back held every retry for the step's length; a step forward spent
    retry windows at once, failing events whose attempts were used up."""
    from types import SimpleNamespace

    from trackpipe.delivery import state as state_module
    from trackpipe.delivery.state import DeliveryState, Sent
    from trackpipe.destinations.base import retry
    from trackpipe.pipeline.clock import StepWatch

    clocks = MachineClocks()
    monkeypatch.setattr(state_module, "time", SimpleNamespace(time=clocks.wall))
    state = DeliveryState(tmp_path / "deliveries.db",
                          clock=StepWatch(clocks.wall, clocks.monotonic))
    policy = RetryPolicy(window_ms=4 * 3600_000, max_attempts=2, initial_ms=1000.0)
    try:
        first = state_module.now_ms()
        state.record("hook", [Sent(1, "m1", first, "u:a", 1, first, retry(503, "busy"))],
                     duration_ms=1.0, policy=policy)
        clocks.step(-3600)  # the wall clock steps back an hour
        clocks.wait(2)
        [due] = state.due("hook", 10)
        assert due.position == 1, "held for the hour the clock stepped back"

        state.record("hook", [Sent(1, "m1", first, "u:a", 2, due.first_attempt_at,
                                   retry(503, "busy"))], duration_ms=1.0, policy=policy)
        clocks.step(5 * 3600)  # forward, past the 4-hour retry window
        clocks.wait(4)  # past the second backoff (2 s x at most 1.5)
        [due] = state.due("hook", 10)
        given_up = state.record("hook", [Sent(1, "m1", first, "u:a", 3, due.first_attempt_at,
                                              retry(503, "busy"))],
                                duration_ms=1.0, policy=policy)
        assert given_up == [], "failed for a retry window that had not passed"
    finally:
        state.close()
