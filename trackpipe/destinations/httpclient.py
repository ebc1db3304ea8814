"""The HTTP client every HTTP destination uses (webhook, Mixpanel, Amplitude, forwarding)."""

from __future__ import annotations

import httpx


def new_client(*, allow_private: bool = False, timeout: float = 10.0) -> httpx.AsyncClient:
    # Replaced by the SSRF-guarded client (netguard.py) as part of the webhook work.
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False)
