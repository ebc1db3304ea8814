"""Which identifiers an event names, read the way identity reads them.

Suppression asks this of every new event (and of every invalid one, which is
stored as a discard); a delete asks it of the stored discards. An event names
its `userId`, `anonymousId` and alias `previousId`, and the values of the
configured trait identifiers ([identity] trait_identifiers, e.g. email) in
`traits` and `context.traits`, trimmed and lower-cased as identity compares
them (identity/facts.py normalize_trait).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Iterable

import msgspec

from trackpipe.identity.facts import normalize_trait

ID_FIELDS = ("userId", "anonymousId", "previousId")

Names = tuple[list[tuple[str, str]], list[tuple[str, str]]]
"""([(id field, id)], [(trait name, normalised value)])"""


class _Context(msgspec.Struct):
    traits: Any = None


class _Named(msgspec.Struct):
    """Only what names someone: the rest of a stored body is skipped, not decoded."""

    previousId: Any = None
    traits: Any = None
    context: _Context | None = None


_decode_named = msgspec.json.Decoder(_Named).decode
_decode_any = msgspec.json.decode
_STRING = r'"(?:[^"\\]|\\.)*"'
# A number is whole only once something follows it: cut short, 123 would read as 12.
_NUMBER = r'-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?=[\s,\]}])'


def as_id(value: Any) -> str | None:
    """An id as the collector stores it (pipeline/validate.py): numbers become strings."""
    if type(value) is str:
        return value or None
    if type(value) is int:
        return str(value)
    if type(value) is float:
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def of_record(user_id: str | None, anonymous_id: str | None, body: bytes,
              trait_names: Iterable[str]) -> Names:
    """What a validated event names; its body is read only for an alias or trait identifiers."""
    ids = [(f, v) for f, v in (("userId", user_id), ("anonymousId", anonymous_id)) if v]
    trait_names = tuple(trait_names)
    if not trait_names and b'"previousId"' not in body:
        return ids, []
    try:
        msg = _decode_named(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ids, []
    previous = as_id(msg.previousId)
    if previous:
        ids.append(("previousId", previous))
    return ids, _traits((msg.traits, msg.context.traits if msg.context else None), trait_names)


def of_payload(payload: str, trait_names: Iterable[str]) -> Names:
    """What a discard's stored payload (any JSON, cut to 2 KB) names."""
    trait_names = tuple(trait_names)
    if payload.lstrip()[:1] == "{" and payload.rstrip()[-1:] != "}":
        return _from_fragments(payload, trait_names)  # cut short: decoding it would fail
    try:
        message = _decode_any(payload)
    except (msgspec.DecodeError, RecursionError):  # cut short, or not JSON at all
        return _from_fragments(payload, trait_names)
    if not isinstance(message, dict):
        return [], []
    ids = [(f, v) for f in ID_FIELDS if (v := as_id(message.get(f)))]
    context = message.get("context")
    holders = (message.get("traits"), context.get("traits") if isinstance(context, dict) else None)
    return ids, _traits(holders, trait_names)


def _traits(holders: Iterable[Any], trait_names: tuple[str, ...]) -> list[tuple[str, str]]:
    found = []
    for holder in holders:
        if isinstance(holder, dict):
            for name in trait_names:
                value = holder.get(name)
                if isinstance(value, str) and value.strip():
                    found.append((name, normalize_trait(value)))
    return found


def _from_fragments(text: str, trait_names: tuple[str, ...]) -> Names:
    """A payload cut short is no longer JSON: take every complete `"key": value` pair whose
    key is an id field or a trait identifier, wherever it is in the event."""
    ids, traits = [], []
    for key, value_text in _pairs(trait_names).findall(text):
        try:
            value = json.loads(value_text)
            if "\\" in key:  # a trait name JSON escapes, as it is written in the payload
                key = json.loads(f'"{key}"')
        except ValueError:
            continue
        if key in ID_FIELDS:
            if v := as_id(value):
                ids.append((key, v))
        elif isinstance(value, str) and value.strip():
            traits.append((key, normalize_trait(value)))
    return ids, traits


@functools.lru_cache(maxsize=16)
def _pairs(trait_names: tuple[str, ...]) -> re.Pattern:
    """The `"key": value` pairs of these keys only, the value a whole string or number.
    Decoding every pair of a 2 KB payload cost ~200 µs a discard, for the ingest's
    suppression check and for a delete reading each stored discard.

    The keys are matched as trackpipe stores them (msgspec writes "userId" unescaped).
    Their opening quote must follow `{`, `,` or white space: a quote inside a string is
    escaped (`\\"`), so a key such as `x"userId` is not taken for a userId."""
    keys = "|".join(re.escape(msgspec.json.encode(k).decode()[1:-1])
                    for k in sorted({*ID_FIELDS, *trait_names}, key=len, reverse=True))
    return re.compile(rf'"(?<=[{{,\s]")({keys})"\s*:\s*({_STRING}|{_NUMBER})')
