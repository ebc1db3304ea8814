"""Time loading typical track events straight into PostgreSQL through the warehouse
destination's send(), the same code path the delivery framework drives.

    python bench/warehouse_load.py [--events 100000] [--batch 2000]
                                   [--dsn "host=127.0.0.1 user=postgres dbname=test"]

Prints events/s and rows/s (each track event is two rows: `tracks` and its event
table). Uses a scratch schema that it drops afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import msgspec
import psycopg

from trackpipe.destinations.base import Event
from trackpipe.destinations.warehouse.postgres import PostgresWarehouse
from trackpipe.gc_tuning import tune_gc

EVENT_NAMES = ("Order Completed", "Product Viewed", "Product Added", "Checkout Started")


def track(n: int, run: str) -> Event:
    """A typical server-side ecommerce track event, as the collector normalizes it."""
    message = {
        "type": "track", "event": EVENT_NAMES[n % len(EVENT_NAMES)],
        "messageId": f"{run}-{n}", "userId": f"user-{n % 5000}", "anonymousId": f"anon-{n % 9000}",
        "sourceId": "src_1", "receivedAt": "2024-05-01T10:00:00.123Z",
        "sentAt": "2024-05-01T10:00:00.100Z", "timestamp": "2024-05-01T09:59:59.900Z",
        "context": {"ip": "203.0.113.7",
                    "library": {"name": "analytics-python", "version": "2.4.0"},
                    "page": {"path": "/checkout", "url": "https://shop.example/checkout"},
                    "userAgent": "Mozilla/5.0"},
        "properties": {"order_id": f"o-{n}", "revenue": 10.5 + n % 100, "currency": "EUR",
                       "quantity": n % 7, "coupon": "MAY_DEALS_3", "first_order": n % 2 == 0,
                       "products": [{"sku": "SEG-02", "price": 19.99}]},
    }
    # as the delivery framework hands it over: the stored JSON, decoded only if read
    event = Event(n, message["messageId"], None, f"profile-{n % 5000}", None, None,
                  msgspec.json.encode(message))
    # As the worker hands it over: each identifier the event names, with its profile.
    event.identities = {("user_id", message["userId"]): event.profile_id,
                        ("anonymous_id", message["anonymousId"]): event.profile_id}
    return event


async def run(dsn: str, events: int, batch_size: int) -> None:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    dest = PostgresWarehouse("bench", PostgresWarehouse.Settings(dsn=dsn, schema=schema))
    run_id = uuid.uuid4().hex[:6]
    batches = [[track(n, run_id) for n in range(lo, min(lo + batch_size, events))]
               for lo in range(0, events, batch_size)]
    try:
        await dest.send(batches[0][:len(EVENT_NAMES)])  # create the tables outside the timing
        started = time.perf_counter()
        for batch in batches:
            outcomes = await dest.send(batch)
            if any(o.state != "delivered" for o in outcomes):
                raise SystemExit(f"a batch was not delivered: {outcomes[0]}")
        elapsed = time.perf_counter() - started
    finally:
        await dest.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    print(f"{events} events in {elapsed:.2f} s, batches of {batch_size}: "
          f"{events / elapsed:,.0f} events/s, {2 * events / elapsed:,.0f} rows/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=PostgresWarehouse.default_batch_size)
    parser.add_argument("--dsn", default="host=127.0.0.1 user=postgres dbname=test")
    args = parser.parse_args()
    tune_gc()  # as the consumers process does
    asyncio.run(run(args.dsn, args.events, args.batch))


if __name__ == "__main__":
    main()
