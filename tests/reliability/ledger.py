"""The reliability checker ("ledger", reliability-and-security.md §3.2) and a load generator.

Every event carries a unique ``messageId`` and a ``properties.seq``. Each batch
request is recorded with every status it got; a batch that was not answered
200 (connection refused or reset, timeout, 503) is retried later with the SAME
payload, the way the real SDKs retry. After the run:

* ``A``: messageIds of batches answered 200 at least once;
* ``sent``: every messageId put on the wire (acknowledged or not);
* ``S``: the stored events, fetched through the admin API.

Invariants checked: no acknowledged loss (A ⊆ set(S)), no stored duplicates
(each messageId at most once in S) and no phantoms (set(S) ⊆ sent).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from support import ServerProcess, basic

CLIENT_TIMEOUT_S = 5.0


@dataclass
class Batch:
    ids: list[str]
    body: bytes
    statuses: list[object] = field(default_factory=list)  # int status or exception class name
    acked: bool = False


def event(run: str, seq: int, user: int) -> dict:
    return {"type": "track", "event": "Reliability Probe", "userId": f"{run}-u{user}",
            "messageId": f"{run}-{seq}", "properties": {"seq": seq, "run": run},
            "timestamp": "2024-01-01T00:00:00.000Z"}


class Ledger:
    def __init__(self, run: str, users: int = 16):
        self.run = run
        self.users = users
        self.batches: list[Batch] = []
        self._seq = itertools.count(1)
        self.responses: list[httpx.Response] = []  # every non-200 HTTP answer, for checks
        self.timeline: list[tuple[float, object]] = []  # (monotonic time, outcome) per attempt

    def new_batch(self, size: int, *, dup_ids: list[str] | None = None) -> Batch:
        items = []
        for _ in range(size):
            seq = next(self._seq)
            items.append(event(self.run, seq, seq % self.users))
        for mid in dup_ids or ():
            items.append({**items[0], "messageId": mid})
        batch = Batch([it["messageId"] for it in items], json.dumps({"batch": items}).encode())
        self.batches.append(batch)
        return batch

    # -- sending --------------------------------------------------------------

    async def send(self, client: httpx.AsyncClient, url: str, batch: Batch) -> object:
        """POST the batch once; 200 marks it acknowledged. Errors count as not acknowledged."""
        try:
            r = await client.post(f"{url}/v1/batch", content=batch.body,
                                  headers={"content-type": "application/json"},
                                  timeout=CLIENT_TIMEOUT_S)
        except httpx.HTTPError as exc:
            batch.statuses.append(type(exc).__name__)
            self.timeline.append((time.monotonic(), type(exc).__name__))
            return type(exc).__name__
        batch.statuses.append(r.status_code)
        self.timeline.append((time.monotonic(), r.status_code))
        if r.status_code == 200:
            batch.acked = True
        else:
            self.responses.append(r)
        return r.status_code

    def unacked(self) -> list[Batch]:
        return [b for b in self.batches if not b.acked]

    async def retry_unacked(self, url: str, write_key: str, deadline_s: float = 20.0,
                            concurrency: int = 4) -> None:
        """Resend every unacknowledged batch, same payload, until each gets a 200."""
        deadline = time.monotonic() + deadline_s
        async with client_for(write_key, concurrency) as client:
            while pending := self.unacked():
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(pending)} batches still not acknowledged after "
                                         f"{deadline_s} s of retries; last statuses: "
                                         f"{[b.statuses[-3:] for b in pending[:5]]}")
                sem = asyncio.Semaphore(concurrency)

                async def one(b: Batch) -> None:
                    async with sem:
                        await self.send(client, url, b)

                await asyncio.gather(*(one(b) for b in pending))
                if self.unacked():
                    await asyncio.sleep(0.2)

    # -- the sets -------------------------------------------------------------

    @property
    def acked_ids(self) -> set[str]:
        return {m for b in self.batches if b.acked for m in b.ids}

    @property
    def sent_ids(self) -> set[str]:
        return {m for b in self.batches if b.statuses for m in b.ids}

    def status_counts(self) -> Counter:
        return Counter(s for b in self.batches for s in b.statuses)

    def check(self, stored: list[dict], *, expect_all_acked: bool = True) -> Counter:
        """Assert invariants 1-3 against the stored events; returns the stored multiset."""
        counts = Counter(e["messageId"] for e in stored)
        acked, sent = self.acked_ids, self.sent_ids
        lost = acked - counts.keys()
        dups = {m: c for m, c in counts.items() if c > 1}
        phantoms = counts.keys() - sent
        assert not lost, f"{len(lost)} acknowledged events were not stored, e.g. {sorted(lost)[:5]}"
        assert not dups, f"{len(dups)} messageIds stored more than once, e.g. {list(dups.items())[:5]}"
        assert not phantoms, f"{len(phantoms)} stored events were never sent: {sorted(phantoms)[:5]}"
        if expect_all_acked:
            assert acked == sent, f"{len(sent - acked)} sent messageIds never acknowledged"
        by_id = {e["messageId"]: e for e in stored}
        for m in list(acked)[:200]:  # the payload is the one sent, not another event's
            assert by_id[m]["properties"]["seq"] == int(m.rsplit("-", 1)[1])
        return counts


def client_for(write_key: str, concurrency: int = 8) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        headers={"authorization": basic(write_key)}, timeout=CLIENT_TIMEOUT_S,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))


async def run_load(ledger: Ledger, proc: ServerProcess, stop: asyncio.Event, *,
                   workers: int = 8, sizes: tuple[int, int] = (20, 50),
                   inflight: list[int] | None = None) -> None:
    """`workers` concurrent clients, each sending fresh batches until `stop` is set.

    A batch that is not acknowledged is retried (same payload) after a short backoff
    while the load runs; whatever is still unacknowledged at the end is left to
    Ledger.retry_unacked. `inflight[0]` counts requests on the wire right now.
    """
    inflight = inflight if inflight is not None else [0]
    sizes_cycle = itertools.cycle(range(sizes[0], sizes[1] + 1, 7))

    async def worker(n: int) -> None:
        async with client_for(proc.write_key, 1) as client:
            batch = None
            while not stop.is_set():
                if batch is None or batch.acked:
                    batch = ledger.new_batch(next(sizes_cycle))
                inflight[0] += 1
                try:
                    status = await ledger.send(client, proc.url, batch)
                finally:
                    inflight[0] -= 1
                if status != 200:
                    await asyncio.sleep(0.1)  # server down or refusing: back off, then retry

    await asyncio.gather(*(worker(n) for n in range(workers)))


async def hard_restart(proc: ServerProcess) -> None:
    """SIGKILL the server, then start it again on the same data dir (off the event loop)."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, proc.kill)
    await loop.run_in_executor(None, close_log, proc)
    await loop.run_in_executor(None, proc.start)


def close_log(proc: ServerProcess) -> None:
    """ServerProcess.start opens a fresh log handle; close the old one after a kill."""
    log = getattr(proc, "_log", None)
    if log is not None and not log.closed:
        log.close()
