"""What the browser SDKs need to run fully self-hosted (wire-protocol.md §6).

Both SDKs fetch `{cdnURL}/v1/projects/{writeKey}/settings` and must each see
exactly one integration key: analytics-next reads `Segment.io`,
@customerio/cdp-analytics-browser reads `Customer.io Data Pipelines`, and
either SDK, given a second key, loads its `ajs-destination` chunk and vendor
code from a CDN, which fails on a machine that reaches only trackpipe.
Nothing in the request tells the two SDKs apart, so each has its own path:
analytics-next uses `cdnURL = <trackpipe>`, cio-browser `cdnURL =
<trackpipe>/v1/cio` (under /v1/, the prefix app.py hands to the tracking API).
Metrics sampling is off, so neither posts to a metrics host trackpipe does not
serve, and `Customer.io In-App Plugin` is never named: it loads gist from CIO.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec

from trackpipe.config import Settings


@dataclass(frozen=True)
class SettingsRoute:
    prefix: str  # the path after "/v1/" up to the write key
    integration: str  # the one key the SDK reads its apiKey/apiHost/protocol from
    endpoint: str  # the label of trackpipe_http_requests_total


SETTINGS_ROUTES = (
    SettingsRoute("projects/", "Segment.io", "/v1/projects/settings"),
    SettingsRoute("cio/v1/projects/", "Customer.io Data Pipelines",
                  "/v1/cio/v1/projects/settings"),
)


def settings_route(kind: str) -> SettingsRoute | None:
    """The settings route a path after "/v1/" falls under, or None."""
    return next((r for r in SETTINGS_ROUTES if kind.startswith(r.prefix)), None)


def settings_write_keys(route: SettingsRoute, kind: str, raw_path: bytes | None) -> list[str]:
    """The write key of `<prefix><writeKey>/settings`, as the path reads decoded and as it
    was sent: both SDKs put the key in the URL unencoded, so a key holding "/" or "%41"
    is found only in the raw path, one holding a space only in the decoded one."""
    keys = [kind[len(route.prefix):]]
    if raw_path and raw_path.startswith(b"/v1/"):
        keys.append(raw_path[4 + len(route.prefix):].decode("latin-1"))
    return [k[:-len("/settings")] for k in keys
            if k.endswith("/settings") and len(k) > len("/settings")]


def settings_body(write_key: str, settings: Settings, host_header: bytes | None,
                  integration: str = "Segment.io") -> bytes:
    protocol, host = _public_host(settings, host_header)
    endpoint = {"apiKey": write_key, "apiHost": f"{host}/v1", "protocol": protocol}
    return msgspec.json.encode({
        "integrations": {integration: endpoint},
        "metrics": {"sampleRate": 0},
        "plan": {},
        "remotePlugins": [],
    })


def _public_host(settings: Settings, host_header: bytes | None) -> tuple[str, str]:
    if settings.server.public_url:  # config.py checked: http(s), a host, maybe a path
        url = urlsplit(settings.server.public_url)
        return url.scheme, url.netloc + url.path.rstrip("/")  # a proxy's prefix stays
    if host_header:
        return "http", host_header.decode("latin-1")
    return "http", f"{settings.server.host}:{settings.server.port}"
