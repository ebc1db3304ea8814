"""What the identity graph needs from one log entry, read once per event.

The collector already validated the message, so this only picks fields out:
the ids (from the entry's columns), the event timestamp, previousId,
groupId and traits. Only the fields named here are decoded (msgspec skips
the rest), which keeps a batch of track events cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from trackpipe.events import format_ts
from trackpipe.log.base import Entry

USER, ANON = "user_id", "anonymous_id"


class _Context(msgspec.Struct):
    traits: Any = None


class _Message(msgspec.Struct):
    timestamp: Any = None
    previousId: Any = None
    groupId: Any = None
    traits: Any = None
    context: _Context | None = None


class _Event(msgspec.Struct):
    """Track/page/screen: only what they contribute, so the rest of the body is skipped."""

    timestamp: Any = None
    context: _Context | None = None


_decoders = {t: msgspec.json.Decoder(_Message if t in ("identify", "group", "alias") else _Event)
             for t in ("identify", "group", "alias", "track", "page", "screen")}
_fallback = msgspec.json.Decoder(_Event)
_NOTHING = _Event()
NO_COUNT = (None, None)  # the count kind and key of an event that counts as none
# Types whose facts need only the entry's columns and ts when no trait identifiers
# are configured (their context.traits is read only to find those): identity reads
# them without their bodies.
LEAN_TYPES = ("track", "page", "screen")


class Fact(NamedTuple):
    position: int
    message_id: str
    ts: str  # "YYYY-MM-DDTHH:MM:SS.mmmZ": sorts as text
    type: str
    count_key: tuple[str, str] | None  # ("event", name) for track, ("type", "page") ...
    user: str | None
    anon: str | None
    previous: str | None  # alias only
    trait_ids: list[tuple[str, str]]  # (trait name, normalized value)
    traits: dict | None  # identify only: context.traits overlaid by traits
    group: tuple[str, dict] | None  # (groupId, traits) for group calls


class Reader:
    """Turns entries into facts; `trait_names` are the configured trait identifiers."""

    def __init__(self, trait_names: list[str]):
        self.trait_names = list(trait_names)

    def facts(self, entries: Sequence[Entry], settled: Mapping[tuple, int] | None = None
              ) -> tuple[list[Fact], list[tuple]]:
        """fact() of each entry, and the timeline rows (node, ts, position, count kind,
        count key) of the entries without a body (a lean read's track, page and screen
        events) that name a pair in `settled`, in place of their facts: (userId,
        anonymousId) -> the node owning their events, when that row is all an event of
        theirs changes (graph.py `Graph.settled`). Entries without a body need only their
        columns, and a batch's share a handful of timestamps and event names: each is
        worked out once."""
        out: list[Fact] = []
        rows: list[tuple] = []
        new, settled = tuple.__new__, settled or {}
        stamps: dict[int, str] = {}
        counts: dict[tuple[str, str | None], tuple[str, str] | None] = {}
        # Unpacked, not read by name: a NamedTuple's field read is a descriptor call.
        for entry in entries:
            position, message_id, received_at, type_, event, user, anon, _, body, ms = entry
            if body:
                out.append(self.fact(entry))
                continue
            if ms is None:
                ms = received_at
            ts = stamps.get(ms)
            if ts is None:
                ts = stamps[ms] = format_ts(ms)
            named = (type_, event)
            count_key = counts.get(named, counts)  # counts itself: not worked out yet
            if count_key is counts:
                count_key = counts[named] = _count_key(type_, event)
            user, anon = user or None, anon or None
            owner = settled.get((user, anon))
            if owner is not None:
                kind, key = count_key or NO_COUNT
                rows.append((owner, ts, position, kind, key))
                continue
            # tuple.__new__: a NamedTuple's own __new__ is a Python call, twice the cost.
            out.append(new(Fact, (position, message_id, ts, type_, count_key, user, anon,
                                  None, [], None, None)))
        return out, rows

    def fact(self, entry: Entry) -> Fact:
        type_ = entry.type
        # No body: a lean read left it out, as this type needs only the entry's ts.
        msg = _decode(type_, entry.body) if entry.body else _NOTHING
        ctx_traits = msg.context.traits if msg.context is not None else None
        if not isinstance(ctx_traits, dict):
            ctx_traits = None
        ts = msg.timestamp
        if not (type(ts) is str and len(ts) == 24):  # the collector always sets one
            ts = format_ts(entry.ts if entry.ts is not None else entry.received_at)
        count_key = _count_key(type_, entry.event)
        if isinstance(msg, _Event):
            return Fact(entry.position, entry.message_id, ts, type_, count_key,
                        entry.user_id or None, entry.anonymous_id or None, None,
                        self._trait_ids(ctx_traits), None, None)
        traits = _traits(type_, _dict(msg.traits), ctx_traits)
        return Fact(
            entry.position, entry.message_id, ts, type_, count_key,
            entry.user_id or None, entry.anonymous_id or None,
            _id(msg.previousId) if type_ == "alias" else None,
            self._trait_ids(traits if type_ == "identify" else ctx_traits),
            traits, _group(type_, msg))

    def _trait_ids(self, traits: dict | None) -> list[tuple[str, str]]:
        if not traits or not self.trait_names:
            return []
        found = []
        for name in self.trait_names:
            value = traits.get(name)
            if isinstance(value, str) and value.strip():
                found.append((name, normalize_trait(value)))
        return found


def _count_key(type_: str, event: str | None) -> tuple[str, str] | None:
    """What the event counts as: ("event", name) for a track, ("type", "page" | "screen")."""
    if type_ == "track":
        return ("event", event) if event else None
    return ("type", type_) if type_ in ("page", "screen") else None


def _decode(type_: str, body: bytes) -> _Message | _Event:
    try:
        return _decoders.get(type_, _fallback).decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _Event()  # an odd body: the ids from the entry's columns still count


def normalize_trait(value: str) -> str:
    """Trait identifiers (emails) compare trimmed and case-insensitively."""
    return value.strip().lower()


def _id(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and value else None


def _dict(value: Any) -> dict | None:
    return value if isinstance(value, dict) else None


def _traits(type_: str, traits: dict | None, ctx_traits: dict | None) -> dict | None:
    """Identify traits per the spec: `context.traits` too (rudder-python sends only those),
    with the call's own `traits` winning where both name a key."""
    if type_ != "identify":
        return None
    if not ctx_traits:
        return traits
    return deep_merge(ctx_traits, traits or {})


def deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        old = merged.get(key)
        merged[key] = deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) \
            else value
    return merged


def _group(type_: str, msg: _Message) -> tuple[str, dict] | None:
    if type_ != "group":
        return None
    group_id = _id(msg.groupId)
    return (group_id, _dict(msg.traits) or {}) if group_id else None
