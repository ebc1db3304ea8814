"""A tiny threaded HTTP server for the browser tests: the test page and the SDK build.

The page comes from its own origin, so every call to trackpipe is cross-origin
and goes through the CORS preflight a real site causes. It loads the npm UMD
build (``dist/umd/index.js``) of analytics-next or cio-browser and calls
``AnalyticsBrowser.load`` with ``cdnURL`` = trackpipe (``<trackpipe>/v1/cio`` for
cio-browser), so the settings and the event host come from trackpipe's
settings endpoint (wire-protocol.md §6.1, §6.4; trackpipe/sources/browser.py).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from . import bundle

BUNDLE_PATH = "/analytics-next/bundles/"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>trackpipe browser test</title>
<link rel="icon" href="data:,">
%(chunk_setup)s<script src="%(bundle)sindex.js"></script>
<script>
  const CONFIG = %(config)s;
  // Resolves once the SDK has fetched its settings from trackpipe.
  window.trackpipeLoaded = AnalyticsNext.AnalyticsBrowser
    .load({writeKey: CONFIG.writeKey, cdnURL: CONFIG.cdnURL}, CONFIG.options)
    .then(([analytics]) => { window.analytics = analytics; return true; });
</script>
</head><body><h1>trackpipe browser test</h1></body></html>
"""


# The UMD build takes the path of its lazy chunks from window.analytics._cdn and
# otherwise falls back to https://cdn.segment.com (cio-browser: https://cdp.customer.io;
# wire-protocol.md §6.4).
CHUNKS_FROM_HERE = """<script>window.analytics = {_cdn: location.origin};</script>
"""


def render_page(cdn_url: str, write_key: str, chunks_from_here: bool,
                options: dict | None = None) -> bytes:
    config = json.dumps({"writeKey": write_key, "cdnURL": cdn_url, "options": options or {}})
    config = config.replace("<", "\\u003c")
    return (PAGE % {"bundle": BUNDLE_PATH, "config": config,
                    "chunk_setup": CHUNKS_FROM_HERE if chunks_from_here else ""}).encode()


class PageServer:
    """Serves ``/`` (the test page) and ``/analytics-next/bundles/<file>`` on 127.0.0.1.

    ``chunks_from_here=False`` gives the page a plain npm setup, with nothing
    telling the SDK where its chunks live: any chunk it needs is then fetched
    from the vendor's CDN, which the request guard catches. ``options`` is the
    second argument of ``AnalyticsBrowser.load``.
    """

    def __init__(self, cdn_url: str, write_key: str, chunks_from_here: bool = True, *,
                 sdk: bundle.Bundle = bundle.ANALYTICS_NEXT, options: dict | None = None):
        self.sdk = sdk
        self.page = render_page(cdn_url, write_key, chunks_from_here, options)
        self.served: list[tuple[str, int]] = []  # (path, status), for assertions
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def _answer(self, path: str) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", self.page
        if path.startswith(BUNDLE_PATH):
            found = self.sdk.umd_file(path[len(BUNDLE_PATH):])
            if found is not None:
                return 200, "application/javascript", found.read_bytes()
        return 404, "text/plain", b"not found\n"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, ctype, body = owner._answer(self.path)
                owner.served.append((self.path, status))
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.send_header("cache-control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass  # `served` records each request; stderr stays quiet

        return Handler
