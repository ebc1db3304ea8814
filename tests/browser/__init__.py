"""Test rig for driving the real browser SDK in headless Chromium.

- ``bundle``: where the UMD builds of analytics-next and cio-browser live
  (tests/compat/node/node_modules).
- ``page_server``: a tiny threaded HTTP server serving the test page and one build.
- ``launch``: finding Debian's chromium + Playwright, skipping (or failing under
  TRACKPIPE_REQUIRE_SERVICES=1) when either is missing.
- ``analytics_page``: one open test page, its analytics calls and a guard that
  blocks and records every request leaving 127.0.0.1.
- ``fixtures``: the ``chromium`` pytest fixture (import it into a test module).
"""
