"""Trigger conditions: a small boolean language over a Segment message.

    type = "track" and (event = "Order Completed" or properties.revenue >= 100)

`parse` turns the text into a tree of nodes (str() prints one back as text);
`compile` turns the tree into nested closures once, so testing an event is a
few dict lookups and no parsing. Evaluation never raises: a missing path is
null and comparing values of different types is false. docs/routing.md is the
user's reference.
"""

from __future__ import annotations

import fnmatch
import json
import math
import operator
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

from trackpipe.errors import ConfigError

Condition = Callable[[dict], bool]

KEYWORDS = frozenset({"and", "or", "not", "in", "contains", "matches", "exists",
                      "true", "false", "null"})
COMPARISONS = ("=", "==", "!=", "<", "<=", ">", ">=")
_NUMBER = (int, float)  # not bool: `true` is never equal to 1
# The parser and `build` recurse once per level of nesting, so nesting is what must
# stay small; a chain's length only costs time. Both limits are in docs/routing.md.
MAX_NESTING = 32  # parentheses and `not`s, one inside another
MAX_TERMS = 256   # comparisons (and bare true/false) in one condition

_TOKEN = re.compile(r"""
    (?P<string>"(?:[^"\\\x00-\x1f]|\\.)*")
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|!=|==|=|<|>|[()\[\],.])
""", re.X)
_SEGMENT = re.compile(r"[A-Za-z0-9_]+")  # after a dot, "0" or "2fa" are keys too
_HEAD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# -- the tree -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Path:
    keys: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join(k if i and _SEGMENT.fullmatch(k) or not i and _is_bare_head(k)
                        else json.dumps(k) for i, k in enumerate(self.keys))


@dataclass(frozen=True, slots=True)
class Literal:
    value: Any  # str, int, float, bool or None

    def __str__(self) -> str:
        return json.dumps(self.value)


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: Path | Literal
    right: Path | Literal

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True, slots=True)
class In:
    left: Path | Literal
    values: tuple[Literal, ...]

    def __str__(self) -> str:
        return f"{self.left} in [{', '.join(map(str, self.values))}]"


@dataclass(frozen=True, slots=True)
class Matches:
    left: Path | Literal
    pattern: str

    def __str__(self) -> str:
        return f"{self.left} matches {json.dumps(self.pattern)}"


@dataclass(frozen=True, slots=True)
class Exists:
    path: Path

    def __str__(self) -> str:
        return f"{self.path} exists"


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node

    def __str__(self) -> str:
        return f"not {self.operand}"


# And and Or hold a whole chain (`a and b and c`), not a pair: a tree of pairs is as
# deep as the chain is long, and everything that walks it recursively would be too.
@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Node, ...]

    def __str__(self) -> str:
        return f"({' and '.join(map(str, self.operands))})"


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Node, ...]

    def __str__(self) -> str:
        return f"({' or '.join(map(str, self.operands))})"


Node = Literal | Compare | In | Matches | Exists | Not | And | Or


def _is_bare_head(key: str) -> bool:
    return bool(_HEAD.match(key)) and key.lower() not in KEYWORDS


# -- parsing --------------------------------------------------------------------------

def parse(text: str) -> Node:
    """The tree of a condition; a syntax error is a ConfigError pointing at the spot."""
    parser = _Parser(text)
    node = parser.expression()
    parser.expect_end("and, or, or the end of the condition")
    return node


def parse_path(text: str) -> tuple[str, ...]:
    """The keys of a dotted path such as `properties."order id"` (mappings use this)."""
    parser = _Parser(text, "path")
    path = parser.path()
    parser.expect_end("a dot and another key")
    return path.keys


