"""Track events of a shape seen before, laid out without walking them.

Most track events of one name carry the same keys with values of the same kinds,
event after event. For such an event, what the layout (layout.rows_for), the fixed
values' conversion (plan.fixed_values) and the typing of each cell (plan._Table.add)
work out follows from its shape alone: the same columns, the same types, nothing to
reject. So once the slow path has laid out a track event, its shape is compiled into
msgspec Structs that admit the same keys, the same nesting and values of the same
kinds: strings, integers within 64 bits, floats (an integer where a float was sends
the event down the slow path), booleans, arrays. A later event of that name that
decodes into them (in C) needs only its leaves read out (operator.attrgetter, in C
too) and a few checks in Python: date-times parse, no NUL anywhere. One that does not
decode (a new key, a value of another kind, a null where a value was) takes the slow
path and becomes the name's shape. Where the two could differ is a property test:
tests/destinations/test_warehouse_shapes.py.

A laid-out event is used as is only when the table already has every one of its
columns, each of the kind its value has; otherwise the slow path adds the columns.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import operator
import re
from typing import Annotated, Any, Literal, NamedTuple, Union

import msgspec

from trackpipe.destinations.base import Event
from trackpipe.destinations.warehouse import layout
from trackpipe.destinations.warehouse.schema import (
    BIGINT, BOOLEAN, DOUBLE, INT64_MAX, INT64_MIN, JSON, TEXT, TIMESTAMP, parse_timestamp,
    typed)

log = logging.getLogger("trackpipe.warehouse")

NO_SHAPE, SLOW = "no shape", "slow"  # what lay_out answers when it lays nothing out
MAX_NAMES = 64      # event names with a compiled shape, at most
MAX_LEARNED = 16    # shapes learned per name; a name whose shape keeps changing stays slow
MAX_LEAVES = 300
WHEN_CACHE = 4096

# A leaf of text is str, whatever it holds: in a text column (a shape's event is laid out
# only into columns of its leaves' kinds) the slow path loads a string that looks like a
# date-time as that same string. Only a NUL (rejected by the slow path) matters, and a
# message holding one is left to the slow path as a whole (a search of its JSON).
_UNNAMEABLE = re.compile(r'["\\\x00-\x1f]')  # in a key, msgspec cannot use it as a field name
_INT = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
# msgspec would take an integer for a float field, as a float; the slow path calls it a
# bigint (which a text column shows as "1", not "1.0"). So a double leaf admits both, as
# what they are, and an integer sends its event down the slow path.
_FLOAT = int | Annotated[float, msgspec.Meta(ge=-(2**53 - 1), le=2**53 - 1)]
_FIXED_TEXT = {"anonymousId": "anonymous_id", "userId": "user_id", "sourceId": "source_id"}
_FIXED_WHEN = {"receivedAt": "received_at", "sentAt": "sent_at",
               "originalTimestamp": "original_timestamp", "timestamp": "timestamp"}


class Shape(NamedTuple):
    name: str                       # the event name
    table: str                      # its table
    columns: tuple[str, ...]        # per leaf, in walk order, context's first
    kinds: tuple[str, ...]          # per leaf, the column type it asks for
    n_context: int                  # leaves of `context` (the `tracks` row's); then properties
    # What an event of the shape is read into: its two rows, each a tuple of values in
    # the order of its layout (track_columns, event_columns), the ids and times first:
    #   head     id, profile_id, uuid_ts, then each date-time of `whens`, then `constants`
    #   values   `plain` (the fixed texts, context's plain leaves, properties'), as decoded
    #   specials per one of `checks` (context's leaves, properties'), checked, converted
    # The `tracks` row takes the first `n_track` of values and `n_track_special` of specials.
    track_columns: tuple[str, ...]  # interned (ShapeBook): shapes of one layout share it
    event_columns: tuple[str, ...]
    whens: Any                      # struct -> the fixed date-times as sent
    constants: tuple                # the event's table and name; None for each fixed
                                    # column the shape has no (or a null) value for
    plain: Any                      # struct -> tuple of the values taken as they are
    n_track: int
    floats: tuple[int, ...]         # positions in `plain` of leaves that must be floats
    checks: tuple[tuple[Any, str, str], ...]  # per leaf checked per event: (struct -> its
                                              # value, column, "when" | "[" | "{}")
    n_track_special: int


# A laid-out track event: (shape, its `tracks` row, its event table's row, its date-time
# leaves as layout entries: the value as sent, for conversions to text). A plain tuple,
# as one is made per event.
Laid = tuple


class ShapeBook:
    """The compiled shapes of one destination's track events, by event name."""

    def __init__(self) -> None:
        self._shapes: dict[type, Shape] = {}   # top-level struct -> shape
        self._by_name: dict[str, type] = {}
        self._learned: dict[str, int] = {}
        self._compiled = 0
        self._decode = None
        self._when: dict[str, dt.datetime] = {}  # receivedAt, sentAt repeat within a request
        # layouts by value, so that equal ones are one object (plan tells a table whose rows
        # all have one layout by identity); at most two per shape ever compiled
        self._layouts: dict[tuple, tuple] = {}

    def lay_out(self, event: Event, loaded_at: dt.datetime) -> Laid | str:
        """The event's rows if it has a known shape; else NO_SHAPE (the slow path's turn,
        and the shape to learn from it) or SLOW (a known shape; a value the slow path
        must see, such as a date-time that does not parse)."""
        raw = event._json
        if raw is None or event._message is not None:
            return SLOW  # already decoded (an action's message): nothing to gain here
        if self._decode is None:
            return NO_SHAPE
        message_id, profile_id = event.message_id, event.profile_id
        # (find, not `in`: a bytes `in` first tries its operand as an int, and formats the
        # TypeError it gets, which costs more than the search; and most JSON has no
        # backslash, which a search finds missing much faster than a longer string)
        if (raw.find(b"\\") >= 0 and raw.find(b"\\u0000") >= 0) or raw.find(b"\x00") >= 0 \
                or "\x00" in message_id or (profile_id and "\x00" in profile_id):
            return SLOW  # a NUL somewhere: rejected values, the slow path's work
        if len(message_id) > layout.SHORT_ID_CHARS:
            return SLOW  # maybe longer than an id column holds (layout.row_id): likewise
        try:
            obj = self._decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return NO_SHAPE
        shape = self._shapes[obj.__class__]
        values = shape.plain(obj)
        for i in shape.floats:
            if values[i].__class__ is not float:
                return SLOW
        try:  # the same few date-times in event after event: parsed once
            whens = tuple(map(self._when.__getitem__, shape.whens(obj)))
        except KeyError:
            whens = self._parse_whens(shape.whens(obj))
            if whens is None:
                return SLOW
        head = (message_id, profile_id, loaded_at, *whens, *shape.constants)
        if not shape.checks:
            return shape, head + values[:shape.n_track], head + values, ()
        specials = _specials(shape, obj)
        if specials is None:
            return SLOW
        done, dynamic = specials
        return (shape, head + values[:shape.n_track] + done[:shape.n_track_special],
                head + values + done, dynamic)

    def _parse_whens(self, values: tuple) -> tuple | None:
        """The fixed date-times parsed, and kept for the next events; None if one does not
        parse (the slow path rejects it)."""
        when, parsed = self._when, []
        for value in values:
            got = when.get(value)
            if got is None:
                got = parse_timestamp(value)
                if got is None:
                    return None
                if len(when) >= WHEN_CACHE:
                    when.clear()
                when[value] = got
            parsed.append(got)
        return tuple(parsed)

    def learn(self, message: dict) -> None:
        """Compile the shape of a track message the slow path has just laid out."""
        name = message.get("event")
        if message.get("type") != "track" or not isinstance(name, str) \
                or self._learned.get(name, 0) >= MAX_LEARNED:
            return
        if name not in self._by_name and len(self._by_name) >= MAX_NAMES:
            return
        self._learned[name] = self._learned.get(name, 0) + 1
        self._compiled += 1
        try:
            struct, shape = _compile(message, name, self._compiled)
        except _NoShape:
            return
        except Exception:  # learning is an optimisation: it must never fail a load
            log.exception("warehouse: the shape of a %r event could not be compiled", name)
            return
        old = self._by_name.get(name)
        if old is not None:
            del self._shapes[old]
        layouts = self._layouts
        shape = shape._replace(
            track_columns=layouts.setdefault(shape.track_columns, shape.track_columns),
            event_columns=layouts.setdefault(shape.event_columns, shape.event_columns))
        self._by_name[name] = struct
        self._shapes[struct] = shape
        self._decode = msgspec.json.Decoder(Union[tuple(self._shapes)]).decode  # noqa: UP007


