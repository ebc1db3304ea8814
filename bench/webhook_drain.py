"""The consumers' own cost per webhook event: drain a stored backlog, nothing else running.

    python bench/webhook_drain.py [--events 50000] [--batch 1000] [--profile]

Appends --events ~1.1 KB track events (bench/ingest.py's) to a fresh log, then
one DestinationWorker delivers them as signed batches to bench/bare_app.py,
the way the consumers process does. Prints events/s (wall) and the worker's
CPU microseconds per event; --profile adds the top of a cProfile.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from trackpipe import config
from trackpipe.delivery.state import DeliveryState
from trackpipe.delivery.worker import DestinationWorker
from trackpipe.destinations.build import build_destination
from trackpipe.log.base import Record
from trackpipe.log.sqlite import SQLiteLog

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import ingest  # noqa: E402  (bench/ingest.py: the event the ingest benchmark sends)


def fill(event_log: SQLiteLog, events: int) -> None:
    now = datetime.now(timezone.utc)
    records = []
    for i in range(events):
        m = ingest.track_event(i, now)
        m.update(messageId=f"m-{uuid.uuid4().hex}", receivedAt="2026-11-28T10:00:00.000Z",
                 sentAt="2026-11-28T10:00:00.000Z", sourceId="src_1")
        records.append(Record(m["messageId"], 1, "track", m["event"], m.get("userId"),
                              m.get("anonymousId"), "src_1", msgspec.json.encode(m)))
    for lo in range(0, events, 5000):
        event_log.append(records[lo:lo + 5000])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drain(worker: DestinationWorker, events: int) -> tuple[float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    while worker.state.cursor(worker.name) < events:
        await worker.step()
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        event_log = SQLiteLog(Path(tmp) / "log.db")
        fill(event_log, args.events)
        port = free_port()
        receiver = subprocess.Popen([sys.executable, str(BENCH / "bare_app.py"), "--port",
                                     str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state = DeliveryState(Path(tmp) / "deliveries.db")
        try:
            time.sleep(1.5)  # the receiver starting
            cfg = config.Destination(name="hook", type="webhook", batch_size=args.batch, settings={
                "url": f"http://127.0.0.1:{port}/hook", "allow_private_targets": True,
                "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"})
            worker = DestinationWorker(cfg, build_destination(cfg), event_log, state)
            profile = cProfile.Profile() if args.profile else None

            async def run():
                await worker.destination.start()
                worker._started = True
                try:
                    if profile:
                        profile.enable()
                    return await drain(worker, args.events)
                finally:
                    if profile:
                        profile.disable()
                    await worker.destination.close()

            wall, cpu = asyncio.run(run())
        finally:
            receiver.terminate()
            state.close()
            event_log.close()
    print(f"webhook drain: {args.events / wall:,.0f} events/s, "
          f"{cpu / args.events * 1e6:.1f} us consumer CPU per event")
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
