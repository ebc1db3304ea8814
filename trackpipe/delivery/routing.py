"""Whether an event goes to a destination, and in what shape.

Every event meets every destination's Router, in this order: the event's
`integrations` object (Segment's semantics, names case-sensitive), the
destination's filter, its actions (the first whose trigger matches wins) and
that action's mapping. The configuration is checked and compiled once, at
construction; route() only does dict lookups and calls closures.
docs/routing.md is the user's reference.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import msgspec

from trackpipe import config
from trackpipe.delivery import conditions
from trackpipe.delivery.mapping import compile_mapping
from trackpipe.errors import ConfigError

TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
FILTER_MODES = ("allow", "deny")
_NAMED = {"track": "event", "page": "name", "screen": "name"}  # what `filter.events` matches


class Routed(NamedTuple):
    message: dict | None   # without `_metadata`; the action's mapped payload if one matched;
                           # None when the message goes on unchanged as `raw`
    options: dict | None   # the destination's option object from `integrations`, if any
    action: str | None     # the action that matched, if the destination has actions
    raw: bytes | None = None  # the stored body, when the message goes on unchanged


class _Head(msgspec.Struct):
    """What routing reads of a message without actions. Decoding only this is about
    three times cheaper than building the whole message as dicts, and a message
    that goes on unchanged need never be decoded (nor encoded again) at all."""

    type: Any = None
    event: Any = None
    name: Any = None
    integrations: Any = None
    metadata: msgspec.Raw | msgspec.UnsetType = msgspec.field(default=msgspec.UNSET,
                                                              name="_metadata")


_decode_head = msgspec.json.Decoder(_Head).decode
_decode = msgspec.json.Decoder().decode
_new_tuple = tuple.__new__


class Skipped(NamedTuple):
    reason: str  # "integrations" | "filter" | "no_action"


INTEGRATIONS = Skipped("integrations")
FILTER = Skipped("filter")
NO_ACTION = Skipped("no_action")


class _Action(NamedTuple):
    name: str
    trigger: conditions.Condition
    mapping: Callable[[dict], dict]


class Router:
    def __init__(self, destination: config.Destination):
        self.name = destination.name
        if self.name == "All":
            raise ConfigError("A destination cannot be named 'All': in an event's `integrations`"
                              " that key means every destination. Choose another name.")
        self._filter = _compile_filter(destination)
        self._actions = tuple(_compile_action(destination, a) for a in destination.actions)

    def route_body(self, body: bytes) -> Routed | Skipped:
        """route() for a message as the log stores it (JSON). Without actions and without
        a `_metadata` to remove, the message goes on as these same bytes, undecoded."""
        if self._actions:
            return self.route(_decode(body))
        head = _decode_head(body)
        if head.metadata is not msgspec.UNSET:
            return self.route(_decode(body))
        options = self._options(head.integrations)
        if type(options) is Skipped:
            return options
        if self._filter is not None and not self._filter(
                {"type": head.type, "event": head.event, "name": head.name}):
            return FILTER
        # Routed(None, options, None, body), minus namedtuple's Python-level __new__ (per event)
        return _new_tuple(Routed, (None, options, None, body))

    def route(self, message: dict) -> Routed | Skipped:
        options = self._options(message.get("integrations"))
        if type(options) is Skipped:
            return options
        if self._filter is not None and not self._filter(message):
            return FILTER
        message = dict(message)  # a copy, so the caller's message keeps its `_metadata`
        message.pop("_metadata", None)
        if not self._actions:
            return Routed(message, options, None)
        for action in self._actions:
            if action.trigger(message):
                return Routed(action.mapping(message), options, action.name)
        return NO_ACTION

    def _options(self, integrations: Any) -> dict | None | Skipped:
        """This destination's option object from `integrations` (None when it has none),
        or INTEGRATIONS when the event is not for this destination."""
        if not integrations or type(integrations) is not dict:
            return None
        verdict = self._integrations(integrations)
        if verdict is False:
            return INTEGRATIONS
        return None if verdict is True else verdict

    def _integrations(self, integrations: dict) -> dict | bool:
        """False: turned off; True: on; a dict: on, with these options. Only true, false and
        objects count as settings; any other value is ignored, as if the key were absent."""
        value = integrations.get(self.name)
        if value is True or value is False or type(value) is dict:
            return value
        return integrations.get("All") is not False


def _compile_filter(destination: config.Destination) -> Callable[[dict], bool] | None:
    """A test that says whether the event may pass, or None when everything passes."""
    spec = destination.filter
    if spec is None:
        return None
    if spec.mode not in FILTER_MODES:
        raise ConfigError(f"Destination {destination.name!r}: filter mode {spec.mode!r} is "
                          "unknown; use \"allow\" or \"deny\".")
    unknown = sorted(set(spec.types) - TYPES)
    if unknown:
        raise ConfigError(f"Destination {destination.name!r}: filter types {unknown} are "
                          f"unknown; the message types are {', '.join(sorted(TYPES))}.")
    types, events = frozenset(spec.types), frozenset(spec.events)
    if not types and not events:
        return (lambda m: True) if spec.mode == "allow" else (lambda m: False)

    def matches(message: dict) -> bool:
        kind = message.get("type")
        if type(kind) is not str or types and kind not in types:
            return False
        name = message.get(_NAMED.get(kind, ""))
        return not events or type(name) is str and name in events

    if spec.mode == "allow":
        return matches
    return lambda m: not matches(m)


def _compile_action(destination: config.Destination, action: config.Action) -> _Action:
    where = f"Destination {destination.name!r}, action {action.name!r}"
    names = [a.name for a in destination.actions]
    if not action.name.strip() or names.count(action.name) > 1:
        raise ConfigError(f"{where}: every action needs a name of its own "
                          f"(this destination's actions are named {names}).")
    try:
        trigger = conditions.compile(action.trigger)
    except ConfigError as exc:
        raise ConfigError(f"{where}: bad trigger. {exc}") from None
    try:
        mapping = compile_mapping(action.mapping)
    except ConfigError as exc:
        raise ConfigError(f"{where}: bad mapping. {exc}") from None
    return _Action(action.name, trigger, mapping)

