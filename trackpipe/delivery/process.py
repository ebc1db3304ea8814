"""The consumers process: identity and every destination, beside the collector.

`trackpipe serve` starts it (and restarts it if it dies). A destination that
puts the person's profile id into what it sends (`uses_profiles`: the
warehouses) reads only as far as identity has got; the others read to the
log's head, so identity never slows them. It reads the log
through its own read-only connections and keeps its own state files
(identity.db, deliveries.db), so nothing it does — a slow destination, a
profile rebuild — can take CPU time from the tracking API's event loop, which
only has to answer requests (the same reason the log writer has a process of
its own; see pipeline/writer_process.py). It also runs at a lower CPU priority
(`server.consumers_nice`), so that on a busy machine it takes the CPU the
collector leaves rather than sharing it equally.

The settings arrive as JSON on stdin, so credentials never show in `ps`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import msgspec

from trackpipe import config
from trackpipe.delivery.state import DeliveryState
from trackpipe.delivery.worker import DestinationWorker
from trackpipe.destinations import destination_class
from trackpipe.destinations.build import build_destination
from trackpipe.gc_tuning import tune_gc
from trackpipe.log import retention
from trackpipe.log.sqlite import SQLiteLog
from trackpipe.logs import setup_logging
from trackpipe.pipeline.dedupe import MessageLookup
from trackpipe.privacy.erase import process_requests
from trackpipe.privacy.suppress import Suppressions, Watch
from trackpipe.sources.catalog import Catalog

log = logging.getLogger("trackpipe.consumers")

IDENTITY_BATCH = 2000
ENTRY_BY_ENTRY_AFTER = 3  # failures of one batch before it is applied entry by entry
STOP_GRACE_SECONDS = 5.0  # how long a stop waits for sends in flight


class IdentityConsumer:
    """Applies the log to the identity store, in order, one batch at a time, on a thread
    of its own (the store is synchronous); destinations ask it for profile ids."""

    def __init__(self, store, log_: SQLiteLog):
        self.store = store
        self.log = log_
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="identity")
        self._position = 0

    def position(self) -> int:
        return self._position

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._position = await loop.run_in_executor(self.pool, self.store.position)
        failures, failed_at = 0, -1  # consecutive failures of the batch after failed_at
        while not stop.is_set():
            try:
                entries = await loop.run_in_executor(self.pool, self._read_and_apply,
                                                     self.store.apply)
                failures = 0
            except Exception as exc:
                failures = failures + 1 if self._position == failed_at else 1
                failed_at = self._position
                log.exception("identity: applying the batch after position %d failed;"
                              " retrying", self._position)
                if failures < ENTRY_BY_ENTRY_AFTER or environmental(exc):
                    await asyncio.sleep(1.0)
                    continue
                try:
                    entries = await loop.run_in_executor(self.pool, self._read_and_apply,
                                                         self.apply_each)
                except Exception:
                    await asyncio.sleep(1.0)
                    continue
            if not entries:
                try:
                    await asyncio.wait_for(stop.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass
                continue
            self._position = entries[-1].position

    def _read_and_apply(self, apply) -> list:
        """The next batch, read and applied in one job on the identity thread: a privacy
        delete (erase_requests, the same thread) runs before both or after both. Between
        a read and its apply, it erased the person's events from the log, and the apply
        then made the profile again from events already read."""
        entries = self.log.read(self._position, IDENTITY_BATCH, self.store.lean_types)
        if entries:
            apply(entries)
        return entries

    def apply_each(self, entries) -> None:
        """Apply entries one at a time, passing over one that fails for a reason of its
        own (a bug it trips): without this, identity would retry that batch forever and
        every warehouse, which waits for identity, would stop with it. A passed-over
        entry is applied as if it named nobody and logged with its position. A database
        error stops this, to be retried."""
        for entry in entries:
            try:
                self.store.apply([entry])
            except Exception as exc:
                if environmental(exc):
                    raise
                log.error("identity: passing over position %d (message %s), which cannot be"
                          " applied: %r", entry.position, entry.message_id, exc)
                self.store.apply([entry._replace(body=b"{}", user_id=None,
                                                 anonymous_id=None)])

    async def erase_requests(self, stop: asyncio.Event, data_dir: Path, destinations) -> None:
        """Queued privacy deletes, run on the identity thread between two batches."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                await loop.run_in_executor(self.pool, process_requests, data_dir, self.store,
                                           destinations)
            except Exception:
                log.exception("privacy: a delete request failed; retrying")
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    async def resolve(self, entries):
        """Each entry's person, and the person of each identifier it names."""
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, self.store.resolve_entries, entries)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.store is not None:
            self.store.close()


