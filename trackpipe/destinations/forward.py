"""The segment destination: relay messages to another Segment-compatible endpoint.

POST `<api_url>/v1/batch` with HTTP Basic (write key as username, empty
password) and `{"batch": [...], "sentAt": ...}`: the shape every Segment server
library sends, so it works against Segment (https://api.segment.io, EU
https://events.eu1.segmentapis.com), Customer.io Data Pipelines
(https://cdp.customer.io, EU https://cdp-eu.customer.io) and another trackpipe.

Each message keeps its messageId, type, context and `timestamp`. The fields the
receiver stamps itself (`receivedAt`, `sentAt`) and trackpipe's own `sourceId`
are left out, and so is `originalTimestamp`: the receiver computes
`timestamp = receivedAt - (sentAt - originalTimestamp)`, so a forwarded
`originalTimestamp` would undo this server's clock-skew correction and shift
every event by the delivery delay. Sent as `timestamp` with a fresh batch
`sentAt`, the receiver keeps the event time this server settled on.
"""

from __future__ import annotations

import gzip
from datetime import datetime, timezone
from typing import Iterable, Sequence

import httpx
import msgspec

from trackpipe.destinations.base import DELIVERED, DestinationError, Event, Outcome
from trackpipe.destinations.base import basic_authorization, classify_http, fail
from trackpipe.destinations.httpclient import HttpDestination, error_outcome
from trackpipe.events import TYPES, format_ts

MAX_EVENT_BYTES = 32 * 1024     # Segment's and Customer.io's per-event limit
MAX_REQUEST_BYTES = 475_000     # under the 500 KB request limit, as analytics-python keeps
LOCAL_FIELDS = ("sourceId", "writeKey", "receivedAt", "sentAt", "originalTimestamp", "_metadata")
RECEIVER = "a Segment-compatible receiver"
TEXT_FIELDS = ("event", "name", "userId", "anonymousId", "messageId", "groupId", "previousId")


class SegmentForward(HttpDestination):
    kind = "segment"
    default_batch_size = 100
    secret_fields = ("write_key",)

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        write_key: str
        """The receiving source's write key."""
        api_url: str = "https://api.segment.io"
        """Base URL; Customer.io is https://cdp.customer.io (EU: https://cdp-eu.customer.io)."""
        gzip: bool = False
        """Compress request bodies (Content-Encoding: gzip)."""
        allow_private_targets: bool = False
        """Allow an api_url on a private or loopback address (another trackpipe nearby)."""
        timeout_seconds: float = 15.0

        def __post_init__(self) -> None:
            if not self.write_key.strip():
                raise ValueError("write_key is empty; set it to the receiving source's write key")
            check_api_url(self.api_url)

    def __init__(self, name: str, settings: msgspec.Struct):
        super().__init__(name, settings)
        self._url = self.settings.api_url.rstrip("/") + "/v1/batch"
        self._headers = {"authorization": basic_authorization(self.settings.write_key, ""),
                         "content-type": "application/json", "user-agent": "trackpipe"}
        if self.settings.gzip:
            self._headers["content-encoding"] = "gzip"

    def sent_secrets(self) -> list[str]:
        return [self._headers["authorization"]]  # as a receiver may echo it back

    async def send(self, batch: Sequence[Event]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(batch)
        items: list[tuple[int, bytes]] = []
        for i, event in enumerate(batch):
            # The receiver would drop such a message, or refuse the whole request for it.
            outcomes[i] = (unknown_type(RECEIVER, event.message)
                           or odd_field(RECEIVER, event.message))
            if outcomes[i] is not None:
                continue
            item = msgspec.json.encode(dated(outgoing(event.message), event))
            if len(item) > MAX_EVENT_BYTES:
                outcomes[i] = fail(None, f"the message is {len(item)} bytes as JSON; Segment and"
                                         f" Customer.io refuse events over {MAX_EVENT_BYTES}"
                                         " bytes. Trim its properties or context.")
            else:
                items.append((i, item))
        for chunk in chunk_by_size([item for _, item in items], 1000, MAX_REQUEST_BYTES):
            outcome = await self._post([items[k][1] for k in chunk])
            for k in chunk:
                outcomes[items[k][0]] = outcome
        return outcomes  # type: ignore[return-value]  # every slot is filled above

    async def check(self) -> str:
        opened = self._client is None
        if opened:
            await self.start()
        try:
            outcome = await self._post([])
        finally:
            if opened:
                await self.close()
        if outcome.state != "delivered":
            answered = (f"answered {outcome.status}" if outcome.status is not None
                        else "could not be asked")
            raise DestinationError(f"{self._url} {answered}: {outcome.detail}."
                                   " Check api_url and write_key.")
        return f"{self._url} accepted an empty batch"

    async def _post(self, items: list[bytes]) -> Outcome:
        sent_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        body = b'{"batch":[' + b",".join(items) + b'],"sentAt":"' + sent_at.encode() + b'"}'
        if self.settings.gzip:
            body = gzip.compress(body)
        assert self._client is not None, "start() opens the client"
        try:
            r = await self._client.post(self._url, content=body, headers=self._headers)
        except httpx.HTTPError as exc:
            return error_outcome(exc, self._url)
        return classify_http(r.status_code, r.content, r.headers)


# -- shared by the HTTP vendor destinations (mixpanel, amplitude) ----------------------

def check_api_url(url: str) -> None:
    """For the Settings of every HTTP destination here: a ValueError becomes a config error."""
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"api_url {url!r} must start with https:// (or http://)")


