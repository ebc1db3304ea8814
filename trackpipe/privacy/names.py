"""Which identifiers an event names, read the way identity reads them.

Suppression asks this of every new event (and of every invalid one, which is
stored as a discard); a delete asks it of the stored discards. An event names
its `userId`, `anonymousId` and alias `previousId`, and the values of the
configured trait identifiers ([identity] trait_identifiers, e.g. email) in
`traits` and `context.traits`, trimmed and lower-cased as identity compares
them (identity/facts.py normalize_trait).
"""

from __future__ import annotations

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
# A complete `"key": value` pair, value a string or a number (see _from_fragments).
_STRING = r'"(?:[^"\\]|\\.)*"'
_PAIR = re.compile(rf'({_STRING})\s*:\s*({_STRING}|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)')


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
    for key_text, value_text in _PAIR.findall(text):
        try:
            key, value = json.loads(key_text), json.loads(value_text)
        except ValueError:
            continue
        if key in ID_FIELDS and (v := as_id(value)):
            ids.append((key, v))
        elif key in trait_names and isinstance(value, str) and value.strip():
            traits.append((key, normalize_trait(value)))
    return ids, traits