class _NoShape(Exception):
    """The message has something only the slow path handles (or names too many leaves)."""


def _compile(message: dict, name: str, serial: int) -> tuple[type, Shape]:
    if not name.strip() or "\x00" in name:
        raise _NoShape
    table = layout.event_table(name)
    builder = _Builder(serial)
    fields = []
    for key, value in message.items():
        if key == "event":
            continue
        if key == "type":
            fields.append((key, Literal["track"], None))
        elif key in _FIXED_TEXT or key in _FIXED_WHEN:
            if value is None:
                fields.append((key, None, None))
            elif not isinstance(value, str) or "\x00" in value or (
                    key in _FIXED_WHEN and parse_timestamp(value) is None):
                raise _NoShape
            else:
                fields.append((key, str, None))
        elif key in ("context", "properties"):
            if not isinstance(value, dict):
                raise _NoShape  # the collector keeps these objects; anything else is odd
            fields.append((key, builder.struct(value, "context_" if key == "context" else "",
                                               key), None))
        else:
            fields.append((key, msgspec.Raw, None))
    struct = builder.define(fields, tag=name)
    attr = {key: a for a, key in builder.names[struct].items()}
    ctx = builder.leaves.get("context", [])
    props = builder.leaves.get("properties", [])
    leaves = [*ctx, *props]
    columns = [c for _, c, _ in leaves]
    if len(set(columns)) != len(columns) or len(leaves) > MAX_LEAVES:
        raise _NoShape  # two keys for one column: the slow path rejects the second
    return struct, _shape(name, table, message, attr, ctx, props)


