"""PostgreSQL connection strings: checked without being echoed, kept out of error text.

libpq quotes the token it could not parse ('invalid percent-encoded token:
"Sup3r%Secret"'), and that token is often the password. Such a message would
reach the log, the admin API and `trackpipe check`; these helpers keep it out.
"""

from __future__ import annotations

import re

from psycopg import Error as PsycopgError
from psycopg.conninfo import conninfo_to_dict

MASK = "********"
_URL_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^:/@]*:([^@]*)@")
_KEY_PASSWORD = re.compile(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def check(dsn: str, setting: str) -> None:
    """ValueError naming `setting` (never the value) when libpq cannot parse `dsn`."""
    try:
        conninfo_to_dict(dsn)
    except PsycopgError:
        raise ValueError(f"{setting} is not a valid libpq connection string or postgresql://"
                         " URL; check its quoting and that a % in it is written %25") from None


def scrub(text: str, dsn: str) -> str:
    """`text` with the connection string and its password, as written or decoded, masked."""
    for secret in sorted(_secrets(dsn), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _secrets(dsn: str) -> set[str]:
    found = {dsn}
    for pattern in (_URL_PASSWORD, _KEY_PASSWORD):
        for match in pattern.finditer(dsn):
            found.add(match.group(1))
            found.add(match.group(1).strip("'"))
    try:
        found.add(conninfo_to_dict(dsn).get("password") or "")
    except PsycopgError:
        pass
    return {s for s in found if s}
