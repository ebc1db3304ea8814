"""The amplitude destination: every call as events on the HTTP V2 API (POST /2/httpapi).

- track → its event name; page → "Viewed <name> Page" or "Loaded a Page", screen
  likewise (as Segment names them), with the properties as `event_properties`.
- identify → an `$identify` event whose `user_properties` `$set` the traits.
- group → an `$identify` event that puts the user in the group (`groups`
  {group_type: groupId}) plus a `$groupidentify` event that `$set`s the group's
  traits, as Amplitude's own SDKs send them. Group analytics is an Amplitude add-on.
- alias is not sent (delivered with a "not sent" detail): Amplitude's user mapping
  API is a separate, enterprise-only endpoint.

userId → `user_id`, anonymousId → `device_id`, messageId → `insert_id` (Amplitude
drops a repeated insert_id, so retries do not double). Reserved properties:
`revenue`, `price`, `quantity`, `productId`/`product_id` and
`revenueType`/`revenue_type` also go to Amplitude's top-level revenue fields
when their type fits, as Amplitude refuses the whole event otherwise: quantity
an integer of Java's int range (2.0 → 2), price and revenue numbers (a decimal string such as
"19.99" → 19.99), productId and revenueType strings (a number → its digits); a
value that does not fit stays an event property only. `currency` stays an event
property. `options.min_id_length` is 1, so the short user ids that Segment
accepts are not refused (Amplitude's default minimum is 5).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import httpx
import msgspec

from trackpipe.destinations.base import DestinationError, Event, Outcome, classify_http
from trackpipe.destinations.base import event_time, excerpt, fail, parse_retry_after, retry
from trackpipe.destinations.forward import check_api_url, chunk_by_size, event_name, odd_field
from trackpipe.destinations.forward import unknown_type, worst
from trackpipe.destinations.httpclient import HttpDestination, error_outcome

MAX_EVENTS = 2000           # per request, after which Amplitude answers 413
MAX_BYTES = 1000 * 1000     # "keep request sizes under 1 MB"
THROTTLE_WAIT = 30.0        # Amplitude asks throttled senders to pause about 30 s
DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
JAVA_INT_MAX = 2**31 - 1  # Amplitude's quantity is an Integer

CONTEXT_FIELDS = {  # Amplitude event field ← context path
    "ip": ("ip",), "os_name": ("os", "name"), "os_version": ("os", "version"),
    "device_model": ("device", "model"), "device_manufacturer": ("device", "manufacturer"),
    "app_version": ("app", "version"), "language": ("locale",), "carrier": ("network", "carrier"),
    "location_lat": ("location", "latitude"), "location_lng": ("location", "longitude"),
}
REVENUE_FIELDS = {  # Amplitude revenue field ← property names, first present wins
    "revenue": ("revenue",), "price": ("price",), "quantity": ("quantity",),
    "productId": ("productId", "product_id"), "revenueType": ("revenueType", "revenue_type"),
}


class Amplitude(HttpDestination):
    kind = "amplitude"
    default_batch_size = 100
    secret_fields = ("api_key",)

    class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        api_key: str
        """The project's API key (Project Settings → General)."""
        api_url: str = "https://api2.amplitude.com"
        """https://api.eu.amplitude.com for EU data residency."""
        group_type: str = "group"
        """The Amplitude group type a group call's groupId belongs to (e.g. "company")."""
        allow_private_targets: bool = False
        timeout_seconds: float = 15.0

        def __post_init__(self) -> None:
            if not self.api_key.strip():
                raise ValueError("api_key is empty; copy it from Amplitude's Project Settings")
            check_api_url(self.api_url)

    def __init__(self, name: str, settings: msgspec.Struct):
        super().__init__(name, settings)
        self._url = self.settings.api_url.rstrip("/") + "/2/httpapi"

    async def send(self, batch: Sequence[Event]) -> list[Outcome]:
        results: list[list[Outcome]] = [[] for _ in batch]
        owners: list[int] = []
        encoded: list[bytes] = []
        for i, event in enumerate(batch):
            built = amplitude_events(event, self.settings.group_type)
            if isinstance(built, Outcome):
                results[i].append(built)
                continue
            owners += [i] * len(built)
            encoded += [msgspec.json.encode(e) for e in built]
        for chunk in chunk_by_size(encoded, MAX_EVENTS, MAX_BYTES):
            outcomes = await self._post([encoded[k] for k in chunk])
            for k, outcome in zip(chunk, outcomes):
                results[owners[k]].append(outcome)
        return [worst(r) for r in results]

    async def check(self) -> str:
        opened = self._client is None
        if opened:
            await self.start()
        try:
            r = await self._client.post(self._url, content=self._body([]),
                                        headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            raise DestinationError(f"cannot reach {self._url}: {exc!r}; check api_url.") from None
        finally:
            if opened:
                await self.close()
        if b"api key" in r.content.lower() or r.status_code in (401, 403) or r.status_code >= 500:
            raise DestinationError(f"Amplitude answered {r.status_code}: {excerpt(r.content)}."
                                   " Check api_key and api_url (EU projects use"
                                   " https://api.eu.amplitude.com).")
        return f"{self._url} accepted the API key"

    def _body(self, encoded: list[bytes]) -> bytes:
        head = msgspec.json.encode({"api_key": self.settings.api_key,
                                    "options": {"min_id_length": 1}})
        return head[:-1] + b',"events":[' + b",".join(encoded) + b"]}"

    async def _post(self, encoded: list[bytes], resend: bool = True) -> list[Outcome]:
        try:
            r = await self._client.post(self._url, content=self._body(encoded),
                                        headers={"content-type": "application/json",
                                                 "user-agent": "trackpipe"})
        except httpx.HTTPError as exc:
            return [error_outcome(exc, self._url)] * len(encoded)
        if r.status_code == 413 and len(encoded) > 1:
            half = len(encoded) // 2
            return await self._post(encoded[:half]) + await self._post(encoded[half:])
        if r.status_code == 400:
            rejected = rejected_events(r.content)
            if rejected:
                return await self._without(encoded, rejected, resend)
        if r.status_code == 429:
            wait = parse_retry_after(r.headers.get("retry-after")) or THROTTLE_WAIT
            return [retry(429, r.content, wait)] * len(encoded)
        return [classify_http(r.status_code, r.content, r.headers)] * len(encoded)

    async def _without(self, encoded: list[bytes], rejected: dict[int, str],
                       resend: bool) -> list[Outcome]:
        """Amplitude ingested nothing: fail the events it named and send the rest again
        at once, as its docs advise (once; a second partial refusal waits for a retry)."""
        keep = [k for k in range(len(encoded)) if k not in rejected]
        if resend and keep:
            again = iter(await self._post([encoded[k] for k in keep], resend=False))
        else:
            again = iter([retry(400, "resent after other events in its request were refused")]
                         * len(keep))
        return [fail(400, rejected[k]) if k in rejected else next(again)
                for k in range(len(encoded))]


# -- translation ---------------------------------------------------------------------

def amplitude_events(event: Event, group_type: str) -> list[dict] | Outcome:
    """What the event becomes, or its outcome when nothing is sent. Never raises, whatever
    a mapping put in a field: a raise would retry the whole batch for one odd message."""
    message = event.message
    refused = unknown_type("Amplitude", message)
    if refused is not None:
        return refused
    kind = message["type"]
    if kind == "alias":
        return Outcome("delivered", None, "not sent: Amplitude maps user ids only through its"
                                          " separate, enterprise-only user mapping API")
    refused = odd_field("Amplitude", message)
    if refused is not None:
        return refused
    base = common_fields(message, event.options, event_time(event))
    if kind in ("track", "page", "screen"):
        return [{**base, "event_type": event_name(message),
                 "event_properties": _dict(message.get("properties")),
                 **revenue_fields(_dict(message.get("properties")))}]
    if kind == "identify":
        return [{**base, "event_type": "$identify",
                 "user_properties": {"$set": _dict(message.get("traits"))}}]
    group_id = str(message.get("groupId") or "")  # a group call
    membership = {**base, "event_type": "$identify", "groups": {group_type: group_id},
                  "user_properties": {"$set": {group_type: group_id}}}
    traits = {**base, "event_type": "$groupidentify", "groups": {group_type: group_id},
              "group_properties": {"$set": _dict(message.get("traits"))},
              "insert_id": base["insert_id"] + "-group"}
    return [membership, traits]




def common_fields(message: dict, options: dict | None, at: int | None) -> dict:
    fields: dict[str, Any] = {"insert_id": str(message.get("messageId") or ""),
                              "library": "trackpipe"}
    if at is not None:  # else Amplitude uses its upload time (only an Event built without one)
        fields["time"] = at
    if message.get("userId"):
        fields["user_id"] = str(message["userId"])
    if message.get("anonymousId"):
        fields["device_id"] = str(message["anonymousId"])
    context = _dict(message.get("context"))
    for name, path in CONTEXT_FIELDS.items():
        value: Any = context
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            fields[name] = value
    session = _dict(options).get("session_id")  # integrations.<destination>.session_id
    if isinstance(session, int) and not isinstance(session, bool):
        fields["session_id"] = session
    return fields


def revenue_fields(properties: dict) -> dict:
    """The revenue fields whose property has a type Amplitude takes (see the top)."""
    fields: dict[str, Any] = {}
    for name, sources in REVENUE_FIELDS.items():
        value = next((properties[s] for s in sources if properties.get(s) is not None), None)
        typed = REVENUE_TYPES[name](value)
        if typed is not None:
            fields[name] = typed
    return fields


def _integer(value: Any) -> int | None:
    """A whole number that fits Amplitude's quantity, a Java int (1e300 became 301 digits)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= JAVA_INT_MAX:
        return value
    return None


def _number(value: Any) -> int | float | None:
    if isinstance(value, str):
        value = float(value) if DECIMAL.fullmatch(value.strip()) else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


REVENUE_TYPES = {"revenue": _number, "price": _number, "quantity": _integer,
                 "productId": _text, "revenueType": _text}


def rejected_events(body: bytes) -> dict[int, str]:
    """index → reason from a 400 answer's events_with_invalid_fields /
    events_with_missing_fields / silenced_events; empty when it names none."""
    try:
        answer = _dict(msgspec.json.decode(body))
    except (msgspec.DecodeError, RecursionError):  # nested past the decoder
        return {}
    rejected: dict[int, str] = {}
    for key, reason in (("events_with_invalid_fields", "invalid"),
                        ("events_with_missing_fields", "missing")):
        for field, indexes in _dict(answer.get(key)).items():
            for k in indexes if isinstance(indexes, list) else ():
                if isinstance(k, int):
                    rejected[k] = f"Amplitude refused the event: {reason} field {field!r}"
    for k in answer.get("silenced_events") or ():
        if isinstance(k, int):
            rejected[k] = "Amplitude refused the event: its device is silenced"
    return rejected




def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}
