"""What the browser SDKs need to run fully self-hosted (wire-protocol.md §6).

The settings body names only the `Segment.io` integration: any other key,
`Customer.io Data Pipelines` included, makes analytics-next load its
`ajs-destination` chunk and third-party code from vendor CDNs, which fails
on a machine that reaches only trackpipe. Metrics sampling is off, so the browser
never posts to a metrics host trackpipe does not serve.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import msgspec

from trackpipe.config import Settings


def settings_body(write_key: str, settings: Settings, host_header: bytes | None) -> bytes:
    protocol, host = _public_host(settings, host_header)
    endpoint = {"apiKey": write_key, "apiHost": f"{host}/v1", "protocol": protocol}
    return msgspec.json.encode({
        "integrations": {"Segment.io": endpoint},
        "metrics": {"sampleRate": 0},
        "plan": {},
        "remotePlugins": [],
    })


def _public_host(settings: Settings, host_header: bytes | None) -> tuple[str, str]:
    if settings.server.public_url:
        url = urlsplit(settings.server.public_url)
        return url.scheme or "http", url.netloc
    if host_header:
        return "http", host_header.decode("latin-1")
    return "http", f"{settings.server.host}:{settings.server.port}"
