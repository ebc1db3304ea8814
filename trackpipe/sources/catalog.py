"""The catalog: registered sources (write keys) and the admin token, in catalog.db.

The CLI writes it directly (`trackpipe sources add`); a running server
notices the change within a second (SQLite's data_version) and reloads.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from trackpipe.config import make_data_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    write_key  TEXT NOT NULL UNIQUE,
    enabled    INTEGER NOT NULL DEFAULT 1,
    strict     INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS suppressions (
    id_hash    TEXT PRIMARY KEY,   -- keyed hash of a userId/anonymousId (privacy/suppress.py)
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS privacy_audit (
    id       INTEGER PRIMARY KEY,
    at       INTEGER NOT NULL,
    action   TEXT NOT NULL,        -- suppress | unsuppress | delete
    subject  TEXT NOT NULL,        -- keyed hash of the id the action was asked for
    detail   TEXT NOT NULL         -- JSON: counts of what was done, never the ids
);
"""


@dataclass(frozen=True, slots=True)
class Source:
    id: str
    name: str
    write_key: str
    enabled: bool
    strict: bool
    created_at: int

    def public(self) -> dict:
        return {"id": self.id, "name": self.name, "writeKey": self.write_key,
                "enabled": self.enabled, "strict": self.strict,
                "createdAt": self.created_at}


class Catalog:
    def __init__(self, data_dir: Path | str):
        path = Path(data_dir) / "catalog.db"
        make_data_dir(path.parent)
        _create_private(path)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def sources(self) -> list[Source]:
        rows = self.db.execute("SELECT id, name, write_key, enabled, strict, created_at"
                               " FROM sources ORDER BY created_at, name").fetchall()
        return [Source(r[0], r[1], r[2], bool(r[3]), bool(r[4]), r[5]) for r in rows]

    def add_source(self, name: str, write_key: str | None = None, strict: bool = False) -> Source:
        if not name.strip():
            raise ValueError("A source needs a name that is not empty.")
        problem = write_key_problem(write_key) if write_key is not None else None
        if problem:
            raise ValueError(f"{problem}. {WRITE_KEY_RULE}")
        source = Source(f"src_{secrets.token_hex(8)}", name, write_key or new_write_key(),
                        True, strict, int(time.time() * 1000))
        try:
            self.db.execute("INSERT INTO sources VALUES (?, ?, ?, ?, ?, ?)",
                            (source.id, source.name, source.write_key, 1, int(strict),
                             source.created_at))
        except sqlite3.IntegrityError:
            raise ValueError(f"A source named {name!r} or with that write key already exists; "
                             "see `trackpipe sources list`.") from None
        return source

    def set_enabled(self, name: str, enabled: bool) -> bool:
        cur = self.db.execute("UPDATE sources SET enabled = ? WHERE name = ?", (int(enabled), name))
        return cur.rowcount == 1

    def version(self) -> int:
        """Changes whenever another connection commits to the catalog."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    # The admin token is kept only as a hash: it is shown once, when generated.
    def admin_token_hash(self) -> str | None:
        row = self.db.execute("SELECT value FROM secrets WHERE name = 'admin_token'").fetchone()
        return row[0] if row else None

    def set_admin_token(self, token: str) -> None:
        self.db.execute("INSERT INTO secrets VALUES ('admin_token', ?) ON CONFLICT (name)"
                        " DO UPDATE SET value = excluded.value", (hash_token(token),))

    # -- privacy ----------------------------------------------------------------

    def privacy_key(self) -> bytes:
        row = self.db.execute("SELECT value FROM secrets WHERE name = 'privacy_key'").fetchone()
        if row is None:
            self.db.execute("INSERT OR IGNORE INTO secrets VALUES ('privacy_key', ?)",
                            (secrets.token_hex(32),))
            row = self.db.execute("SELECT value FROM secrets WHERE name = 'privacy_key'").fetchone()
        return bytes.fromhex(row[0])

    def suppressed(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id_hash FROM suppressions")]

    def suppress(self, hashes: list[str]) -> None:
        now = int(time.time() * 1000)
        self.db.executemany("INSERT OR IGNORE INTO suppressions VALUES (?, ?)",
                            [(h, now) for h in hashes])

    def unsuppress(self, hashes: list[str]) -> int:
        return self.db.executemany("DELETE FROM suppressions WHERE id_hash = ?",
                                   [(h,) for h in hashes]).rowcount

    def audit(self, action: str, subject: str, detail: str) -> None:
        self.db.execute("INSERT INTO privacy_audit (at, action, subject, detail) VALUES (?,?,?,?)",
                        (int(time.time() * 1000), action, subject, detail))

    def audit_log(self, limit: int = 100) -> list[tuple]:
        return self.db.execute("SELECT id, at, action, subject, detail FROM privacy_audit"
                               " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()

    def close(self) -> None:
        self.db.close()


MAX_WRITE_KEY = 256
WRITE_KEY_RULE = (f"A write key is 1 to {MAX_WRITE_KEY} printable ASCII characters, has no"
                  " colon, '?' or '#', and no space at either end.")


def write_key_problem(key: str) -> str | None:
    """Why a chosen write key would fail in one of the forms README.md documents, or None.
    Keys stored before these rules keep working: only new ones are checked."""
    if not key.strip():
        return "The write key is empty"
    if not (key.isascii() and key.isprintable()):
        return ("The write key has a character that is not printable ASCII (HTTP headers"
                " carry ASCII)")
    if ":" in key:
        return "The write key has a colon (Basic auth splits the key at the first colon)"
    if key != key.strip():
        return "The write key starts or ends with a space (Bearer <key> loses it)"
    if "?" in key or "#" in key:
        return ("The write key has a '?' or '#' (the browser SDKs' settings URL"
                " /v1/projects/<key>/settings cannot carry them)")
    if len(key) > MAX_WRITE_KEY:
        return (f"The write key is {len(key)} characters long, over {MAX_WRITE_KEY}"
                " (a Basic auth header that long is refused)")
    return None


def _create_private(path: Path) -> None:
    """catalog.db holds the write keys, the privacy key and the admin token's hash: 0600
    from the start, whatever the umask (SQLite gives its -wal and -shm the same mode)."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def new_write_key() -> str:
    return secrets.token_urlsafe(24)


def new_admin_token() -> str:
    return "tpa_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), stored_hash)
