"""Finding the stored rows that may name a person, with SQLite doing the reading.

A delete looks for the person in free text: the payloads of invalid events
(log.db `discards`) and what destinations answered (deliveries.db details).
Reading every row in Python cost 5 to 200 µs a row; 175,000 discards took
longer than the log writer waits for its lock. Here SQLite's instr() keeps the
rows that hold one of the forms the person's identifiers take in such text, and
only those few are read in Python.
"""

from __future__ import annotations

import json
import math
from typing import Callable, Iterable

import msgspec

from trackpipe.privacy.names import ID_FIELDS, as_id

KELVIN = "\u212a"  # Python lower-cases it to an ASCII "k"; SQLite's lower() does not


def quoted(value: str) -> set[str]:
    """`value` as a JSON string: as written, and escaped as msgspec (trackpipe's encoder,
    and most others) and Python's json (non-ASCII as \\u escapes) write it. None for an
    empty value, which names no one."""
    if not value:
        return set()
    return {f'"{value}"', msgspec.json.encode(value).decode(), json.dumps(value)}


def in_payload(value: str) -> set[str]:
    """What a stored payload (msgspec JSON, no white space) holds wherever an id field
    holds `value`: the quoted string, or the number names.as_id reads as `value`
    (`"userId":7` or `"userId":7.0` for "7", `"userId":1e20` for "100000000000000000000",
    `"userId":0.00001` for "1e-05")."""
    forms = quoted(value)
    for number in _numbers(value):
        text = msgspec.json.encode(number).decode()
        forms.update(f'"{field}":{text}' for field in ID_FIELDS)
    return forms


def folded_in_payload(value: str) -> set[str]:
    """What a stored payload, lower-cased, holds wherever a trait holds `value` (trimmed
    and lower-cased, identity/facts.py normalize_trait), however it was padded or cased."""
    return {f[1:-1].lower() for f in quoted(value)}


def _numbers(value: str) -> list[int | float]:
    found: list[int | float] = []
    for parse in (int, float):
        try:
            number = parse(value)
        except (ValueError, OverflowError):
            continue
        if math.isfinite(number) and as_id(number) == value:
            found.append(number)
    return found


def where(column: str, exact: Iterable[str], folded: Iterable[str] = ()
          ) -> tuple[str, list[str]]:
    """An SQL test, with its parameters, that `column` may hold one of `exact` as it is or
    one of `folded` (lower case) in any case. A superset: check the rows it keeps.

    SQLite's lower() folds ASCII letters only: a value with other letters is also looked
    for in every row with a non-ASCII character, and one with a "k" in every row with
    the Kelvin sign."""
    exact, folded = sorted(set(exact)), sorted(set(folded))
    tests = [f"instr({column}, ?)"] * len(exact) + [f"instr(lower({column}), ?)"] * len(folded)
    params = [*exact, *folded]
    if not all(f.isascii() for f in folded):
        tests.append(f"length({column}) < length(CAST({column} AS BLOB))")
    elif any("k" in f for f in folded):
        tests.append(f"instr({column}, ?)")
        params.append(KELVIN)
    return f"({' OR '.join(tests) or '0'})", params


def holds(exact: Iterable[str], folded: Iterable[str] = ()) -> Callable[[str], bool]:
    """The exact test `where` approximates, for the rows it kept."""
    exact, folded = tuple(set(exact)), tuple(set(folded))

    def test(text: str) -> bool:
        if any(f in text for f in exact):
            return True
        lowered = text.lower() if folded else ""
        return any(f in lowered for f in folded)
    return test
