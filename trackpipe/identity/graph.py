"""The identity graph: which identifiers are one person, and the rules that say so.

Nodes are identifiers: a `user_id`, an `anonymous_id`, or a configured trait
identifier such as `email` (trimmed, lower-cased). Edges come from events:

- `user_anonymous`: an event of any type carrying both userId and anonymousId;
- `alias`: an alias call, from previousId to userId, or to anonymousId when
  the call has no userId (the reference's SDKs accept that; userId ==
  previousId, as analytics-next sends it, is a no-op). previousId is the
  known userId of that value, else the known anonymousId, else a new
  identifier known only as a previousId: it is kept as an anonymousId (the
  usual alias: a visitor's anonymous id to the id they sign up with) until
  an event names it, and the first event naming it as a userId makes it
  that userId, edges and all. So an alias that arrives before the events of
  the userId it names joins them as it would have after them. When its
  profile has since gained a userId through an edge that rule 1 below would
  have refused had it been a userId (a shared anonymousId, a trait), the
  profile is rebuilt (`rebuild`) as if it had been that userId from the
  start: the edges the rules now refuse are recorded refused, and the
  profile may split (the store does it, see `Contested`);
- `trait`: a trait identifier (identify traits / context.traits) to the
  event's userId, or its anonymousId when it has no userId.

Each connected set of identifiers is one profile. Its id ("prof_...") is the
id first given to its oldest identifier, so when two profiles merge the OLDER
id survives and the younger one keeps resolving to it (merged_profile_ids).

Rules, checked in this order when an edge would join two profiles:

1. `distinct_user_ids`: two profiles that both hold a userId are never joined
   by a shared anonymousId or trait identifier; only an `alias` joins them.
2. `max_identifiers`: the joined profile would hold more identifiers than
   `max_identifiers_per_profile`.
3. `max_merges`: the joined profile would have absorbed more than
   `max_merges_per_profile` other profiles (attaching a brand-new identifier
   is not a merge).

A refused edge is recorded (kind "refused", with its rule) and never applied;
the event still belongs to its userId's profile (else its anonymousId's).
Blocked values (`blocked_values`, trimmed, case-insensitive) never become
nodes; they are only counted. Each distinct edge is recorded once: seeing it
again changes nothing, so an edge refused or unmerged stays that way.

Example: anonymous `a1` views pages, then `identify(userId="u1")` from the
same browser joins a1 and u1 into one profile; the pages stay in u1's
timeline. If `u2` later logs in on that browser (a1 with u2), the edge is
refused (`distinct_user_ids`) and u2's events go to u2's own profile.
`alias(previousId="u1", userId="u2")` would join them explicitly.

`rebuild` replays a profile's recorded edges (minus an unmerged one) in their
original order under the same rules, so an unmerge never leaves a profile
that the rules would not have built; nor does a previousId made a userId.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from trackpipe.identity.facts import ANON, NO_COUNT, USER, Fact
from trackpipe.identity.profiles import Contributions

APPLIED, REFUSED, UNMERGED = "applied", "refused", "unmerged"


class Limits:
    def __init__(self, blocked: Iterable[str], max_identifiers: int, max_merges: int):
        self.blocked = frozenset(v.strip().lower() for v in blocked)
        self.max_identifiers = max_identifiers
        self.max_merges = max_merges

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls(settings.blocked_values, settings.max_identifiers_per_profile,
                   settings.max_merges_per_profile)

    def is_blocked(self, value: str) -> bool:
        return value.strip().lower() in self.blocked


class Node:
    __slots__ = ("born", "id", "kind", "origin", "previous_only", "profile", "value")

    def __init__(self, id: int, kind: str, value: str, profile: str, origin: str | None,
                 born: int = -1):
        self.id, self.kind, self.value = id, kind, value
        self.profile, self.origin = profile, origin
        self.born = born  # position of the fact that created it in this batch, else -1
        # An anonymousId only an alias's previousId named so far (see `_as_user`); None:
        # loaded and not asked yet (the store tells, see `undecided`).
        self.previous_only: bool | None = None


class Profile:
    __slots__ = ("head", "id", "merges", "nodes", "users")

    def __init__(self, id: str, head: int, nodes: int, users: int, merges: int):
        self.id, self.head, self.nodes, self.users, self.merges = id, head, nodes, users, merges


class Contested(Exception):
    """A previousId-only anonymousId that an event names as a userId, made a userId in place,
    might join two userIds through an edge rule 1 refuses (see `_contest`): apply() stops
    before that event, for the store to rebuild the profile with it a userId from the start
    (repair.retype), and then to apply the rest."""

    def __init__(self, node: Node):
        super().__init__(node.value)
        self.node = node


class Changes:
    """Everything one apply() writes, in one transaction."""

    def __init__(self):
        self.new_nodes: list[Node] = []
        self.retyped: list[Node] = []  # previousId-only anonymousIds that became userIds
        self.relabels: list[tuple[str, str]] = []  # (absorbed profile, survivor), in order
        self.dirty: set[str] = set()
        self.dead: set[str] = set()
        self.edges: list[tuple] = []  # (a, b, rule, state, refusal, joined, from, to, pos, mid, ts)
        self.contributions = Contributions()
        self.blocked = 0
        # Set when apply() stopped at a `Contested` node: it, and the facts not applied.
        self.contested: Node | None = None
        self.rest: list[Fact] = []


class Graph:
    """The working set of nodes and profiles, and the merge rules applied to facts.

    The store loads the nodes a batch names (`missing`), then `apply` mutates
    the working set and collects the writes in a Changes.
    """

    def __init__(self, limits: Limits, new_node_id: Callable[[], int],
                 new_profile_id: Callable[[], str]):
        self.limits = limits
        self.new_node_id = new_node_id
        self.new_profile_id = new_profile_id
        self.nodes: dict[tuple[str, str], Node] = {}
        self.profiles: dict[str, Profile] = {}
        self.redirect: dict[str, str] = {}  # absorbed profile id -> survivor, for cached nodes
        self.edges: set[tuple[int, int, str]] = set()
        # Per profile, its previousId-only anonymousIds not contested yet, and the ids of
        # the contested ones (see `_contest`).
        self.awaiting: dict[str, list[Node]] = {}
        self.contested: set[int] = set()
        # (userId, anonymousId) -> the node owning an event that names just these, for
        # pairs whose events change nothing but their timeline rows (see `_settled`).
        self.settled: dict[tuple[str | None, str | None], int] = {}

    def missing(self, facts: list[Fact]) -> set[tuple[str, str]]:
        """Identifier keys the facts name that the working set does not hold yet."""
        nodes, settled, keys = self.nodes, self.settled, set()
        # Facts unpacked, not read by name (a NamedTuple's field read is a descriptor call):
        # this runs once per event.
        for _, _, _, _, _, user, anon, previous, trait_ids, _, _ in facts:
            if (user, anon) not in settled:  # a settled pair's ids are held
                if user and (USER, user) not in nodes:
                    keys.add((USER, user))
                if anon and (ANON, anon) not in nodes:
                    keys.add((ANON, anon))
            if previous:
                keys.update(((USER, previous), (ANON, previous)))
            if trait_ids:
                keys.update(trait_ids)
        return {k for k in keys if k not in nodes}

    def undecided(self, facts: list[Fact], missing: set[tuple[str, str]]) -> list[Node]:
        """Loaded anonymousIds that a userId of these facts turns into if they were only ever
        an alias's previousId, and that the working set cannot tell: the store sets their
        `previous_only` before apply(). `missing`: what the facts named that the working
        set did not hold before the store loaded it (none of their userIds: no such node)."""
        if not any(kind == USER for kind, _ in missing):
            return []
        nodes, found = self.nodes, {}
        for f in facts:
            if f.user and (USER, f.user) not in nodes:
                node = nodes.get((ANON, f.user))
                if node is not None and node.previous_only is None:
                    found[node.id] = node
        return list(found.values())

    def find(self, profile_id: str) -> str:
        redirect = self.redirect
        while profile_id in redirect:
            profile_id = redirect[profile_id]
        return profile_id

    def profile_of(self, node: Node) -> str:
        if node.profile in self.redirect:
            node.profile = self.find(node.profile)
        return node.profile

    def apply(self, facts: list[Fact]) -> Changes:
        changes = Changes()
        timeline, settled = changes.contributions.timeline, self.settled
        try:
            for fact in facts:
                position, _, ts, _, count_key, user, anon, previous, trait_ids, traits, group = fact
                # Most events name only people already known, as they were named before:
                # then the event's timeline row is all it changes (what _apply would find).
                if not (previous or trait_ids or traits or group):
                    owner = settled.get((user, anon))
                    if owner is None:
                        owner = self._settled(user, anon)
                    if owner is not None:
                        kind, key = count_key or NO_COUNT
                        timeline.append((owner, ts, position, kind, key))
                        continue
                self._apply(fact, changes)
        except Contested as stop:  # raised before the fact changed anything
            changes.contested, changes.rest = stop.node, facts[facts.index(fact):]
        for node in changes.new_nodes:
            self.profile_of(node)
        return changes

    def _settled(self, user: str | None, anon: str | None) -> int | None:
        """The node that owns an event naming only these ids (no alias, trait or group),
        when applying it changes nothing else, else None: each id known (a userId as
        one), the anonymousId known to stay one, and the edge between them recorded.
        None of that is ever undone in this working set (nodes keep their ids, edges
        stay, an anonymousId an event named stays one), so the answer is kept."""
        nodes = self.nodes
        owner = node = None
        if user:
            owner = nodes.get((USER, user))
            if owner is None:
                return None
        if anon:
            node = nodes.get((ANON, anon))
            if node is None or node.previous_only is not False:
                return None
            if owner is None:
                owner = node
            elif (min(node.id, owner.id), max(node.id, owner.id),
                  "user_anonymous") not in self.edges:
                return None
        if owner is None:
            return None
        # Keyed by the nodes' own strings: the event's copies are not kept alive.
        self.settled[(user and owner.value, anon and node.value)] = owner.id
        return owner.id

    def _apply(self, f: Fact, ch: Changes) -> None:
        nodes = self.nodes
        user = anon = None
        if f.user:
            user = (nodes.get((USER, f.user)) or self._as_user(f.user, ch)
                    or self._new(USER, f.user, f, ch))
        if f.anon:
            anon = nodes.get((ANON, f.anon)) or self._new(ANON, f.anon, f, ch)
            if anon is not None:
                anon.previous_only = False  # an event's anonymousId: it stays one
        if user and anon:
            self._link(anon, user, "user_anonymous", f, ch)
        target = user if f.user else anon  # an alias without userId joins its anonymousId
        if f.previous and f.previous != (f.user or f.anon) and target:
            prev = self._previous(f, ch)
            if prev is not None:
                self._link(prev, target, "alias", f, ch)
        owner = user or anon
        for key in f.trait_ids:
            node = nodes.get(key) or self._new(*key, f, ch)
            if node is None:
                continue
            if owner is None:
                owner = node
            elif node is not owner:
                self._link(node, owner, "trait", f, ch)
        if owner is not None:
            ch.contributions.add(owner.id, f)

    def _previous(self, f: Fact, ch: Changes) -> Node | None:
        known = self.nodes.get((USER, f.previous)) or self.nodes.get((ANON, f.previous))
        if known:
            return known
        node = self._new(ANON, f.previous, f, ch)
        if node is not None:
            self.await_user(node)
        return node

    def await_user(self, node: Node, contested: bool = False) -> None:
        """`node` is an anonymousId only an alias's previousId named so far; `contested`:
        made a userId in place, it might join two userIds (see `_contest`)."""
        node.previous_only = True
        if contested:
            self.contested.add(node.id)
        else:
            self.awaiting.setdefault(self.profile_of(node), []).append(node)

    def _as_user(self, value: str, ch: Changes) -> Node | None:
        """The anonymousId `value` made a userId, when only an alias's previousId named it
        (the old userId of someone whose alias came first): its edges are then what they
        would have been had its events come before the alias. Raises Contested when that
        takes a rebuild of its profile."""
        node = self.nodes.get((ANON, value))
        if node is None or not node.previous_only:
            return None
        if node.id in self.contested:
            raise Contested(node)
        del self.nodes[(ANON, value)]
        node.kind, node.previous_only = USER, False
        self.nodes[(USER, value)] = node
        profile = self.profiles[self.profile_of(node)]
        # A new userId: the others awaiting here may be joined to it by an edge rule 1 would
        # refuse between userIds, and their paths to it are not known here.
        self._contest_all(profile.id)
        profile.users += 1
        ch.retyped.append(node)
        ch.dirty.add(profile.id)
        return node

    def _new(self, kind: str, value: str, f: Fact, ch: Changes) -> Node | None:
        """A node for an identifier seen for the first time, in a profile of its own;
        None for a blocked value."""
        if self.limits.is_blocked(value):
            ch.blocked += 1
            return None
        node = Node(self.new_node_id(), kind, value, self.new_profile_id(), None, f.position)
        node.origin, node.previous_only = node.profile, False
        self.nodes[(kind, value)] = node
        self.profiles[node.profile] = Profile(node.profile, node.id, 1, int(kind == USER), 0)
        ch.new_nodes.append(node)
        ch.dirty.add(node.profile)
        return node

    def _link(self, x: Node, y: Node, rule: str, f: Fact, ch: Changes) -> None:
        key = (x.id, y.id, rule) if x.id < y.id else (y.id, x.id, rule)
        if key in self.edges:
            return
        self.edges.add(key)
        px, py = self.profile_of(x), self.profile_of(y)
        if px == py:
            ch.edges.append((*key, APPLIED, None, 0, px, py, f.position, f.message_id, f.ts))
            return
        older, younger = sorted((self.profiles[px], self.profiles[py]), key=lambda p: p.head)
        fresh = _fresh(younger, x, y, f)
        refusal = refuse(self.limits, older, younger, rule, not fresh)
        if refusal:
            ch.edges.append((*key, REFUSED, refusal, 0, younger.id, older.id, f.position,
                             f.message_id, f.ts))
            return
        joined = not fresh
        if fresh:  # a brand-new identifier: its id never showed, so it is nobody's old id
            (x if x.profile == younger.id else y).origin = None
        ch.edges.append((*key, APPLIED, None, int(joined), None if fresh else younger.id,
                         older.id, f.position, f.message_id, f.ts))
        if rule != "alias":
            self._contest(older, younger)
        self._merge(older, younger, joined, ch)

    def _contest(self, a: Profile, b: Profile) -> None:
        """An edge that is no alias joins a profile without a userId to one with: had a
        previousId-only anonymousId of the first been a userId, rule 1 would have refused
        it. So naming one as a userId later rebuilds its profile as if it had always been
        one (`Contested`): a plain retype would join two userIds through this edge."""
        if bool(a.users) != bool(b.users):
            self._contest_all((b if a.users else a).id)

    def _contest_all(self, profile_id: str) -> None:
        """The profile's awaiting anonymousIds are contested: a replay decides for each (one
        that refuses nothing is a plain retype, so contesting too many is safe)."""
        for node in self.awaiting.pop(profile_id, ()):
            if node.previous_only:
                self.contested.add(node.id)

    def _merge(self, older: Profile, younger: Profile, joined: bool, ch: Changes) -> None:
        older.nodes += younger.nodes
        older.users += younger.users
        older.merges += younger.merges + int(joined)
        del self.profiles[younger.id]
        self.redirect[younger.id] = older.id
        if younger.id in self.awaiting:
            self.awaiting.setdefault(older.id, []).extend(self.awaiting.pop(younger.id))
        ch.relabels.append((younger.id, older.id))
        ch.dirty.add(older.id)
        ch.dead.add(younger.id)


def _fresh(profile: Profile, x: Node, y: Node, f: Fact) -> bool:
    """Whether `profile` is a single identifier this very event introduced."""
    node = x if x.profile == profile.id else y
    return profile.nodes == 1 and node.born == f.position


def refuse(limits: Limits, a: Profile, b: Profile, rule: str, counts_as_merge: bool) -> str | None:
    """The rule that forbids joining profiles a and b with an edge of `rule`, or None."""
    if rule != "alias" and a.users and b.users:
        return "distinct_user_ids"
    if a.nodes + b.nodes > limits.max_identifiers:
        return "max_identifiers"
    if counts_as_merge and a.merges + b.merges + 1 > limits.max_merges:
        return "max_merges"
    return None


def rebuild(limits: Limits, nodes: list[tuple[int, str]], edges: list[tuple[int, int, int, str, int]]
            ) -> tuple[list[list[int]], dict[int, int], list[tuple[int, str]]]:
    """Replay recorded edges over a profile's nodes.

    nodes: (node id, kind); edges: (edge id, a, b, rule, joined) in recorded order.
    Returns the components (lists of node ids, each sorted), the merges count per
    component head, and the edges the rules now refuse.
    """
    parent = {n: n for n, _ in nodes}
    size = {n: (1, int(kind == USER), 0) for n, kind in nodes}  # (nodes, users, merges)

    def root(n: int) -> int:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    refused = []
    for edge_id, a, b, rule, joined in edges:
        ra, rb = root(a), root(b)
        if ra == rb:
            continue
        (na, ua, ma), (nb, ub, mb) = size[ra], size[rb]
        why = refuse(limits, Profile("", ra, na, ua, ma), Profile("", rb, nb, ub, mb), rule,
                     bool(joined))
        if why:
            refused.append((edge_id, why))
            continue
        head, other = min(ra, rb), max(ra, rb)
        parent[other] = head
        size[head] = (na + nb, ua + ub, ma + mb + joined)
    groups: dict[int, list[int]] = {}
    for n, _ in nodes:
        groups.setdefault(root(n), []).append(n)
    components = [sorted(members) for members in groups.values()]
    return components, {r: size[r][2] for r in groups}, refused
