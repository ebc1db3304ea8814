"""One open test page running a browser SDK (analytics-next or cio-browser), as a tab would."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import bundle
from .page_server import PageServer

LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
LOAD_TIMEOUT_MS = 15_000

# Runs one analytics call in the page and returns what was put on the event.
CALL_JS = """async ([method, args]) => {
  const ctx = await window.analytics[method](...args);
  if (ctx.failedDelivery && ctx.failedDelivery()) {
    throw new Error(`${method} failed: ${ctx.failedDelivery().reason}`);
  }
  const e = ctx.event;
  return {messageId: e.messageId, type: e.type, event: e.event || null,
          userId: e.userId || null, anonymousId: e.anonymousId,
          timestamp: new Date(e.timestamp).toISOString()};
}"""


@dataclass(frozen=True)
class Sent:
    """One request the page made, as the browser sent it."""
    method: str
    url: str
    headers: dict[str, str]
    body: str | None


class AnalyticsPage:
    """A Playwright page on the test page, with every non-local request blocked and recorded."""

    def __init__(self, page, page_server: PageServer):
        self.page = page
        self.server = page_server
        self.outside: list[str] = []  # URLs that tried to leave the machine
        self.requests: list[str] = []
        self.sent: list[Sent] = []  # the same requests with method, headers and body
        page.context.route("**/*", self._guard)

    def _guard(self, route) -> None:
        request = route.request
        url = request.url
        self.requests.append(url)
        self.sent.append(Sent(request.method, url, request.headers, request.post_data))
        scheme, host = urlsplit(url).scheme, urlsplit(url).hostname or ""
        if scheme in ("data", "blob") or host in LOCAL_HOSTS:
            route.continue_()
        else:
            self.outside.append(url)
            route.abort("blockedbyclient")

    def open(self) -> AnalyticsPage:
        self.page.goto(self.server.url + "/", wait_until="load")
        self._wait_loaded()
        return self

    def reload(self) -> AnalyticsPage:
        self.page.reload(wait_until="load")
        self._wait_loaded()
        return self

    def _wait_loaded(self) -> None:
        # `load()` rejects when its settings or a chunk it needs cannot be fetched.
        self.page.wait_for_function("() => window.trackpipeLoaded !== undefined",
                                    timeout=LOAD_TIMEOUT_MS)
        loaded = self.page.evaluate(
            "() => window.trackpipeLoaded.then(() => null, (e) => String(e))")
        if loaded is not None:
            raise AssertionError(f"{self.server.sdk.package} did not load: {loaded}; requests "
                                 f"blocked for leaving 127.0.0.1: {self.outside}")

    def call(self, method: str, *args: Any) -> dict[str, Any]:
        """``analytics[method](*args)``; returns messageId, type, event, ids and timestamp."""
        return self.page.evaluate(CALL_JS, [method, list(args)])

    def anonymous_id(self) -> str:
        return self.page.evaluate("() => window.analytics.user().anonymousId()")

    def user_id(self) -> str | None:
        return self.page.evaluate("() => window.analytics.user().id()")

    def pause(self, ms: int) -> None:
        self.page.wait_for_timeout(ms)


@contextlib.contextmanager
def open_analytics_page(browser, cdn_url: str, write_key: str, chunks_from_here: bool = True,
                        *, sdk: bundle.Bundle = bundle.ANALYTICS_NEXT,
                        options: dict | None = None) -> Iterator[AnalyticsPage]:
    """A fresh browser context (no cookies, empty storage) on a test page of its own.

    `cdn_url` is the SDK's ``cdnURL``: trackpipe's URL for analytics-next,
    ``<trackpipe>/v1/cio`` for cio-browser; `options` goes to ``load`` as is."""
    with PageServer(cdn_url, write_key, chunks_from_here, sdk=sdk,
                    options=options) as page_server:
        context = browser.new_context()
        try:
            yield AnalyticsPage(context.new_page(), page_server).open()
        finally:
            context.close()
