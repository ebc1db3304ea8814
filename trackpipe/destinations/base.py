"""The seam every destination sits behind.

A destination turns a batch of events into requests to one tool and says,
per event, what happened: delivered, worth retrying, or failed for good.
Everything else — reading the log, routing, batching, backoff, the failed
store, replays, metrics — belongs to the delivery framework (trackpipe/delivery),
so a destination module stays small: its settings, `send`, `check`.

Classifying a failure is the destination's job because only it knows the
tool: a 429 from Mixpanel is worth retrying, a 400 is not; a dropped
PostgreSQL connection is worth retrying, a permission error is not.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
import time
import urllib.parse
from abc import ABC, abstractmethod
from functools import cached_property
from typing import Any, ClassVar, Iterable, NamedTuple, Sequence

import msgspec

from trackpipe.events import parse_ts

EXCERPT_CHARS = 500
MIN_SECRET_CHARS = 4  # shorter setting values (a header "1") would mask every digit of a text
AUTHORIZATION = re.compile(r"([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*) +(\S+)")  # scheme credentials


class Event:
    """One log entry on its way to one destination.

    position    in the log; unique and increasing
    message_id
    message     the normalized Segment message (`_metadata` removed), or, when a mapping
                action matched, the message that action built
    profile_id  the resolved person (identity), when identity is enabled
    options     this destination's option object from `integrations`, if any
    action      name of the mapping action that matched, if the destination has actions
    json        the message as JSON bytes
    stored_time the stored message's time in ms (its `timestamp`, else when it was
                received): stable across retries, for a `message` without a timestamp
    identities  (kind, value) -> profile id of each identifier the message names (userId,
                anonymousId, an alias's previousId, the configured trait identifiers),
                as identity holds them at delivery; see identity/store.py Resolved

    The framework hands over the stored JSON of a message that routing leaves
    unchanged, and decodes it only when a destination reads `message`; a
    destination that sends the message as it is (webhook, file) joins `json`
    and skips a decode and an encode per event. Treat `message` as read-only:
    `json` does not follow changes made to it.
    """

    __slots__ = ("position", "message_id", "_message", "profile_id", "options", "action", "_json",
                 "stored_time", "identities")

    def __init__(self, position: int, message_id: str, message: dict | None,
                 profile_id: str | None, options: dict | None, action: str | None,
                 json: bytes | None = None, stored_time: int | None = None,
                 identities: dict[tuple[str, str], str] | None = None):
        if message is None and json is None:
            raise ValueError("an Event needs its message, as a dict or as JSON")
        self.position, self.message_id, self._message = position, message_id, message
        self.profile_id, self.options, self.action, self._json = profile_id, options, action, json
        self.stored_time = stored_time
        self.identities = identities or {}

    @property
    def message(self) -> dict:
        if self._message is None:
            self._message = _decode(self._json)
        return self._message

    @property
    def json(self) -> bytes:
        if self._json is None:
            self._json = msgspec.json.encode(self._message)
        return self._json

    def __repr__(self) -> str:
        return f"Event({self.position}, {self.message_id!r}, action={self.action!r})"


_decode = msgspec.json.Decoder().decode


def event_time(event: Event) -> int | None:
    """The event's time in ms: its message's `timestamp` (0 is 1970, not "missing"), else
    the stored message's time, when an action built a message without one. Never the
    time of sending: a retry must carry the same time as the first attempt (Mixpanel
    deduplicates on it), and the event did not happen when it was sent."""
    ts = parse_ts(event.message.get("timestamp"))
    return ts if ts is not None else event.stored_time


class Outcome(NamedTuple):
    state: str                  # "delivered" | "retry" | "failed"
    status: int | None = None   # HTTP status (or None for non-HTTP tools)
    detail: str = ""            # what the tool answered, cut to EXCERPT_CHARS
    retry_after: float | None = None  # seconds the tool asked us to wait


DELIVERED = Outcome("delivered", 200)


def retry(status: int | None, detail: str, retry_after: float | None = None) -> Outcome:
    return Outcome("retry", status, excerpt(detail), retry_after)


def fail(status: int | None, detail: str) -> Outcome:
    return Outcome("failed", status, excerpt(detail))


def excerpt(text: Any) -> str:
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text[:EXCERPT_CHARS * 4]).decode("utf-8", "replace")
    text = str(text)
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS - 1] + "…"


GONE = 410


def classify_http(status: int, body: bytes | str = b"", headers: Any = None) -> Outcome:
    """The usual HTTP answer → Outcome: 2xx delivered; 408, 409, 429 and 5xx worth retrying
    (with Retry-After when given); 410 Gone kept for a retry too, but it stops the whole
    destination (delivery/worker.py); any other status failed for good."""
    if 200 <= status < 300:
        return Outcome("delivered", status)
    if status == GONE:
        return retry(status, body)
    if status in (408, 409, 429) or status >= 500:
        return retry(status, body, parse_retry_after(headers.get("retry-after") if headers else None))
    return fail(status, body)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds or as an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class DestinationError(Exception):
    """A destination's settings are wrong or its health check failed; the message says how."""


def secret_values(settings: msgspec.Struct, fields: Iterable[str]) -> set[str]:
    """Every text in these settings, found inside dicts and lists too (a headers table)."""
    found: set[str] = set()
    todo = [getattr(settings, f, None) for f in fields]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            todo += value.values()
        elif isinstance(value, (list, tuple)):
            todo += value
        elif isinstance(value, str):
            found.add(value)
    return found


# A query or fragment value is taken for a credential when its key says so, or when it is
# long enough to be a generated token; `format=json` or `retries=1000` are not (masking
# them would garble every detail that quotes "json").
CREDENTIAL_KEY = re.compile(r"tok|key|secret|sig|auth|pass|pwd|code|sess|cred|jwt|hash|hmac",
                            re.IGNORECASE)
TOKEN_CHARS = 16


def is_http_url(value: object) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://"))


def _split_url(url: str) -> tuple[str, str, str, str, str, str]:
    """(scheme, userinfo, host and path, query, fragment, separators) by plain splitting:
    urlsplit refuses some URLs httpx takes (a stray bracket), and masking must not fail."""
    scheme, _, rest = url.partition("://")
    rest, hash_, fragment = rest.partition("#")
    rest, mark, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    return scheme, userinfo if at else "", hostport + slash + path, query, fragment, mark + hash_


def _pairs(text: str) -> list[tuple[str, str]]:
    return [piece.partition("=")[::2] for piece in text.split("&") if piece]


def url_credentials(url: str) -> list[str]:
    """The parts of a URL that are credentials, as written and decoded: the password of a
    `user:password@` (or a user alone: a write key travels so), and the query and fragment
    values that look like one (CREDENTIAL_KEY, TOKEN_CHARS). The host and path are not."""
    _, userinfo, _, query, fragment, _ = _split_url(url)
    user, _, password = userinfo.partition(":")
    found = [password or user] if userinfo else []
    for key, value in _pairs(query) + _pairs(fragment):
        if value and (CREDENTIAL_KEY.search(key) or len(value) >= TOKEN_CHARS):
            found.append(value)
    return found + [urllib.parse.unquote_plus(v) for v in found]


def settings_url_credentials(settings: msgspec.Struct) -> set[str]:
    """Credentials inside any of the settings' URLs (a webhook's url, an api_url)."""
    return {secret for value in msgspec.structs.asdict(settings).values() if is_http_url(value)
            for secret in url_credentials(value)}


def mask_url(url: str, mask: str) -> str:
    """`url` as shown: its userinfo and every query and fragment value replaced by `mask`
    (shown, a value need not look like a credential to be hidden)."""
    def hide(text: str) -> str:
        return "&".join(f"{piece.partition('=')[0]}={mask}" if "=" in piece else piece
                        for piece in text.split("&"))

    scheme, userinfo, rest, query, fragment, separators = _split_url(url)
    shown = f"{scheme}://{mask + '@' if userinfo else ''}{rest}"
    if "?" in separators:
        shown += "?" + hide(query)
    if "#" in separators:
        shown += "#" + hide(fragment)
    return shown


def secret_forms(secret: str) -> set[str]:
    """The secret as it is and as a tool may echo it: JSON-quoted (also with "\\/", as PHP
    writes it), URL-encoded, and an Authorization value's credentials without their scheme
    ("Bearer x" → "x"; a Basic pair decoded, and its password). Forms shorter than
    MIN_SECRET_CHARS are left out: they would mask every digit of a text."""
    quoted = msgspec.json.encode(secret).decode()[1:-1]
    forms = {secret, quoted, quoted.replace("/", "\\/"), urllib.parse.quote(secret, safe=""),
             urllib.parse.quote_plus(secret, safe="")}
    credentials = AUTHORIZATION.fullmatch(secret)
    if credentials:
        forms |= secret_forms(credentials.group(2))
        if credentials.group(1).lower() == "basic":
            forms |= _basic_pair(credentials.group(2))
    return {f for f in forms if len(f) >= MIN_SECRET_CHARS}


def _basic_pair(token: str) -> set[str]:
    try:
        pair = base64.b64decode(token, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return set()
    return {pair, pair.partition(":")[2]}


def basic_authorization(username: str, password: str) -> str:
    """The Authorization value httpx sends for this Basic auth pair."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret masked, and a connection string's password too (dsn.scrub).
    Longest first, so a secret inside another one leaves none of the longer one showing."""
    from trackpipe import dsn  # loads psycopg: only once some text needs scrubbing

    for secret in sorted(secrets, key=len, reverse=True):
        if "password" in secret or "://" in secret:  # a connection string with a password
            text = dsn.scrub(text, secret)
        text = _scrub_cut(text.replace(secret, dsn.MASK), secret, dsn.MASK)
    return text


def _scrub_cut(text: str, secret: str, mask: str) -> str:
    """An excerpt cut inside a secret ("Invalid API key: 7f3a…") still shows its start:
    at the end of a detail, or inside a sentence that quotes the excerpt (`check`)."""
    if "…" not in text:
        return text
    parts = text.split("…")
    for i, part in enumerate(parts[:-1]):
        for k in range(len(secret) - 1, MIN_SECRET_CHARS - 1, -1):
            if part.endswith(secret[:k]):
                parts[i] = part[:-k] + mask
                break
    return "…".join(parts)


class Destination(ABC):
    """One configured destination instance.

    Subclasses set `kind` and `Settings` (a msgspec Struct with
    forbid_unknown_fields=True, built from the instance's `settings` table), and
    list in `secret_fields` the settings that must never be shown or logged. The
    framework masks their values in every detail it records, logs or prints (`scrub`):
    a tool may echo a credential in its error ("Invalid API key: ...").
    """

    kind: ClassVar[str]
    Settings: ClassVar[type[msgspec.Struct]]
    secret_fields: ClassVar[tuple[str, ...]] = ()
    default_batch_size: ClassVar[int] = 100
    supports_delete: ClassVar[bool] = False
    retries_keep_requests: bool = False
    """True when a request has an identity its receiver deduplicates on (a webhook batch's
    webhook-id): the failed events of a request are then retried as that request again,
    never merged with others that come due at the same time. send() must then answer
    the events of one request with one Outcome object (one per request when it cut the
    batch into several). Left False, events due together go together, up to
    batch_size: a backlog of small failed requests (an outage under light traffic)
    drains in full batches."""
    uses_profiles: ClassVar[bool] = False
    """True when send() reads Event.profile_id: the framework then holds each event back
    until identity has applied it, and resolves its person. A destination that leaves
    it False is never slowed by identity."""

    def __init__(self, name: str, settings: msgspec.Struct):
        self.name = name
        self.settings = settings

    @cached_property
    def _secrets(self) -> frozenset[str]:
        sent = (secret_values(self.settings, self.secret_fields) | set(self.sent_secrets())
                | settings_url_credentials(self.settings))
        return frozenset(form for secret in sent for form in secret_forms(secret))

    def sent_secrets(self) -> Iterable[str]:
        """Secrets that the settings' values become on the wire, which a tool may echo
        too: a Basic auth header built from them, a signing key's base64 without prefix."""
        return ()

    def scrub(self, text: str) -> str:
        """`text` with the values of this destination's secret settings masked."""
        return scrub(text, self._secrets) if text and self._secrets else text

    def scrub_outcomes(self, outcomes: Sequence[Outcome]) -> list[Outcome]:
        """The outcomes with their details scrubbed. Events that shared an Outcome object
        still share one: that is how a send says they went in one request."""
        scrubbed: dict[int, Outcome] = {}
        shown: dict[str, str] = {}  # a batch's "not sent" details are many copies of one text
        for o in outcomes:
            if id(o) not in scrubbed:
                if o.detail not in shown:
                    shown[o.detail] = self.scrub(o.detail)
                detail = shown[o.detail]
                scrubbed[id(o)] = o if detail == o.detail else o._replace(detail=detail)
        return [scrubbed[id(o)] for o in outcomes]

    async def start(self) -> None:
        """Open clients, pools and files. Called once before the first send."""

    @abstractmethod
    async def send(self, batch: Sequence[Event]) -> Sequence[Outcome] | Outcome:
        """Deliver the batch. Return one Outcome per event (same order), or one Outcome that
        applies to all of them. Must not raise for a failure of the tool: an exception is
        treated as a retryable failure of the whole batch, with its text as the detail."""

    async def check(self) -> str:
        """Health check for `trackpipe check`: return a short description of what was
        verified; raise DestinationError with a helpful message when unhealthy."""
        return "settings valid"

    async def delete_user(self, user_ids: Sequence[str], anonymous_ids: Sequence[str],
                          traits: Sequence[tuple[str, str]] = ()) -> Outcome:
        """Forward a privacy delete for a person (only when `supports_delete`). `traits`,
        the person's (trait name, normalised value) identifiers, is given only to a
        destination that `uses_profiles`."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what start() opened."""
