"""Queries over the stored graph: a person's profile, timeline and merge history.

`ident` may be a profile id (current, or one that was merged away), a userId,
an anonymousId or a trait identifier's value; userId wins when one value is
both a userId and an anonymousId.
"""

from __future__ import annotations

from trackpipe.events import format_ts
from trackpipe.identity.facts import ANON, USER, normalize_trait
from trackpipe.identity.profiles import fold_counts, fold_groups, fold_traits

_KIND_ORDER = {USER: 0, ANON: 1}
# The `log` of timeline rows written before rows named their log (sql_store.py).
LEGACY = ""
Rows = list[tuple[int, str, str, str, str]]
"""Timeline rows as (position, log, ts, identifier kind, identifier value)."""


def lookup(db, ident: str) -> str | None:
    """The current profile id `ident` belongs to, or None."""
    if not isinstance(ident, str) or not ident:
        return None
    if ident.startswith("prof_"):
        rows = db.fetch("SELECT profile FROM nodes WHERE origin = ?", (ident,))
        if rows:
            return rows[0][0]
    rows = db.fetch("SELECT kind, profile FROM nodes WHERE value = ?", (ident,))
    if not rows and normalize_trait(ident) != ident:
        rows = [r for r in db.fetch("SELECT kind, profile FROM nodes WHERE value = ?",
                                    (normalize_trait(ident),)) if r[0] not in _KIND_ORDER]
    if not rows:
        return None
    return min(rows, key=lambda r: (_KIND_ORDER.get(r[0], 2), r[0]))[1]


def members(db, profile_id: str) -> list[tuple[int, str, str, str | None]]:
    """(node id, kind, value, origin) of the profile's identifiers, oldest first."""
    return db.fetch("SELECT id, kind, value, origin FROM nodes WHERE profile = ? ORDER BY id",
                    (profile_id,))


def profile(db, ident: str) -> dict | None:
    pid = lookup(db, ident)
    if pid is None:
        return None
    nodes = members(db, pid)
    ids = [n[0] for n in nodes]
    traits = db.fetch_in("SELECT path, value, ts, position FROM traits WHERE node IN ({})", ids)
    groups = db.fetch_in("SELECT group_id, traits, ts, position FROM groups WHERE node IN ({})",
                         ids)
    counts = db.fetch_in("SELECT kind, key, count(*) FROM timeline WHERE node IN ({}) "
                         "AND kind IS NOT NULL GROUP BY kind, key", ids)
    seen = db.fetch_in("SELECT min(ts), max(ts) FROM timeline WHERE node IN ({})", ids)
    event_counts, type_counts = fold_counts(counts)
    return {
        "profile_id": pid,
        "user_ids": [n[2] for n in nodes if n[1] == USER],
        "anonymous_ids": [n[2] for n in nodes if n[1] == ANON],
        "identifiers": [{"type": n[1], "value": n[2]} for n in nodes],
        "traits": fold_traits(traits),
        "groups": fold_groups(groups),
        "event_counts": event_counts,
        "type_counts": type_counts,
        "first_seen": min((r[0] for r in seen if r[0]), default=None),
        "last_seen": max((r[1] for r in seen if r[1]), default=None),
        "merged_profile_ids": sorted(n[3] for n in nodes if n[3] and n[3] != pid),
    }


def timeline(db, ident: str, cursor: str | None, limit: int, log: str
             ) -> tuple[Rows, str | None]:
    """The person's timeline rows of `log` and LEGACY (the caller keeps those of its log,
    see SQLStore.verify) in (timestamp, position) order, `limit` at a time."""
    pid = lookup(db, ident)
    if pid is None:
        return [], None
    after = _parse_cursor(cursor)
    nodes = {n[0]: (n[1], n[2]) for n in members(db, pid)}
    # In a shared store, a position's own row before a legacy one (`log` DESC: '' sorts
    # last), so that a page ending between the two has the one that counts. A store of one
    # log has '' only: its index's order is enough.
    order = "ts, position" if log == LEGACY else "ts, position, log DESC"
    rows = db.fetch(f"SELECT ts, position, log, node FROM timeline WHERE node IN "
                    f"({','.join('?' * len(nodes))}) AND log IN (?, ?) AND (ts, position) > (?, ?)"
                    f" ORDER BY {order} LIMIT ?", (*nodes, log, LEGACY, *after, limit + 1))
    page = rows[:limit]
    more = len(rows) > limit
    return ([(position, log_, ts, *nodes[node]) for ts, position, log_, node in page],
            f"{page[-1][0]}~{page[-1][1]}" if more else None)


