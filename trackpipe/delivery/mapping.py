"""Action mappings: the payload a destination receives, built from a message.

    {"event": "$.event", "user.id": "$.userId", "source": "trackpipe",
     "revenue": {"$path": "$.properties.revenue", "default": 0}}

Keys are output paths (dots build nested objects); a value is a path into the
message ("$" is the whole message), a nested mapping, a list of values, a
`{"$path", "default"}` object or a literal. The mapping is turned into
closures once; an output key whose path is missing is left out. The output nests
at most MAX_DEPTH levels, so neither compiling nor mapping recurses without bound.
docs/routing.md is the user's reference.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from trackpipe.delivery.conditions import getter, parse_path
from trackpipe.errors import ConfigError

Producer = Callable[[dict], Any]
MISSING: Any = object()  # "leave this output key out"
_PATH_KEYS = frozenset({"$path", "default"})
MAX_DEPTH = 32  # keys and array positions from the payload down to the deepest value


def compile_mapping(mapping: dict[str, Any]) -> Callable[[dict], dict]:
    """A function from a message to the mapped payload; an empty mapping sends the message
    as it is. The payload shares nested values with the message: treat it as read-only."""
    if not mapping:
        return lambda message: message
    return _object(_expand(mapping, "", 0))


def _expand(mapping: dict[str, Any], prefix: str, depth: int) -> dict[str, Any]:
    """Dotted keys and nested mappings as one tree (leaves are producers), so
    {"user.id": ..., "user": {"name": ...}} merges into one `user` object.
    `depth` is how deep in the output `mapping`'s object sits."""
    tree: dict[str, Any] = {}
    for key, value in mapping.items():
        where = prefix + str(key)
        parts = key.split(".") if isinstance(key, str) else [""]
        if not all(parts):
            raise ConfigError(f"Mapping key {where!r} has an empty part; output keys are "
                              "dotted names such as \"user.id\".")
        level = _within_depth(depth + len(parts), where)
        item: Any = (_expand(value, where + ".", level) if _is_object(value)
                     else _value(value, where, level))
        for part in reversed(parts[1:]):
            item = {part: item}
        _merge(tree, parts[0], item, where)
    return tree


def _merge(tree: dict[str, Any], key: str, item: Any, where: str) -> None:
    existing = tree.get(key)
    if existing is None:
        tree[key] = item
    elif isinstance(existing, dict) and isinstance(item, dict):
        for k, v in item.items():
            _merge(existing, k, v, where)
    else:
        raise ConfigError(f"Mapping key {where!r} sets an output value that another key "
                          "already sets; give each output path once.")


def _object(tree: dict[str, Any]) -> Callable[[dict], dict]:
    items = tuple((k, _object(v) if isinstance(v, dict) else v) for k, v in tree.items())

    def build(message: dict) -> dict:
        out = {}
        for key, produce in items:
            value = produce(message)
            if value is not MISSING:
                out[key] = value
        return out
    return build


def _within_depth(level: int, where: str) -> int:
    """`level`, checked before anything is built at it: a deeper mapping would need a
    deeper recursion than Python allows, here and in every payload built from it."""
    if level > MAX_DEPTH:
        shown = where if len(where) <= 60 else where[:57] + "..."
        raise ConfigError(f"Mapping key {shown!r} nests the output more than {MAX_DEPTH} "
                          "levels deep (each dotted part, nested table and array counts "
                          "one); flatten the mapping.")
    return level


def _value(value: Any, where: str, level: int) -> Producer:
    """The producer of a value `level` keys and positions deep in the output."""
    if _is_path(value):
        return _path(value, where, MISSING)
    if isinstance(value, dict):  # not _is_object: the {"$path": ...} form
        return _path_with_default(value, where, level)
    if isinstance(value, list):
        return _list(value, where, level)
    return lambda message: value  # a literal; "$5 off" is one too


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and (value == "$" or value.startswith("$."))


def _path(text: str, where: str, missing: Any) -> Producer:
    if text == "$":
        return lambda message: message
    try:
        keys = parse_path(text[2:])
    except ConfigError as exc:
        raise ConfigError(f"Mapping key {where!r}: {text!r} is not a valid path. {exc}") from None
    return getter(keys, missing)


def _path_with_default(spec: dict, where: str, level: int) -> Producer:
    path = spec["$path"]
    if set(spec) - _PATH_KEYS or not isinstance(path, str):
        raise ConfigError(f"Mapping key {where!r}: write a path with a default as "
                          '{"$path": "$.properties.x", "default": 0} (no other keys).')
    if not _is_path(path):  # _path drops the two characters "$.": "$userId" would read "serId"
        raise ConfigError(f"Mapping key {where!r}: {path!r} is not a path; a \"$path\" is "
                          '"$" (the whole message) or starts with "$." (such as "$.userId").')
    if "default" not in spec:
        return _path(path, where, MISSING)
    get, default = _path(path, where, None), spec["default"]
    _check_literal_depth(default, level, where)
    if isinstance(default, (dict, list)):  # a fresh copy, so no payload shares it
        return lambda m: copy.deepcopy(default) if (v := get(m)) is None else v
    return lambda m: default if (v := get(m)) is None else v


def _check_literal_depth(value: Any, level: int, where: str) -> None:
    """A default is copied into payloads as it is: it counts towards the depth too."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for child in value:
            _check_literal_depth(child, _within_depth(level + 1, where), where)


def _list(values: list, where: str, level: int) -> Producer:
    inner = _within_depth(level + 1, where) if values else level
    items = tuple(_object(_expand(v, f"{where}[{i}].", inner)) if _is_object(v)
                  else _value(v, f"{where}[{i}]", inner) for i, v in enumerate(values))

    def build(message: dict) -> list:
        # A missing element becomes null, so the positions of the others hold.
        return [None if (v := produce(message)) is MISSING else v for produce in items]
    return build


def _is_object(value: Any) -> bool:
    """A nested mapping, as opposed to the {"$path": ...} form."""
    return isinstance(value, dict) and "$path" not in value