class SuppressionFollower:
    """Keeps the workers' suppression list in step with the catalog, and acknowledges a
    suppression the admin API asked about (DeliveryState.ask_suppression).

    Every POLL_SECONDS it reads the ticket the API last handed out, then the catalog
    (one PRAGMA unless it changed: Watch.refresh); the workers share the list, so from
    then on they test every event against it. The list is taken on every poll, whatever
    an earlier ticket is still waiting for. When a ticket is new, the people who entered
    the list since the last ticket (Watch.take_added: whoever reloaded it, the follower
    or a worker) are settled for it, on a task of its own:
      1. a send that was checked against a list without one of them and carries one of
         their events is waited for (it may still reach the destination; after it,
         nothing does); a send of anyone else's is not;
      2. their queued events (retries, replays, events held for per-user ordering) are
         removed from `pending` for every destination, counted as skipped:suppressed;
    and only then the ticket is marked taken, which is when the API answers. Tickets are
    taken in order (one counter): a ticket settled early waits for the earlier ones. The
    API writes the catalog before it takes a ticket, and this reads the ticket before the
    catalog: a ticket marked taken always covers the suppression it was taken for.
    A suppression without a ticket (a privacy delete's, which erases the events itself)
    purges nothing here: the workers drop the events as they meet them (the next ticket
    also settles for it).

    A worker reloads the list itself when it is about to skip an event and the catalog
    has changed since (an unsuppress): an event the ingest let through after an
    unsuppress is in the log only after the unsuppress committed, so it is never
    skipped for a suppression already lifted."""

    POLL_SECONDS = 0.1
    PAGE = 5000

    def __init__(self, watch: Watch, state: DeliveryState, event_log: SQLiteLog,
                 workers: list[DestinationWorker]):
        self.watch = watch
        self.state = state
        self.log = event_log
        self.workers = workers
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="suppression")
        self._taken = state.suppression_taken()
        self._seen = self._taken  # the last ticket a settling was started for
        self._settling: list[tuple[int, asyncio.Task]] = []  # in ticket order
        # A ticket left unacknowledged (the process stopped first) purges once more.
        self._everyone = state.suppression_asked() > self._taken

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    self.poll()
                except Exception:
                    log.exception("suppression: taking the new list failed; trying again")
                try:
                    await asyncio.wait_for(stop.wait(), self.POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
        finally:
            tasks = [task for _, task in self._settling]
            for task in tasks:
                task.cancel()  # unacknowledged: settled again on the next start
            await asyncio.gather(*tasks, return_exceptions=True)

    async def follow(self) -> None:
        """Poll, and go on polling until every ticket seen is taken."""
        self.poll()
        while self._settling:
            await asyncio.wait([task for _, task in self._settling], timeout=self.POLL_SECONDS)
            self.poll()

    def poll(self) -> None:
        """Take the list; settle a new ticket on a task; mark the settled tickets taken."""
        asked = self.state.suppression_asked()  # before the catalog (see the class)
        self.watch.refresh()
        if asked > self._seen:
            newly = self.watch.take_added(everyone=self._everyone)
            self._everyone = False
            self._settling.append((asked, asyncio.create_task(self._settle(newly))))
            self._seen = asked
        while self._settling and self._settling[0][1].done():
            ticket = self._settling[0][0]
            self.state.take_suppression(ticket)
            self._settling.pop(0)
            self._taken = ticket

    async def _settle(self, newly: dict[str, int]) -> None:
        if not newly:
            return
        while True:
            try:
                await self._land_flights(newly)
                await asyncio.get_running_loop().run_in_executor(self.pool, self.purge)
                return
            except Exception:
                log.exception("suppression: purging the newly suppressed failed; trying again")
                await asyncio.sleep(self.POLL_SECONDS)

    async def _land_flights(self, newly: dict[str, int]) -> None:
        """Wait for the sends that were checked against a list without someone in `newly`
        (hash -> the generation it entered the list at) and carry one of their events
        (each ends within the worker's SEND_TIMEOUT). A send that starts later is checked
        against a list that has them all."""
        key, traits = self.watch.list.key, self.watch.trait_names
        tests: dict[int, Suppressions] = {}  # generation -> those it had not seen
        for worker in self.workers:
            while (flight := worker.flight) is not None:
                entries, generation = flight
                test = tests.get(generation)
                if test is None:
                    test = tests[generation] = Suppressions(
                        key, [h for h, added in newly.items() if added > generation])
                if not test.hashes or not any(
                        test.names(e.user_id, e.anonymous_id, e.body, traits) for e in entries):
                    break
                while worker.flight is flight:
                    await asyncio.sleep(0.01)

    def purge(self) -> int:
        """Remove every queued event of a suppressed person, for every destination."""
        removed = 0
        verdicts: dict[int, bool] = {}  # destinations share positions: each read once
        for destination in self.state.known_destinations():
            after = 0
            while page := self.state.pending_after(destination, after, self.PAGE):
                after = page[-1]
                unread = [p for p in page if p not in verdicts]
                for entry in self.log.get(unread):
                    verdicts[entry.position] = self.watch.names(entry)
                theirs = [p for p in page if verdicts.get(p)]
                removed += self.state.drop_suppressed(destination, theirs)
        if removed:
            log.info("suppression: %d queued deliveries of suppressed people removed", removed)
        return removed

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class LogRetention:
    """The log's retention (log/retention.py), on a thread of its own: it needs only the
    readers' positions, so it neither waits for identity's batches nor holds them up."""

    FULL_SWEEP_S = 3600.0  # how often events held at the bottom of the log are looked at again
    MAX_UNFORGOTTEN = 2_000_000  # deleted events kept in memory to forget after failures

    def __init__(self, data_dir: Path, settings: config.Settings, state: DeliveryState,
                 event_log: SQLiteLog, identity: IdentityConsumer | None):
        self.path = data_dir / "log.db"
        self.settings = settings
        self.state = state
        self.log = event_log
        self.identity = identity
        self.index = MessageLookup(data_dir / "ids.db", event_log)
        self._unforgotten: list[tuple[int, str]] = []  # deleted, not yet out of traces/index
        self._below = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="retention")

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        after, more, swept_at = 0, False, time.monotonic()
        while not stop.is_set():
            try:  # an unfinished prune goes on at once: its budget only spreads the work
                await asyncio.wait_for(stop.wait(), 0.05 if more else
                                       self.settings.log.prune_every_seconds)
                return
            except asyncio.TimeoutError:
                pass
            if not more and time.monotonic() - swept_at > self.FULL_SWEEP_S:
                after, swept_at = 0, time.monotonic()  # what was held may have been let go
            try:
                pruned = await loop.run_in_executor(self.pool, self.prune, after)
                after, more = pruned.after, pruned.more
            except Exception:
                more = False
                log.exception("retention: pruning the log failed; trying again later")

    def prune(self, after: int) -> retention.Pruned:
        readers = [self.state.lowest_cursor(d.name for d in self.settings.destinations
                                            if d.enabled)]
        if self.identity is not None:
            readers.append(self.identity.position())
        read_up_to = min((r for r in readers if r is not None), default=self.log.head())
        # The positions just read must outlive a power cut before what they passed is gone.
        self.state.make_durable()
        if self.identity is not None:
            self.identity.store.make_durable()
        # Only a configured destination holds the log (disabled too: its failures stay
        # replayable); a removed one's leftovers go with their events (report_removed).
        holders = [d.name for d in self.settings.destinations]
        seconds = self.settings.log.retention_seconds

        def deleted(gone: list[tuple[int, str]], below: int) -> None:
            self._unforgotten.extend(gone)
            self._below = below

        try:
            pruned = retention.prune(
                self.path, read_up_to=read_up_to, after=after,
                older_than=int(time.time() * 1000) - seconds * 1000,
                held=lambda lo, hi: self.state.held(holders, lo, hi), forget=deleted)
        finally:
            self.forget()
        if pruned.events or pruned.discards or pruned.repeats:
            log.info("retention: deleted %d events, %d discards and %d repeat records older"
                     " than %d s", pruned.events, pruned.discards, pruned.repeats, seconds)
        return pruned

    def forget(self) -> None:
        """What refers to the deleted events goes with them: delivery traces and dedup index
        entries, once a prune (sorted and many at a time, for the index's random keys).
        What fails is tried again after the next prune; left for good it only takes space."""
        gone = self._unforgotten
        if not gone:
            return
        try:
            self.state.forget_traces([position for position, _ in gone], self._below)
            self.index.forget(gone)
            self._unforgotten = []
        except Exception:
            log.exception("retention: forgetting %d deleted events failed; trying again later",
                          len(gone))
            if len(gone) > self.MAX_UNFORGOTTEN:
                self._unforgotten = []  # stale entries cost space, not correctness

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.index.close()


