"""Who is suppressed: new events naming one of their identifiers are dropped at ingest.

The list holds keyed hashes of the identifiers, never the identifiers themselves,
so after a delete no trackpipe file still names the person (the key is per
install, so the hashes mean nothing elsewhere). The ingest path only pays for
the check while the list is non-empty.

A person's identifiers carry their kind: "user_id", "anonymous_id", a trait
identifier's name (e.g. "email", its value normalised), "profile" (the profile
id, which only the delete uses), or None for an id trackpipe has no profile
for, which may be a userId or an anonymousId. userIds, anonymousIds and alias
previousIds are compared with the plain hash; trait values with a hash of their
own, so that an email does not suppress a userId that happens to be spelt the
same in lower case.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

from trackpipe.identity.facts import ANON, USER, normalize_trait
from trackpipe.privacy import names

PROFILE = "profile"
_TRAIT = "trait\x1f"

Identifier = tuple[str | None, str]  # (kind, value)


def id_hash(key: bytes, value: str) -> str:
    return hashlib.blake2b(value.encode(), key=key, digest_size=16).hexdigest()


def trait_hash(key: bytes, value: str) -> str:
    return id_hash(key, _TRAIT + normalize_trait(value))


def is_trait(kind: str | None) -> bool:
    return kind not in (USER, ANON, PROFILE, None)


def identifiers(profile: dict | None, ident: str, trait_names: Sequence[str]) -> list[Identifier]:
    """The person's identifiers, as far as trackpipe knows them. With a profile: all of its
    identifiers (`ident` is one of them, or its profile id). Without: `ident` as given, as a
    userId or anonymousId, and, when trait identifiers are configured, as each of them."""
    if profile:
        return [(PROFILE, profile["profile_id"])] + [
            (i["type"], i["value"]) for i in profile.get("identifiers", ())]
    return [(None, ident)] + [(name, normalize_trait(ident)) for name in trait_names]


def hashes(key: bytes, ids: Iterable[Identifier]) -> dict[str, list[str]]:
    """The hashes that suppress each identifier's value (a value may have two readings)."""
    out: dict[str, list[str]] = {}
    for kind, value in ids:
        if kind == PROFILE:
            continue  # events never carry it
        h = trait_hash(key, value) if is_trait(kind) else id_hash(key, value)
        found = out.setdefault(value, [])
        if h not in found:
            found.append(h)
    return out


class Suppressions:
    def __init__(self, key: bytes, hashes: Iterable[str] = ()):
        self.key = key
        self.hashes = frozenset(hashes)

    def replace(self, hashes: Iterable[str]) -> None:
        self.hashes = frozenset(hashes)

    def drop(self, records: list, discards: list = (), trait_names: Sequence[str] = ()
             ) -> tuple[list, list, int]:
        """The Records and Discards that name no suppressed identifier, and how many were
        dropped. A discard is an invalid event kept with its payload: a suppressed
        person's is dropped like their valid events."""
        if not self.hashes:
            return records, list(discards), 0
        kept = [r for r in records if not self._named(
            names.of_record(r.user_id, r.anonymous_id, r.body, trait_names))]
        kept_discards = [d for d in discards if not self._named(
            names.of_payload(d.payload, trait_names))]
        return kept, kept_discards, len(records) - len(kept) + len(discards) - len(kept_discards)

    def _named(self, named: names.Names) -> bool:
        key, hashes = self.key, self.hashes
        ids, traits = named
        return (any(id_hash(key, v) in hashes for _, v in ids)
                or any(trait_hash(key, v) in hashes for _, v in traits))
