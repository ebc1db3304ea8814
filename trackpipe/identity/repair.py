"""Changing the past: undoing a bad merge, and forgetting a person (privacy delete)."""

from __future__ import annotations

import time
from collections.abc import Callable

from trackpipe.identity.graph import APPLIED, REFUSED, UNMERGED, Limits, rebuild
from trackpipe.identity.reads import lookup, members
from trackpipe.identity.store import Forgotten

_CONTRIBUTIONS = ("timeline", "traits", "groups")


def unmerge(db, limits: Limits, profile_id: str, merge_id: str | int,
            new_id: Callable[[], str]) -> list[str]:
    """Disable one applied edge of the profile for good, then rebuild the profile from its
    remaining edges (graph.rebuild). Returns the resulting profile ids, the oldest first."""
    pid = lookup(db, profile_id)
    if pid is None:
        raise LookupError(f"no profile {profile_id!r}")
    edge_id = _edge_id(merge_id)
    nodes = members(db, pid)
    ids = {n[0] for n in nodes}
    found = db.fetch("SELECT a, b, state FROM edges WHERE id = ?", (edge_id,))
    if not found or found[0][2] != APPLIED or not ({found[0][0], found[0][1]} & ids):
        raise LookupError(f"merge {merge_id!r} is not an applied merge of profile {pid}; "
                          f"list them with GET /api/v1/profiles/{pid}/merges")
    db.run("UPDATE edges SET state = ?, unmerged_at = ? WHERE id = ?",
           (UNMERGED, int(time.time() * 1000), edge_id))
    # Sorted here: fetch_in runs one query per chunk of identifiers, each in its own order,
    # and the rules must see the edges in the order they were recorded.
    edges = sorted(db.fetch_in("SELECT id, a, b, rule, joined FROM edges"
                               " WHERE state = 'applied' AND a IN ({})", sorted(ids)))
    components, merges, refused = rebuild(
        limits, [(n[0], n[1]) for n in nodes], [e for e in edges if e[2] in ids])
    db.many("UPDATE edges SET state = ?, refusal = ? WHERE id = ?",
            [(REFUSED, why, e) for e, why in refused])
    return _store_components(db, nodes, components, merges, pid, new_id)


def _edge_id(merge_id: str | int) -> int:
    text = str(merge_id).strip()
    text = text[1:] if text[:1] in ("m", "M") else text
    if not (text.isascii() and text.isdigit()) or len(text) > 18:  # beyond any SQLite id
        raise LookupError(f"{merge_id!r} is not a merge id; use an `id` such as \"m12\" from "
                          "the profile's merges")
    return int(text)


def _store_components(db, nodes, components, merges, old_pid, new_id) -> list[str]:
    kinds = {n[0]: n[1] for n in nodes}
    origins = {n[0]: n[3] for n in nodes}
    db.run("DELETE FROM profiles WHERE id = ?", (old_pid,))
    result = []
    for members_ in sorted(components):
        head = members_[0]
        pid = origins[head]
        if pid is None:  # an identifier that never headed a profile heads one now
            pid = new_id()
            db.run("UPDATE nodes SET origin = ? WHERE id = ?", (pid, head))
        db.many("UPDATE nodes SET profile = ? WHERE id = ?", [(pid, n) for n in members_])
        users = sum(1 for n in members_ if kinds[n] == "user_id")
        db.run("INSERT INTO profiles (id, head, nodes, users, merges) VALUES (?, ?, ?, ?, ?)",
               (pid, head, len(members_), users, merges[head]))
        result.append(pid)
    return result


def forget(db, ident: str) -> Forgotten | None:
    """Remove the person `ident` belongs to: identifiers, contributions, edges, profile."""
    pid = lookup(db, ident)
    if pid is None:
        return None
    nodes = members(db, pid)
    ids = [n[0] for n in nodes]
    positions = [r[0] for r in db.fetch_in("SELECT position FROM timeline WHERE node IN ({})",
                                           ids)]
    rows = [(i,) for i in ids]
    for table in _CONTRIBUTIONS:
        db.many(f"DELETE FROM {table} WHERE node = ?", rows)
    db.many("DELETE FROM edges WHERE a = ? OR b = ?", [(i, i) for i in ids])
    db.run("DELETE FROM nodes WHERE profile = ?", (pid,))
    db.run("DELETE FROM profiles WHERE id = ?", (pid,))
    return Forgotten([(n[1], n[2]) for n in nodes], sorted(set(positions)))
