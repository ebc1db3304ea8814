"""Local stand-ins for Mixpanel, Amplitude and a Segment-compatible endpoint.

Each checks a request the way the vendor documents it (method, path, auth,
content type, body shape, limits), answers as the vendor does (including its
error bodies), and records what it accepted. `break_()` / `heal()` make it
fail retryably (503) or for good (the vendor's answer to bad credentials or a
bad request) for the conformance sinks. Thread-safe: the server under test
delivers from another process while a test reads.

Sources: Mixpanel Import API (docs.mixpanel.com/reference/import-events, the
400 Bad Request troubleshooting page), Engage profile-set; Amplitude HTTP V2
API (amplitude.com/docs/apis/analytics/http-v2) and its batching/retry guide;
Segment HTTP Tracking API (batch, 32 KB / 500 KB limits).
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

Answer = tuple[int, dict]  # status, JSON body


class Request:
    def __init__(self, method: str, path: str, query: dict, headers: dict, raw: bytes):
        self.method, self.path, self.query, self.headers, self.raw = (
            method, path, query, headers, raw)
        self.body = gzip.decompress(raw) if headers.get("content-encoding") == "gzip" else raw

    def basic_auth(self) -> tuple[str, str] | None:
        value = self.headers.get("authorization", "")
        if not value.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(value[6:]).decode().partition(":")
        return user, password


class MockServer:
    """A threaded HTTP server; subclasses answer in `handle`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.accepted: list[dict] = []  # what the vendor would have stored
        self.mode = "ok"                # "ok" | "retryable" | "terminal"
        self.scripted: list[tuple[int, dict, dict]] = []  # answers to give before checking
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                mock._serve(self)

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        raw = h.rfile.read(int(h.headers.get("content-length") or 0))
        headers = {k.lower(): v for k, v in h.headers.items()}
        extra: dict = {}
        try:
            req = Request(h.command, parts.path, parse_qs(parts.query), headers, raw)
            with self.lock:
                self.requests.append(req)
                if self.scripted:
                    status, body, extra = self.scripted.pop(0)
                else:
                    status, body = self.handle(req)
        except (OSError, EOFError, ValueError) as exc:  # e.g. gzip or JSON that does not parse
            status, body = 400, self.bad_body(str(exc))
        data = json.dumps(body).encode()
        h.send_response(status)
        for name, value in extra.items():
            h.send_header(name, value)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def handle(self, req: Request) -> Answer:
        raise NotImplementedError

    def answer_next(self, status: int, body: dict, headers: dict | None = None) -> None:
        """Give this answer to the next request, whatever it is (rate limits, outages)."""
        with self.lock:
            self.scripted.append((status, body, headers or {}))

    def bad_body(self, why: str) -> dict:
        return {"error": why}

    def break_(self, terminal: bool = False) -> None:
        with self.lock:
            self.mode = "terminal" if terminal else "retryable"

    def heal(self) -> None:
        with self.lock:
            self.mode = "ok"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def _json(req: Request):
    return json.loads(req.body)


# -- Mixpanel -----------------------------------------------------------------------

INSERT_ID = re.compile(r"[A-Za-z0-9-]{1,36}")
PLACEHOLDER_IDS = {"anon", "anonymous", "nil", "none", "null", "n/a", "undefined", "0", "-1",
                   "00000000-0000-0000-0000-000000000000", "<nil>", "[]", "{}", "lmy47d"}