def outgoing(message: dict) -> dict:
    return {k: v for k, v in message.items() if k not in LOCAL_FIELDS}


def dated(message: dict, event: Event) -> dict:
    """A message an action built without `timestamp` gets the stored event's: the receiver
    would date it when it arrives, hours late after retries, and differently each time."""
    if message.get("timestamp") is None and event.stored_time is not None:
        message["timestamp"] = format_ts(event.stored_time)
    return message


def chunk_by_size(items: Sequence[bytes], max_count: int, max_bytes: int) -> Iterable[range]:
    """Consecutive index ranges of the encoded items, each within max_count items and
    max_bytes in total (an item larger than max_bytes goes alone)."""
    start, total = 0, 0
    for i, item in enumerate(items):
        size = len(item) + 1  # its separator
        if i > start and (i - start >= max_count or total + size > max_bytes):
            yield range(start, i)
            start, total = i, 0
        total += size
    if start < len(items):
        yield range(start, len(items))


def unknown_type(tool: str, message: dict) -> Outcome | None:
    """The failed Outcome of a message whose `type` is not a Segment call's (an action's
    mapping may put any JSON value there, an object too); None when it is one."""
    kind = message.get("type")
    if isinstance(kind, str) and kind in TYPES:
        return None
    return fail(None, f"Only Segment messages (type {', '.join(TYPES)}) go to {tool}; this"
                      f" one has type {kind!r}. If an action built it, map `type` and the"
                      " fields of that call.")


def odd_field(tool: str, message: dict) -> Outcome | None:
    """The failed Outcome of a message with an object, array or boolean where a name or
    an id goes. Ingest refuses those, but an action's mapping can put one there; sent
    on, it would reach the tool as a Python repr, or make it refuse the whole request."""
    for field in TEXT_FIELDS:
        value = message.get(field)
        if isinstance(value, (dict, list, bool)):
            shown = msgspec.json.encode(value).decode()
            shown = shown if len(shown) <= 60 else shown[:59] + "…"
            return fail(None, f"`{field}` must be a string for {tool}; this message has"
                              f" {shown}. If an action built it, map `{field}` to a string.")
    return None


def event_name(message: dict) -> str:
    """A track call's event; a page or screen call named the way Segment names them for
    Mixpanel and Amplitude: "Viewed <name> Page" when named, else "Loaded a Page"."""
    if message.get("type") == "track":
        return str(message.get("event") or "")
    properties = message.get("properties")
    name = message.get("name") or (properties.get("name") if isinstance(properties, dict) else None)
    noun = "Page" if message.get("type") == "page" else "Screen"
    return f"Viewed {name} {noun}" if name else f"Loaded a {noun}"


def worst(outcomes: list[Outcome]) -> Outcome:
    """One message's outcome from those of the requests it went out in: any failure
    (retrying cannot fix it), then any retry, else delivered."""
    for state in ("failed", "retry"):
        for outcome in outcomes:
            if outcome.state == state:
                return outcome
    return outcomes[0] if outcomes else DELIVERED
