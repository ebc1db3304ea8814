"""What one request costs the event loop: the tracking API in-process, no HTTP.

Runs `TrackingAPI` (auth, decode, validate, enrich, encode, the hand-off to a real
log writer process and its reply) on the bench's own bodies (bench/ingest.py: one
~1 KB track event, or a batch of 100), 50 requests at a time, and prints the
event loop's time per request. uvicorn and the socket are left out: this is the
part of a request that is trackpipe's. The figure is this process's CPU time, so
the time spent waiting for commits is not in it; building each request (a copy of
the body with its own messageIds) is, the same in every run.

Timings on a shared 2-core machine move by ±20% between runs. `--callgrind`
counts the instructions instead (valgrind; the same count on every run of the
same code), as the difference between two runs of different lengths, so start-up
and import cost cancel out:

    python bench/loop_cost.py                  # µs per /v1/track request
    python bench/loop_cost.py --load batch     # µs per 100-event /v1/batch request
    python bench/loop_cost.py --callgrind      # instructions per request (slow: ~1 min)

Only the parent process is counted: the writer process's work (hashing, depth
checks, the commit) is not in the figure. How many requests share a commit
depends on timing: the loop looks for the writer's reply once a commit is
likely done (pipeline/writer_process.py). Under valgrind the loop runs ~50x
slower while the writer does not, so there it finds each reply almost at once
and sends smaller groups than it would at full speed: since 550e8c8 the count
(~263k instructions per track request, ~217k before) overstates what the
change costs outside valgrind (timed here: 28-34 µs against 26-34 µs).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402  (bench/ingest.py: the request bodies)

from trackpipe.config import load as load_config  # noqa: E402
from trackpipe.gc_tuning import tune_gc  # noqa: E402
from trackpipe.pipeline.writer_process import WriterProcess  # noqa: E402
from trackpipe.sources.auth import SourceRegistry  # noqa: E402
from trackpipe.sources.catalog import Source  # noqa: E402
from trackpipe.sources.http import TrackingAPI  # noqa: E402

WRITE_KEY = "loop-cost-key"
CONCURRENCY = 50


async def drive(api: TrackingAPI, load: str, requests: int) -> None:
    template = ingest.body_template(load)
    path = "/v1/track" if load == "track" else "/v1/batch"
    auth = b"Basic " + base64.b64encode(f"{WRITE_KEY}:".encode())
    sent = 0

    async def one() -> None:
        nonlocal sent
        sent += 1
        body = template.replace(ingest.MARK, f"r{sent}").encode()
        scope = {"type": "http", "path": path, "method": "POST", "client": ("127.0.0.1", 5555),
                 "headers": [(b"content-type", b"application/json"), (b"authorization", auth),
                             (b"content-length", str(len(body)).encode())]}
        statuses = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await api(scope, receive, send)
        if statuses != [200]:
            raise RuntimeError(f"a request was answered {statuses}")

    for _ in range(requests // CONCURRENCY):
        await asyncio.gather(*(one() for _ in range(CONCURRENCY)))


def run(load: str, requests: int) -> float:
    """CPU seconds of this process (the event loop's) per request; the writer's are its own."""
    data = tempfile.mkdtemp(prefix="trackpipe-loop-cost-")
    writer = WriterProcess(Path(data), 3_600_000)
    try:
        api = TrackingAPI(load_config(None, {}), SourceRegistry([
            Source("src", "bench", WRITE_KEY, True, False, 0)]), writer)
        tune_gc()  # as `trackpipe serve` does
        started = time.process_time()
        uvloop.run(drive(api, load, requests))
        return (time.process_time() - started) / requests
    finally:
        writer.close()
        shutil.rmtree(data, ignore_errors=True)


def callgrind(load: str, short: int, long: int) -> int:
    """Instructions per request: (a long run - a short run) / the requests between them."""
    if not shutil.which("valgrind"):
        raise SystemExit("--callgrind needs valgrind (apt-get install valgrind)")
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (short, long):
            out = subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
                 sys.executable, __file__, "--load", load, "--requests", str(n)],
                capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
            found = re.search(r"Collected : (\d+)", out.stderr)
            if out.returncode != 0 or not found:
                raise SystemExit(f"valgrind run failed ({out.returncode}):\n{out.stderr[-2000:]}")
            totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) // (long - short)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", choices=["track", "batch"], default="track")
    p.add_argument("--requests", type=int, help="requests to send (default: 20,000 track,"
                   " 1,000 batch; a multiple of 50)")
    p.add_argument("--callgrind", action="store_true", help="count instructions with valgrind")
    args = p.parse_args()
    if args.callgrind:
        short, long = (200, 2200) if args.load == "track" else (50, 250)
        per = callgrind(args.load, short, long)
        print(f"{args.load}: {per:,} instructions per request on the event loop")
        print(f'{{"load": "{args.load}", "loop_instructions_per_request": {per}}}')
        return
    requests = args.requests or (20_000 if args.load == "track" else 1_000)
    per = run(args.load, requests)
    print(f"{args.load}: {per * 1e6:,.1f} µs per request on the event loop ({requests:,} requests)")
    print(f'{{"load": "{args.load}", "loop_us_per_request": {per * 1e6:.1f}}}')


if __name__ == "__main__":
    main()