class MixpanelMock(MockServer):
    """POST /import (strict validation, Basic auth with the project token or a service
    account + project_id) and POST /engage (token in the body, answers 200 + status)."""

    def __init__(self, token: str = "mp-token", service_account: tuple[str, str] | None = None,
                 project_id: str = "12345"):
        self.token, self.service_account, self.project_id = token, service_account, project_id
        self.profile_updates: list[dict] = []
        super().__init__()

    def handle(self, req: Request) -> Answer:
        if req.method != "POST":
            return 405, {"error": "method not allowed"}
        if req.path == "/import":
            return self._import(req)
        if req.path == "/engage":
            return self._engage(req)
        return 404, {"error": "not found"}

    def _authorized(self, req: Request) -> bool:
        auth = req.basic_auth()
        if auth == (self.token, ""):
            return True
        return (self.service_account is not None and auth == self.service_account
                and req.query.get("project_id") == [self.project_id])

    def _import(self, req: Request) -> Answer:
        if self.mode == "retryable":
            return 503, {"code": 503, "error": "service unavailable", "status": "Error"}
        if self.mode == "terminal" or not self._authorized(req):
            return 401, {"code": 401, "error": "Invalid credentials", "status": "Unauthorized"}
        if req.headers.get("content-type") not in ("application/json", "application/x-ndjson"):
            return 415, {"code": 415, "error": "unsupported content type", "status": "Error"}
        records = _json(req)
        if not isinstance(records, list) or not records:
            return 400, {"code": 400, "error": "request body must be a non-empty array",
                         "status": "Bad Request"}
        if len(records) > 2000 or len(req.body) > 10 * 1024 * 1024:
            return 413, {"code": 413, "error": "request too large", "status": "Error"}
        failed = [f for k, r in enumerate(records) for f in _import_errors(k, r)]
        bad = {f["index"] for f in failed}
        good = [r for k, r in enumerate(records) if k not in bad]
        self.accepted += good
        if failed:
            return 400, {"code": 400, "error": "some data points in the request failed validation",
                         "status": "Bad Request", "num_records_imported": len(good),
                         "failed_records": failed}
        return 200, {"code": 200, "num_records_imported": len(good), "status": "OK"}

    def _engage(self, req: Request) -> Answer:
        if self.mode == "retryable":
            return 503, {"status": 0, "error": "service unavailable"}
        if "gzip" in req.headers.get("content-encoding", ""):
            return 400, {"status": 0, "error": "gzip is not supported"}
        updates = _json(req)
        if not isinstance(updates, list) or len(updates) > 2000:
            return 200, {"status": 0, "error": "body must be an array of at most 2000 updates"}
        for u in updates:
            if self.mode == "terminal" or u.get("$token") != self.token:
                return 200, {"status": 0, "error": "Invalid token"}
            error = self._profile_error(u)
            if error:
                return 200, {"status": 0, "error": error}
        self.profile_updates += updates
        return 200, {"status": 1, "error": None}

    def _profile_error(self, update: dict) -> str | None:
        if not isinstance(update.get("$distinct_id"), str) or not isinstance(update.get("$set"),
                                                                            dict):
            return "$distinct_id and $set are required"
        return None

    def received(self) -> list[str]:
        with self.lock:
            return [r["properties"]["trackpipe_message_id"] for r in self.accepted]


def _import_errors(index: int, record) -> list[dict]:
    props = record.get("properties") if isinstance(record, dict) else None

    def error(field: str, message: str) -> dict:
        insert_id = props.get("$insert_id") if isinstance(props, dict) else None
        return {"index": index, "insert_id": insert_id, "field": field, "message": message}

    if not isinstance(props, dict):
        return [error("properties", "'properties' must be an object")]
    errors = []
    if not isinstance(record.get("event"), str) or not record["event"]:
        errors.append(error("event", "'event' must be a non-empty string"))
    t = props.get("time")
    now_ms = time.time() * 1000
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        errors.append(error("properties.time", "'properties.time' is required"))
    elif not 31536000000 <= (t if t > 1e11 else t * 1000) <= now_ms + 3600 * 1000:
        errors.append(error("properties.time", "'properties.time' is before 1971 or in the future"))
    distinct = props.get("distinct_id")
    if not isinstance(distinct, str) or distinct.lower() in PLACEHOLDER_IDS:
        errors.append(error("properties.distinct_id", "'properties.distinct_id' is invalid"))
    if not isinstance(props.get("$insert_id"), str) or not INSERT_ID.fullmatch(props["$insert_id"]):
        errors.append(error("properties.$insert_id",
                            "'properties.$insert_id' must be at most 36 alphanumeric or '-'"))
    return errors


# -- Amplitude ----------------------------------------------------------------------

class AmplitudeMock(MockServer):
    """POST /2/httpapi: {"api_key", "events", "options"?}; a 400 names the bad events'
    indexes and then nothing of the request is ingested."""

    def __init__(self, api_key: str = "amp-key"):
        self.api_key = api_key
        super().__init__()

    def handle(self, req: Request) -> Answer:
        if req.method != "POST" or req.path != "/2/httpapi":
            return 404, {"code": 404, "error": "not found"}
        if self.mode == "retryable":
            return 503, {"code": 503, "error": "service unavailable"}
        if req.headers.get("content-type", "").split(";")[0] != "application/json":
            return 400, {"code": 400, "error": "Content-Type must be application/json"}
        if len(req.body) > 1024 * 1024:
            return 413, {"code": 413, "error": "Payload too large"}
        body = _json(req)
        if not isinstance(body, dict) or "api_key" not in body:
            return 400, {"code": 400, "error": "Request missing required field",
                         "missing_field": "api_key"}
        if self.mode == "terminal" or body["api_key"] != self.api_key:
            return 400, {"code": 400, "error": f"Invalid API key: {body['api_key']}"}
        events = body.get("events")
        if not isinstance(events, list):
            return 400, {"code": 400, "error": "Request missing required field",
                         "missing_field": "events"}
        if len(events) > 2000:
            return 413, {"code": 413, "error": "Payload too large"}
        min_len = (body.get("options") or {}).get("min_id_length", 5)
        invalid, missing = _amplitude_errors(events, min_len)
        if invalid or missing:
            return 400, {"code": 400, "error": "Invalid field values on some events",
                         "events_with_invalid_fields": invalid,
                         "events_with_missing_fields": missing}
        self.accepted += events
        return 200, {"code": 200, "events_ingested": len(events),
                     "payload_size_bytes": len(req.body),
                     "server_upload_time": int(time.time() * 1000)}

    def received(self) -> list[str]:
        with self.lock:
            return [e["insert_id"] for e in self.accepted
                    if not e["insert_id"].endswith("-group")]


