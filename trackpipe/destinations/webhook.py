"""The `webhook` destination: events as signed JSON POSTs to a URL of yours.

    [[destinations]]
    name = "orders-hook"
    type = "webhook"
    [destinations.settings]
    url = "https://example.com/hook"
    mode = "batch"                # or "single": one request per event
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    headers = { Authorization = "Bearer change-me" }

Requests follow Standard Webhooks (standardwebhooks.com): `webhook-id` names
the content and stays the same on every re-delivery, so receivers can drop
duplicates; `webhook-timestamp` is the attempt's time; `webhook-signature` is
`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, one per secret while a
secret is being rotated. Segment's `X-Signature` (hex HMAC-SHA1 of the body) is
added when `segment_shared_secret` is set. Bodies are compact JSON without
ASCII escaping, i.e. what JavaScript's JSON.stringify gives back.

Redirects are followed (at most 5) with the same method and body, each hop
through the SSRF guard; custom headers are not sent on to another origin (host or port).
A privacy delete is forwarded as Segment does: `{"type": "delete", "userId": ...}`.
A batch the receiver refuses as too large (413, e.g. nginx's 1 MB default) goes
again in halves, and later batches are cut below the size it refused; only an
event that is too large on its own fails.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import hmac
import json
import logging
import re
import time
from typing import Literal, Sequence

import httpx
import msgspec

from trackpipe.destinations.base import (DELIVERED, Destination, DestinationError, Event,
                                         Outcome, classify_http, fail, retry)
from trackpipe.destinations.httpclient import error_outcome, new_client, read_capped
from trackpipe.destinations.netguard import SETTING, BlockedAddress, Guard, host_refusal

log = logging.getLogger("trackpipe.webhook")

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}
SINGLE_CONCURRENCY = 8  # requests in flight at once in single mode
SEND_BUDGET = 90.0  # seconds for one send(), under the framework's limit, so that every
                    # event gets its own outcome rather than a blanket retry
RESERVED_HEADERS = {"webhook-id", "webhook-timestamp", "webhook-signature", "x-signature",
                    "content-type", "content-length", "host", "transfer-encoding"}
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")  # what may be a webhook-id as it is
MIN_SECRET_BYTES = 24  # the Standard Webhooks minimum
NEW_SECRET = ("python -c \"import base64, os; print('whsec_' +"
              " base64.b64encode(os.urandom(32)).decode())\"")


class WebhookSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str
    """Where events go: an http:// or https:// URL."""
    mode: Literal["batch", "single"] = "batch"
    """"batch": one request per batch, body {"batch": [message, ...]}; "single": one per event."""
    method: Literal["POST", "PUT"] = "POST"
    secret: str | list[str] = ""
    """Standard Webhooks signing secret "whsec_<base64>"; a list signs with each (rotation)."""
    segment_shared_secret: str = ""
    """Adds Segment's X-Signature header (hex HMAC-SHA1 of the body) for existing receivers."""
    headers: dict[str, str] = {}
    """Extra static headers, e.g. Authorization; kept secret."""
    allow_private_targets: bool = False
    """Allow loopback and private-network addresses (an internal service of your own)."""
    timeout_seconds: float = 15.0
    """Per request (connect, send, each read); Standard Webhooks suggests 15-30 s."""

    def __post_init__(self) -> None:
        _check_url(self.url, self.allow_private_targets)
        signing_keys(self.secret)
        _check_headers(self.headers)
        if not 0 < self.timeout_seconds <= 60:
            raise ValueError("timeout_seconds must be more than 0 and at most 60;"
                             f" got {self.timeout_seconds}")


