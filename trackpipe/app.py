"""Wires the pipeline together and exposes it as one ASGI app.

/v1/* goes straight to the tracking API (the hot path); everything else
(admin API, health, metrics) goes through Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sqlite3
from pathlib import Path

from trackpipe import data_format
from trackpipe.admin import api as admin_api
from trackpipe.config import Settings, make_data_dir, make_private
from trackpipe.delivery.state import DeliveryState
from trackpipe.delivery.supervisor import ConsumersProcess
from trackpipe.destinations import build as destinations
from trackpipe.errors import ConfigError, StartFailed
from trackpipe.log.sqlite import SQLiteLog, damage
from trackpipe.pipeline.dedupe import MessageLookup
from trackpipe.pipeline.writer_process import WriterProcess
from trackpipe.privacy.suppress import Suppressions
from trackpipe.sources.auth import SourceRegistry
from trackpipe.sources.catalog import Catalog
from trackpipe.sources.http import TrackingAPI
from trackpipe.sources.responses import error_body

log = logging.getLogger("trackpipe")


class Pipeline:
    """The running pieces: catalog, log, dedup index, group committer."""

    def __init__(self, settings: Settings):
        self.settings = settings
        destinations.validate(settings)  # a bad destination stops the start, not the first event
        data = settings.data_path
        data_format.refuse_newer(data)  # before anything there is made or changed
        make_data_dir(data)
        make_private(data)
        self._lock = _lock_data_dir(data)
        _check_files(data)
        data_format.mark(data)  # before its files migrate, as each does when opened
        self.catalog = Catalog(data)
        if settings.admin_token:
            self.catalog.set_admin_token(settings.admin_token)
        self.admin_token_hash = self.catalog.admin_token_hash()
        self.registry = SourceRegistry(self.catalog.sources())
        self.suppressions = Suppressions(self.catalog.privacy_key(), self.catalog.suppressed())
        self._catalog_version = self.catalog.version()
        # The writer process owns every write to the log; this process reads.
        self.committer = WriterProcess(data, settings.dedup.window_seconds * 1000)
        self.log = SQLiteLog(data / "log.db", writable=False)
        self.lookup = MessageLookup(data / "ids.db", self.log)
        self.deliveries = DeliveryState(data / "deliveries.db")
        # A destination added to the config receives events from now on. Its
        # cursor is set here, before the server answers, so that nothing sent
        # right after start slips in ahead of it.
        head = self.log.head()
        for cfg in settings.destinations:
            if cfg.enabled:
                self.deliveries.set_cursor(cfg.name, head)
        self.identity = None  # the profile store, read here; the consumers process writes it
        if settings.identity.enabled:
            from trackpipe.identity.store import open_store
            self.identity = open_store(settings.identity, data)
        # Identity and destinations run in a process of their own; see delivery/process.py.
        self.consumers = ConsumersProcess(settings)
        self.consumers.start()
        self.shutting_down = False

    def reload_catalog(self, force: bool = False) -> None:
        version = self.catalog.version()  # changes only when another connection commits
        if force or version != self._catalog_version:
            self._catalog_version = version
            self.registry.replace(self.catalog.sources())
            self.suppressions.replace(self.catalog.suppressed())
            self.admin_token_hash = self.catalog.admin_token_hash()

    def readiness(self) -> tuple[bool, str]:
        if self.shutting_down:
            return False, "shutting down"
        if not self.committer.alive():
            return False, f"the log writer is not running ({self.committer.last_error})"
        stalled = self.committer.stalled_for()
        if stalled:
            return False, f"the log writer has been committing one group for {stalled:.1f} s"
        if self.committer.healthy:
            return True, "ok"
        try:  # the last commit failed: is there room again for a group that size?
            self.log.probe_write(self.committer.last_failed_bytes)
        except sqlite3.Error as exc:
            return False, f"cannot write: {exc}"
        return True, "recovered"

    def close(self) -> None:
        self.shutting_down = True
        self.consumers.close()
        self.committer.close()
        self.deliveries.close()
        if self.identity is not None:
            self.identity.close()
        self.log.close()
        self.catalog.close()


DATA_FILES = ("catalog.db", "log.db", "ids.db", "deliveries.db", "identity.db")


def _check_files(data: Path) -> None:
    """A damaged file (a bad disk, a copy cut short) stops the start with a clear message:
    run on it, trackpipe would answer 200 to events it then cannot read, and 500 to reads
    (reliability-and-security.md R20)."""
    for name in DATA_FILES:
        problem = damage(data / name)
        if problem:
            raise StartFailed(
                f"{data / name} is damaged ({problem}). Stop here and keep a copy of the data"
                f" dir; restore the file from a backup, or save what it still holds with"
                f" `sqlite3 {name} .recover | sqlite3 {name}.recovered` and put that in its"
                f" place (ids.db may simply be deleted: it is rebuilt from the log).")


def _lock_data_dir(data):
    """One server per data dir: a second one would start a second log writer."""
    lock = open(data / "trackpipe.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(f"Another trackpipe is already serving {data.resolve()}; stop it or "
                          "choose another --data-dir.") from None
    return lock  # released by the kernel when this process exits, however it exits


def create_app(pipeline: Pipeline):
    tracking = TrackingAPI(pipeline.settings, pipeline.registry, pipeline.committer,
                           pipeline.suppressions)
    admin = admin_api.build(pipeline)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        watcher = asyncio.create_task(_watch_catalog(pipeline))
        supervisor = asyncio.create_task(pipeline.consumers.supervise())
        try:
            yield
        finally:
            watcher.cancel()
            supervisor.cancel()
            pipeline.shutting_down = True
            await pipeline.committer.drain()

    admin.router.lifespan_context = lifespan

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            if pipeline.shutting_down:
                body = error_body("shutting_down", "trackpipe is shutting down; retry shortly.")
                await send({"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/json"), (b"retry-after", b"5"),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await tracking(scope, receive, send)
        else:
            await admin(scope, receive, send)

    return app


async def _watch_catalog(pipeline: Pipeline) -> None:
    """A source added or disabled from the CLI takes effect within a second."""
    while True:
        await asyncio.sleep(1.0)
        try:
            pipeline.reload_catalog()
        except sqlite3.Error as exc:
            log.warning("could not reload the catalog: %s", exc)
