"""Admin routes for delivery: destinations with their counts, per-event attempts, replays."""

from __future__ import annotations

import time

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from trackpipe.admin.common import (cursor_param, error, int_param, json_body, json_response,
                                    time_param)
from trackpipe.delivery.replay import ReplayRefused, replay
from trackpipe.delivery.routing import Router, Skipped
from trackpipe.destinations.build import masked
from trackpipe.events import format_ts


def destination_summary(pipeline, cfg) -> dict:
    """What `GET /api/v1/destinations` and `trackpipe destinations` show for one destination."""
    s = pipeline.deliveries.summary(cfg.name)
    head = pipeline.log.head()
    # One that never ran starts at the head when it does (it gets what is stored from then
    # on): nothing stored before is waiting for it.
    started = s["cursor"] is not None
    backlog = max(0, head - s["cursor"]) if cfg.enabled and started else 0
    oldest = s["oldest_retrying_received_at"]
    if backlog:
        nxt = pipeline.log.read(s["cursor"], 1)
        if nxt and (oldest is None or nxt[0].received_at < oldest):
            oldest = nxt[0].received_at
    counters = s["counters"]
    failed = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("failed:")}
    skipped = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("skipped:")}
    err = s["last_error"]
    return {
        "name": cfg.name, "type": cfg.type, "enabled": cfg.enabled, "started": started,
        "delivered": counters.get("delivered", 0),
        "pending": backlog + s["retrying"],
        "retrying": s["retrying"],
        "failed": s["failed_now"],
        "failed_total": failed,
        "retries": counters.get("retries", 0),
        "skipped": skipped,
        "oldest_pending_age_seconds":
            None if oldest is None else round(max(0.0, time.time() - oldest / 1000), 3),
        "last_error": None if err is None else {
            "at": format_ts(err["at"]), "status": err["status"], "detail": err["detail"]},
        "stopped": None if s["stopped"] is None else {
            "at": format_ts(s["stopped"]["at"]), "detail": s["stopped"]["detail"]},
        "settings": masked(cfg),
    }


class DestinationsAPI:
    def __init__(self, pipeline):
        self.p = pipeline
        self.by_name = {d.name: d for d in pipeline.settings.destinations}

    def routes(self) -> list[tuple[str, object, list[str]]]:
        return [
            ("/api/v1/destinations", self.list, ["GET"]),
            ("/api/v1/destinations/{name}", self.one, ["GET"]),
            ("/api/v1/destinations/{name}/failed", self.failed, ["GET"]),
            ("/api/v1/destinations/{name}/replay", self.replay, ["POST"]),
            ("/api/v1/events/{message_id:path}/deliveries", self.deliveries, ["GET"]),
        ]

    async def list(self, request: Request) -> Response:
        rows = await run_in_threadpool(
            lambda: [destination_summary(self.p, d) for d in self.p.settings.destinations])
        return json_response({"destinations": rows})

    async def one(self, request: Request) -> Response:
        cfg = self._cfg(request)
        if isinstance(cfg, Response):
            return cfg
        return json_response(await run_in_threadpool(destination_summary, self.p, cfg))

    async def failed(self, request: Request) -> Response:
        cfg = self._cfg(request)
        if isinstance(cfg, Response):
            return cfg
        q = request.query_params
        if set(q) - {"limit", "cursor"}:
            return error(400, "invalid_parameter", "The failed store is listed by position with"
                         " `limit` (1 to 1000) and `cursor` (the `next` of the previous page);"
                         f" got {sorted(set(q) - {'limit', 'cursor'})}.")
        limit = int_param(q, "limit", 100, 1, 1000)
        rows = await run_in_threadpool(self.p.deliveries.failed, cfg.name, limit + 1,
                                       cursor_param(q) or 0)
        page, more = rows[:limit], len(rows) > limit
        for row in page:
            row["failed_at"] = format_ts(row["failed_at"])
        return json_response({"failed": page,
                              "next": str(page[-1]["position"]) if more else None})

    async def replay(self, request: Request) -> Response:
        cfg = self._cfg(request)
        if isinstance(cfg, Response):
            return cfg
        body = await json_body(request, '{"since": "2026-11-01T00:00:00Z", "failed_only": true}')
        if isinstance(body, Response):
            return body
        if set(body) - {"since", "until", "failed_only"}:
            return error(400, "invalid_parameter", "The replay body takes `since`, `until` "
                         "(ISO-8601 or epoch ms) and `failed_only` (boolean).")
        bounds = {k: body[k] for k in ("since", "until") if body.get(k) is not None}
        if any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in bounds.values()):
            return error(400, "invalid_parameter", "`since` and `until` are ISO-8601 strings or"
                         " epoch milliseconds.")
        times = {k: time_param({k: str(v)}, k) for k, v in bounds.items()}
        failed_only = body.get("failed_only", False)
        if not isinstance(failed_only, bool):
            return error(400, "invalid_parameter", "`failed_only` must be true or false.")
        try:
            queued = await run_in_threadpool(replay, self.p.log, self.p.deliveries, cfg,
                                             failed_only=failed_only, **times, given=bounds)
        except ReplayRefused as refused:
            return error(refused.status, refused.code, refused.message)
        return json_response({"destination": cfg.name, "queued": queued})

    async def deliveries(self, request: Request) -> Response:
        message_id = request.path_params["message_id"]
        answer = await run_in_threadpool(self._deliveries, message_id)
        if answer is None:
            return error(404, "not_found", f"No stored event has messageId {message_id!r}; "
                         f"GET /api/v1/messages/{message_id}/status tells what became of it.")
        return json_response(answer)

    def _deliveries(self, message_id: str) -> dict | None:
        """Every stored copy of the message (one past the dedup window is stored again),
        oldest first; the top level repeats the newest, as before copies were listed."""
        positions = self.p.lookup.positions(message_id)
        entries = sorted((e for e in self.p.log.get(positions) if e.message_id == message_id),
                         key=lambda e: e.position)
        if not entries:
            return None
        copies = [{"position": e.position, "receivedAt": format_ts(e.received_at),
                   "deliveries": self._copy_deliveries(e)} for e in entries]
        newest = copies[-1]
        return {"messageId": message_id, "position": newest["position"],
                "deliveries": newest["deliveries"], "copies": copies}

    def _copy_deliveries(self, entry) -> list[dict]:
        """Per destination, what the records say became of this stored event. Only with no
        record at all (it was stored before the destination was added), or a batch row
        from before trackpipe recorded what its reads skipped, does routing say."""
        out = []
        for cfg in self.p.settings.destinations:
            def routed_away(cfg=cfg) -> str | None:
                routed = Router(cfg).route(msgspec.json.decode(entry.body))
                return routed.reason if isinstance(routed, Skipped) else None

            state, tries = self.p.deliveries.history(cfg.name, entry.position, routed_away)
            for t in tries:
                t["at"] = format_ts(t["at"])
            if state is None:
                reason = routed_away()
                state = (f"skipped ({reason})" if reason is not None
                         else "not sent (stored before the destination was added)")
            out.append({"destination": cfg.name, "type": cfg.type, "state": state,
                        "attempts": tries})
        return out

    def _cfg(self, request: Request):
        name = request.path_params["name"]
        cfg = self.by_name.get(name)
        if cfg is None:
            known = ", ".join(self.by_name) or "none configured"
            return error(404, "not_found", f"No destination is named {name!r} (known: {known}).")
        return cfg
