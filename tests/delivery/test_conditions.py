"""The trigger condition language: operators, precedence, quoting, errors, properties."""

from __future__ import annotations

import fnmatch
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trackpipe.delivery import conditions as c
from trackpipe.errors import ConfigError

ORDER = {
    "type": "track",
    "event": "Order Completed",
    "userId": "u1",
    "properties": {
        "revenue": 12.5, "quantity": 3, "coupon": None, "order id": "o-1", "tags": ["a", "b", 7],
        "products": [{"sku": "p1"}, {"sku": "p2"}], "paid": True, "name": "Ann",
    },
    "context": {"page": {"path": "/blog/how-to"}},
}


@pytest.mark.parametrize("text, expected", [
    ('type = "track"', True),
    ('type == "track"', True),
    ('type = "page"', False),
    ('type != "page"', True),
    ('type != "track"', False),
    ("properties.revenue > 12", True),
    ("properties.revenue > 12.5", False),
    ("properties.revenue >= 12.5", True),
    ("properties.revenue < 13", True),
    ("properties.revenue <= 12.4", False),
    ("properties.quantity = 3.0", True),       # numbers compare numerically
    ('properties.name < "Bob"', True),          # strings compare by code point
    ('event contains "Completed"', True),
    ('event contains "completed"', False),      # case-sensitive
    ('properties.tags contains "b"', True),     # list membership
    ("properties.tags contains 7", True),
    ('properties.tags contains "7"', False),
    ('event in ["Order Completed", "Order Refunded"]', True),
    ('event in ["Order Refunded"]', False),
    ("properties.quantity in [1, 2, 3]", True),
    ("properties.quantity in []", False),
    ('event matches "Order *"', True),
    ('event matches "Order ?ompleted"', True),
    ('event matches "Order"', False),           # the whole string must match
    ('context.page.path matches "/blog/*"', True),
    ('properties.revenue matches "1*"', False),  # only strings match
    ("properties.revenue exists", True),
    ("properties.coupon exists", False),        # null does not exist
    ("properties.missing exists", False),
    ('properties."order id" = "o-1"', True),
    ('properties.products.1.sku = "p2"', True),  # a digit key indexes a list
    ("properties.products.2.sku exists", False),
    ("properties.paid = true", True),
    ("properties.paid = 1", False),             # a boolean is not a number
    ("properties.coupon = null", True),
    ("true", True),
    ("false", False),
])
def test_operators(text, expected):
    assert c.compile(text)(ORDER) is expected


@pytest.mark.parametrize("text, expected", [
    ("properties.missing = null", True),        # a missing path is null
    ("properties.missing != 1", True),          # != is always the opposite of =
    ("properties.missing > 0", False),
    ("properties.missing < 0", False),
    ('properties.revenue > "10"', False),       # different types never compare
    ('properties.revenue <= "99"', False),
    ('properties.quantity = "3"', False),
    ('properties.quantity != "3"', True),
    ("properties.tags > 1", False),
    ('properties.name.first = "Ann"', False),   # a path through a string is missing
    ("properties.revenue contains 1", False),
    ("userId.0 exists", False),
])
def test_missing_paths_and_type_mismatches_are_false_never_errors(text, expected):
    assert c.compile(text)(ORDER) is expected


@pytest.mark.parametrize("text, tree", [
    ("a = 1 or b = 1 and c = 1", "(a = 1 or (b = 1 and c = 1))"),
    ("a = 1 and b = 1 or c = 1", "((a = 1 and b = 1) or c = 1)"),
    ("not a = 1 and b = 1", "(not a = 1 and b = 1)"),
    ("not (a = 1 and b = 1)", "not (a = 1 and b = 1)"),
    ("a = 1 and (b = 1 or c = 1)", "(a = 1 and (b = 1 or c = 1))"),
    ("a = 1 or b = 1 or c = 1", "((a = 1 or b = 1) or c = 1)"),
    ("not not a exists", "not not a exists"),
    ('TYPE = "x" AND Not b exists OR c = 1', '((TYPE = "x" and not b exists) or c = 1)'),
])
def test_precedence(text, tree):
    assert str(c.parse(text)) == tree


