"""Admin and observability routes. Everything under /api/ needs the admin token.

No permissive CORS here: only the ingest paths are meant for browsers.
"""

from __future__ import annotations

import sqlite3
from urllib.parse import unquote

import msgspec
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from trackpipe import metrics
from trackpipe.admin.common import cursor_param, error, int_param, json_response, time_param
from trackpipe.admin.destinations import DestinationsAPI
from trackpipe.admin.people import PeopleAPI
from trackpipe.events import format_ts
from trackpipe.log.sqlite import FILTERS
from trackpipe.sources.catalog import token_matches

MAX_LIMIT = 1000


class AdminAPI:
    def __init__(self, pipeline):
        self.p = pipeline
        metrics.LOG_EXTENT.log = pipeline.log
        metrics.READINESS.check = pipeline.readiness
        if pipeline.settings.destinations:
            from trackpipe.admin.destinations import destination_summary
            metrics.register_delivery(lambda: [destination_summary(pipeline, d)
                                               for d in pipeline.settings.destinations])

    def routes(self) -> list[Route]:
        delivery = [Route(path, self._guard(fn), methods=methods)
                    for path, fn, methods in [*DestinationsAPI(self.p).routes(),
                                              *PeopleAPI(self.p).routes()]]
        guarded = [
            ("/api/v1/events", self.events),
            ("/api/v1/events/{message_id:path}", self.event),
            ("/api/v1/messages/{message_id:path}/status", self.status),
            ("/api/v1/discards", self.discards),
            ("/api/v1/sources", self.sources),
        ]
        return [*delivery, *(Route(path, self._guard(fn)) for path, fn in guarded),
                Route("/health", self.health), Route("/ready", self.ready),
                Route("/metrics", self.metrics)]

    def _guard(self, handler):
        async def guarded(request: Request) -> Response:
            # Exactly one: with several, which one counts would be up to each server on the
            # way (a proxy in front may have checked another).
            given = request.headers.getlist("authorization")
            scheme, _, token = (given[0] if len(given) == 1 else "").partition(" ")
            stored = self.p.admin_token_hash
            if scheme.lower() != "bearer" or not stored or not token_matches(token.strip(), stored):
                return error(401, "unauthorized", "The admin API needs `Authorization: Bearer "
                             "<admin token>` (printed when trackpipe first started, or set "
                             "with TRACKPIPE_ADMIN_TOKEN).")
            if request.scope.get(ESCAPED_SLASHES):
                params = request.path_params
                params.update((k, unquote(v)) for k, v in params.items())
            try:
                return await handler(request)
            except ValueError as exc:
                return error(400, "invalid_parameter", str(exc))
        return guarded

    # -- events ---------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        q = request.query_params
        filters = {}
        for name in FILTERS:
            if name in q:
                filters[name] = time_param(q, name) if name in ("since", "until") else q[name]
        limit = int_param(q, "limit", 100, 1, MAX_LIMIT)
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ValueError(f"`order` is \"asc\" or \"desc\", not {order!r}.")
        ascending = order == "asc"
        position = cursor_param(q)
        if ascending and position is None:
            position = 0
        if "message_id" in filters:
            entries = await run_in_threadpool(self._by_message_id, filters.pop("message_id"))
            entries = [e for e in entries if _matches(e, filters)][:limit]
            return json_response({"events": [_message(e) for e in entries], "next": None})
        entries, nxt, scanned = await run_in_threadpool(
            self.p.log.query, filters, before=None if ascending else position,
            after=position if ascending else None, limit=limit)
        page = {"events": [_message(e) for e in entries],
                "next": str(nxt) if nxt is not None else None}
        if ascending:  # where a follower resumes once it has caught up (`next` is null)
            page["scanned"] = str(scanned)
        return json_response(page)

    async def event(self, request: Request) -> Response:
        message_id = request.path_params["message_id"]
        entries = await run_in_threadpool(self._by_message_id, message_id)
        if not entries:
            return error(404, "not_found", f"No stored event has messageId {message_id!r}; "
                         f"GET /api/v1/messages/{message_id}/status tells what became of it.")
        return json_response(_message(entries[-1]))

    def _by_message_id(self, message_id: str):
        positions = self.p.lookup.positions(message_id)
        return [e for e in self.p.log.get(positions) if e.message_id == message_id]

    async def status(self, request: Request) -> Response:
        message_id = request.path_params["message_id"]
        answer = await run_in_threadpool(self._status, message_id)
        if answer is None:
            retention = self.p.settings.log.retention_seconds
            return error(404, "not_found", f"trackpipe has no record of messageId {message_id!r}: "
                         "it never arrived in a well-formed, authorised request"
                         + (f", or it was older than the log's retention ({retention} s) and has"
                            " been deleted" if retention else "")
                         + ". Check the client's host and write key.")
        return json_response(answer)

    def _status(self, message_id: str) -> dict | None:
        stored = self._by_message_id(message_id)
        repeat = self.p.log.repeat(message_id)
        discards = self.p.log.discards(message_id=message_id, limit=20)
        if not stored and not discards:
            return None
        answer: dict = {"messageId": message_id}
        if stored:
            # The newest copy is the one deduplication holds on to now; a messageId is stored
            # again only once the window has passed since the copy before.
            newest = stored[-1]
            answer["status"] = "deduplicated" if repeat else "stored"
            answer["stored"] = {"receivedAt": format_ts(newest.received_at),
                                "sourceId": newest.source, "position": newest.position,
                                "type": newest.type, "copies": len(stored)}
            if repeat:
                # Repeats count against the copy at repeat[0] (kept by position).
                held = next((e for e in stored if e.position == repeat[0]), newest)
                answer["deduplicated"] = {"firstSeenAt": format_ts(held.received_at),
                                          "repeats": repeat[1],
                                          "lastRepeatAt": format_ts(repeat[3])}
        else:
            answer["status"] = "discarded"
        if discards:
            answer["discards"] = [_discard(d) for d in discards]
        return answer

    async def discards(self, request: Request) -> Response:
        q = request.query_params
        limit = int_param(q, "limit", 100, 1, MAX_LIMIT)
        rows = await run_in_threadpool(self.p.log.discards, message_id=q.get("message_id"),
                                       reason=q.get("reason"), before=cursor_param(q),
                                       limit=limit)
        nxt = str(rows[-1][0]) if len(rows) == limit else None
        return json_response({"discards": [_discard(d) for d in rows], "next": nxt})

    async def sources(self, request: Request) -> Response:
        return json_response({"sources": [s.public() for s in self.p.registry.by_id.values()]})

    # -- observability (no token: the server binds to loopback by default) ------

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        ready, detail = await run_in_threadpool(self.p.readiness)
        body = {"ready": ready, "log": detail, "head": self.p.log.head(),
                "consumers": self.p.consumers.describe()}
        return json_response(body, 200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        # In a thread: the scrape reads deliveries.db, and readiness may probe the disk.
        body = await run_in_threadpool(metrics.exposition)
        return Response(body, media_type="text/plain; version=0.0.4")


def _message(entry) -> dict:
    return msgspec.json.decode(entry.body)


def _discard(row) -> dict:
    return {"id": row[0], "receivedAt": format_ts(row[1]), "sourceId": row[2],
            "messageId": row[3], "reason": row[4], "message": row[5], "payload": row[6]}


def _matches(entry, filters: dict) -> bool:
    checks = {"type": entry.type, "event": entry.event, "user_id": entry.user_id,
              "anonymous_id": entry.anonymous_id, "source": entry.source}
    for name, value in filters.items():
        if name == "since" and entry.received_at < value:
            return False
        if name == "until" and entry.received_at >= value:
            return False
        if name in checks and checks[name] != value:
            return False
    return True


async def _http_error(request: Request, exc: HTTPException) -> Response:
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"There is no route {request.url.path}; see README.md#admin-and-query-api.",
               405: f"{request.method} is not allowed on {request.url.path}."}
    return error(exc.status_code, codes.get(exc.status_code, "http_error"),
                 message.get(exc.status_code, str(exc.detail)))


