"""The trigger condition language: operators, precedence, quoting, errors, properties."""

from __future__ import annotations

import fnmatch
import sys
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
    ("a = 1 or b = 1 or c = 1", "(a = 1 or b = 1 or c = 1)"),  # one node for a chain
    ("(a = 1 or b = 1) or c = 1", "((a = 1 or b = 1) or c = 1)"),
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
    message = syntax_error(text, column, words)
    caret_line = message.splitlines()[2]
    assert caret_line == " " * (4 + column - 1) + "^"


def test_syntax_error_on_a_later_line_names_the_line():
    with pytest.raises(ConfigError, match=r"at line 2, column 8:\n    and x =\n {11}\^\n"):
        c.compile('type = "track"\nand x =')


def test_parse_path():
    assert c.parse_path('properties."order id".0') == ("properties", "order id", "0")
    with pytest.raises(ConfigError, match=r"Invalid path: .*\n.*\n.*\^\nPaths look like"):
        c.parse_path("properties.")


@pytest.mark.parametrize("text, column", [
    ("properties.x = " + "1" * 5000, 16),
    ("properties.x in [1, -" + "2" * 5000 + "]", 21),
    ("properties.list." + "0" * 5000 + " exists", 17),       # a list index
    ('properties.list."' + "0" * 5000 + '" exists', 17),     # quoted, still an index
])
def test_numbers_too_long_to_convert_are_syntax_errors(text, column):
    # Python refuses to convert integers over 4,300 digits (a bare ValueError).
    with pytest.raises(ConfigError) as caught:
        c.compile(text)
    message = str(caught.value)
    assert f"number too long (5000 digits; at most {sys.get_int_max_str_digits()})" in message
    assert f"at column {column}:" in message


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1.5E+400"])
def test_numbers_past_a_float_are_syntax_errors(number):
    with pytest.raises(ConfigError, match=r"number out of range .*at column 16:"):
        c.compile(f"properties.x < {number}")


def test_long_numbers_that_convert_are_fine():
    big = "9" * 4000
    assert c.compile(f"properties.x = {big}")({"properties": {"x": int(big)}})
    assert c.compile(f'properties."{big}" = 1')({"properties": {big: 1}})


def nested(levels: int) -> str:
    """`levels` parentheses inside one another, alternating or/and; with b = 2 it is
    true exactly when a = 1, so every level is evaluated."""
    text = "a = 1"
    for level in range(levels):
        text = f"b != 2 or ({text})" if level % 2 else f"b = 2 and ({text})"
    return text


def chain(terms: int, word: str = "and") -> str:
    return f" {word} ".join(f"properties.n != {i}" for i in range(terms))


def frames_in_use() -> int:
    frame, count = sys._getframe(), 0
    while frame is not None:
        frame, count = frame.f_back, count + 1
    return count


def on_a_nearly_full_stack(run, headroom: int = 200):
    """run() with only `headroom` frames to spare, as when the consumers process builds
    its routers deep inside asyncio.run."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(frames_in_use() + headroom)
    try:
        return run()
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("text, message, expected", [
    (chain(c.MAX_TERMS), {"properties": {"n": -1}}, True),
    (chain(c.MAX_TERMS, "or"), {"properties": {"n": 0}}, True),
    (chain(c.MAX_TERMS), {"properties": {"n": c.MAX_TERMS - 1}}, False),
    (nested(c.MAX_NESTING), {"a": 1, "b": 2}, True),
    (nested(c.MAX_NESTING), {"a": 0, "b": 2}, False),
    ("not " * c.MAX_NESTING + "a = 1", {"a": 1}, True),
    ("(" * c.MAX_NESTING + "true" + ")" * c.MAX_NESTING, {}, True),
])
def test_the_largest_allowed_conditions_compile_and_run_on_a_nearly_full_stack(
        text, message, expected):
    assert on_a_nearly_full_stack(lambda: c.compile(text)(message)) is expected


TOO_DEEP = nested(c.MAX_NESTING + 1)


@pytest.mark.parametrize("text, column, words", [
    (chain(c.MAX_TERMS + 1), len(chain(c.MAX_TERMS)) + 6, f"more than {c.MAX_TERMS} in one"),
    (chain(999, "or"), len(chain(c.MAX_TERMS, "or")) + 5, "use `in [...]`"),
    (TOO_DEEP, TOO_DEEP.rfind("(") + 1,   # the caret is at the parenthesis too many
     f"more than {c.MAX_NESTING} levels of parentheses and `not`"),
    ("(" * 250 + "true" + ")" * 250, c.MAX_NESTING + 1, "nesting too deep"),
    ("not " * 1000 + "true", 4 * c.MAX_NESTING + 1, "nesting too deep"),
    ("not (" * 20 + "true" + ")" * 20, 5 * 16 + 1, "nesting too deep"),  # 2 levels each
])
def test_conditions_over_the_limits_are_syntax_errors(text, column, words):
    syntax_error(text, column, words)


def syntax_error(text: str, column: int, words: str) -> str:
    """The ConfigError's message for `text`, checked to name `words` at `column`."""
    with pytest.raises(ConfigError) as caught:
        c.compile(text)
    message = str(caught.value)
    assert words in message
    assert f"at column {column}:" in message
    return message


@pytest.mark.parametrize("left, right, equal", [
    ([1], [True], False),                       # true is not 1, inside a list too
    ({"k": 1.0}, {"k": True}, False),
    ([[0]], [[False]], False),
    ({"k": [1, {"z": None}]}, {"k": [1, {"z": False}]}, False),
    ([1], [1.0], True),                         # numbers compare numerically at every level
    ({"k": [3, {"z": "x"}]}, {"k": [3.0, {"z": "x"}]}, True),
    ([1, 2], [1], False),
    ({"a": 1}, {"a": 1, "b": 2}, False),
    ([], [], True),
])
def test_lists_and_objects_compare_by_the_scalar_rule_at_every_level(left, right, equal):
    message = {"properties": {"a": left, "b": right, "list": [right]}}
    assert c.compile("properties.a = properties.b")(message) is equal
    assert c.compile("properties.a != properties.b")(message) is not equal
    assert c.compile("properties.list contains properties.a")(message) is equal


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
    st.builds(c.Not, inner)
    | st.builds(c.And, st.lists(inner, min_size=2, max_size=3).map(tuple))
    | st.builds(c.Or, st.lists(inner, min_size=2, max_size=3).map(tuple))),
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
        if kind(a) != kind(b):
            return False
        if isinstance(a, list):
            return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
        return a == b

    match node:
        case c.Not(x):
            return not reference(x, message)
        case c.And(operands):
            return all(reference(x, message) for x in operands)
        case c.Or(operands):
            return any(reference(x, message) for x in operands)
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