def test_precedence_decides_the_result():
    message = {"a": 1, "b": 2, "c": 3}
    assert c.compile("a = 1 or b = 0 and c = 0")(message) is True
    assert c.compile("(a = 1 or b = 0) and c = 0")(message) is False


def test_string_escapes_and_quoted_keys():
    message = {"event": 'say "hi"\n\u00e9', "properties": {"a.b": 1, "": 2, "x y": {"z": 3}}}
    assert c.compile(r'event = "say \"hi\"\n\u00e9"')(message)
    assert c.compile('properties."a.b" = 1')(message)
    assert c.compile('properties."" = 2')(message)
    assert c.compile('properties."x y".z = 3')(message)
    assert c.compile("properties.a.b exists")(message) is False  # unquoted dots descend


def test_keywords_are_plain_keys_after_a_dot():
    assert c.compile('properties.in = "x" and properties.not.and = 1')(
        {"properties": {"in": "x", "not": {"and": 1}}})


def test_conditions_span_lines():
    assert c.compile('type = "track"\n  and event = "Order Completed"')(ORDER)


def test_syntax_error_shows_the_text_and_a_caret():
    with pytest.raises(ConfigError) as caught:
        c.compile('type = "track" and and event = "x"')
    assert str(caught.value) == (
        "Invalid condition: expected a path such as properties.revenue, or a value such as "
        '"text", 12 or true, found \'and\' at column 20:\n'
        '    type = "track" and and event = "x"\n'
        "                       ^\n"
        'Conditions look like: type = "track" and properties.revenue > 10 (see docs/routing.md).')


@pytest.mark.parametrize("text, column, words", [
    ("", 1, "found the end"),
    ('type = "track" and', 19, "found the end"),
    ("type", 5, "expected an operator"),
    ("(a = 1", 7, "closing parenthesis"),
    ("a = 1)", 6, "found ')'"),
    ("a = 'x'", 5, "unexpected character \"'\""),
    ('a = "\\q"', 5, "bad escape"),
    ("a in [b]", 7, "lists hold values"),
    ("a in [1 2]", 9, "a comma"),
    ("a in 1", 6, "a list"),
    ("a matches b", 11, "quoted pattern"),
    ("1 exists", 3, "expected an operator"),
    ("a. = 1", 4, "a key after the dot"),
    ("a.b-c = 1", 4, "unexpected character '-'"),
    ("in = 1", 1, "found 'in'"),
    ('a = "unterminated', 5, "unexpected character '\"'"),
])
def test_syntax_errors_point_at_the_problem(text, column, words):
    with pytest.raises(ConfigError) as caught:
        c.compile(text)
    message = str(caught.value)
    assert words in message
    assert f"at column {column}:" in message
    caret_line = message.splitlines()[2]
    assert caret_line == " " * (4 + column - 1) + "^"


def test_syntax_error_on_a_later_line_names_the_line():
    with pytest.raises(ConfigError, match=r"at line 2, column 8:\n    and x =\n {11}\^\n"):
        c.compile('type = "track"\nand x =')


def test_parse_path():
    assert c.parse_path('properties."order id".0') == ("properties", "order id", "0")
    with pytest.raises(ConfigError, match=r"Invalid path: .*\n.*\n.*\^\nPaths look like"):
        c.parse_path("properties.")


def test_matches_takes_a_glob_that_cannot_backtrack_catastrophically():
    condition = c.compile('event matches "*a*a*a*a*a*a*a*a*b"')
    started = time.perf_counter()
    assert condition({"event": "a" * 32_000}) is False
    assert time.perf_counter() - started < 1.0
    assert c.compile('event matches "[OR]rder*"')({"event": "Rrder x"})
    assert c.compile('event matches "a.c"')({"event": "abc"}) is False  # "." is literal