class _Parser:
    """Recursive descent; precedence from loose to tight: or, and, not, comparisons."""

    def __init__(self, text: str, kind: str = "condition"):
        self.text, self.kind = text, kind
        self.tokens = _tokenize(text, kind)
        self.i = 0
        self.nesting = self.terms = 0

    def expression(self) -> Node:
        nodes = [self.conjunction()]
        while self.keyword("or"):
            nodes.append(self.conjunction())
        return nodes[0] if len(nodes) == 1 else Or(tuple(nodes))

    def conjunction(self) -> Node:
        nodes = [self.negation()]
        while self.keyword("and"):
            nodes.append(self.negation())
        return nodes[0] if len(nodes) == 1 else And(tuple(nodes))

    def negation(self) -> Node:
        if not self.keyword("not"):
            return self.atom()
        self.enter()
        node = Not(self.negation())
        self.nesting -= 1
        return node

    def atom(self) -> Node:
        if self.symbol("("):
            self.enter()
            node = self.expression()
            self.expect(")", "a closing parenthesis")
            self.nesting -= 1
            return node
        self.count_term()
        left = self.operand()
        kind, value, _ = self.tokens[self.i]
        if kind == "op" and value in COMPARISONS:
            self.i += 1
            return Compare("=" if value == "==" else value, left, self.operand())
        if self.keyword("in"):
            return In(left, self.list_literal())
        if self.keyword("contains"):
            return Compare("contains", left, self.operand())
        if self.keyword("matches"):
            return Matches(left, self.string("a quoted pattern such as \"Order *\""))
        if isinstance(left, Path) and self.keyword("exists"):
            return Exists(left)
        if isinstance(left, Literal) and type(left.value) is bool:
            return left  # a bare `true` or `false`
        self.fail("an operator: = != < <= > >= in contains matches exists")

    def operand(self) -> Path | Literal:
        kind, value, _ = self.tokens[self.i]
        if kind in ("string", "number"):
            self.i += 1
            return Literal(value)
        if kind == "name" and value.lower() in ("true", "false", "null"):
            self.i += 1
            return Literal({"true": True, "false": False, "null": None}[value.lower()])
        if kind == "name" and value.lower() not in KEYWORDS:
            return self.path()
        self.fail("a path such as properties.revenue, or a value such as \"text\", 12 or true")

    def path(self) -> Path:
        kind, value, _ = self.tokens[self.i]
        if kind != "name" or value.lower() in KEYWORDS:
            self.fail("a path such as properties.revenue")
        keys = [value]
        self.i += 1
        while self.symbol("."):
            kind, value, pos = self.tokens[self.i]
            if kind not in ("segment", "string"):
                self.fail("a key after the dot (quote it if it has spaces: \"order id\")")
            if _is_index(value):  # `getter` turns it into an int: it must convert
                _integer(value, self.text, pos, self.kind)
            keys.append(value)
            self.i += 1
        return Path(tuple(keys))

    def list_literal(self) -> tuple[Literal, ...]:
        self.expect("[", "a list such as [\"a\", \"b\"]")
        values: list[Literal] = []
        while not self.symbol("]"):
            if values:
                self.expect(",", "a comma or ]")
            operand = self.operand()
            if isinstance(operand, Path):
                self.fail("a value (lists hold values, not paths)", back=1)
            values.append(operand)
        return tuple(values)

    def string(self, what: str) -> str:
        kind, value, _ = self.tokens[self.i]
        if kind != "string":
            self.fail(what)
        self.i += 1
        return value

    def keyword(self, word: str) -> bool:
        kind, value, _ = self.tokens[self.i]
        if kind == "name" and value.lower() == word:
            self.i += 1
            return True
        return False

    def symbol(self, sym: str) -> bool:
        kind, value, _ = self.tokens[self.i]
        if kind == "op" and value == sym:
            self.i += 1
            return True
        return False

    def expect(self, sym: str, what: str) -> None:
        if not self.symbol(sym):
            self.fail(what)

    def expect_end(self, what: str) -> None:
        if self.tokens[self.i][0] != "end":
            self.fail(what)

    def enter(self) -> None:
        """Called just after a `(` or a `not`, which nest what follows one level deeper."""
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            self.refuse(f"nesting too deep: more than {MAX_NESTING} levels of parentheses "
                        "and `not` inside one another", back=1)

    def count_term(self) -> None:
        self.terms += 1
        if self.terms > MAX_TERMS:
            self.refuse(f"too many comparisons: more than {MAX_TERMS} in one condition "
                        "(to test one value against many, use `in [...]`)")

    def fail(self, expected: str, back: int = 0) -> NoReturn:
        at = self.i - back
        kind, _, pos = self.tokens[at]
        found = "the end" if kind == "end" else repr(
            self.text[pos:self.tokens[at + 1][2]].strip()[:40])
        self.refuse(f"expected {expected}, found {found}", back)

    def refuse(self, message: str, back: int = 0) -> NoReturn:
        raise _syntax_error(self.text, self.tokens[self.i - back][2], message, self.kind)


