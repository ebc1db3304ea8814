"""The identity store over SQL, shared by the SQLite and PostgreSQL backends.

A backend supplies a connection wrapper (Db: fetch/run/many with `?`
placeholders), its transactions and its caching policy; everything else —
loading the nodes a batch names, the rules (graph.py), the writes, the reads —
is written once here. Every apply() is one transaction that also moves the
store's log position, so a crash never applies a position twice.

Each timeline row names the log its position is in (`log`): positions are
numbers in one node's log, and nodes sharing a store each have their own log.
A node shows and erases by position only its own log's rows (`self.log`); the
other logs' rows are counted (elsewhere), and a forget asks their nodes to
erase theirs (erasures). LEGACY ('') is the log of rows written before logs
were named: in the SQLite store, which has one log, that log is its own; in a
shared store it is unknown, and a row of it counts as this node's only when
the entry at its position in this node's log is the event that made it
(`verify`).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager

import msgspec

from trackpipe.identity import reads, repair
from trackpipe.identity.facts import ANON, LEAN_TYPES, USER, Fact, Reader
from trackpipe.identity.graph import Changes, Graph, Limits, Node, Profile, rebuild
from trackpipe.identity.reads import LEGACY, Rows, members
from trackpipe.identity.store import (CONSUMER, Erasure, Forgotten, IdentityStore, ReadLog,
                                      Resolved, new_profile_id)
from trackpipe.log.base import Entry

CHUNK = 500  # values per IN (...) list


def marks(n: int) -> str:
    return ",".join("?" * n)


def chunks(values: Sequence, size: int = CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(values), size):
        yield values[i:i + size]


class Db(ABC):
    """A connection that speaks `?` placeholders; backends subclass it."""

    @abstractmethod
    def fetch(self, sql: str, params: Sequence = ()) -> list[tuple]: ...

    @abstractmethod
    def run(self, sql: str, params: Sequence = ()) -> None: ...

    @abstractmethod
    def many(self, sql: str, rows: Sequence[Sequence]) -> None: ...

    def insert(self, head: str, rows: Sequence[Sequence], tail: str = "") -> None:
        """`head` is "INSERT INTO t (columns)"; `tail` e.g. an ON CONFLICT clause."""
        if rows:
            self.many(f"{head} VALUES ({marks(len(rows[0]))}) {tail}", rows)

    def relabel(self, moves: dict[str, str]) -> None:
        """Every node of profile `old` now belongs to profile `moves[old]`."""
        self.many("UPDATE nodes SET profile = ? WHERE profile = ?",
                  [(new, old) for old, new in moves.items()])

    def delete_profiles(self, ids: Sequence[str]) -> None:
        self.many("DELETE FROM profiles WHERE id = ?", [(p,) for p in ids])

    def fetch_in(self, sql: str, values: Sequence, before: Sequence = ()) -> list[tuple]:
        """`sql` holds one `{}` where the IN list goes; run it over chunks of `values`."""
        out: list[tuple] = []
        values = list(values)
        for part in chunks(values):
            out.extend(self.fetch(sql.format(marks(len(part))), (*before, *part)))
        return out


# Facts applied in the first pass after a batch rebuilt a profile, doubling in each pass
# after it (see SQLStore._apply).
AFTER_REBUILD_STEP = 8

class SQLStore(IdentityStore):
    def __init__(self, settings, consumer: str, log: str = LEGACY):
        self.consumer = consumer
        self.log = log  # the name this store's timeline rows give this node's log
        self.limits = Limits.from_settings(settings)
        self.reader = Reader(settings.trait_identifiers)
        self.trait_keys = [msgspec.json.encode(name) for name in settings.trait_identifiers]
        self.lean_types = () if settings.trait_identifiers else LEAN_TYPES
        self.lock = threading.RLock()
        self.db: Db

    # -- what a backend provides -----------------------------------------------------

    @abstractmethod
    def write_tx(self) -> AbstractContextManager[None]:
        """A transaction that no other writer of this store runs beside."""

    @abstractmethod
    def read_tx(self) -> AbstractContextManager[None]:
        """A transaction that sees one consistent snapshot."""

    @abstractmethod
    def working_graph(self) -> Graph:
        """The graph to apply a batch to: a still-valid cache, or a fresh one."""

    @abstractmethod
    def node_ids(self, n: int) -> list[int]:
        """n unused node ids, increasing."""

    def forget_cache(self) -> None:
        """Drop cached graph state (after unmerge/forget, or a failed apply)."""

    # -- applying the log --------------------------------------------------------------

    def position(self) -> int:
        with self.lock, self.read_tx():
            return self._position()

    def _position(self) -> int:
        rows = self.db.fetch("SELECT position FROM positions WHERE consumer = ?", (self.consumer,))
        return rows[0][0] if rows else 0

    def apply(self, entries: Sequence[Entry]) -> None:
        with self.lock:
            try:
                with self.write_tx():
                    self._apply(entries)
            except BaseException:
                self.forget_cache()  # the working set saw changes that rolled back
                raise

    def _apply(self, entries: Sequence[Entry]) -> None:
        done = self._position()
        todo = [e for e in entries if e.position > done]
        if not todo:
            return
        graph = self.working_graph()
        # The events of settled pairs come back as their timeline rows: once settled, a
        # pair stays so (graph.py `_settled`), so the rules would find just that. A rebuild
        # below keeps them right too: a row belongs to a node, and the node stays.
        facts, rows = self.reader.facts(todo, graph.settled)
        changes = self._apply_facts(graph, facts)
        changes.contributions.timeline.extend(rows)
        self._write(graph, changes)
        pending: list[Fact] = []
        step = AFTER_REBUILD_STEP
        while changes.contested is not None or pending:
            if changes.contested is not None:
                # A previousId becomes a userId that rule 1 keeps apart from its profile's
                # userId (graph.py `Contested`): its profile is rebuilt from the rows written
                # so far, then the working set, now out of date, is read again.
                repair.retype(self.db, self.limits, changes.contested.id, new_profile_id)
                self.forget_cache()
                pending = changes.rest + pending
                step = AFTER_REBUILD_STEP
            else:
                step *= 2
            # After a rebuild the rest goes a slice at a time, small at first: the next
            # rebuild then reads again only what one slice names, not the whole rest of the
            # batch (hundreds of rebuilds in one batch would cost their number times it).
            part, pending = pending[:step], pending[step:]
            graph = self.working_graph()
            changes = self._apply_facts(graph, part)
            self._write(graph, changes)
        self.db.run("INSERT INTO positions (consumer, position) VALUES (?, ?) ON CONFLICT "
                    "(consumer) DO UPDATE SET position = excluded.position",
                    (self.consumer, todo[-1].position))

    def _apply_facts(self, graph: Graph, facts: list[Fact]) -> Changes:
        """Load what the facts name into the graph and apply them (graph.apply)."""
        missing = graph.missing(facts)
        # A new userId may be a stored anonymousId only an alias named (graph.py `_as_user`).
        # One the working set holds is not loaded again: its node object (and what it knows,
        # such as whether it stays an anonymousId) is the one settled pairs rely on.
        self._load(graph, missing | {(ANON, v) for kind, v in missing
                                     if kind == USER and (ANON, v) not in graph.nodes})
        self._tell_previous_only(graph, graph.undecided(facts, missing))
        new = sum(1 for key in missing if key not in graph.nodes)  # at most this many nodes
        ids = iter(self.node_ids(new))
        graph.new_node_id = ids.__next__
        return graph.apply(facts)

    def _load(self, graph: Graph, keys: set[tuple[str, str]]) -> None:
        """Bring the nodes named by `keys`, their profiles and their edges into the graph."""
        if not keys:
            return
        rows = self.db.fetch_in("SELECT id, kind, value, profile, origin FROM nodes "
                                "WHERE value IN ({})", sorted({v for _, v in keys}))
        loaded = [Node(*row) for row in rows if (row[1], row[2]) in keys]
        for node in loaded:
            graph.nodes[(node.kind, node.value)] = node
        wanted = sorted({n.profile for n in loaded if n.profile not in graph.profiles})
        for row in self.db.fetch_in("SELECT id, head, nodes, users, merges FROM profiles "
                                    "WHERE id IN ({})", wanted):
            graph.profiles[row[0]] = Profile(*row)
        ids = [n.id for n in loaded]
        for column in ("a", "b"):
            graph.edges.update(self.db.fetch_in(
                f"SELECT a, b, rule FROM edges WHERE {column} IN ({{}})", ids))

    def _tell_previous_only(self, graph: Graph, nodes: list[Node]) -> None:
        """Set whether each of these stored anonymousIds was only ever an alias's previousId:
        an event naming it gave it a timeline row (it owned the event) or a user_anonymous
        edge (the event's userId did), and an alias's previousId neither."""
        if not nodes:
            return
        ids = [n.id for n in nodes]
        seen = {n for (n,) in self.db.fetch_in(
            "SELECT DISTINCT node FROM timeline WHERE node IN ({})", ids)}
        for column in ("a", "b"):
            seen.update(n for (n,) in self.db.fetch_in(
                f"SELECT {column} FROM edges WHERE rule <> 'alias' AND {column} IN ({{}})", ids))
        for node in nodes:
            node.previous_only = False
            if node.id not in seen:
                graph.await_user(node, contested=not self._may_be_user(graph, node))

    def _may_be_user(self, graph: Graph, node: Node) -> bool:
        """Whether the rules, replayed over the profile's edges (graph.rebuild), refuse no
        more with `node` a userId than as the anonymousId it is: else it is contested
        (graph.py `_contest`). Compared edge by edge, not counted: caps lowered since the
        edges were applied make the replay as it is refuse some too, and the two replays
        may refuse as many but different edges. And by rule: an edge refused for a cap as
        it is but for rule 1 with `node` a userId would still join two userIds."""
        profile = graph.profiles[graph.profile_of(node)]
        if not profile.users:
            return True
        nodes = [(n[0], n[1]) for n in members(self.db, profile.id)]
        ids = {n for n, _ in nodes}
        edges = sorted(e for e in self.db.fetch_in(
            "SELECT id, a, b, rule, joined FROM edges WHERE state = 'applied' AND a IN ({})",
            sorted(ids)) if e[2] in ids)
        as_user = [(n, USER if n == node.id else kind) for n, kind in nodes]
        return (set(rebuild(self.limits, as_user, edges)[2])
                <= set(rebuild(self.limits, nodes, edges)[2]))

    def _write(self, graph: Graph, ch: Changes) -> None:
        db = self.db
        # Retyped first: a new anonymousId of the same value may be among the new nodes.
        if ch.retyped:
            db.many("UPDATE nodes SET kind = ? WHERE id = ?", [(n.kind, n.id) for n in ch.retyped])
        db.insert("INSERT INTO nodes (id, kind, value, profile, origin)",
                  [(n.id, n.kind, n.value, n.profile, n.origin) for n in ch.new_nodes])
        # Each absorbed profile's nodes go straight to the profile that survives the batch
        # (the same end state as replaying the merges in order).
        db.relabel({old: graph.find(old) for old, _ in ch.relabels})
        db.delete_profiles(sorted(ch.dead))
        live = [graph.profiles[p] for p in sorted(ch.dirty - ch.dead)]
        db.insert("INSERT INTO profiles (id, head, nodes, users, merges)",
                  [(p.id, p.head, p.nodes, p.users, p.merges) for p in live],
                  "ON CONFLICT (id) DO UPDATE SET head = excluded.head, nodes = excluded.nodes, "
                  "users = excluded.users, merges = excluded.merges")
        db.insert("INSERT INTO edges (a, b, rule, state, refusal, joined, from_profile, "
                  "to_profile, position, message_id, ts)", ch.edges,
                  "ON CONFLICT (a, b, rule) DO NOTHING")
        self._write_contributions(ch)
        if ch.blocked:
            db.run("INSERT INTO stats (name, n) VALUES ('blocked', ?) ON CONFLICT (name) "
                   "DO UPDATE SET n = stats.n + excluded.n", (ch.blocked,))

    def _write_contributions(self, ch: Changes) -> None:
        c, db = ch.contributions, self.db
        # Rows go in key order: neighbouring inserts then share B-tree pages.
        c.timeline.sort()
        self._write_timeline(c.timeline)
        for table, key in (("traits", "path"), ("groups", "group_id")):
            value = "value" if table == "traits" else "traits"
            db.insert(f"INSERT INTO {table} (node, {key}, {value}, ts, position)",
                      [(*k, *v) for k, v in sorted(getattr(c, table).items())],
                      f"ON CONFLICT (node, {key}) DO UPDATE SET {value} = excluded.{value}, "
                      "ts = excluded.ts, position = excluded.position WHERE "
                      f"(excluded.ts, excluded.position) > ({table}.ts, {table}.position)")

    @abstractmethod
    def _write_timeline(self, rows: list[tuple]) -> None:
        """Insert timeline rows (node, ts, position, kind, key) of this node's log; one
        already there is kept (a position applied again). A store several logs share also
        claims the matching row of no known log (see PostgresStore)."""

    # -- the delivery path -------------------------------------------------------------

    def resolve_many(self, pairs: Sequence[tuple[str | None, str | None]]) -> list[str | None]:
        with self.lock, self.read_tx():
            graph = self.working_graph()
            keys = {(USER, u) for u, _ in pairs if u} | {(ANON, a) for _, a in pairs if a}
            self._load(graph, {k for k in keys if k not in graph.nodes})
            return [self._resolve(graph, u, a) for u, a in pairs]

    @staticmethod
    def _resolve(graph: Graph, user_id: str | None, anonymous_id: str | None) -> str | None:
        for key in ((USER, user_id), (ANON, anonymous_id)):
            node = graph.nodes.get(key) if key[1] else None
            if node is not None:
                return graph.profile_of(node)
        return None

    def resolve_entries(self, entries: Sequence[Entry]) -> list[Resolved]:
        named = [self._named(e) for e in entries]
        with self.lock, self.read_tx():
            held = self._held({key for ids in named for keys in ids for key in keys})
        return [Resolved(held.get((USER, e.user_id)) or held.get((ANON, e.anonymous_id)),
                         self._holders(held, ids)) for e, ids in zip(entries, named)]

    def _held(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """key -> profile id of each of these identifiers the store holds: from the working
        set, and the others in one query of their nodes alone (their edges and profiles,
        which apply() needs, are not read, and the working set does not keep them)."""
        graph = self.working_graph()
        held = {key: graph.profile_of(graph.nodes[key]) for key in keys if key in graph.nodes}
        rest = keys - held.keys()
        if rest:
            for kind, value, profile in self.db.fetch_in(
                    "SELECT kind, value, profile FROM nodes WHERE value IN ({})",
                    sorted({value for _, value in rest})):
                if (kind, value) in rest:
                    held[(kind, value)] = profile
        return held

    def _named(self, entry: Entry) -> list[tuple[tuple[str, str], ...]]:
        """The identifiers `entry` names, each as the keys the store may hold it under, in
        the order apply() looks them up: a previousId is a userId, else an anonymousId."""
        named: list[tuple[tuple[str, str], ...]] = []
        if entry.user_id:
            named.append(((USER, entry.user_id),))
        if entry.anonymous_id:
            named.append(((ANON, entry.anonymous_id),))
        if not self._may_name_others(entry):
            return named  # decoding its body would find no one else
        fact = self.reader.fact(entry)
        if fact.previous:
            named.append(((USER, fact.previous), (ANON, fact.previous)))
        named.extend((key,) for key in fact.trait_ids)
        return named

    def _may_name_others(self, entry: Entry) -> bool:
        """Whether the body may name a previousId (an alias) or a trait identifier: the log
        holds it as the collector encoded it (msgspec), so a trait's key is spelt in it as
        encoded here (privacy/names.py relies on the same)."""
        if not entry.body:
            return False
        return entry.type == "alias" or any(key in entry.body for key in self.trait_keys)

    @staticmethod
    def _holders(held: dict[tuple[str, str], str], named: list[tuple[tuple[str, str], ...]]
                 ) -> dict[tuple[str, str], str]:
        """(kind, value) -> profile id of each named identifier the store holds (a blocked
        value, never a node, is no one's)."""
        found = {}
        for keys in named:
            for key in keys:
                if key in held:
                    found[key] = held[key]
                    break
        return found

    # -- queries and repairs (reads.py, repair.py) ------------------------------------

    def profile(self, ident: str) -> dict | None:
        with self.lock, self.read_tx():
            return reads.profile(self.db, ident)

    def timeline(self, ident: str, cursor: str | None = None, limit: int = 100,
                 read: ReadLog | None = None) -> tuple[list[int], str | None]:
        with self.lock, self.read_tx():
            rows, nxt = reads.timeline(self.db, ident, cursor, limit, self.log)
        own = self.verify(rows, read)
        return [r[0] for r in rows if r[0] in own], nxt

    def elsewhere(self, ident: str) -> dict[str, int]:
        if self.log == LEGACY:
            return {}  # a store of one log: no other log holds any of the person's events
        with self.lock, self.read_tx():
            return reads.elsewhere(self.db, ident, self.log)

    def verify(self, rows: Rows, read: ReadLog | None) -> set[int]:
        """The positions of `rows` ((position, log, ts, kind, value)) in this node's log:
        its own rows', and a legacy row's when the entry at its position in this log (read
        by `read`) is the event that made it: same timestamp, naming that identifier."""
        own = {r[0] for r in rows if r[1] == self.log}
        legacy = [r for r in rows if r[1] == LEGACY and r[0] not in own]
        if not legacy or read is None:
            return own
        entries = {e.position: e for e in read(sorted({r[0] for r in legacy}))}
        for position, _, ts, kind, value in legacy:
            entry = entries.get(position)
            if entry is None:
                continue
            fact = self.reader.fact(entry)
            if fact.ts == ts and (kind, value) in {(USER, fact.user), (ANON, fact.anon),
                                                   *fact.trait_ids}:
                own.add(position)
        return own

    def merges(self, ident: str) -> list[dict]:
        with self.lock, self.read_tx():
            return reads.merges(self.db, ident)

    def stats(self) -> dict:
        with self.lock, self.read_tx():
            return reads.stats(self.db)

    def unmerge(self, profile_id: str, merge_id: str | int) -> list[str]:
        with self.lock:
            self.forget_cache()
            with self.write_tx():
                return repair.unmerge(self.db, self.limits, profile_id, merge_id, new_profile_id)

    def forget(self, ident: str, read: ReadLog | None = None) -> Forgotten | None:
        with self.lock:
            self.forget_cache()
            with self.write_tx():
                return repair.forget(self.db, ident, lambda rows: self.verify(rows, read),
                                     self._others() if self.log != LEGACY else None)

    def forget_ids(self, pairs: Sequence[tuple[str, str]], read: ReadLog | None = None
                   ) -> list[Forgotten]:
        """Forget the profiles holding these exact (kind, value) identifiers, asking no
        other node (see repair.forget_ids): a delete another node asked this one for."""
        with self.lock:
            self.forget_cache()
            with self.write_tx():
                return repair.forget_ids(self.db, list(pairs), lambda rows: self.verify(rows, read))

    # -- privacy deletes other nodes asked for (one store, several logs) ---------------

    def _others(self) -> list[str]:
        """The other logs applied to this store: the other nodes' positions (not the name
        every node used before node ids, which is no one log)."""
        return [c for (c,) in self.db.fetch("SELECT consumer FROM positions")
                if c not in (self.consumer, self.log, CONSUMER)]

    def ask_others(self, ids: Sequence[tuple[str | None, str]]) -> int:
        """Ask every other node to erase these identifiers' events from its log (a delete
        of ids the store has no profile for: another node may have events of them it has
        not applied yet). Returns how many nodes were asked."""
        if self.log == LEGACY:
            return 0
        with self.lock, self.write_tx():
            return repair.ask(self.db, list(ids), {log: [] for log in self._others()})

    def erasures(self) -> list[Erasure]:
        if self.log == LEGACY:
            return []  # one log, no one else to ask
        with self.lock:
            with self.read_tx():
                asked, unwanted = repair.erasures(self.db, self.log), repair.unwanted(self.db)
            if unwanted:  # a retired node's part removed by an operator (README Privacy)
                with self.write_tx():
                    repair.sweep(self.db)
            return asked

    def erased(self, erasure_id: int) -> None:
        with self.lock, self.write_tx():
            repair.erased(self.db, erasure_id, self.log)
