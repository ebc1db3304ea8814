"""Admin routes about people: profiles, their timelines and merges, and privacy requests."""

from __future__ import annotations

import asyncio
import json
import re
import time

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from trackpipe.admin.common import error, int_param, json_body, json_response
from trackpipe.events import format_ts
from trackpipe.identity.store import CONSUMER
from trackpipe.log.sqlite import connect
from trackpipe.privacy import erase
from trackpipe.privacy import suppress as suppression
from trackpipe.privacy.suppress import id_hash
from trackpipe.sources.catalog import Catalog

ERASE_WAIT_SECONDS = 30.0
SUPPRESS_WAIT_SECONDS = 30.0  # for the consumers process to stop delivering their events


class PeopleAPI:
    def __init__(self, pipeline):
        self.p = pipeline

    @property
    def identity(self):
        return self.p.identity  # None when [identity] enabled = false

    def routes(self) -> list[tuple[str, object, list[str]]]:
        return [
            ("/api/v1/profiles/{ident:path}/events", self.timeline, ["GET"]),
            ("/api/v1/profiles/{ident:path}/merges", self.merges, ["GET"]),
            ("/api/v1/profiles/{ident:path}/unmerge", self.unmerge, ["POST"]),
            ("/api/v1/profiles/{ident:path}", self.profile, ["GET"]),
            ("/api/v1/privacy/suppress", self.suppress, ["POST"]),
            ("/api/v1/privacy/unsuppress", self.unsuppress, ["POST"]),
            ("/api/v1/privacy/delete", self.delete, ["POST"]),
            ("/api/v1/privacy/audit", self.audit, ["GET"]),
        ]

    # -- profiles -------------------------------------------------------------------

    def _disabled(self) -> Response:
        return error(404, "identity_disabled", "Identity resolution is off ([identity] enabled ="
                     " false), so trackpipe keeps no profiles.")

    def _missing(self, ident: str) -> Response:
        return error(404, "not_found", f"No profile has the id, userId or anonymousId {ident!r} "
                     "(profiles appear a moment after their first event is stored).")

    async def profile(self, request: Request) -> Response:
        if self.identity is None:
            return self._disabled()
        ident = request.path_params["ident"]
        found = await run_in_threadpool(self.identity.profile, ident)
        return json_response(found) if found else self._missing(ident)

    async def timeline(self, request: Request) -> Response:
        if self.identity is None:
            return self._disabled()
        ident = request.path_params["ident"]
        limit = int_param(request.query_params, "limit", 100, 1, 1000)
        cursor = request.query_params.get("cursor") or None

        def page():
            if self.identity.profile(ident) is None:
                return None
            # Positions in this node's log only: nodes sharing an identity store each have
            # a log of their own, and this node shows none of theirs, only how many.
            positions, nxt = self.identity.timeline(ident, cursor, limit, self.p.log.get)
            by_position = {e.position: e for e in self.p.log.get(positions)}
            events = [msgspec.json.decode(by_position[p].body) for p in positions if p in by_position]
            elsewhere = self.identity.elsewhere(ident)
            return {"events": events, "next": nxt, "other_nodes": [
                {"node": log.removeprefix(f"{CONSUMER}:"), "events": n}
                for log, n in elsewhere.items()]}
        try:
            answer = await run_in_threadpool(page)
        except ValueError:
            raise ValueError("`cursor` must be the `next` value of a previous page.") from None
        return json_response(answer) if answer is not None else self._missing(ident)

    async def merges(self, request: Request) -> Response:
        if self.identity is None:
            return self._disabled()
        ident = request.path_params["ident"]
        if await run_in_threadpool(self.identity.profile, ident) is None:
            return self._missing(ident)
        return json_response({"merges": await run_in_threadpool(self.identity.merges, ident)})

    async def unmerge(self, request: Request) -> Response:
        if self.identity is None:
            return self._disabled()
        ident = request.path_params["ident"]
        body = await json_body(request, '{"merge_id": "m12"}')
        if isinstance(body, Response):
            return body
        merge_id = body.get("merge_id")
        if not _is_merge_id(merge_id):
            return error(400, "invalid_parameter", "Send {\"merge_id\": ...}: an `id` such as"
                         f" \"m12\" from GET /api/v1/profiles/{ident}/merges.")
        found = await run_in_threadpool(self.identity.profile, ident)
        if found is None:
            return self._missing(ident)
        try:
            profiles = await run_in_threadpool(self.identity.unmerge, found["profile_id"], merge_id)
        except (KeyError, LookupError) as exc:
            return error(404, "not_found", f"No merge {merge_id!r} in this profile: {exc}")
        await self._audit("unmerge", ident, {"merge_id": merge_id, "profiles": len(profiles)})
        return json_response({"profiles": profiles})

    # -- privacy --------------------------------------------------------------------

    def _identifiers(self, ident: str) -> list[suppression.Identifier]:
        """The person's identifiers with their kinds (see privacy/suppress.py)."""
        found = self.identity.profile(ident) if self.identity is not None else None
        return suppression.identifiers(found, ident, self.p.settings.identity.trait_identifiers)

    async def suppress(self, request: Request) -> Response:
        ident = await _ident(request)
        if isinstance(ident, Response):
            return ident
        ids = await run_in_threadpool(self._identifiers, ident)
        by_value = await self._in_catalog(_suppress, ids)
        self.p.reload_catalog(force=True)  # reads only: never waits for a writer (WAL)
        stopped = await self._deliveries_stopped()
        await self._audit("suppress", ident, {"identifiers": len(by_value)})
        # 202: dropped at ingest already; the consumers process (down, or finishing a send
        # of theirs to a slow destination) skips and purges their queued events when it can.
        return json_response({"suppressed": len(by_value), "deliveries_stopped": stopped},
                             200 if stopped else 202)

    async def _deliveries_stopped(self) -> bool:
        """Wait until the consumers process has taken the new list: no send of the person's
        events is under way or will start, none is queued (delivery/process.py
        SuppressionFollower). Without a consumers process nothing is delivered."""
        if not self.p.consumers.needed:
            return True
        state = self.p.deliveries
        ticket = await run_in_threadpool(state.ask_suppression)
        deadline = time.monotonic() + SUPPRESS_WAIT_SECONDS
        while await run_in_threadpool(state.suppression_taken) < ticket:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def unsuppress(self, request: Request) -> Response:
        ident = await _ident(request)
        if isinstance(ident, Response):
            return ident
        ids = await run_in_threadpool(self._identifiers, ident)

        def lift(catalog) -> tuple[int, int]:  # identifiers that were suppressed, not hashes
            by_value = suppression.hashes(catalog.privacy_key(), ids)
            return len(by_value), sum(1 for hs in by_value.values() if catalog.unsuppress(hs))
        asked, n = await self._in_catalog(lift)
        self.p.reload_catalog(force=True)
        await self._audit("unsuppress", ident, {"identifiers": asked, "lifted": n})
        return json_response({"unsuppressed": n})

    async def delete(self, request: Request) -> Response:
        ident = await _ident(request)
        if isinstance(ident, Response):
            return ident
        ids = await run_in_threadpool(self._identifiers, ident)
        # Delete implies suppress (Segment's "delete and suppress"): no new events meanwhile.
        await self._in_catalog(_suppress, ids)
        self.p.reload_catalog(force=True)
        # deliveries.db is written by the consumers process too: its waits stay off the loop.
        db = await run_in_threadpool(connect, self.p.settings.data_path / "deliveries.db",
                                     synchronous="NORMAL")
        try:
            request_id = await run_in_threadpool(erase.queue, db, ids)
            if not self.p.consumers.needed:  # no consumers process: do it here
                await run_in_threadpool(erase.process_requests, self.p.settings.data_path, None, [])
            deadline = time.monotonic() + ERASE_WAIT_SECONDS
            while ((done := await run_in_threadpool(erase.result, db, request_id)) is None
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.1)
        finally:
            db.close()
        if done is None:
            await self._audit("delete", ident, {"request": request_id, "state": "queued"})
            return json_response({"request_id": request_id, "state": "queued"}, 202)
        await self._audit("delete", ident, {"request": request_id, **done})
        return json_response({"request_id": request_id, "state": "done", **done})

    async def audit(self, request: Request) -> Response:
        limit = int_param(request.query_params, "limit", 100, 1, 1000)
        rows = await run_in_threadpool(self.p.catalog.audit_log, limit)
        return json_response({"audit": [
            {"id": r[0], "at": format_ts(r[1]), "action": r[2], "subject": r[3],
             "detail": json.loads(r[4])} for r in rows]})

    async def _audit(self, action: str, ident: str, detail: dict) -> None:
        def write(catalog) -> None:
            subject = id_hash(catalog.privacy_key(), ident)  # never the id itself
            catalog.audit(action, subject, json.dumps(detail))
        await self._in_catalog(write)

    async def _in_catalog(self, work, *args):
        """`work(catalog, *args)` in a thread, on a catalog connection of its own. A write
        can wait (up to 30 s) for another writer's lock, the CLI's say; on the pipeline's
        shared connection that wait would hold up the event loop's catalog reloads, and
        with them every /v1/* request."""
        def run():
            catalog = Catalog(self.p.settings.data_path)
            try:
                return work(catalog, *args)
            finally:
                catalog.close()
        return await run_in_threadpool(run)


async def _ident(request: Request):
    body = await json_body(request, '{"id": "user-1"}')
    if isinstance(body, Response):
        return body
    ident = body.get("id")
    if not isinstance(ident, str) or not ident.strip() or len(ident) > 1024:
        return error(400, "invalid_parameter", "Send {\"id\": ...}: a profile id, userId or "
                     "anonymousId.")
    return ident


def _suppress(catalog: Catalog, ids: list[suppression.Identifier]) -> dict[str, list[str]]:
    by_value = suppression.hashes(catalog.privacy_key(), ids)
    catalog.suppress([h for hs in by_value.values() for h in hs])
    return by_value


MERGE_ID = re.compile(r"[mM]?[0-9]{1,18}")


def _is_merge_id(value) -> bool:
    """The shape of a merge's `id` ("m12", or 12): anything else is a malformed request."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0 <= value < 10**18
    return isinstance(value, str) and MERGE_ID.fullmatch(value.strip()) is not None