def _tokenize(text: str, kind: str) -> list[tuple[str, Any, int]]:
    tokens: list[tuple[str, Any, int]] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            tokens.append(("end", None, pos))
            return tokens
        after_dot = bool(tokens) and tokens[-1][:2] == ("op", ".")
        segment = _SEGMENT.match(text, pos) if after_dot else None
        if segment:
            tokens.append(("segment", segment.group(), pos))
            pos = segment.end()
            continue
        match = _TOKEN.match(text, pos)
        if match is None:
            raise _syntax_error(text, pos, f"unexpected character {text[pos]!r}", kind)
        group, token = match.lastgroup or "", match.group()
        tokens.append((group, _token_value(group, token, text, pos, kind), pos))
        pos = match.end()


def _token_value(group: str, token: str, text: str, pos: int, kind: str) -> Any:
    if group == "number":
        if any(c in token for c in ".eE"):
            value = float(token)
            if math.isinf(value):  # no event holds one: ingest refuses Infinity
                raise _syntax_error(text, pos, "number out of range (past 1.8e308)", kind)
            return value
        return _integer(token, text, pos, kind)
    if group == "string":
        try:
            return json.loads(token)
        except ValueError:
            raise _syntax_error(text, pos, "bad escape in string (use \\\" \\\\ \\n \\t \\uXXXX)",
                                kind) from None
    return token


def _integer(digits: str, text: str, pos: int, kind: str) -> int:
    try:
        return int(digits)
    except ValueError:  # over sys.get_int_max_str_digits() (4,300 unless changed)
        limit = sys.get_int_max_str_digits()
        raise _syntax_error(text, pos, f"number too long ({len(digits.lstrip('-'))} digits; "
                            f"at most {limit})", kind) from None


def _is_index(key: str) -> bool:
    return key.isascii() and key.isdigit()


_EXAMPLES = {
    "condition": 'Conditions look like: type = "track" and properties.revenue > 10',
    "path": 'Paths look like: properties.revenue or properties."order id"',
}


def _syntax_error(text: str, pos: int, message: str, kind: str) -> ConfigError:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    line = text[start:] if end < 0 else text[start:end]
    pad = "".join(c if c == "\t" else " " for c in line[:pos - start])
    where = f"column {pos - start + 1}"
    if "\n" in text:
        where = f"line {text.count(chr(10), 0, pos) + 1}, {where}"
    return ConfigError(
        f"Invalid {kind}: {message} at {where}:\n    {line}\n    {pad}^\n"
        f"{_EXAMPLES[kind]} (see docs/routing.md).")


# -- evaluation -----------------------------------------------------------------------

def compile(text: str) -> Condition:  # noqa: A001 - the natural name, as in re.compile
    """Parse once; the result tests a message (a dict) and never raises."""
    return build(parse(text))


