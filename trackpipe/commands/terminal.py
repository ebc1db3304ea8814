"""Printing what clients sent (event names, ids, traits) on the operator's terminal."""

from __future__ import annotations

import unicodedata

# Bidirectional formatting characters: they reorder what a terminal shows (CVE-2021-42574).
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(value: object) -> str:
    """`value` as text that is safe on a terminal: control characters (escape sequences,
    newlines, carriage returns), line separators and bidi overrides become their Python
    escapes (\\x1b, \\n, \\u202e). For tables and messages; JSON output escapes on its own."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if _unsafe(ch) else ch
                   for ch in text)


def _unsafe(ch: str) -> bool:
    return ch in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp")
