"""What a person did and said, kept per identifier and folded into a profile on read.

Contributions are stored per identifier (node), never as one mutable blob per
profile, so that after an unmerge each side is again the fold of its own
identifiers' data:

- traits: one row per (node, trait path) with the newest value by event
  `timestamp` (then log position). Nested objects are flattened to leaf paths,
  so `{"address": {"city": ...}}` and a later `{"address": {"street": ...}}`
  both survive; the fold replays leaves oldest first, so later values win.
  An empty object gets a row of its own, at the object's path plus a null
  (`["prefs", null]`; no trait key is null): it only makes the path an object
  from then on, so it must not replace the row of a value set there earlier,
  such as a null that cleared what the object held (the fold then matches the
  calls deep-merged in timestamp order).
- groups: one row per (node, groupId): the traits of the newest group call.
- timeline: one row per event (node, timestamp, position, count kind, count key), where
  the count is ("event", track event name) or ("type", "page" | "screen"). Event counts
  and first/last seen are folded from these rows when a profile is read: one
  B-tree insert per event instead of two is what lets a batch of 1000 events
  of 1000 different people commit fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import msgspec

from trackpipe.identity.facts import Fact

_encode = msgspec.json.encode


class Contributions:
    """One batch's contributions, combined in memory before they are written."""

    def __init__(self):
        self.timeline: list[tuple] = []  # (node, ts, position, count kind, count key)
        self.traits: dict[tuple[int, str], tuple[str, str, int]] = {}  # -> (value, ts, pos)
        self.groups: dict[tuple[int, str], tuple[str, str, int]] = {}

    def add(self, node: int, f: Fact) -> None:
        self.timeline.append((node, f.ts, f.position, *(f.count_key or (None, None))))
        if f.traits:
            for path, value in flatten(f.traits):
                _newest(self.traits, (node, path), (value, f.ts, f.position))
        if f.group is not None:
            group_id, traits = f.group
            _newest(self.groups, (node, group_id), (_encode(traits).decode(), f.ts, f.position))


def _newest(rows: dict, key, row: tuple[str, str, int]) -> None:
    old = rows.get(key)
    if old is None or (row[1], row[2]) > (old[1], old[2]):
        rows[key] = row


def flatten(traits: dict, prefix: tuple = ()) -> Iterable[tuple[str, str]]:
    """(JSON path, JSON value) per leaf; an empty object is a leaf of its own, at the
    object's path and a null."""
    for key, value in traits.items():
        path = (*prefix, key)
        if isinstance(value, dict) and value:
            yield from flatten(value, path)
        elif value == {}:
            yield _encode((*path, None)).decode(), "{}"
        else:
            yield _encode(path).decode(), _encode(value).decode()


def fold_traits(rows: Iterable[tuple[str, str, str, int]]) -> dict:
    """rows: (JSON path, JSON value, ts, position) -> the merged traits object."""
    merged: dict = {}
    for path, value, _, _ in sorted(rows, key=lambda r: (r[2], r[3])):
        *parents, leaf = json.loads(path)
        if leaf is None:  # an empty object: the parents are objects from here on
            _object_at(merged, parents)
            continue
        target = _object_at(merged, parents)
        decoded = json.loads(value)
        # An empty object stored at its own path (before flatten kept it apart) said the same.
        if not (decoded == {} and isinstance(target.get(leaf), dict)):
            target[leaf] = decoded
    return merged


def _object_at(merged: dict, keys: list[str]) -> dict:
    """The object at `keys`, made one (replacing any other value) where it is not."""
    target = merged
    for key in keys:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    return target


def fold_groups(rows: Iterable[tuple[str, str, str, int]]) -> list[dict]:
    """rows: (groupId, JSON traits, ts, position) -> newest traits per group."""
    newest: dict[str, tuple] = {}
    for group_id, traits, ts, position in rows:
        _newest(newest, group_id, (traits, ts, position))
    return [{"group_id": g, "traits": json.loads(newest[g][0])} for g in sorted(newest)]


def fold_counts(rows: Iterable[tuple[str, str, int]]) -> tuple[dict, dict]:
    """rows: (kind, key, n) -> (event_counts, type_counts)."""
    events: dict[str, int] = {}
    types: dict[str, int] = {}
    for kind, key, n in rows:
        target = events if kind == "event" else types
        target[key] = target.get(key, 0) + n
    return dict(sorted(events.items())), dict(sorted(types.items()))