def _shape(name: str, table: str, message: dict, attr: dict[str, str], ctx: list,
           props: list) -> Shape:
    """The Shape of a struct (`attr`: message key -> field) with the leaves `ctx` and
    `props` (_Builder.leaves): where each value of an event goes in its two rows."""
    def has(key):  # a fixed field the struct holds a string for
        return key in attr and message[key] is not None

    def split(top, leaves):  # (column, attribute path, check): taken as they are, checked
        read = [(column, f"{attr[top]}.{path}", check) for path, column, (_, check) in leaves]
        return ([x for x in read if x[2] in (None, "float")],
                [x for x in read if x[2] not in (None, "float")])

    texts = [(column, attr[key], None) for key, column in _FIXED_TEXT.items() if has(key)]
    whens = [(column, attr[key]) for key, column in _FIXED_WHEN.items() if has(key)]
    absent = [column for key, column in (*_FIXED_TEXT.items(), *_FIXED_WHEN.items())
              if not has(key)]
    ctx_plain, ctx_special = split("context", ctx)
    props_plain, props_special = split("properties", props)
    plain, special = [*texts, *ctx_plain, *props_plain], [*ctx_special, *props_special]
    n_track = len(texts) + len(ctx_plain)
    head = ("id", "profile_id", "uuid_ts", *(c for c, _ in whens), "event", "event_text",
            *absent)
    leaves = [*ctx, *props]
    return Shape(
        name, table, tuple(c for _, c, _ in leaves), tuple(k for _, _, (k, _) in leaves),
        len(ctx),
        track_columns=(*head, *(c for c, _, _ in plain[:n_track]),
                       *(c for c, _, _ in ctx_special)),
        event_columns=(*head, *(c for c, _, _ in plain), *(c for c, _, _ in special)),
        whens=_leaf_getter([a for _, a in whens]), constants=(table, name, *[None] * len(absent)),
        plain=_leaf_getter([a for _, a, _ in plain]), n_track=n_track,
        floats=tuple(i for i, (_, _, check) in enumerate(plain) if check == "float"),
        checks=tuple((operator.attrgetter(a), c, check) for c, a, check in special),
        n_track_special=len(ctx_special))