def elsewhere(db, ident: str, log: str) -> dict[str, int]:
    """How many of the person's timeline rows each other log holds (not `log`, not LEGACY)."""
    pid = lookup(db, ident)
    if pid is None:
        return {}
    counts: dict[str, int] = {}
    ids = [n[0] for n in members(db, pid)]
    for other, n in db.fetch_in("SELECT log, count(*) FROM timeline WHERE log <> ? AND log <> ?"
                                " AND node IN ({}) GROUP BY log", ids, (log, LEGACY)):
        counts[other] = counts.get(other, 0) + n
    return dict(sorted(counts.items()))


def _parse_cursor(cursor: str | None) -> tuple[str, int]:
    if not cursor:
        return ("", 0)
    ts, sep, position = cursor.rpartition("~")
    # At most 18 digits: any log position, and always within SQLite's 64-bit integers. The
    # time is printable ASCII as every stored one is (PostgreSQL text cannot even hold NUL).
    if (not sep or not (position.isascii() and position.isdigit()) or len(position) > 18
            or len(ts) != 24 or not (ts.isascii() and ts.isprintable())):
        raise ValueError(f"The cursor {cursor!r} is not one a timeline page returned; pass the "
                         "`next` value of the previous page, or none for the first page.")
    return (ts, int(position))


def merges(db, ident: str) -> list[dict]:
    """Every merge, refused merge and unmerge touching the profile's identifiers, oldest first."""
    pid = lookup(db, ident)
    if pid is None:
        return []
    ids = [n[0] for n in members(db, pid)]
    rows = {}
    for column in ("a", "b"):
        for row in db.fetch_in(_EDGES.format(column=column), ids):
            rows[row[0]] = row
    records = []
    for row in sorted(rows.values()):
        records.extend(_records(row))
    return records


_EDGES = """SELECT e.id, e.rule, e.state, e.refusal, e.from_profile, e.to_profile, e.position,
    e.message_id, e.ts, e.unmerged_at, na.kind, na.value, nb.kind, nb.value
    FROM edges e JOIN nodes na ON na.id = e.a JOIN nodes nb ON nb.id = e.b
    WHERE e.{column} IN ({{}})"""


def _records(row: tuple) -> list[dict]:
    (edge_id, rule, state, refusal, src, dst, position, message_id, ts, unmerged_at,
     kind_a, value_a, kind_b, value_b) = row
    identifiers = [{"type": kind_a, "value": value_a}, {"type": kind_b, "value": value_b}]
    record = {"id": f"m{edge_id}", "at": ts, "position": position, "message_id": message_id,
              "kind": "refused" if state == "refused" else "merge",
              "rule": refusal if state == "refused" else rule, "edge": rule,
              "from": src, "to": dst, "identifiers": identifiers}
    if state != "unmerged":
        return [record]
    undo = {**record, "id": f"u{edge_id}", "kind": "unmerge", "rule": "unmerged",
            "at": format_ts(unmerged_at)}
    return [record, undo]


def stats(db) -> dict:
    blocked = db.fetch("SELECT n FROM stats WHERE name = 'blocked'")
    return {
        "profiles": db.fetch("SELECT count(*) FROM profiles")[0][0],
        "identifiers": db.fetch("SELECT count(*) FROM nodes")[0][0],
        "blocked": blocked[0][0] if blocked else 0,
        "refused": db.fetch("SELECT count(*) FROM edges WHERE state = 'refused'")[0][0],
    }
