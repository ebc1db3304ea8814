"""The real @customerio/cdp-analytics-browser in Chromium against trackpipe, fully offline.

A page served by the test (not a CDN) loads the npm UMD build of cio-browser
and calls ``AnalyticsBrowser.load({writeKey, cdnURL: "<trackpipe>/v1/cio"})``,
as the README shows. cio-browser fetches the same ``/v1/projects/<KEY>/settings``
path as analytics-next but reads another integration key, and either SDK loads
vendor code when it sees a second key; the ``/v1/cio`` prefix is how trackpipe
tells them apart (trackpipe/sources/browser.py). cio-browser then sends its
calls to ``/v1/{p,t,i}``, or batched to ``/v1/b``, as ``text/plain`` with the
write key in the body and no Authorization header (wire-protocol.md §2.2, §6).
Each call must be stored once, and every request the page makes is watched:
nothing may leave 127.0.0.1.

Needs /usr/bin/chromium, the `playwright` package and `npm install` in
tests/compat/node; skips without them (fails under TRACKPIPE_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
from browser import bundle
from browser.analytics_page import open_analytics_page
from browser.fixtures import chromium  # noqa: F401 (the fixture)
from browser.launch import require_browser
from support import wait_for

CIO = bundle.CIO_BROWSER
CIO_KEY = "Customer.io Data Pipelines"


@pytest.fixture(scope="module")
def cio_chromium(chromium):  # noqa: F811
    require_browser(CIO)
    return chromium


def cio_page(browser, server, options: dict | None = None):
    """cio-browser as a plain npm site sets it up: nothing tells it where its chunks live,
    so any chunk it wanted would come from cdp.customer.io and be caught."""
    return open_analytics_page(browser, f"{server.url}/v1/cio", server.write_key,
                               chunks_from_here=False, sdk=CIO, options=options)


def assert_stayed_local(tab) -> None:
    assert tab.outside == [], f"the page tried to reach other hosts: {tab.outside}"
    missing = [path for path, status in tab.server.served if status != 200]
    assert missing == [], f"the page asked the test server for files it lacks: {missing}"


def to_trackpipe(tab, server) -> list:
    """The requests the page sent to trackpipe, settings GET included."""
    port = urlsplit(server.url).port
    return [s for s in tab.sent if urlsplit(s.url).port == port]


def stored_calls(server, anonymous_id: str, count: int) -> list[dict]:
    def all_stored() -> list[dict] | None:
        found = server.events(anonymous_id=anonymous_id)
        return found if len(found) >= count else None

    return wait_for(all_stored, timeout=15, what=f"{count} events of the page in the log")


def test_settings_name_one_integration_per_sdk(server):
    origin = "http://localhost:3000"
    cio = httpx.get(f"{server.url}/v1/cio/v1/projects/{server.write_key}/settings",
                    headers={"origin": origin})
    assert cio.status_code == 200
    assert cio.headers["access-control-allow-origin"] in (origin, "*")
    integrations = cio.json()["integrations"]
    # One key only: a second makes cio-browser load ajs-destination, and the in-app
    # plugin loads gist from Customer.io (wire-protocol.md §6.1).
    assert list(integrations) == [CIO_KEY]
    assert integrations[CIO_KEY] == {"apiKey": server.write_key, "protocol": "http",
                                     "apiHost": f"127.0.0.1:{server.port}/v1"}
    assert cio.json()["metrics"]["sampleRate"] == 0
    segment = httpx.get(f"{server.url}/v1/projects/{server.write_key}/settings")
    assert list(segment.json()["integrations"]) == ["Segment.io"]
    for path in ("/v1/cio/v1/projects/NOPE/settings", "/v1/cio/v1/projects/settings",
                 f"/v1/cio/v1/projects/{server.write_key}/other"):
        missing = httpx.get(f"{server.url}{path}")
        assert missing.status_code == 404, path
        assert missing.json()["code"] == "invalid_write_key"


def test_cio_browser_calls_are_stored(server, cio_chromium):
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    with cio_page(cio_chromium, server) as tab:
        assert tab.page.evaluate("() => typeof AnalyticsNext.AnalyticsBrowser") == "function"
        anonymous_id = tab.anonymous_id()
        sent = [tab.call("page"),
                tab.call("track", "Docs Read", {"path": "/docs"}),
                tab.call("identify", user_id, {"plan": "pro"})]
        stored = stored_calls(server, anonymous_id, len(sent))
        assert_stayed_local(tab)
        requests = to_trackpipe(tab, server)

    settings_url = f"{server.url}/v1/cio/v1/projects/{server.write_key}/settings"
    assert [r.url for r in requests if r.method == "GET"] == [settings_url]
    posts = [r for r in requests if r.method == "POST"]
    assert [urlsplit(r.url).path for r in posts] == ["/v1/p", "/v1/t", "/v1/i"]
    for post in posts:
        assert "authorization" not in {h.lower() for h in post.headers}
        assert post.headers.get("content-type", "").startswith("text/plain")
        assert json.loads(post.body)["writeKey"] == server.write_key

    assert [e["messageId"] for e in stored] == [s["messageId"] for s in sent]
    assert [e["type"] for e in stored] == ["page", "track", "identify"]
    assert stored[1]["event"] == "Docs Read"
    assert stored[1]["properties"] == {"path": "/docs"}
    assert stored[2]["userId"] == user_id
    assert stored[2]["traits"] == {"plan": "pro"}
    assert all("writeKey" not in e for e in stored), "the write key was stored"
    assert stored[0]["context"]["library"] == {"name": "analytics.js",
                                               "version": f"next-{CIO.version()}"}


def test_cio_browser_batches_are_stored(server, cio_chromium):
    batching = {"integrations": {CIO_KEY: {"deliveryStrategy": {
        "strategy": "batching", "config": {"size": 3, "timeout": 10_000}}}}}
    with cio_page(cio_chromium, server, batching) as tab:
        anonymous_id = tab.anonymous_id()
        sent = [tab.call("track", f"Step {n}", {"n": n}) for n in range(3)]
        stored = stored_calls(server, anonymous_id, len(sent))
        assert_stayed_local(tab)
        posts = [r for r in to_trackpipe(tab, server) if r.method == "POST"]

    assert [urlsplit(r.url).path for r in posts] == ["/v1/b"]
    body = json.loads(posts[0].body)
    assert body["writeKey"] == server.write_key
    assert "authorization" not in {h.lower() for h in posts[0].headers}
    assert [e["messageId"] for e in stored] == [s["messageId"] for s in sent]
    assert [e["event"] for e in stored] == ["Step 0", "Step 1", "Step 2"]


def test_trackpipe_address_alone_sends_cio_browser_to_customer_io(server, cio_chromium):
    """Why the README gives cio-browser its own cdnURL: at `<trackpipe>` it gets the
    `Segment.io` settings, finds none of its own and falls back to cdp.customer.io."""
    with open_analytics_page(cio_chromium, server.url, server.write_key,
                             chunks_from_here=False, sdk=CIO) as tab:
        tab.call("track", "Lost", {})
        wait_for(lambda: tab.outside, timeout=10, what="the page's request to Customer.io")
    assert tab.outside == ["https://cdp.customer.io/v1/t"]
