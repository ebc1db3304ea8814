"""Changing the past: undoing a bad merge, a previousId becoming the userId it was
(graph.py `Contested`), and forgetting a person (privacy delete)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from trackpipe.identity.facts import ANON, USER
from trackpipe.identity.graph import APPLIED, REFUSED, UNMERGED, Limits, rebuild
from trackpipe.identity.reads import LEGACY, Rows, lookup, members
from trackpipe.identity.store import Erasure, Forgotten

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
    return _replay(db, limits, pid, nodes, new_id)


def retype(db, limits: Limits, node: int, new_id: Callable[[], str]) -> list[str]:
    """Make the anonymousId `node`, which only an alias's previousId named, the userId of its
    value, and rebuild its profile as if it had been that userId from the start
    (graph.py `Contested`): the edges the rules now refuse are refused, and the profile
    may split. Returns the resulting profile ids, the oldest first."""
    db.run("UPDATE nodes SET kind = ? WHERE id = ?", (USER, node))
    pid = db.fetch("SELECT profile FROM nodes WHERE id = ?", (node,))[0][0]
    return _replay(db, limits, pid, members(db, pid), new_id)


def _replay(db, limits: Limits, pid: str, nodes, new_id: Callable[[], str]) -> list[str]:
    """Rebuild profile `pid` of `nodes` from its applied edges (graph.rebuild)."""
    ids = {n[0] for n in nodes}
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


def forget(db, ident: str, verify: Callable[[Rows], set[int]], others: list[str] | None
           ) -> Forgotten | None:
    """Remove the person `ident` belongs to: identifiers, contributions, edges, profile.
    The positions returned are this node's log's (`verify` picks them from the person's
    timeline rows); each log of `others` (the other nodes', or None when there are none)
    is asked, in the same transaction, to erase the person's events from that log: the
    positions its rows held, and whatever names these identifiers."""
    pid = lookup(db, ident)
    return None if pid is None else _forget_profile(db, pid, verify, others)


def forget_ids(db, pairs: list[tuple[str, str]], verify: Callable[[Rows], set[int]]
               ) -> list[Forgotten]:
    """Remove the profiles holding one of these exact (kind, value) identifiers: a delete
    another node asked for names the person's identifiers with their kinds, and a bare
    value may be someone else's (their userId spelt like this person's anonymousId).
    The other nodes are not asked again: the node the delete was sent to asked them all."""
    pids = sorted({pid for kind, value in pairs for (pid,) in db.fetch(
        "SELECT profile FROM nodes WHERE kind = ? AND value = ?", (kind, value))})
    return [_forget_profile(db, pid, verify, None) for pid in pids]


def _forget_profile(db, pid: str, verify: Callable[[Rows], set[int]], others: list[str] | None
                    ) -> Forgotten:
    nodes = members(db, pid)
    ids = [n[0] for n in nodes]
    named = {n[0]: (n[1], n[2]) for n in nodes}
    timeline = db.fetch_in("SELECT position, log, ts, node FROM timeline WHERE node IN ({})", ids)
    rows = [(position, log, ts, *named[node]) for position, log, ts, node in timeline]
    positions = verify(rows)
    identifiers = _identifiers(db, nodes, {row[3] for row in timeline})
    for table in _CONTRIBUTIONS:
        db.many(f"DELETE FROM {table} WHERE node = ?", [(i,) for i in ids])
    db.many("DELETE FROM edges WHERE a = ? OR b = ?", [(i, i) for i in ids])
    db.run("DELETE FROM nodes WHERE profile = ?", (pid,))
    db.run("DELETE FROM profiles WHERE id = ?", (pid,))
    asked = 0
    if others is not None:
        theirs: dict[str, set[int]] = {log: set() for log in others}
        for position, log, *_ in rows:
            if log in theirs:
                theirs[log].add(position)
        # Rows of no known log that are not this node's may be any other node's: each
        # checks them against its own log (SQLStore.verify).
        legacy = [r for r in rows if r[1] == LEGACY and r[0] not in positions]
        asked = ask(db, identifiers, {log: sorted(p) for log, p in theirs.items()}, legacy)
    return Forgotten(identifiers, sorted(positions), asked)


def _identifiers(db, nodes, owners: set[int]) -> list[tuple[str | None, str]]:
    """(kind, value) of each identifier; kind None (either reading) for an anonymousId only
    an alias's previousId named (graph.py `_as_user`): an event of the log not applied yet
    may name it as the userId it turns into."""
    anons = [n[0] for n in nodes if n[1] == ANON and n[0] not in owners]
    named = set()
    for column in ("a", "b"):
        named.update(n for (n,) in db.fetch_in(
            f"SELECT {column} FROM edges WHERE rule <> 'alias' AND {column} IN ({{}})", anons))
    either = set(anons) - named
    return [(None if n[0] in either else n[1], n[2]) for n in nodes]


# -- a delete other nodes carry out (privacy/erase.py) --------------------------------------

def ask(db, identifiers: list[tuple[str | None, str]], positions: dict[str, list[int]],
        legacy: Rows = ()) -> int:
    """Keep an erase request for each log of `positions`: the identifiers, the positions
    of the person's events in that log, and the `legacy` rows for it to check. Returns
    how many logs were asked."""
    if not positions:
        return 0
    rows = db.fetch("INSERT INTO erasures (ids, legacy, created_at) VALUES (?, ?, ?) "
                    "RETURNING id", (json.dumps([list(i) for i in identifiers]),
                                     json.dumps([list(r) for r in legacy]),
                                     int(time.time() * 1000)))
    erasure = rows[0][0]
    db.many("INSERT INTO erasure_logs (erasure, log, positions) VALUES (?, ?, ?)",
            [(erasure, log, json.dumps(p)) for log, p in sorted(positions.items())])
    return len(positions)


def erasures(db, log: str) -> list[Erasure]:
    """The erase requests still waiting for `log`, oldest first."""
    rows = db.fetch("SELECT e.id, e.ids, l.positions, e.legacy FROM erasure_logs l JOIN"
                    " erasures e ON e.id = l.erasure WHERE l.log = ? ORDER BY e.id", (log,))
    return [Erasure(i, [(k, v) for k, v in json.loads(ids)], json.loads(positions),
                    [tuple(r) for r in json.loads(legacy)])
            for i, ids, positions, legacy in rows]


def erased(db, erasure: int, log: str) -> None:
    """`log` did its part; a request no log still waits for is removed with its ids."""
    db.run("DELETE FROM erasure_logs WHERE erasure = ? AND log = ?", (erasure, log))
    sweep(db)


_UNWANTED = "FROM erasures WHERE NOT EXISTS" \
            " (SELECT 1 FROM erasure_logs WHERE erasure_logs.erasure = erasures.id)"


def unwanted(db) -> bool:
    """Whether some request is no longer waited for by any log (an operator removed a
    retired node's part, see README Privacy): its ids are to go."""
    return bool(db.fetch(f"SELECT 1 {_UNWANTED} LIMIT 1"))


def sweep(db) -> None:
    """Remove the requests no log still waits for, with the person's ids they hold."""
    db.run(f"DELETE {_UNWANTED}")
