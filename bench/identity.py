"""How fast the identity store keeps up with the log, and how fast it answers lookups.

    .venv/bin/python bench/identity.py                      # SQLite, 100k profiles
    .venv/bin/python bench/identity.py --store postgres --dsn postgresql://postgres@127.0.0.1/test

Phase 1 loads `--profiles` people (an anonymous page view, then an identify
that stitches it to a userId, with traits). Phase 2 applies `--events` of a
realistic mix in batches of `--batch` log entries: mostly track events of
known users (userId + anonymousId, as browsers send them), new anonymous
visitors who later identify, group calls and trait updates. Entries are
prepared in memory so the figure is the store's own (apply = parse + rules +
one transaction per batch). Then `--lookups` random profile() calls.
The last line is JSON: identity_events_per_s, profile_lookup_p99_ms, ...
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trackpipe.config import Identity
from trackpipe.events import format_ts
from trackpipe.identity.store import open_store
from trackpipe.log.base import Entry

T0 = 1_700_000_000_000
EVENTS = ["Product Viewed", "Product Added", "Checkout Started", "Order Completed",
          "Products Searched", "Cart Viewed"]
CONTEXT = {"library": {"name": "analytics.js", "version": "next-1.84.3"},
           "page": {"path": "/shop", "url": "https://shop.example/shop", "title": "Shop"},
           "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0",
           "locale": "en-US", "ip": "203.0.113.7"}


class Log:
    """Builds entries the way the collector stores them."""

    def __init__(self):
        self.position = 0

    def entry(self, type_: str, user: str | None, anon: str | None, **fields) -> Entry:
        self.position += 1
        ms = T0 + self.position * 10
        body = {"type": type_, "userId": user, "anonymousId": anon, "messageId": f"m{self.position}",
                "timestamp": format_ts(ms), "receivedAt": format_ts(ms), "sourceId": "src_1",
                "context": CONTEXT, **fields}
        return Entry(self.position, f"m{self.position}", ms, type_, fields.get("event"), user,
                     anon, "src_1", msgspec.json.encode(body))


def person_events(log: Log, i: int) -> list[Entry]:
    anon, user = f"anon-{i}", f"user-{i}"
    return [log.entry("page", None, anon, name="Home", properties={"path": "/"}),
            log.entry("identify", user, anon, traits={
                "email": f"person{i}@example.com", "name": f"Person {i}", "plan": "free",
                "address": {"city": "Paris", "country": "FR"}})]


def mix(log: Log, rng: random.Random, known: int, n: int) -> list[Entry]:
    entries: list[Entry] = []
    visitors: list[int] = []
    next_person = known
    while len(entries) < n:
        r = rng.random()
        if r < 0.85:
            i = rng.randrange(known)
            entries.append(log.entry("track", f"user-{i}", f"anon-{i}", event=rng.choice(EVENTS),
                                     properties={"product_id": str(rng.randrange(5000)),
                                                 "price": 19.99}))
        elif r < 0.90:
            visitors.append(next_person)
            entries.append(log.entry("page", None, f"anon-{next_person}", name="Landing"))
            next_person += 1
        elif r < 0.95 and visitors:
            i = visitors.pop(rng.randrange(len(visitors)))
            entries.extend(person_events(log, i)[1:])
        elif r < 0.97:
            i = rng.randrange(known)
            entries.append(log.entry("group", f"user-{i}", f"anon-{i}", groupId=f"org-{i % 997}",
                                     traits={"name": f"Org {i % 997}", "plan": "team"}))
        else:
            i = rng.randrange(known)
            entries.append(log.entry("identify", f"user-{i}", f"anon-{i}",
                                     traits={"plan": rng.choice(["free", "pro"]),
                                             "address": {"street": "1 Main St"}}))
    return entries


def run_batches(store, entries: list[Entry], batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(entries), batch):
        store.apply(entries[i:i + batch])
    return time.perf_counter() - started


def lookups(store, rng: random.Random, known: int, n: int) -> list[float]:
    times = []
    for _ in range(n):
        i = rng.randrange(known)
        ident = rng.choice([f"user-{i}", f"anon-{i}", f"person{i}@example.com"])
        started = time.perf_counter()
        found = store.profile(ident)
        times.append((time.perf_counter() - started) * 1000)
        assert found is not None and f"user-{i}" in found["user_ids"], ident
    return sorted(times)


def open_bench_store(args, data_dir: str):
    settings = Identity(store=args.store, postgres_dsn=args.dsn, trait_identifiers=["email"],
                        cache_identifiers=args.cache_identifiers)
    if args.store != "postgres":
        return open_store(settings, data_dir), lambda: None
    import psycopg

    from trackpipe.identity.postgres_store import PostgresStore
    schema = f"identity_bench_{int(time.time())}"
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")

    def drop():
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    return PostgresStore(args.dsn, settings, schema=schema), drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--lookups", type=int, default=3000)
    parser.add_argument("--cache-identifiers", type=int, default=Identity().cache_identifiers,
                        help="[identity] cache_identifiers (SQLite store): below the working "
                             "set, batches reload what they name")
    args = parser.parse_args()
    rng = random.Random(7)
    log = Log()
    with tempfile.TemporaryDirectory(prefix="trackpipe-identity-bench-") as data_dir:
        store, drop = open_bench_store(args, data_dir)
        try:
            people = [e for i in range(args.profiles) for e in person_events(log, i)]
            load_s = run_batches(store, people, args.batch)
            print(f"loaded {args.profiles} profiles ({len(people)} events) in {load_s:.1f}s "
                  f"= {len(people) / load_s:,.0f} events/s", file=sys.stderr)
            entries = mix(log, rng, args.profiles, args.events)
            apply_s = run_batches(store, entries, args.batch)
            print(f"applied {len(entries)} mixed events in {apply_s:.1f}s", file=sys.stderr)
            times = lookups(store, rng, args.profiles, args.lookups)
            stats = store.stats()
        finally:
            store.close()
            drop()
    print(json.dumps({
        "store": args.store, "profiles": stats["profiles"], "identifiers": stats["identifiers"],
        "batch": args.batch, "events": len(entries), "cache_identifiers": args.cache_identifiers,
        "identity_events_per_s": round(len(entries) / apply_s),
        "load_events_per_s": round(len(people) / load_s),
        "profile_lookup_p50_ms": round(times[len(times) // 2], 3),
        "profile_lookup_p99_ms": round(times[int(len(times) * 0.99)], 3),
    }))


if __name__ == "__main__":
    main()