class Webhook(Destination):
    kind = "webhook"
    Settings = WebhookSettings
    secret_fields = ("secret", "segment_shared_secret", "headers")
    default_batch_size = 100
    supports_delete = True

    def __init__(self, name: str, settings: WebhookSettings, *, resolver=None, dialer=None):
        super().__init__(name, settings)
        self.settings: WebhookSettings = settings
        self._keys = signing_keys(settings.secret)
        self._url = httpx.URL(settings.url)  # parsed once, not per request
        self._resolver, self._dialer = resolver, dialer  # tests replace DNS and sockets
        self._client: httpx.AsyncClient | None = None
        # the largest body the receiver may take: one byte less than one it refused (413)
        self._max_body: int | None = None
        # A batch's webhook-id names its events: a retry must carry the same ones.
        self.retries_keep_requests = settings.mode == "batch"

    def sent_secrets(self) -> list[str]:
        """The signing keys' base64 without "whsec_", as a receiver's library decodes them."""
        secrets = [self.settings.secret] if isinstance(self.settings.secret, str) else \
            self.settings.secret
        return [s.removeprefix("whsec_") for s in secrets]

    async def start(self) -> None:
        self._client = new_client(allow_private=self.settings.allow_private_targets,
                                  timeout=self.settings.timeout_seconds,
                                  resolver=self._resolver, dialer=self._dialer)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def send(self, batch: Sequence[Event]) -> Sequence[Outcome] | Outcome:
        if self.settings.mode == "single":
            return await self._each([(event_webhook_id(e.message_id), e.json) for e in batch])
        return await self._post_batch(batch, _deadline())

    async def _post_batch(self, batch: Sequence[Event], deadline: float
                          ) -> Outcome | list[Outcome]:
        """One request for the batch (its one outcome) or, when the batch is larger than
        the receiver takes (its 413, remembered for the batches after it), one per half,
        down to single events (an outcome per event)."""
        # the stored JSON of each event, joined: no decode and encode per event (and no
        # concatenation, which would copy the whole body once more per piece added)
        body = b"".join((b'{"batch":[', b",".join([e.json for e in batch]), b"]}"))
        if len(batch) > 1 and self._max_body is not None and len(body) > self._max_body:
            return await self._halves(batch, deadline)
        outcome = await self.post(batch_webhook_id([e.message_id for e in batch]), body, deadline)
        if outcome.status == 413 and len(batch) > 1:
            if self._max_body is None or len(body) <= self._max_body:
                log.info("webhook %s: the receiver refused a %d-byte body as too large (413);"
                         " sending smaller batches from now on", self.name, len(body))
            self._max_body = len(body) - 1
            return await self._halves(batch, deadline)
        return outcome

    async def _halves(self, batch: Sequence[Event], deadline: float) -> list[Outcome]:
        half = len(batch) // 2
        outcomes: list[Outcome] = []
        for part in (batch[:half], batch[half:]):
            got = await self._post_batch(part, deadline)
            outcomes += [got] * len(part) if isinstance(got, Outcome) else got
        return outcomes

    async def delete_user(self, user_ids: Sequence[str], anonymous_ids: Sequence[str]) -> Outcome:
        now = _iso_now()
        notices = ([("userId", u) for u in user_ids] + [("anonymousId", a) for a in anonymous_ids])
        messages = [(f"delete_{_digest([k, v])}", {"type": "delete", k: v, "timestamp": now})
                    for k, v in notices]
        if self.settings.mode == "single":
            return worst(await self._each(messages))
        return await self.post(f"delete_{_digest([list(n) for n in notices])}",
                               {"batch": [m for _, m in messages]}, _deadline())

    async def check(self) -> str:
        url = httpx.URL(self.settings.url)
        guard = Guard(allow_private=self.settings.allow_private_targets, resolver=self._resolver)
        try:
            addresses = await guard.resolve(url.host, url.port or DEFAULT_PORTS[url.scheme])
        except BlockedAddress as exc:
            raise DestinationError(str(exc)) from None
        except OSError as exc:
            raise DestinationError(f"The url's host {url.host!r} does not resolve ({exc}); check"
                                   " the url setting and this machine's DNS.") from None
        checked = "" if self.settings.allow_private_targets else ", all public"
        return f"{url.host} resolves to {', '.join(addresses)}{checked}; no event sent"

    async def _each(self, requests: list[tuple[str, dict | bytes]]) -> list[Outcome]:
        gate, deadline = asyncio.Semaphore(SINGLE_CONCURRENCY), _deadline()

        async def one(webhook_id: str, message: dict | bytes) -> Outcome:
            async with gate:
                return await self.post(webhook_id, message, deadline)

        return list(await asyncio.gather(*(one(i, m) for i, m in requests)))

    async def post(self, webhook_id: str, payload: dict | bytes, deadline: float) -> Outcome:
        """One delivery attempt of one body (JSON bytes, or a dict to encode), over by
        `deadline` (loop time); never raises."""
        body = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return retry(None, f"not attempted: this send used up its {SEND_BUDGET:.0f} s budget")
        try:
            async with asyncio.timeout(left):
                return await self._follow(self._url, webhook_id, body)
        except TimeoutError:
            return retry(None, f"no answer within this send's {SEND_BUDGET:.0f} s budget")
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return error_outcome(exc)

    async def _follow(self, url: httpx.URL, webhook_id: str, body: bytes) -> Outcome:
        assert self._client is not None, "start() opens the client"
        headers = self.headers(webhook_id, body)
        for _ in range(MAX_REDIRECTS + 1):
            async with self._client.stream(self.settings.method, url, content=body,
                                           headers=headers) as response:
                answer = await read_capped(response)
                location = response.headers.get("location")
                if response.status_code not in REDIRECTS or not location:
                    return classify_http(response.status_code, answer, response.headers)
            target = url.join(location)
            if target.scheme not in ("http", "https"):
                return fail(response.status_code, f"redirected to {target}, which is not http(s)")
            if not _keeps_custom_headers(url, target):
                headers = self.headers(webhook_id, body, custom=False)
            url = target
        return fail(response.status_code, f"more than {MAX_REDIRECTS} redirects; last to {url}."
                    " Point the url setting at the final address.")

    def headers(self, webhook_id: str, body: bytes, *, custom: bool = True) -> dict[str, str]:
        timestamp = str(_unix_now())
        headers = {**(self.settings.headers if custom else {}),
                   "content-type": "application/json",
                   "webhook-id": webhook_id, "webhook-timestamp": timestamp}
        if self._keys:
            headers["webhook-signature"] = sign(self._keys, webhook_id, timestamp, body)
        if self.settings.segment_shared_secret:
            headers["x-signature"] = hmac.new(self.settings.segment_shared_secret.encode(), body,
                                              hashlib.sha1).hexdigest()
        return headers