def _specials(shape: Shape, obj: Any) -> tuple[tuple, tuple] | None:
    """The values of the leaves a shape checks per event, as loaded, and the date-times
    among them as layout entries; None when one is not of the shape's kind."""
    done, dynamic = [], []
    for get, column, check in shape.checks:
        value = get(obj)
        if check == "when":
            when = parse_timestamp(value)
            if when is None:
                return None
            dynamic += (column, TIMESTAMP, when, value)
            done.append(when)
        else:
            text = bytes(value)
            if not (text == b"{}" if check == "{}" else text[:1] == b"["):
                return None
            done.append(text.decode())
    return tuple(done), tuple(dynamic)


def _leaf_getter(paths: list[str]) -> Any:
    """obj -> the tuple of the values at `paths` (attrgetter of one path gives no tuple)."""
    if len(paths) > 1:
        return operator.attrgetter(*paths)
    if not paths:
        return lambda obj: ()
    one = operator.attrgetter(paths[0])
    return lambda obj: (one(obj),)


class _Builder:
    """Structs for nested objects, named f0, f1, ... (renamed to the keys), and the leaves
    they hold in walk order: (attribute path below the top, column, (kind, check))."""

    def __init__(self, serial: int):
        self.serial, self.count = serial, 0
        self.names: dict[type, dict[str, str]] = {}
        self.leaves: dict[str, list] = {}

    def struct(self, obj: dict, prefix: str, top: str, path: str = "") -> type:
        fields = []
        for key, value in obj.items():
            attr = f"f{len(fields)}"
            if value is None:
                fields.append((key, None, None))
                continue
            here = f"{path}.{attr}" if path else attr
            column_path = prefix + key
            if value.__class__ is dict and value:
                fields.append((key, self.struct(value, column_path + "_", top, here), None))
                continue
            kind, field_type, check = _leaf(value)
            column = layout.column_for(column_path, "tracks",
                                       "properties" if top == "properties" else "")
            self.leaves.setdefault(top, []).append((here, column, (kind, check)))
            fields.append((key, field_type, None))
        return self.define(fields)

    def define(self, fields: list, tag: str | None = None) -> type:
        if any(_UNNAMEABLE.search(key) for key, _, _ in fields):
            raise _NoShape  # msgspec cannot rename a field to such a key
        self.count += 1
        names = {f"f{i}": key for i, (key, _, _) in enumerate(fields)}
        types = [(f"f{i}", type(None) if t is None else t) for i, (_, t, _) in enumerate(fields)]
        extra = {"tag_field": "event", "tag": tag} if tag is not None else {}
        struct = msgspec.defstruct(f"Shape{self.serial}_{self.count}", types, rename=names,
                                   forbid_unknown_fields=True, gc=False, **extra)
        self.names[struct] = names
        return struct


def _leaf(value: Any) -> tuple[str, Any, str | None]:
    """(column type, struct field type, the check each event's value needs) of a leaf."""
    got = typed(value)
    if got.__class__ is not tuple:
        raise _NoShape  # a value no column takes: rejected_values, the slow path's work
    kind = got[0]
    if kind == TEXT:
        return TEXT, str, None
    if kind == TIMESTAMP:
        return TIMESTAMP, str, "when"
    if kind == BIGINT:
        return BIGINT, _INT, None
    if kind == DOUBLE:
        if not (math.isfinite(value) and abs(value) <= 2**53 - 1):
            raise _NoShape
        return DOUBLE, _FLOAT, "float"
    if kind == BOOLEAN:
        return BOOLEAN, bool, None
    if kind == JSON and isinstance(value, list):
        return TEXT, msgspec.Raw, "["
    if kind == JSON and value == {}:
        return TEXT, msgspec.Raw, "{}"
    raise _NoShape

