"""Action mappings: paths, nesting, lists, literals, defaults and configuration errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trackpipe.delivery.mapping import compile_mapping
from trackpipe.errors import ConfigError

MESSAGE = {
    "type": "track",
    "event": "Order Completed",
    "userId": "u1",
    "anonymousId": None,
    "properties": {"revenue": 12.5, "order id": "o-1", "products": [{"sku": "p1"}],
                   "coupon": None},
    "traits": {"email": "a@example.com"},
}


def test_empty_mapping_sends_the_message_unchanged():
    assert compile_mapping({})(MESSAGE) is MESSAGE


def test_paths_literals_and_dotted_output_keys():
    mapped = compile_mapping({
        "event_name": "$.event",
        "user.id": "$.userId",
        "user.email": "$.traits.email",
        "amount": "$.properties.revenue",
        "order": '$.properties."order id"',
        "first_sku": "$.properties.products.0.sku",
        "source": "trackpipe",
        "note": "$5 off",          # a "$" not followed by "." is a literal
        "$email": "$.traits.email",  # output keys may start with "$" (Mixpanel's do)
        "version": 2, "test": False, "nothing": None,
    })(MESSAGE)
    assert mapped == {
        "event_name": "Order Completed", "user": {"id": "u1", "email": "a@example.com"},
        "amount": 12.5, "order": "o-1", "first_sku": "p1", "source": "trackpipe",
        "note": "$5 off", "$email": "a@example.com", "version": 2, "test": False,
        "nothing": None,
    }


def test_dollar_alone_is_the_whole_message():
    assert compile_mapping({"data": "$", "kind": "$.type"})(MESSAGE) == {
        "data": MESSAGE, "kind": "track"}


def test_missing_paths_leave_the_key_out_but_null_is_kept():
    mapped = compile_mapping({
        "a": "$.properties.missing", "b.c": "$.nope.deeper", "anon": "$.anonymousId",
        "coupon": "$.properties.coupon", "sku": "$.properties.products.5.sku",
    })(MESSAGE)
    assert mapped == {"b": {}, "anon": None, "coupon": None}


def test_nested_mappings_merge_with_dotted_keys():
    mapped = compile_mapping({
        "user": {"id": "$.userId", "contact.email": "$.traits.email"},
        "user.kind": "customer",
    })(MESSAGE)
    assert mapped == {"user": {"id": "u1", "contact": {"email": "a@example.com"},
                               "kind": "customer"}}


def test_lists_map_each_element_and_keep_positions():
    mapped = compile_mapping({
        "ids": ["$.userId", "$.properties.missing", "fixed", {"sku": "$.properties.products.0.sku"},
                ["$.type"]],
    })(MESSAGE)
    assert mapped == {"ids": ["u1", None, "fixed", {"sku": "p1"}, ["track"]]}


def test_path_with_default():
    mapped = compile_mapping({
        "revenue": {"$path": "$.properties.revenue", "default": 0},
        "currency": {"$path": "$.properties.currency", "default": "USD"},
        "coupon": {"$path": "$.properties.coupon", "default": "none"},  # null takes it too
        "gone": {"$path": "$.properties.currency"},                    # no default: left out
    })(MESSAGE)
    assert mapped == {"revenue": 12.5, "currency": "USD", "coupon": "none"}


def test_object_defaults_are_not_shared_between_payloads():
    build = compile_mapping({"tags": {"$path": "$.properties.tags", "default": ["none"]}})
    first = build(MESSAGE)
    first["tags"].append("changed")
    assert build(MESSAGE) == {"tags": ["none"]}


def test_the_input_message_is_not_changed():
    message = {"userId": "u1", "properties": {"a": 1}}
    build = compile_mapping({"properties.b": "$.userId", "x": "$.properties"})
    assert build(message) == {"properties": {"b": "u1"}, "x": {"a": 1}}
    assert message == {"userId": "u1", "properties": {"a": 1}}


@pytest.mark.parametrize("mapping, words", [
    ({"user.id": "$.userId", "user": "x"}, "'user' sets an output value that another key"),
    ({"user": "x", "user.id": "$.userId"}, "'user.id' sets an output value"),
    ({"a": "$.x", "b": {"c": 1}, "b.c": 2}, "'b.c' sets an output value"),
    ({"user..id": "$.userId"}, "'user..id' has an empty part"),
    ({"": 1}, "has an empty part"),
    ({"a": {"b": {"": 1}}}, "'a.b.' has an empty part"),
    ({"a": "$.properties."}, "'a': '$.properties.' is not a valid path. Invalid path"),
    ({"a": "$.x y"}, "is not a valid path"),
    ({"a": ["$.ok", "$.bad path"]}, "'a[1]'"),
    ({"a": {"$path": "$.x", "defualt": 1}}, "'a': write a path with a default as"),
    ({"a": {"$path": "x"}}, "'a': 'x' is not a path; a \"$path\" is \"$\""),
    ({"a": {"$path": 5}}, "write a path with a default"),
])
def test_configuration_errors_name_the_key(mapping, words):
    with pytest.raises(ConfigError) as caught:
        compile_mapping(mapping)
    assert words in str(caught.value)


@pytest.mark.parametrize("spec", [
    {"$path": "$userId"}, {"$path": "$userId", "default": "anonymous"},
    {"$path": "$ userId"}, {"$path": "$$.userId"}, {"$path": ""},
])
def test_a_path_with_a_default_must_start_with_dollar_dot(spec):
    # Plain string values already need "$.": "$userId" is a literal there. Here it used
    # to be read as a path with its first letter cut off (the key "serId").
    with pytest.raises(ConfigError) as caught:
        compile_mapping({"user": spec})
    assert f"'user': {spec['$path']!r} is not a path" in str(caught.value)
    assert 'starts with "$."' in str(caught.value)


@pytest.mark.parametrize("mapping", [
    {"x": "$.properties.products." + "0" * 5000},
    {"x": {"$path": "$.properties." + "1" * 5000, "default": 0}},
])
def test_a_path_index_too_long_to_convert_is_a_configuration_error(mapping):
    with pytest.raises(ConfigError) as caught:
        compile_mapping(mapping)
    assert "'x': " in str(caught.value)
    assert "Invalid path: number too long (5000 digits" in str(caught.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["a", "b", "0"]), inner, max_size=3),
    max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "0", "properties"]), json_values, max_size=4))
def test_mapping_never_raises_on_arbitrary_messages(message):
    build = compile_mapping({"x": "$.a.b", "y": ["$.properties.0", "$"], "z.w": "$.b.0.a",
                             "d": {"$path": "$.a", "default": 1}})
    mapped = build(message)
    assert set(mapped) <= {"x", "y", "z", "d"}
    assert mapped["y"][1] is message
    assert mapped["d"] == (1 if message.get("a") is None else message["a"])


# -- the depth limit -------------------------------------------------------------------

MAX_DEPTH = 32  # the limit docs/routing.md states

def nested(depth: int, leaf) -> dict:
    """{"a": {"a": ... leaf}} with `depth` keys, built the way TOML inline tables are."""
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


def test_a_mapping_32_levels_deep_maps():
    dotted = ".".join(["a"] * MAX_DEPTH)
    assert compile_mapping({dotted: "$.userId"})(MESSAGE) == nested(MAX_DEPTH, "u1")
    assert compile_mapping(nested(MAX_DEPTH, "$.userId"))(MESSAGE) == nested(MAX_DEPTH, "u1")
    # 2 dotted parts + 29 nested keys + 1 array level = 32
    mixed = {"a.a": nested(29, ["$.userId"])}
    assert compile_mapping(mixed)(MESSAGE) == nested(31, ["u1"])
    deep_default = {"x": {"$path": "$.nope", "default": nested(MAX_DEPTH - 1, 1)}}
    assert compile_mapping(deep_default)(MESSAGE) == {"x": nested(MAX_DEPTH - 1, 1)}


@pytest.mark.parametrize("mapping", [
    {".".join(["a"] * (MAX_DEPTH + 1)): "$.userId"},
    {".".join(["a"] * 600): "$.userId"},  # was a RecursionError, not a configuration error
    nested(MAX_DEPTH + 1, "$.userId"),
    nested(600, "$.userId"),
    {"a.a": nested(MAX_DEPTH - 1, "x")},
    {"a": nested(MAX_DEPTH - 2, [["$.userId"]])},
    {"a": [nested(MAX_DEPTH, 1)]},
    {"x": {"$path": "$.nope", "default": nested(MAX_DEPTH, 1)}},
    {"x": {"$path": "$.nope", "default": [nested(MAX_DEPTH - 1, 1)]}},
])
def test_a_mapping_deeper_than_32_levels_is_a_configuration_error(mapping):
    with pytest.raises(ConfigError) as caught:
        compile_mapping(mapping)
    message = str(caught.value)
    assert f"nests the output more than {MAX_DEPTH} levels deep" in message
    assert message.startswith("Mapping key '") and len(message) < 300
