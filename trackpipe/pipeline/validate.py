"""Per-event checks, with Segment's discard reason codes.

validate() fixes what Segment-compatible clients are known to send in a
lenient shape (null ids, numeric ids) and returns (reason, message) for an
event that must be discarded, or None. It edits the event in place.
"""

from __future__ import annotations

from trackpipe.events import TYPES

Problem = tuple[str, str] | None

_ID_FIELDS = ("userId", "anonymousId", "messageId")
_OBJECT_FIELDS = (("properties", "properties_not_object"), ("traits", "traits_not_object"),
                  ("context", "context_not_object"), ("integrations", "integrations_not_object"))


def validate(ev: dict, type_: str | None) -> Problem:
    """`type_` is the endpoint's type, or None on a batch endpoint (the item's `type` decides)."""
    if type_ is None:
        type_ = ev.get("type")
        if type_ is None:
            return "type_not_defined", "Each batch item must have a `type`."
        if type_ not in TYPES:
            return "type_invalid", f"`type` {_show(type_)} is not one of {', '.join(TYPES)}."
    ev["type"] = type_  # on single-event paths the endpoint wins over the body

    get = ev.get
    for key in _ID_FIELDS:
        value = get(key)
        if type(value) is not str or not value:  # else already as it should be
            problem = _coerce_id(ev, key)
            if problem:
                return problem
    for key, reason in _OBJECT_FIELDS:
        value = get(key)
        if value is not None and type(value) is not dict:
            return reason, f"`{key}` must be an object, got {_show(value)}."

    if type_ == "alias":
        if _coerce_id(ev, "previousId") or "previousId" not in ev:
            return "previous_id_not_defined", "An alias needs a string `previousId`."
        if "userId" not in ev and "anonymousId" not in ev:
            return "no_user_anon_id", "An alias needs the new `userId`."
        return None
    if "userId" not in ev and "anonymousId" not in ev:
        return "no_user_anon_id", "The event has neither `userId` nor `anonymousId`."
    if type_ == "track":
        event = ev.get("event")
        if event is None or event == "":
            return "event_not_defined", "A track call needs an `event` name."
        if type(event) is not str:
            return "event_not_string", f"`event` must be a string, got {_show(event)}."
    elif type_ == "page" or type_ == "screen":
        for key in ("name", "category"):
            value = ev.get(key)
            if value is not None and (type(value) is not str or value == ""):
                return f"{key}_not_string", f"`{key}` must be a non-empty string or null."
    elif type_ == "group":
        if _coerce_id(ev, "groupId") or "groupId" not in ev:
            return "group_id_not_defined", "A group call needs a string `groupId`."
    return None


def _coerce_id(ev: dict, key: str) -> Problem:
    """null and "" mean absent; numbers become strings (Segment would discard them)."""
    value = ev.get(key, _MISSING)
    if value is _MISSING or type(value) is str and value:
        return None
    if value is None or value == "":
        del ev[key]
        return None
    if type(value) is int:
        ev[key] = str(value)
        return None
    if type(value) is float:
        ev[key] = str(int(value)) if value.is_integer() else repr(value)
        return None
    return "id_not_string", f"`{key}` must be a string, got {_show(value)}."


_MISSING = object()


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
