"""The tracking API: /v1/{identify,track,page,screen,group,alias,batch}, the browsers'
/v1/{i,t,p,s,g,a,b}, /v1/m, the settings endpoint and CORS.

A plain ASGI callable rather than a framework route: this is the hot path,
and a framework's per-request overhead would be a large share of it. Bodies
are parsed as JSON whatever the Content-Type (browsers send text/plain,
rudder-node labels gzip as form-urlencoded).
"""

from __future__ import annotations

import ipaddress
import time

from trackpipe import metrics
from trackpipe.config import Settings
from trackpipe.errors import RequestRejected, StoreUnavailable
from trackpipe.events import BATCH_PATHS, PATH_TYPES, format_ts
from trackpipe.pipeline.decode import TOO_DEEP, decode_object, inflate
from trackpipe.pipeline.enrich import RequestContext
from trackpipe.pipeline.ingest import AsSent, batch_context, items_of, prepare
from trackpipe.pipeline.store import Committer
from trackpipe.privacy.suppress import Suppressions
from trackpipe.sources import browser, responses
from trackpipe.sources.auth import SourceRegistry
from trackpipe.sources.ratelimit import RateLimiter
from trackpipe.sources.turns import Turns

ALLOW_HEADERS = b"authorization, content-type, x-retry-count, x-strict-mode"
JSON = (b"content-type", b"application/json")
# A browser's script sees only these of a cross-origin answer's headers: a 429's wait.
EXPOSE_HEADERS = (b"access-control-expose-headers", b"Retry-After, X-RateLimit-Reset")
ENCODINGS = ("gzip", "x-gzip", "deflate")
# Bodies this large take turns at parsing (sources/turns.py); a one-event request
# parses in ~50 µs, and making it wait a loop iteration only splits commit groups.
TAKES_TURNS_BYTES = 16 * 1024
KNOWN = {**{p: f"/v1/{p}" for p in PATH_TYPES}, **{p: f"/v1/{p}" for p in BATCH_PATHS},
         "m": "/v1/m"}


