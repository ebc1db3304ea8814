"""The ``chromium`` fixture; a test module imports it to use it."""

from __future__ import annotations

import pytest

from .launch import launch, require_browser


@pytest.fixture(scope="module")
def chromium():
    """One headless chromium (a Playwright ``Browser``) per test module.

    Module scope, not session: Playwright's sync API keeps an event loop on this
    thread while it runs, which must not outlive the browser tests."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            yield browser
        finally:
            browser.close()