def build(node: Node) -> Condition:
    match node:
        case Or(operands):
            return _any(tuple(map(build, operands)))
        case And(operands):
            return _all(tuple(map(build, operands)))
        case Not(operand):
            f = build(operand)
            return lambda m: not f(m)
        case Literal(value):
            return (lambda m: True) if value is True else (lambda m: False)
        case Exists(path):
            get = getter(path.keys)
            return lambda m: get(m) is not None
        case Matches(left, pattern):
            return _matches(_operand(left), re.compile(fnmatch.translate(pattern)))
        case In(left, values):
            return _in(_operand(left), tuple(v.value for v in values))
        case Compare(op, left, Literal(value)) if op == "=" and type(value) is str:
            get = _operand(left)  # the common `type = "track"`: a non-string never equals
            return lambda m: get(m) == value
        case Compare(op, left, right):
            test, get_left, get_right = _TESTS[op], _operand(left), _operand(right)
            return lambda m: test(get_left(m), get_right(m))
    raise TypeError(f"not a condition node: {node!r}")


def getter(keys: tuple[str, ...], missing: Any = None) -> Callable[[dict], Any]:
    """Reads a path from a message; `missing` when a key is absent or the path hits a
    non-object. A digit key also indexes a list (`properties.products.0.sku`)."""
    if len(keys) == 1:
        key = keys[0]
        return lambda m: m.get(key, missing)
    steps = tuple((k, int(k) if _is_index(k) else None) for k in keys)

    def get(message: dict) -> Any:
        value: Any = message
        for key, index in steps:
            if type(value) is dict:
                if key not in value:
                    return missing
                value = value[key]
            elif index is not None and type(value) is list and index < len(value):
                value = value[index]
            else:
                return missing
        return value
    return get


def _any(tests: tuple[Condition, ...]) -> Condition:
    return lambda message: any(test(message) for test in tests)


def _all(tests: tuple[Condition, ...]) -> Condition:
    return lambda message: all(test(message) for test in tests)


def _operand(node: Path | Literal) -> Callable[[dict], Any]:
    if isinstance(node, Path):
        return getter(node.keys)
    value = node.value
    return lambda m: value


def _equal(a: Any, b: Any) -> bool:
    """One rule at every level of a list or object: numbers compare numerically (3 = 3.0),
    anything else must have the same type, so `true` is never 1, even inside [true]."""
    if type(a) in _NUMBER:
        return type(b) in _NUMBER and a == b
    if type(a) is not type(b):
        return False
    if type(a) is list:  # recursion is bounded: ingest refuses messages over 64 levels
        return len(a) == len(b) and all(map(_equal, a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_equal(v, b[k]) for k, v in a.items())
    return a == b


def _ordered(compare: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def test(a: Any, b: Any) -> bool:
        if type(a) in _NUMBER and type(b) in _NUMBER or type(a) is str and type(b) is str:
            return compare(a, b)
        return False  # "abc" < 5 and null < 1 are false, not errors
    return test


def _contains(a: Any, b: Any) -> bool:
    if type(a) is str:
        return type(b) is str and b in a
    if type(a) is list:
        return any(_equal(item, b) for item in a)
    return False


def _in(get: Callable[[dict], Any], values: tuple) -> Condition:
    if all(type(v) is str for v in values):
        strings = frozenset(values)
        return lambda m: type(x := get(m)) is str and x in strings

    def test(message: dict) -> bool:
        x = get(message)
        return any(_equal(x, v) for v in values)
    return test


def _matches(get: Callable[[dict], Any], pattern: re.Pattern) -> Condition:
    # fnmatch's translation uses atomic groups, so no pattern can backtrack
    # catastrophically (which is why `matches` takes a glob and not a regex).
    return lambda m: type(x := get(m)) is str and pattern.match(x) is not None


_TESTS: dict[str, Callable[[Any, Any], bool]] = {
    "=": _equal,
    "!=": lambda a, b: not _equal(a, b),
    "<": _ordered(operator.lt),
    "<=": _ordered(operator.le),
    ">": _ordered(operator.gt),
    ">=": _ordered(operator.ge),
    "contains": _contains,
}