class TrackingAPI:
    def __init__(self, settings: Settings, registry: SourceRegistry, committer: Committer,
                 suppressions: Suppressions | None = None):
        self.settings = settings
        self.suppressions = suppressions or Suppressions(b"")
        self.limits = settings.limits
        self.registry = registry
        self.committer = committer
        self.origins = set(settings.server.cors_origins)
        self.trusted = [ipaddress.ip_network(p, strict=False)
                        for p in settings.server.trusted_proxies]
        self.limiter = RateLimiter(settings.limits.rate_limit_events_per_second,
                                   settings.limits.rate_limit_burst_seconds)
        self._received: tuple[int, str] = (-1, "")  # the last receivedAt and its text
        self.turns = Turns()

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["path"][4:]  # after "/v1/"
        method = scope["method"]
        headers = dict(scope["headers"])  # keys arrive lower-cased
        cors = self._cors(headers.get(b"origin"))
        route = None if kind in KNOWN else browser.settings_route(kind)  # the event paths skip it
        endpoint = KNOWN.get(kind) or (route.endpoint if route else "other")
        if method == "OPTIONS":
            status, body, extra = 204, b"", self._preflight(cors)
        elif route and method in ("GET", "HEAD"):
            (status, body), extra = self._settings(route, kind, scope, headers), cors
            if not self.settings.server.public_url:  # apiHost is read off Host: a cache
                extra = [*extra, (b"vary", b"Host")]  # in front must not share it across hosts
        elif method != "POST":
            status, body = 405, responses.error_body("method_not_allowed",
                                                     f"{method} is not allowed here; use POST.")
            extra = [*cors, (b"allow", b"POST, OPTIONS")]
        elif endpoint == "other" or route:
            status, body, extra = 404, responses.error_body(
                "not_found", f"There is no tracking endpoint {scope['path']}."), cors
        else:
            status, body, extra = await self._ingest(kind, scope, headers, receive)
            extra = [*extra, *cors]
        metrics.count_request(endpoint, status)
        await _respond(send, status, body, extra)

    async def _ingest(self, kind: str, scope, headers: dict, receive):
        try:
            raw = await self._read_body(headers, receive)
            if kind == "m":
                return 200, responses.SUCCESS_BODY, ()  # browser self-metrics: accepted, ignored
            await self._accept(kind, scope, headers, raw)
        except RequestRejected as exc:
            metrics.EVENTS_REJECTED.add((exc.code,))
            status, body = responses.rejection(exc)
            return status, body, exc.headers
        except StoreUnavailable as exc:
            return 503, responses.error_body("store_unavailable", f"{exc}; retry later."), (
                (b"retry-after", str(responses.RETRY_AFTER_SECONDS).encode()),)
        return 200, responses.SUCCESS_BODY, ()

    async def _read_body(self, headers: dict, receive) -> bytes:
        # A refusal here, before the body is all in, closes the connection: the protocol
        # (sources/oneshot.py) adds `connection: close` to any such answer.
        limit = self.limits.max_request_bytes
        encoding = headers.get(b"content-encoding")
        encoding = "" if encoding is None else encoding.decode("latin-1").strip().lower()
        if encoding not in ENCODINGS and encoding not in ("identity", ""):
            raise RequestRejected("unsupported_encoding", f"Content-Encoding {encoding!r} is not "
                                  "supported; send gzip, deflate or uncompressed JSON.")
        # A compressed body can hardly be larger than what it decompresses to.
        declared = headers.get(b"content-length")
        if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise RequestRejected("payload_too_large", f"Exceed payload limit: the request body "
                                  f"is {int(declared)} bytes, more than {limit}.")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestRejected("invalid_payload", "The client went away mid-request.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestRejected("payload_too_large", "Exceed payload limit: the request "
                                      f"body is more than {limit} bytes.")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if encoding in ENCODINGS:
            raw = inflate(raw, encoding, limit)
        return raw

    async def _accept(self, kind: str, scope, headers: dict, raw: bytes):
        if len(raw) < TAKES_TURNS_BYTES:  # parsed in well under a millisecond
            records, discards, items, suppressed = self._parse(kind, scope, headers, raw)
        else:
            await self.turns.take()  # see sources/turns.py: one per event-loop iteration
            try:
                records, discards, items, suppressed = self._parse(kind, scope, headers, raw)
            finally:
                self.turns.done()
        # Counted once the writer has seen them: a counter never goes down (Prometheus
        # would read that as a reset), and only the writer finds some malformed requests.
        try:
            outcome = await self.committer.submit(records, discards)
        except BaseException:
            metrics.EVENTS_RECEIVED.add((), items)  # well-formed; answered 503, not stored
            raise
        if outcome.too_deep:  # found by the log writer: not a well-formed request after all
            raise RequestRejected("too_deep", TOO_DEEP)
        metrics.EVENTS_RECEIVED.add((), items)
        if suppressed:  # counted here, not on parsing: a request too deep is refused whole
            metrics.EVENTS_SUPPRESSED.add((), suppressed)
        metrics.EVENTS_ACCEPTED.add((), outcome.stored)
        if outcome.deduplicated:
            metrics.EVENTS_DEDUPLICATED.add((), outcome.deduplicated)
        for d in discards:
            metrics.EVENTS_DISCARDED.add((d.reason,))

    def _parse(self, kind: str, scope, headers: dict, raw: bytes):
        """Decode, authenticate, validate and enrich: (records, discards, events received,
        events suppressed). An empty batch is received as one event, its empty_batch
        discard: received = accepted + deduplicated + discarded + suppressed."""
        body = decode_object(raw)
        source = self.registry.resolve(headers.get(b"authorization"), body)
        type_ = None if kind in BATCH_PATHS else PATH_TYPES[kind]
        received = time.time_ns() // 1_000_000
        if received != self._received[0]:  # requests arrive many to a millisecond
            self._received = (received, format_ts(received))
        rc = RequestContext(received, self._received[1], source.id,
                            self._peer_ip(scope, headers), self.settings.ingest.version,
                            truncate_ip=self.settings.privacy.truncate_ip)
        items = items_of(body, type_, self.limits)
        self.limiter.take(source.id, len(items))
        if type_ is None:
            batch_context(body, rc)
        strict = (source.strict or self.settings.ingest.strict
                  or headers.get(b"x-strict-mode", b"").strip() in (b"1", b"true"))
        records, discards = prepare(items, type_, rc, self.limits, strict,
                                    AsSent(raw, type_ is None))
        dropped = 0
        if self.suppressions.hashes:  # invalid events too: a discard keeps the payload
            records, discards, dropped = self.suppressions.drop(
                records, discards, self.settings.identity.trait_identifiers)
        return records, discards, max(len(items), 1), dropped

    def _peer_ip(self, scope, headers: dict) -> str | None:
        """The client's IPv4 address for context.ip, or None (Segment does not auto-collect
        IPv6, wire-protocol.md §4.2)."""
        client = scope.get("client")
        peer = client[0] if client else None
        if self.trusted and peer is not None and self._is_trusted(peer):
            forwarded = headers.get(b"x-forwarded-for")
            if forwarded is not None and len(headers) != len(scope["headers"]):
                forwarded = _all_lines(scope["headers"], b"x-forwarded-for")  # some repeated
            if forwarded:
                peer = self._forwarded_client(forwarded) or peer
        return _ipv4(peer)

    def _forwarded_client(self, forwarded: bytes) -> str | None:
        """Walk X-Forwarded-For from the nearest hop outwards: the first untrusted address
        is the client; when every one is trusted, the farthest. Entries that are not IP
        addresses ("unknown", a port) are passed over, never taken for one."""
        farthest = None
        for hop in reversed(forwarded.decode("latin-1").split(",")):
            hop = _address(hop)
            if hop is None:
                continue
            if not self._is_trusted(hop):
                return hop
            farthest = hop
        return farthest

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        ip = getattr(ip, "ipv4_mapped", None) or ip  # a dual-stack listener's IPv4 peer
        return any(ip in net for net in self.trusted)

    def _cors(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        if origin is None:
            return []
        if "*" in self.origins or origin.decode("latin-1") in self.origins:
            return [(b"access-control-allow-origin", origin), (b"vary", b"Origin"),
                    EXPOSE_HEADERS]
        return []

    def _preflight(self, cors) -> list[tuple[bytes, bytes]]:
        if not cors:
            return []
        return [*cors, (b"access-control-allow-methods", b"POST, GET, OPTIONS"),
                (b"access-control-allow-headers", ALLOW_HEADERS),
                (b"access-control-max-age", b"86400")]

    def _settings(self, route: browser.SettingsRoute, kind: str, scope,
                  headers: dict) -> tuple[int, bytes]:
        keys = browser.settings_write_keys(route, kind, scope.get("raw_path"))
        source = next((s for s in map(self.registry.by_key.get, keys) if s), None)
        if source is None or not source.enabled:
            return 404, responses.error_body("invalid_write_key", "No enabled source has that "
                                             "write key.")
        return 200, browser.settings_body(source.write_key, self.settings,
                                          headers.get(b"host"), route.integration)


def _all_lines(raw_headers, name: bytes) -> bytes:
    """A header sent on several lines is one list, its lines joined in order (RFC 9110
    §5.3); `dict(scope["headers"])` kept only the last line."""
    return b",".join(value for key, value in raw_headers if key == name)


def _address(text: str) -> str | None:
    """An X-Forwarded-For entry as an IP address ("203.0.113.7:5555" and "[2001:db8::1]:443"
    carry a port), or None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return str(getattr(ip, "ipv4_mapped", None) or ip)


def _ipv4(peer: str | None) -> str | None:
    """IPv4 as is, an IPv4-mapped IPv6 peer (a dual-stack listener's) as IPv4, else None."""
    if peer is None or ":" not in peer:
        return peer
    try:
        mapped = ipaddress.IPv6Address(peer).ipv4_mapped
    except ValueError:
        return None
    return None if mapped is None else str(mapped)


async def _respond(send, status: int, body: bytes, extra) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [JSON, (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})
