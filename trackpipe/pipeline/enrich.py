"""Server-side enrichment: what trackpipe stamps on every accepted event.

See ../shared/reference/wire-protocol.md §4.2-4.3. Clock skew: a client's
own time becomes `originalTimestamp`; `timestamp` = receivedAt - (sentAt -
originalTimestamp) when the client said when it sent, else the client's
time as sent (cio-node sends no sentAt at all).
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass

from trackpipe.events import format_ts, in_range, read_ts


@dataclass(slots=True)
class RequestContext:
    """What every event of one request shares."""

    received_at: int
    received_at_text: str
    source_id: str
    peer_ip: str | None
    version: int
    batch_sent_at: int | None = None
    batch_sent_at_text: str | None = None
    batch_context: dict | None = None
    batch_integrations: dict | None = None
    truncate_ip: bool = False


def enrich(ev: dict, rc: RequestContext) -> int:
    """Stamps the event in place; returns its `timestamp` in ms (the log keeps it)."""
    if "messageId" not in ev:
        ev["messageId"] = f"api-{uuid.uuid4()}"
    ev.pop("writeKey", None)  # a credential: never stored or forwarded
    ev["sourceId"] = rc.source_id

    context = ev.get("context") or {}
    if rc.batch_context:
        context = _merge(rc.batch_context, context)
    ev["context"] = context
    integrations = ev.get("integrations") or {}
    if rc.batch_integrations:
        integrations = _merge(rc.batch_integrations, integrations)
    ev["integrations"] = integrations
    if rc.peer_ip is not None and context.get("ip") is None and _client_side(context):
        context["ip"] = rc.peer_ip
    if rc.truncate_ip:
        mask_ip(context)

    ts = _stamp_times(ev, rc)
    ev["version"] = rc.version
    return ts


def mask_ip(context: dict) -> None:
    """Under `privacy.truncate_ip`: context.ip keeps only its network part, and whatever is
    no IP address (a list, a number, "a.b.c.d, e.f.g.h") goes, for it may hold one."""
    ip = context.get("ip")
    if ip is None:
        return
    masked = truncate_ip(ip) if type(ip) is str else None
    if masked is None:
        del context["ip"]
    else:
        context["ip"] = masked


def truncate_ip(ip: str) -> str | None:
    """The network part only: the last octet of IPv4, the last 80 bits of IPv6 zeroed
    (Google Analytics' convention); None when it is not an IP address. An IPv6 address
    that carries an IPv4 one (::ffff:a.b.c.d, 6to4's 2002:: whose /48 is all of it) is
    truncated as that IPv4 address."""
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if addr.version == 6:
        addr = addr.ipv4_mapped or addr.sixtofour or addr
    bits = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False).network_address)


# The libraries that run on the person's own device, by the name they send in
# context.library.name: Segment's browser and mobile ones (wire-protocol.md §4.2).
CLIENT_LIBRARIES = frozenset({
    "analytics.js", "analytics-ios", "analytics-swift", "analytics-android",
    "analytics-kotlin", "analytics-xamarin", "analytics-react-native", "analytics-flutter"})


def _client_side(context: dict) -> bool:
    """Segment fills context.ip for browser/mobile events, and for direct:true HTTP events."""
    if context.get("direct") is True:
        return True
    library = context.get("library")
    if type(library) is not dict:
        return False
    name = library.get("name")
    return type(name) is str and name in CLIENT_LIBRARIES  # (a list would not hash)


def _stamp_times(ev: dict, rc: RequestContext) -> int:
    """Returns the `timestamp` it set, in ms."""
    received = ts = rc.received_at
    get = ev.get
    raw = get("originalTimestamp")
    original = read_ts(raw) if raw is not None else None
    if original is None:
        raw = get("timestamp")
        original = read_ts(raw) if raw is not None else None
    raw_sent = get("sentAt")
    sent = read_ts(raw_sent) if raw_sent is not None else None
    if sent is None:
        sent, sent_text = rc.batch_sent_at, rc.batch_sent_at_text
    else:
        sent, sent_text = sent
    if original is None:
        ev["originalTimestamp"] = ev["timestamp"] = rc.received_at_text
    else:
        original, original_text = original
        ev["originalTimestamp"] = original_text
        ts = received - (sent - original) if sent is not None else original
        if ts == original or not in_range(ts):
            ev["timestamp"], ts = original_text, original
        else:
            ev["timestamp"] = format_ts(ts)
    if sent_text is not None:
        ev["sentAt"] = sent_text
    elif "sentAt" in ev:
        del ev["sentAt"]  # null or unparseable: dropped rather than passed on as if a time
    ev["receivedAt"] = rc.received_at_text
    return ts


def _merge(base: dict, override: dict) -> dict:
    """Batch-level context under the item's own: the item wins, nested objects merge."""
    merged = dict(base)
    for key, value in override.items():
        if type(value) is dict and type(merged.get(key)) is dict:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