# SQLSTATEs that psycopg files under OperationalError but that are one statement's fault:
# class 54, program limit exceeded (an index row or a statement too big for a value).
_PG_STATEMENT_FAULTS = ("54",)
# ...and ones filed elsewhere that are the server's: read only (a failover to a standby),
# an idle transaction's session timeout, data or index corruption.
_PG_SERVER_FAULTS = ("25006", "25P03", "XX001", "XX002")


def environmental(exc: BaseException) -> bool:
    """A failure of the machine or the database (disk full, locked, gone), worth retrying
    as it is; anything else is taken for a bug some entry trips. For PostgreSQL that is
    a connection or server failure (OperationalError: connection lost, shutdown, disk
    full, out of memory, lock timeout, deadlock; InterfaceError), not an error about a
    statement's values (DataError such as a NUL in text, an index row too big,
    IntegrityError), which the entry-by-entry apply passes over."""
    if isinstance(exc, (OSError, MemoryError, sqlite3.Error)):
        return True
    if type(exc).__module__.split(".")[0] != "psycopg":
        return False
    import psycopg
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate.startswith(_PG_STATEMENT_FAULTS):
        return False
    return (isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
            or sqlstate in _PG_SERVER_FAULTS)


def report_removed(settings: config.Settings, state: DeliveryState) -> None:
    """Say once, at start, what a destination no longer in the config left queued or
    failed: nothing sends it, and it no longer holds the log (the retention, when on,
    deletes those events and their rows like any others). Put back in the config, it
    resumes where it stopped and can replay what is left."""
    configured = {d.name for d in settings.destinations}
    for name in state.known_destinations():
        if name in configured:
            continue
        pending, failed = state.leftovers(name)
        if pending or failed:
            log.warning("destination %s is no longer in the config: its %d queued and %d failed"
                        " events are not sent and no longer hold the log%s; add it back to"
                        " deliver or replay them", name, pending, failed,
                        " (the retention deletes them with their events)"
                        if settings.log.retention_seconds else "")


