"""Anonymous-then-identified, sent by the real Python SDKs through their module API.

segment-analytics-python (`import segment.analytics as analytics`) and
customerio-cdp-analytics (`import customerio.analytics as analytics`) are
configured the documented way (`write_key`, `host`) and tell the Track docs'
story server-side: a visitor's page view and two product events under an
anonymousId, an identify that carries both ids, then an order under the
userId alone. The person's profile must list all five events in timestamp
order, and the anonymousId must lead to the same profile.

Missing SDK packages skip the test, or fail it under TRACKPIPE_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import importlib
import uuid
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import NamedTuple

import pytest
from browser.profiles import get_profile, wait_for_timeline
from support import REQUIRE_SERVICES

SDKS = {"segment-python": "segment.analytics", "cio-python": "customerio.analytics"}
SETTINGS = ("write_key", "host", "on_error", "max_retries", "default_client")


class Sdk(NamedTuple):
    analytics: ModuleType  # the SDK's module-level API
    errors: list[str]  # what its on_error reported


@pytest.fixture(params=sorted(SDKS))
def sdk(request, server):
    """The SDK's module-level API pointed at trackpipe; its settings restored afterwards."""
    try:
        module = importlib.import_module(SDKS[request.param])
    except ImportError as exc:
        reason = f"{request.param} is not installed ({exc}): pip install -e '.[test]'"
        if REQUIRE_SERVICES:
            pytest.fail(reason)
        pytest.skip(reason)
    saved = {name: getattr(module, name) for name in SETTINGS}
    errors: list[str] = []
    module.write_key, module.host = server.write_key, server.url
    module.on_error = lambda error, batch: errors.append(f"{error} for {batch}")
    module.max_retries = 0  # a refused batch shows up in `errors`, not as a silent retry
    module.default_client = None
    yield Sdk(module, errors)
    module.shutdown()
    for name, value in saved.items():
        setattr(module, name, value)


def tell_the_story(analytics, user_id: str, anonymous_id: str, traits: dict) -> list[str]:
    """Five calls one second apart (explicit timestamps), returning their messageIds."""
    start = datetime.now(UTC) - timedelta(minutes=1)
    at = [start + timedelta(seconds=i) for i in range(5)]
    anonymous = {"anonymous_id": anonymous_id}
    sent = [
        analytics.page(name="Home", properties={"path": "/"}, timestamp=at[0], **anonymous),
        analytics.track(event="Product Viewed", properties={"product_id": "p-1"},
                        timestamp=at[1], **anonymous),
        analytics.track(event="Product Added", properties={"product_id": "p-1"},
                        timestamp=at[2], **anonymous),
        analytics.identify(user_id=user_id, traits=traits, timestamp=at[3], **anonymous),
        analytics.track(user_id=user_id, event="Order Completed", properties={"revenue": 10},
                        timestamp=at[4]),
    ]
    analytics.flush()
    assert all(ok for ok, _ in sent), "the SDK refused to enqueue a call"
    return [message["messageId"] for _, message in sent]


def test_anonymous_events_join_the_identified_profile(server, sdk):
    run = uuid.uuid4().hex[:12]
    user_id, anonymous_id = f"user-{run}", f"anon-{run}"
    traits = {"email": f"{run}@example.com", "name": "Ada Lovelace"}

    message_ids = tell_the_story(sdk.analytics, user_id, anonymous_id, traits)
    assert sdk.errors == []

    events = wait_for_timeline(server, user_id, message_ids)
    assert [e["messageId"] for e in events] == message_ids
    assert [e["type"] for e in events] == ["page", "track", "track", "identify", "track"]
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps), f"timeline not in timestamp order: {stamps}"

    profile = get_profile(server, user_id)
    assert profile is not None
    assert get_profile(server, anonymous_id)["profile_id"] == profile["profile_id"]
    assert profile["user_ids"] == [user_id]
    assert profile["anonymous_ids"] == [anonymous_id]
    assert {k: profile["traits"].get(k) for k in traits} == traits
    assert profile["event_counts"].get("Order Completed") == 1