async def _internal_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, sqlite3.Error):  # a locked, full or damaged file: not a bug here
        response = error(503, "store_unavailable", f"trackpipe could not read its data"
                         f" ({type(exc).__name__}: {exc}); try again later, and see the"
                         " server log.")
        response.headers["retry-after"] = "5"
        return response
    return error(500, "internal_error", "trackpipe failed to answer this request; the server "
                 "log has the details.")


ESCAPED_SLASHES = "trackpipe.escaped_slashes"


class _EncodedSlashes:
    """An id may hold a slash (userId "team/merges", a messageId "a/deliveries"). Sent as
    %2F it belongs to its segment, but the server decodes the path before routing, and
    /profiles/team%2Fmerges would be team's merges. So when the raw path holds a %2F,
    routing sees each segment with its "%" and "/" escaped again, and the guarded
    routes unescape their parameters."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        raw = scope.get("raw_path") if scope["type"] == "http" else None
        if raw and b"%2f" in raw.lower():
            segments = raw.split(b"?", 1)[0].decode("latin-1").split("/")
            path = "/".join(unquote(s).replace("%", "%25").replace("/", "%2F") for s in segments)
            scope = {**scope, "path": path, ESCAPED_SLASHES: True}
        await self.app(scope, receive, send)


def build(pipeline) -> Starlette:
    app = Starlette(routes=AdminAPI(pipeline).routes(), middleware=[Middleware(_EncodedSlashes)],
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    # A path with a slash too many is a 404 in JSON like any unknown path, not Starlette's
    # bodiless 307 to the path without it.
    app.router.redirect_slashes = False
    return app
