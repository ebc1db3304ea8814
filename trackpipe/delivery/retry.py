"""When to try a failing event again, and when to give up on it.

Exponential backoff with jitter (each wait is the doubled base times a random
factor in [1, 1.5), capped), so a destination that comes back is not hit by
every waiting event at once and the gaps between attempts keep growing. A
`Retry-After` from the tool is a floor under the computed wait (capped the same
way): no attempt before it expires, and one of 0 or a date in the past (a tool
whose clock is behind) cannot turn the backoff off.
An event is given up on only when BOTH the retry window (from its first attempt)
and the attempt count are spent: a long outage does not burn through the
attempts in minutes, and a flapping one does not fail events after one try.
"""

from __future__ import annotations

import random
from typing import NamedTuple


class RetryPolicy(NamedTuple):
    window_ms: int
    max_attempts: int
    initial_ms: float = 1000.0
    max_delay_ms: float = 300_000.0

    @classmethod
    def of(cls, dest) -> "RetryPolicy":
        return cls(dest.retry_window_seconds * 1000, dest.max_attempts,
                   dest.retry_initial_seconds * 1000, dest.retry_max_delay_seconds * 1000)

    def delay_ms(self, attempt: int, retry_after: float | None = None) -> int:
        base = self.initial_ms * (2 ** min(attempt - 1, 30)) * random.uniform(1.0, 1.5)
        if retry_after is not None:
            base = max(base, retry_after * 1000)
        return int(min(base, self.max_delay_ms))

    def exhausted(self, attempts: int, first_attempt_at: int, now: int) -> bool:
        return attempts >= self.max_attempts and now - first_attempt_at >= self.window_ms