def _amplitude_errors(events: list, min_len: int) -> tuple[dict, dict]:
    invalid: dict[str, list[int]] = {}
    missing: dict[str, list[int]] = {}
    for k, e in enumerate(events):
        e = e if isinstance(e, dict) else {}
        if not isinstance(e.get("event_type"), str) or not e["event_type"]:
            missing.setdefault("event_type", []).append(k)
        if not e.get("user_id") and not e.get("device_id"):
            missing.setdefault("user_id", []).append(k)
        for field in ("user_id", "device_id"):
            if field in e and (not isinstance(e[field], str) or len(e[field]) < min_len):
                invalid.setdefault(field, []).append(k)
        if "time" in e and (not isinstance(e["time"], int) or isinstance(e["time"], bool)):
            invalid.setdefault("time", []).append(k)
        for field in ("event_properties", "user_properties", "groups", "group_properties"):
            if field in e and not isinstance(e[field], dict):
                invalid.setdefault(field, []).append(k)
        for field in ("revenue", "price"):
            if field in e and not isinstance(e[field], (int, float)):
                invalid.setdefault(field, []).append(k)
        if "quantity" in e and not isinstance(e["quantity"], int):
            invalid.setdefault("quantity", []).append(k)
    return invalid, missing


# -- Segment-compatible endpoint ------------------------------------------------------

SEGMENT_TYPES = {"track", "identify", "page", "screen", "group", "alias"}


class SegmentMock(MockServer):
    """POST /v1/batch with Basic <write key>: (Segment itself answers 200 to an unknown
    key and drops the data; this mock answers 401, as Customer.io's strict mode does, so
    a wrong key shows). 32 KB per event and 500 KB per request, as Segment documents."""

    def __init__(self, write_key: str = "fwd-key"):
        self.write_key = write_key
        super().__init__()

    def bad_body(self, why: str) -> dict:
        return {"success": False, "code": "invalid_json", "message": why}

    def handle(self, req: Request) -> Answer:
        if req.method != "POST" or req.path != "/v1/batch":
            return 404, {"success": False, "code": "not_found", "message": "no such route"}
        if self.mode == "retryable":
            return 503, {"success": False, "code": "unavailable", "message": "try later"}
        if req.basic_auth() != (self.write_key, ""):
            return 401, {"success": False, "code": "unauthorized", "message": "bad write key"}
        if self.mode == "terminal":
            return 400, {"success": False, "code": "bad_request", "message": "refused"}
        if len(req.body) > 500 * 1024:
            return 400, {"success": False, "code": "payload_too_large",
                         "message": "Exceed payload limit"}
        body = _json(req)
        if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
            return 400, self.bad_body("body must be {\"batch\": [...]}")
        problem = next(filter(None, map(_segment_problem, body["batch"])), None)
        if problem:
            return 400, {"success": False, "code": "invalid_event", "message": problem}
        self.accepted += body["batch"]
        return 200, {"success": True}

    def received(self) -> list[str]:
        with self.lock:
            return [e["messageId"] for e in self.accepted]


def _segment_problem(item) -> str | None:
    if not isinstance(item, dict) or item.get("type") not in SEGMENT_TYPES:
        return "each batch item needs a type"
    if len(json.dumps(item, separators=(",", ":")).encode()) > 32 * 1024:
        return "Exceed payload limit"
    if not isinstance(item.get("messageId"), str):
        return "messageId must be a string"
    if not (item.get("userId") or item.get("anonymousId")):
        return "userId or anonymousId is required"
    if "writeKey" in item or "sourceId" in item:
        return "trackpipe-only fields leaked into an item"
    return None
