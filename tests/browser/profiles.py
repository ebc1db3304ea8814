"""Reading a person back through the admin API, as the identity end-to-end tests do.

Profiles are built by a background consumer of the log, so every read polls
until the profile shows what the test sent (or the deadline passes).
"""

from __future__ import annotations

import time
from urllib.parse import quote

PROFILE_TIMEOUT_S = 10.0


def get_profile(server, ident: str) -> dict | None:
    with server.admin() as admin:
        answer = admin.get(f"/api/v1/profiles/{quote(ident, safe='')}")
    if answer.status_code == 404:
        return None
    answer.raise_for_status()
    return answer.json()


def profile_events(server, ident: str, page_size: int = 100) -> list[dict]:
    """The person's whole timeline, following `next` cursors; [] when there is no profile."""
    events: list[dict] = []
    cursor = None
    with server.admin() as admin:
        while True:
            params = {"limit": page_size, **({"cursor": cursor} if cursor else {})}
            answer = admin.get(f"/api/v1/profiles/{quote(ident, safe='')}/events", params=params)
            if answer.status_code == 404:
                return []
            answer.raise_for_status()
            body = answer.json()
            events += body["events"]
            cursor = body["next"]
            if cursor is None:
                return events


def wait_for_timeline(server, ident: str, message_ids: list[str],
                      timeout: float = PROFILE_TIMEOUT_S, page_size: int = 100) -> list[dict]:
    """Poll until the timeline of `ident` holds every one of `message_ids`; return it."""
    deadline = time.monotonic() + timeout
    while True:
        events = profile_events(server, ident, page_size)
        if set(message_ids) <= {e.get("messageId") for e in events}:
            return events
        if time.monotonic() > deadline:
            got = [(e.get("type"), e.get("event"), e.get("messageId")) for e in events]
            raise AssertionError(
                f"after {timeout:.0f} s the profile of {ident!r} lists {len(events)} events "
                f"{got}, not all of {message_ids}")
        time.sleep(0.2)