# -- properties ----------------------------------------------------------------------

KEYS = ["a", "b", "type", "0", "x y"]
names = st.sampled_from(["a", "b", "type", "properties", "Event"])
segments = st.sampled_from(KEYS) | st.text(max_size=6)
paths = st.builds(lambda head, rest: c.Path((head, *rest)), names, st.lists(segments, max_size=3))
scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(["", "a", "b", "x y"])
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6))
literals = st.builds(c.Literal, scalars)
operands = paths | literals
ops = st.sampled_from(["=", "!=", "<", "<=", ">", ">=", "contains"])
comparisons = (
    st.builds(c.Compare, ops, operands, operands)
    | st.builds(c.In, operands, st.lists(literals, max_size=4).map(tuple))
    | st.builds(c.Matches, operands, st.sampled_from(["*", "a*", "?", "*b", "[ab]*", "x y"]))
    | st.builds(c.Exists, paths)
    | st.builds(c.Literal, st.booleans())
)
trees = st.recursive(comparisons, lambda inner: (
    st.builds(c.Not, inner) | st.builds(c.And, inner, inner) | st.builds(c.Or, inner, inner)),
    max_leaves=8)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS + ["properties", "Event"]), inner, max_size=4),
    max_leaves=12)
messages = st.dictionaries(st.sampled_from(["a", "b", "type", "properties", "Event"]),
                           json_values, max_size=5)


def reference(node, message) -> bool:
    """The semantics written out plainly, to check the compiled closures against."""
    def value(operand):
        if isinstance(operand, c.Literal):
            return operand.value
        current = message
        for key in operand.keys:
            if isinstance(current, dict) and key in current:
                current = current[key]
            elif isinstance(current, list) and key.isascii() and key.isdigit() and int(key) < len(current):
                current = current[int(key)]
            else:
                return None
        return current

    def kind(v):
        return "number" if type(v) in (int, float) else type(v).__name__

    def equal(a, b):
        return kind(a) == kind(b) and a == b

    match node:
        case c.Not(x):
            return not reference(x, message)
        case c.And(x, y):
            return reference(x, message) and reference(y, message)
        case c.Or(x, y):
            return reference(x, message) or reference(y, message)
        case c.Literal(v):
            return v is True
        case c.Exists(p):
            return value(p) is not None
        case c.In(left, values):
            return any(equal(value(left), v.value) for v in values)
        case c.Matches(left, pattern):
            return isinstance(value(left), str) and fnmatch.fnmatchcase(value(left), pattern)
        case c.Compare(op, left, right):
            a, b = value(left), value(right)
            if op == "=":
                return equal(a, b)
            if op == "!=":
                return not equal(a, b)
            if op == "contains":
                return (isinstance(a, str) and isinstance(b, str) and b in a
                        or isinstance(a, list) and any(equal(x, b) for x in a))
            if kind(a) != kind(b) or kind(a) not in ("number", "str"):
                return False
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
    raise AssertionError(node)


@settings(max_examples=400, deadline=None)
@given(trees, messages)
def test_compiled_conditions_agree_with_the_reference_and_never_raise(tree, message):
    result = c.build(tree)(message)
    assert type(result) is bool
    assert result == reference(tree, message)


@settings(max_examples=300, deadline=None)
@given(trees, messages)
def test_not_is_the_negation(tree, message):
    assert c.build(c.Not(tree))(message) is (not c.build(tree)(message))
    assert c.compile(f"not ({tree})")(message) is (not c.compile(str(tree))(message))


@settings(max_examples=400, deadline=None)
@given(trees)
def test_printing_then_parsing_gives_the_same_tree(tree):
    text = str(tree)
    assert c.parse(text) == tree
    assert str(c.parse(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='ab.=!<>()[],"\\ 0123456789-andortexisnul\n', max_size=30))
def test_arbitrary_text_parses_or_raises_config_error(text):
    try:
        c.parse(text)
    except ConfigError as exc:
        assert "^" in str(exc)