def worker_for(cfg: config.Destination, destination, event_log: SQLiteLog,
               state: DeliveryState, identity: IdentityConsumer | None,
               suppressions: Watch | None = None) -> DestinationWorker:
    profiled = identity if identity is not None and destination.uses_profiles else None
    return DestinationWorker(cfg, destination, event_log, state,
                             readable_up_to=profiled.position if profiled else None,
                             resolve=profiled.resolve if profiled else None,
                             suppressions=suppressions)


async def run(settings: config.Settings) -> None:
    data = settings.data_path
    event_log = SQLiteLog(data / "log.db", writable=False)
    state = DeliveryState(data / "deliveries.db")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_stop_at_end_of_input, args=(loop, stop), name="stdin",
                     daemon=True).start()

    tasks = []
    identity = None
    report_removed(settings, state)
    if settings.identity.enabled:
        from trackpipe.identity.store import open_store
        identity = IdentityConsumer(open_store(settings.identity, data), event_log)
        tasks.append(asyncio.create_task(identity.run(stop), name="identity"))
    erasing = identity or IdentityConsumer(None, event_log)
    # Configs, not names: a delete notice keeps the person's emails only for destinations
    # that use profiles (privacy/erase.py).
    notified = [d for d in settings.destinations
                if d.enabled and destination_class(d.type).supports_delete]
    tasks.append(asyncio.create_task(erasing.erase_requests(stop, data, notified), name="privacy"))
    retaining = None
    if settings.log.retention_seconds:
        retaining = LogRetention(data, settings, state, event_log, identity)
        tasks.append(asyncio.create_task(retaining.run(stop), name="retention"))
    # The suppression list, before any worker starts: the first event read is tested.
    catalog = Catalog(data)
    watch = Watch(catalog, settings.identity.trait_identifiers)
    workers = []
    head = event_log.head()
    for cfg in settings.destinations:
        if not cfg.enabled:
            continue
        state.set_cursor(cfg.name, head)  # a new destination gets events from now on
        worker = worker_for(cfg, build_destination(cfg), event_log, state, identity, watch)
        workers.append(worker)
        tasks.append(asyncio.create_task(worker.run(stop), name=f"destination:{cfg.name}"))
    following = SuppressionFollower(watch, state, event_log, workers)
    tasks.append(asyncio.create_task(following.run(stop), name="suppression"))
    print("consumers ready", flush=True)
    try:
        await stop.wait()
    finally:
        stop.set()
        # A send that is still waiting on its destination after the grace period is
        # cancelled: its batch stays recorded as 'sending' and is sent again, with
        # the same webhook-id, on the next start.
        _, hung = await asyncio.wait(tasks, timeout=STOP_GRACE_SECONDS) if tasks else ((), ())
        for task in hung:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if retaining is not None:
            retaining.close()  # before the state it reads closes
        following.close()
        catalog.close()
        erasing.close()
        state.close()
        event_log.close()


def _stop_at_end_of_input(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set `stop` once stdin ends: the server closed it, or the server is gone."""
    sys.stdin.buffer.read()
    try:
        loop.call_soon_threadsafe(stop.set)
    except RuntimeError:  # the loop already ended
        pass


def main() -> int:
    # A signal to the whole process group (Ctrl-C, `systemctl stop`) is the server's to act
    # on: it stops this process in its own order by closing our stdin, as it stops the log
    # writer. (Stopping on the signal, this process exited before the server began its
    # shutdown, which restarted it with a warning.) The server starts it with both ignored
    # (supervisor.py), so a signal during start-up is ignored too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging()
    # One line of settings; stdin then stays open until the server wants this process to stop.
    settings = msgspec.json.decode(sys.stdin.buffer.readline(), type=config.Settings)
    # Before any thread starts (Linux keeps a nice value per thread; new ones inherit it).
    # Clients wait for the collector's answer, and an SDK whose queue fills while it
    # waits drops events; delivery only runs late, and catches up when the load falls.
    os.nice(settings.server.consumers_nice)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    tune_gc()  # warehouse batches allocate hundreds of thousands of containers
    asyncio.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
