"""Who is suppressed: new events carrying one of their ids are dropped at ingest.

The list holds keyed hashes of the ids, never the ids themselves, so after a
delete no trackpipe file still names the person (the key is per install, so
the hashes mean nothing elsewhere). The ingest path only pays for the check
while the list is non-empty.
"""

from __future__ import annotations

import hashlib
from typing import Iterable


def id_hash(key: bytes, value: str) -> str:
    return hashlib.blake2b(value.encode(), key=key, digest_size=16).hexdigest()


class Suppressions:
    def __init__(self, key: bytes, hashes: Iterable[str] = ()):
        self.key = key
        self.hashes = frozenset(hashes)

    def replace(self, hashes: Iterable[str]) -> None:
        self.hashes = frozenset(hashes)

    def drop(self, records: list) -> tuple[list, int]:
        """The Records whose user is not suppressed, and how many were dropped."""
        if not self.hashes:
            return records, 0
        key, hashes = self.key, self.hashes
        kept = [r for r in records
                if not ((r.user_id and id_hash(key, r.user_id) in hashes)
                        or (r.anonymous_id and id_hash(key, r.anonymous_id) in hashes))]
        return kept, len(records) - len(kept)
