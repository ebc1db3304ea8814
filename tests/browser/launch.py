"""Starting Debian's chromium through Playwright, or saying clearly why we cannot.

Playwright's own browser download (`playwright install`) needs the internet, so
the tests drive the distribution's chromium via ``executable_path``. The flags
keep it from calling Google's services, which on a closed network only burn CPU.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from . import bundle

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",  # we run as root in CI, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REQUIRE_SERVICES = os.environ.get("TRACKPIPE_REQUIRE_SERVICES") == "1"


def chromium_path() -> str | None:
    found = os.environ.get("TRACKPIPE_CHROMIUM") or next(
        (p for p in CHROMIUM_PATHS if os.access(p, os.X_OK)), None) or shutil.which("chromium")
    return found if found and os.access(found, os.X_OK) else None


def missing_reason(sdk: bundle.Bundle = bundle.ANALYTICS_NEXT) -> str | None:
    """Why the browser tests of `sdk` cannot run here, or None when they can."""
    if importlib.util.find_spec("playwright") is None:
        return "the `playwright` Python package is missing: pip install -e '.[test]'"
    if chromium_path() is None:
        return ("chromium is not installed: `apt-get install -y chromium` (scripts/test.sh does "
                "it as root), or point TRACKPIPE_CHROMIUM at a Chromium binary")
    return sdk.missing_reason()


def require_browser(sdk: bundle.Bundle = bundle.ANALYTICS_NEXT) -> None:
    """Skip the calling test when the rig is incomplete; fail instead when CI demands it."""
    reason = missing_reason(sdk)
    if reason is None:
        return
    if REQUIRE_SERVICES:
        pytest.fail(reason)
    pytest.skip(reason)


def launch(playwright):
    """A headless chromium; each test then opens its own context (fresh cookies, storage)."""
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                      args=CHROMIUM_ARGS)