def _keeps_custom_headers(origin: httpx.URL, target: httpx.URL) -> bool:
    """Custom headers often hold tokens: they follow a redirect within their origin
    (scheme, host and port; another port can be another service), or from http to https
    on the same host at the default ports, as httpx keeps Authorization."""
    if target.host != origin.host:
        return False
    if target.scheme == origin.scheme:
        return target.port == origin.port  # None for the scheme's default port
    return (origin.scheme, target.scheme) == ("http", "https") and (
        origin.port is None and target.port is None)


def sign(keys: Sequence[bytes], webhook_id: str, timestamp: str, body: bytes) -> str:
    """The webhook-signature header: one `v1,<base64>` per key, space-separated."""
    signed = f"{webhook_id}.{timestamp}.".encode()
    return " ".join("v1," + base64.b64encode(_hmac_sha256(key, signed, body)).decode()
                    for key in keys)


def _hmac_sha256(key: bytes, head: bytes, body: bytes) -> bytes:
    """HMAC-SHA256 of head + body, without copying a body of a megabyte to prepend head."""
    mac = hmac.new(key, head, hashlib.sha256)
    mac.update(body)
    return mac.digest()


def signing_keys(secret: str | list[str]) -> list[bytes]:
    """The HMAC keys from the `secret` setting; raises ValueError with the fix."""
    secrets = [secret] if isinstance(secret, str) else secret
    return [_key(s) for s in secrets if s]


def _key(secret: str) -> bytes:
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"secret must be \"whsec_\" followed by at least {MIN_SECRET_BYTES} bytes"
                         f" of base64; make one with: {NEW_SECRET}")
    return key


def event_webhook_id(message_id: str) -> str:
    """A single event's id is its messageId, unless that could not be a safe header value
    (the id is part of the signed text, where a "." would blur the boundaries)."""
    return message_id if SAFE_ID.fullmatch(message_id) else f"msg_{_digest([message_id])}"


def batch_webhook_id(message_ids: Sequence[str]) -> str:
    """The same events in the same order give the same id, so a re-sent batch is known."""
    return f"batch_{_digest(list(message_ids))}"


def worst(outcomes: Sequence[Outcome]) -> Outcome:
    """One outcome for several requests: a retry wins (it must all be sent again)."""
    for state in ("retry", "failed"):
        for outcome in outcomes:
            if outcome.state == state:
                return outcome
    return DELIVERED


def _digest(value: list) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:32]


def _deadline() -> float:
    return asyncio.get_running_loop().time() + SEND_BUDGET


def _unix_now() -> int:
    return int(time.time())


def _iso_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def _check_url(url: str, allow_private: bool) -> None:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"url {url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"url must be an http:// or https:// URL with a host; got {url!r}")
    if parsed.userinfo:
        raise ValueError("url must not carry credentials; put them in `headers` (kept secret),"
                         " e.g. headers = { Authorization = \"Bearer ...\" }")
    kind = None if allow_private else host_refusal(parsed.host)
    if kind:
        raise ValueError(f"url {url!r} points at a non-public address ({kind});"
                         f" destinations may only reach public addresses unless {SETTING} = true")


def _check_headers(headers: dict[str, str]) -> None:
    for name, value in headers.items():
        if not HEADER_NAME.fullmatch(name) or name.lower() in RESERVED_HEADERS:
            raise ValueError(f"headers: {name!r} cannot be set here (not a header name, or one"
                             f" trackpipe sets itself: {', '.join(sorted(RESERVED_HEADERS))})")
        if "\r" in value or "\n" in value:
            raise ValueError(f"headers: the value of {name!r} contains a line break")
