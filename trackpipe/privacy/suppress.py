"""Who is suppressed: new events naming one of their identifiers are dropped at ingest.

The list holds keyed hashes of the identifiers, never the identifiers themselves,
so after a delete no trackpipe file still names the person (the key is per
install, so the hashes mean nothing elsewhere). The ingest path only pays for
the check while the list is non-empty. The consumers process holds a copy
(Watch) and its delivery workers skip the events it names: see delivery/
process.py SuppressionFollower for when a suppression is acknowledged.

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


_CACHE = 65536  # ids remembered per list (a value's verdict), then forgotten at once
_CACHED_LEN = 256  # longer values are hashed every time (a client chooses their length)


class _Snapshot:
    """One version of the list, with the verdicts already worked out for it."""

    __slots__ = ("hashes", "ids", "traits")

    def __init__(self, hashes: frozenset):
        self.hashes = hashes
        self.ids: dict[str, bool] = {}
        self.traits: dict[str, bool] = {}


class Suppressions:
    """The list, as the ingest (sources/http.py) and the delivery workers (delivery/
    worker.py) both test an event against it: `names` is the one test. Verdicts are
    remembered per id value (a person's events repeat their ids), so an event costs a
    dict lookup per id rather than a keyed hash; each version of the list keeps its own,
    so none outlives a change. `generation` counts the changes."""

    def __init__(self, key: bytes, hashes: Iterable[str] = ()):
        self.key = key
        self._now = _Snapshot(frozenset(hashes))
        self.generation = 0

    @property
    def hashes(self) -> frozenset:
        return self._now.hashes

    def replace(self, hashes: Iterable[str]) -> bool:
        """Take this list; True when it differs from the one held."""
        hashes = frozenset(hashes)
        if hashes == self._now.hashes:
            return False
        self._now = _Snapshot(hashes)
        self.generation += 1
        return True

    def drop(self, records: list, discards: list = (), trait_names: Sequence[str] = ()
             ) -> tuple[list, list, int]:
        """The Records and Discards that name no suppressed identifier, and how many were
        dropped. A discard is an invalid event kept with its payload: a suppressed
        person's is dropped like their valid events."""
        snap = self._now
        if not snap.hashes:
            return records, list(discards), 0
        kept = [r for r in records if not self._named(snap, names.of_record(
            r.user_id, r.anonymous_id, r.body, trait_names))]
        kept_discards = [d for d in discards if not self._named(
            snap, names.of_payload(d.payload, trait_names))]
        return kept, kept_discards, len(records) - len(kept) + len(discards) - len(kept_discards)

    def names(self, user_id: str | None, anonymous_id: str | None, body: bytes,
              trait_names: Sequence[str] = ()) -> bool:
        """Whether a stored event (a log Entry's fields) names a suppressed identifier,
        exactly as the ingest tests a new one (drop): its userId, anonymousId, alias
        previousId, or a trait identifier in `traits` or `context.traits`."""
        snap = self._now
        return bool(snap.hashes) and self._named(
            snap, names.of_record(user_id, anonymous_id, body, trait_names))

    def _named(self, snap: _Snapshot, named: names.Names) -> bool:
        ids, traits = named
        return (any(self._verdict(snap, snap.ids, id_hash, v) for _, v in ids)
                or any(self._verdict(snap, snap.traits, trait_hash, v) for _, v in traits))

    def _verdict(self, snap: _Snapshot, seen: dict, hash_of, value: str) -> bool:
        found = seen.get(value)
        if found is None:
            found = hash_of(self.key, value) in snap.hashes
            if len(value) <= _CACHED_LEN:
                if len(seen) >= _CACHE:
                    seen.clear()
                seen[value] = found
        return found


class Watch:
    """The consumers process's copy of the list (delivery/process.py), kept in step with
    the catalog: `refresh` reloads it when another connection has committed to the
    catalog since (SQLite's data_version, one PRAGMA: no reading of the list itself).

    Whoever reloads it (the suppression follower's poll, or a worker about to skip an
    event), each hash that enters the list is recorded with the generation it entered
    at, until the follower takes the record (`take_added`); a hash that leaves is
    forgotten, and one that comes back is recorded again. So the follower knows who
    was newly suppressed even when it never saw the list without them."""

    def __init__(self, catalog, trait_names: Sequence[str] = ()):
        self.catalog = catalog
        self.trait_names = tuple(trait_names)
        self._version = catalog.version()
        self.list = Suppressions(catalog.privacy_key(), catalog.suppressed())
        self._added: dict[str, int] = {}  # hash -> generation it (last) entered the list at

    def refresh(self) -> bool:
        """Reload the list if the catalog changed; True when the list did."""
        version = self.catalog.version()  # before the read: a commit after it shows next time
        if version == self._version:
            return False
        self._version = version
        before = self.list.hashes
        if not self.list.replace(self.catalog.suppressed()):
            return False
        now, generation = self.list.hashes, self.list.generation
        for h in before - now:
            self._added.pop(h, None)
        for h in now - before:
            self._added[h] = generation
        return True

    def take_added(self, everyone: bool = False) -> dict[str, int]:
        """The hashes that entered the list since the last take (all of it, at generation
        0, if `everyone`), each with the generation it entered at; the record restarts."""
        added = ({h: self._added.get(h, 0) for h in self.list.hashes} if everyone
                 else self._added)
        self._added = {}
        return added

    def names(self, entry) -> bool:
        """Whether this log Entry is a suppressed person's (Suppressions.names)."""
        return self.list.names(entry.user_id, entry.anonymous_id, entry.body, self.trait_names)
