"""The Track docs' anonymous-to-known flow, driven by the real analytics-next in Chromium.

A page served by the test (not a CDN) loads the npm UMD build of
@segment/analytics-next, which fetches its settings from trackpipe and sends
each call to trackpipe's browser endpoints (wire-protocol.md §6). The visitor
browses anonymously, identifies, buys; the person's profile must then list
every one of those events, the anonymous ones included, in timestamp order,
and the browser's anonymousId must lead to the same profile. Every request
the page makes is watched: nothing may leave 127.0.0.1.

Needs /usr/bin/chromium, the `playwright` package and `npm install` in
tests/compat/node; skips without them (fails under TRACKPIPE_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import uuid

from browser.analytics_page import open_analytics_page
from browser.fixtures import chromium  # noqa: F401 (the fixture)
from browser.profiles import get_profile, wait_for_timeline
from support import wait_for

# Between calls, so that no two events share a millisecond timestamp and the
# expected timeline order is unambiguous.
GAP_MS = 40


def new_user() -> tuple[str, dict]:
    run = uuid.uuid4().hex[:12]
    return f"user-{run}", {"email": f"{run}@example.com", "name": "Ada Lovelace"}


def calls(tab, *specs) -> list[dict]:
    sent = []
    for method, *args in specs:
        sent.append(tab.call(method, *args))
        tab.pause(GAP_MS)
    return sent


def browse_anonymously(tab) -> list[dict]:
    return calls(tab, ("page",),
                 ("track", "Product Viewed", {"product_id": "p-1", "name": "Teapot"}),
                 ("track", "Product Added", {"product_id": "p-1", "quantity": 1}))


def identify_and_buy(tab, user_id: str, traits: dict) -> list[dict]:
    return calls(tab, ("identify", user_id, traits),
                 ("track", "Order Completed", {"revenue": 10}))


def assert_stayed_local(tab) -> None:
    assert tab.outside == [], f"the page tried to reach other hosts: {tab.outside}"
    missing = [path for path, status in tab.server.served if status != 200]
    assert missing == [], f"the page asked the test server for files it lacks: {missing}"


def assert_timeline(server, user_id: str, sent: list[dict]) -> list[dict]:
    ids = [s["messageId"] for s in sent]
    events = wait_for_timeline(server, user_id, ids)
    assert [e["messageId"] for e in events] == ids, "timeline is not the calls in order"
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps), f"timeline not in timestamp order: {stamps}"
    assert [e["type"] for e in events] == [s["type"] for s in sent]
    return events


def assert_one_profile(server, user_id: str, anonymous_id: str, traits: dict) -> dict:
    by_user = get_profile(server, user_id)
    by_anonymous = get_profile(server, anonymous_id)
    assert by_user is not None and by_anonymous is not None
    assert by_anonymous["profile_id"] == by_user["profile_id"]
    assert by_user["user_ids"] == [user_id]
    assert anonymous_id in by_user["anonymous_ids"]
    assert {k: by_user["traits"].get(k) for k in traits} == traits
    return by_user


def test_plain_npm_page_needs_no_cdn(server, chromium):  # noqa: F811
    """The §6.4 setup as a site would write it: nothing tells analytics-next where its
    chunks live, so trackpipe's settings must not make it load any (one integration
    key only), or it fetches them from cdn.segment.com and, offline, never loads."""
    with open_analytics_page(chromium, server.url, server.write_key,
                             chunks_from_here=False) as tab:
        sent = tab.call("track", "Docs Read", {"path": "/docs"})
        anonymous_id = tab.anonymous_id()
        stored = wait_for(lambda: server.events(anonymous_id=anonymous_id), timeout=10,
                          what="the browser's event in the log")
        assert_stayed_local(tab)
    assert [e["messageId"] for e in stored] == [sent["messageId"]]
    assert stored[0]["context"]["library"]["name"] == "analytics.js"


def test_anonymous_browsing_joins_the_identified_profile(server, chromium):  # noqa: F811
    user_id, traits = new_user()
    with open_analytics_page(chromium, server.url, server.write_key) as tab:
        anonymous_id = tab.anonymous_id()
        before = browse_anonymously(tab)
        after = identify_and_buy(tab, user_id, traits)
        assert tab.user_id() == user_id
        assert_stayed_local(tab)

    assert {(s["userId"], s["anonymousId"]) for s in before} == {(None, anonymous_id)}
    assert {(s["userId"], s["anonymousId"]) for s in after} == {(user_id, anonymous_id)}
    events = assert_timeline(server, user_id, before + after)
    assert all(e["anonymousId"] == anonymous_id for e in events)
    assert [e.get("userId") for e in events] == [None, None, None, user_id, user_id]

    profile = assert_one_profile(server, user_id, anonymous_id, traits)
    assert {name: profile["event_counts"].get(name) for name in
            ("Product Viewed", "Product Added", "Order Completed")} == {
        "Product Viewed": 1, "Product Added": 1, "Order Completed": 1}


def test_anonymous_id_survives_a_reload_and_joins_the_same_profile(server, chromium):  # noqa: F811
    user_id, traits = new_user()
    with open_analytics_page(chromium, server.url, server.write_key) as tab:
        anonymous_id = tab.anonymous_id()
        before = calls(tab, ("page",), ("track", "Product Viewed", {"product_id": "p-2"}))
        # A reload aborts requests in flight; the test is about the id, not retries.
        wait_for(lambda: len(server.events(anonymous_id=anonymous_id)) == len(before),
                 timeout=10, what="the pre-reload events in the log")
        tab.reload()
        assert tab.anonymous_id() == anonymous_id, "analytics-next lost its anonymousId"
        after = calls(tab, ("page",), ("track", "Product Added", {"product_id": "p-2"}))
        after += identify_and_buy(tab, user_id, traits)
        assert_stayed_local(tab)

    assert {s["anonymousId"] for s in before + after} == {anonymous_id}
    assert_timeline(server, user_id, before + after)
    assert_one_profile(server, user_id, anonymous_id, traits)
