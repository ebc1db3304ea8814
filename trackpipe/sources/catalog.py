"""The catalog: registered sources (write keys) and the admin token, in catalog.db.

The CLI writes it directly (`trackpipe sources add`); a running server
notices the change within a second (SQLite's data_version) and reloads.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

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
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def sources(self) -> list[Source]:
        rows = self.db.execute("SELECT id, name, write_key, enabled, strict, created_at"
                               " FROM sources ORDER BY created_at, name").fetchall()
        return [Source(r[0], r[1], r[2], bool(r[3]), bool(r[4]), r[5]) for r in rows]

    def add_source(self, name: str, write_key: str | None = None, strict: bool = False) -> Source:
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

    def close(self) -> None:
        self.db.close()


def new_write_key() -> str:
    return secrets.token_urlsafe(24)


def new_admin_token() -> str:
    return "tpa_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), stored_hash)
