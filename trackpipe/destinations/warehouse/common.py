"""What both warehouses do around a load: plan, apply, adopt the schema, report.

A subclass opens its database, runs a Plan in one transaction (`_apply`) and says
which of its exceptions are the database's (`db_errors`) and whether one is worth
retrying (`_classify`). Any database error drops the cached schema, so the next
attempt re-reads it: someone may have changed the tables under us. A subclass that
finds, before writing, that they have (`StaleSchema`) gets the batch planned again
at once with the schema read again, before any splitting or failing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from abc import abstractmethod
from typing import ClassVar, Sequence

from trackpipe.destinations.base import DELIVERED, Destination, Event, Outcome, retry
from trackpipe.destinations.warehouse.layout import fixed_columns
from trackpipe.destinations.warehouse.plan import TABLE, Change, Plan, Schema, plan
from trackpipe.destinations.warehouse.shapes import ShapeBook
from trackpipe.destinations.warehouse.sql import Dialect, add_column, create_table, widen_column
from trackpipe.gc_tuning import gc_paused

log = logging.getLogger("trackpipe.warehouse")
IDENTITY_CACHE_SIZE = 200_000


class StaleSchema(Exception):
    """The tables are not as the cached schema says (another writer widened a column, a
    person altered one): raised by `_apply` before anything is written, so the batch can
    be planned again with the types the database has."""


class Warehouse(Destination):
    default_batch_size = 2000
    supports_delete = True
    uses_profiles = True  # the profile_id column and the identities table
    dialect: ClassVar[Dialect]
    db_errors: ClassVar[tuple[type[Exception], ...]]

    def __init__(self, name, settings):
        super().__init__(name, settings)
        self.schema: Schema | None = None  # known tables and column types; None = read it
        # identifier -> profile id as last written: an unchanged mapping is not sent again
        # (assumes this destination is the only writer of its identities table)
        self._identities: dict[tuple[str, str], str] = {}
        self._lock = asyncio.Lock()
        self._shapes = ShapeBook()  # track events' shapes, to lay them out without a walk

    async def send(self, batch: Sequence[Event]) -> Sequence[Outcome]:
        async with self._lock:
            return await self._send_batch(batch)

    async def _send_batch(self, batch: Sequence[Event], first: bool = True,
                          reread: bool = True) -> list[Outcome]:
        """`reread`: whether a stale cached schema may be read again and the batch planned
        again with it (once: a schema changing under every attempt is retried later)."""
        todo: Plan | None = None
        try:
            known = await self._known_schema()
            with gc_paused():
                todo = plan(batch, known, dt.datetime.now(dt.timezone.utc),
                            self.settings.max_columns, self._shapes, self.settings.max_tables)
            todo = todo._replace(identities=[
                i for i in todo.identities if self._identities.get(i[:2]) != i[2]])
            await self._apply(todo)
        except StaleSchema as exc:
            self.forget()
            if reread:
                log.info("warehouse %s: %s; planning the batch again with the tables as they"
                         " are", self.name, exc)
                return await self._send_batch(batch, first, reread=False)
            return todo.outcomes(retry(None, f"the tables changed while loading ({exc})"))
        except self.db_errors as exc:
            refused = self._refused_data(exc)
            if not refused:  # the tables may have changed under us: read them again
                self.forget()
            outcome = self._classify(exc)
            if outcome.state == "failed" and len(batch) > 1 and refused:
                # One event the database will not take (a row wider than a page, a value
                # it refuses) must not fail its whole batch: load each half on its own,
                # down to the events at fault. Costs about two loads of the batch, and
                # only when a load has failed for good.
                if first:
                    log.info("warehouse %s: %s; loading the batch of %d in halves to find"
                             " the events at fault", self.name, outcome.detail, len(batch))
                if todo is not None and todo.changes:
                    await self._commit_changes(todo)
                half = len(batch) // 2
                return [*await self._send_batch(batch[:half], first=False),
                        *await self._send_batch(batch[half:], first=False)]
            return todo.outcomes(outcome) if todo else [outcome] * len(batch)
        self.schema = todo.schema
        if len(self._identities) > IDENTITY_CACHE_SIZE:
            self._identities.clear()
        self._identities.update((i[:2], i[2]) for i in todo.identities)
        self._log_changes(todo)
        return todo.outcomes(DELIVERED)

    async def _commit_changes(self, todo: Plan) -> None:
        """Commit a plan's schema changes without its rows, so that the halves of a refused
        batch do not make (and roll back) the same columns again, each of them."""
        try:
            await self._apply(todo._replace(loads=[], rejected=[], identities=[]))
        except (StaleSchema, *self.db_errors):
            self.forget()  # the halves plan the changes again themselves
            return
        self.schema = todo.schema
        self._log_changes(todo)

    def forget(self) -> None:
        """Drop what is cached about the database; the next load reads it again."""
        self.schema = None
        self._identities.clear()

    async def _known_schema(self) -> Schema:
        if self.schema is None:
            self.schema = await self._read_schema()
        return self.schema

    def _log_changes(self, done: Plan) -> None:
        for c in done.changes:
            log.info("warehouse %s: %s (message %s)", self.name, describe(c, self.dialect),
                     c.message_id)

    def _ddl(self, schema: str, change: Change, at: dt.datetime) -> list[tuple[str, tuple]]:
        """The statements of a schema change, with their parameters, in the order to run."""
        d = self.dialect
        if change.new_type == TABLE:
            return [(create_table(d, schema, change.table, fixed_columns(change.table)), ())]
        if change.old_type is None:
            return [(add_column(d, schema, change.table, change.column, change.new_type), ())]
        return widen_column(d, schema, change.table, change.column, change.old_type,
                            change.new_type, at)

    def change_row(self, c: Change, at: dt.datetime) -> tuple:
        """A Change as a `schema_changes` row, types spelled in this database's SQL."""
        old = self.dialect.sql_type(c.old_type) if c.old_type else None
        new = TABLE if c.new_type == TABLE else self.dialect.sql_type(c.new_type)
        return (at, c.table, c.column, old, new, c.message_id)

    @abstractmethod
    async def _read_schema(self) -> Schema:
        """Open the database, create what is missing (schema, meta tables), read the columns."""

    @abstractmethod
    async def _apply(self, todo: Plan) -> None:
        """Run the plan in one transaction; raise one of `db_errors` on failure."""

    @abstractmethod
    def _classify(self, exc: Exception) -> Outcome:
        """A database error as retry (worth another attempt) or fail (needs a person)."""

    @abstractmethod
    def _refused_data(self, exc: Exception) -> bool:
        """Whether the database refused something in the rows (so some events of the batch
        may load without the others), rather than the load as a whole."""


def describe(c: Change, dialect: Dialect) -> str:
    if c.new_type == TABLE:
        return f"table {c.table} created"
    new = dialect.sql_type(c.new_type)
    if c.old_type is None:
        return f"column {c.table}.{c.column} added as {new}"
    return f"column {c.table}.{c.column} widened from {dialect.sql_type(c.old_type)} to {new}"
